"""``pvemu hypervisor``: serve the hypervisor on a Unix socket until signalled."""

from __future__ import annotations

import argparse
import gc
import os
from typing import TYPE_CHECKING, Final

from pvemu.scripts.argtypes import output_file, positive_float, positive_int
from pvemu.scripts.error_path import leaves
from pvemu.scripts.errors import EXIT_USAGE, UserError

if TYPE_CHECKING:
    from pvemu.hypervisor.server import ServerLimits
    from pvemu.shared.timeline import Timeline

DEFAULT_SOCKET = "/tmp/pvemu.sock"

EPILOG = """\
The process prints one line 'pvemu-hypervisor ready socket=PATH pid=PID' on
stdout once it accepts connections. The console is quiet otherwise: only
warnings and errors reach stderr. The record of what happened in time is
--timeline FILE (every trap as a span per domain and vCPU, for ui.perfetto.dev
or chrome://tracing; see docs/timeline.md) and --log-file FILE (one JSON line
per hypercall, domain and vCPU event). Both files are complete once the
hypervisor exits. SIGINT or SIGTERM destroys every domain, writes the
timeline, removes the socket file and exits 0 (the normal way to stop it).

Errors are one line on stderr: a socket path that is too long (over 107
bytes), in a missing folder or already served by a hypervisor exits 2.

Limits bound what any guest can make the hypervisor hold or do; going over one
is answered with a typed error and never affects other domains (see
docs/robustness.md). The process makes itself non-dumpable so that other
processes of the same user cannot open its descriptors (every domain's
memory) through /proc, and raises its open-file limit to the hard limit.

examples:
  pvemu hypervisor --socket /tmp/hv.sock --memory-mib 512 --quantum 64
  pvemu hypervisor --timeline hv-trace.json --log-file hv.log
"""


def batch_size(text: str) -> int:
    """An argparse type: a batch limit within the wire's ceiling."""
    from pvemu.shared.wire import MAX_MMU_UPDATES

    value = positive_int(text)
    if value > MAX_MMU_UPDATES:
        raise argparse.ArgumentTypeError(f"at most {MAX_MMU_UPDATES} (the wire's ceiling)")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    from pvemu.hypervisor.server import ServerLimits

    defaults = ServerLimits()
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _add_machine_options(parser)
    _add_limit_options(parser, defaults)
    _add_scheduling_options(parser, defaults)
    _add_logging_options(parser)


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    """Where the hypervisor listens and how much memory it has."""
    parser.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"Unix socket to listen on; a stale file is removed (default {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--memory-mib",
        type=positive_int,
        default=1024,
        metavar="N",
        help="machine memory shared by all domains, in MiB (default 1024; at most what this "
        "host's RAM can hold the frame table of: 40 bytes a 4 KiB frame)",
    )


def _add_limit_options(parser: argparse.ArgumentParser, defaults: ServerLimits) -> None:
    """What a guest can make the hypervisor hold or wait for."""
    parser.add_argument(
        "--max-domains",
        type=positive_int,
        default=defaults.max_domains,
        metavar="N",
        help=f"refuse a hello beyond this many live domains (default {defaults.max_domains})",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=defaults.max_connections,
        metavar="N",
        help="open connections; one more gets a 'not_supported' error and is closed "
        f"(default {defaults.max_connections})",
    )
    parser.add_argument(
        "--max-batch",
        type=batch_size,
        default=defaults.max_batch,
        metavar="N",
        help="records in one mmu_update, at most 1048576; more is answered 'too_large'. "
        "Also sets the largest request: max(4 MiB, 16 x N + 64 KiB) "
        f"(default {defaults.max_batch})",
    )
    parser.add_argument(
        "--handshake-timeout",
        type=positive_float,
        default=defaults.handshake_timeout,
        metavar="SECONDS",
        help="close a connection that sends no hello/join for this long "
        f"(default {defaults.handshake_timeout:g})",
    )
    parser.add_argument(
        "--send-timeout",
        type=positive_float,
        default=defaults.send_timeout,
        metavar="SECONDS",
        help="drop a connection whose guest leaves a reply unread this long "
        f"(default {defaults.send_timeout:g})",
    )


def _add_scheduling_options(parser: argparse.ArgumentParser, defaults: ServerLimits) -> None:
    """How domains share the hypervisor, and where their frames land."""
    from pvemu.hypervisor.scheduler import POLICIES

    parser.add_argument(
        "--quantum",
        type=positive_int,
        default=defaults.quantum,
        metavar="K",
        help="entries processed before a long hypercall yields to other domains "
        f"(default {defaults.quantum})",
    )
    parser.add_argument(
        "--scheduler",
        choices=tuple(POLICIES),
        default=defaults.scheduler,
        help="which waiting vCPU runs the next slice: 'fair' (least hypervisor time first, "
        "a waking vCPU ahead of busy ones, as Xen's boost) or 'fifo' (arrival order) "
        f"(default {defaults.scheduler})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the MFN shuffle that scatters each domain's frames (default 0)",
    )


def _add_logging_options(parser: argparse.ArgumentParser) -> None:
    """Where the record of what happened goes: the console stays quiet."""
    parser.add_argument(
        "--timeline",
        metavar="FILE",
        type=output_file,
        help="record every trap and page fault as Chrome trace-event JSON, written on exit "
        "(open it in ui.perfetto.dev or chrome://tracing)",
    )
    parser.add_argument(
        "--log-file",
        metavar="FILE",
        type=output_file,
        help="write every log line there (one per hypercall at level info); the console "
        "then gets warnings and errors only",
    )
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=None,
        help="log renderer (default: json in a log file or off a terminal, console otherwise)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning"),
        default=None,
        help="'info' logs one line per hypercall; 'warning' only problems "
        "(default: info with --log-file, warning otherwise)",
    )


def run(args: argparse.Namespace) -> int:
    import contextlib

    from pvemu.scripts import checks

    checks.check_machine_memory(args.memory_mib, checks.host_memory_mib())
    from pvemu.shared.logs import configure_logging
    from pvemu.shared.timeline import Timeline

    with contextlib.ExitStack() as files:
        try:
            log_file = None
            if args.log_file:
                log_file = files.enter_context(open(args.log_file, "w", buffering=1))
            if args.timeline:
                open(args.timeline, "w").close()  # fail now, not after the run
        except OSError as exc:
            raise UserError(f"cannot write {exc.filename}: {exc.strerror}") from exc
        level = args.log_level or ("info" if log_file else "warning")
        configure_logging(args.log_format or "auto", level, file=log_file)
        timeline = Timeline() if args.timeline else None
        try:
            return _serve(args, timeline)
        finally:
            if timeline is not None:
                timeline.write(args.timeline)


def _serve(args: argparse.Namespace, timeline: Timeline | None) -> int:
    import trio

    from pvemu.hypervisor import Hypervisor
    from pvemu.hypervisor.server import ServerError, ServerLimits, run_server

    check_socket_path(args.socket)
    harden_process()
    limits = ServerLimits(
        quantum=args.quantum,
        max_domains=args.max_domains,
        max_connections=args.max_connections,
        max_batch=args.max_batch,
        handshake_timeout=args.handshake_timeout,
        send_timeout=args.send_timeout,
        scheduler=args.scheduler,
    )
    hv = Hypervisor(args.memory_mib, seed=args.seed)
    # Everything alive now (modules, the machine's free list) lives as long as
    # the process: keep it out of the cyclic GC, whose full passes over it
    # cost ~10 ms, a pause every guest would see as trap latency.
    gc.freeze()
    ready = f"pvemu-hypervisor ready socket={args.socket} pid={os.getpid()}"
    try:
        trio.run(
            lambda: run_server(args.socket, hv, limits, ready_line=(ready,), timeline=timeline)
        )
    except BaseException as exc:
        failures = leaves(exc)
        # trio wraps a task's error in a group: the user reads the server's own message.
        if failures and all(isinstance(f, ServerError) for f in failures):
            raise UserError(f"{failures[0]}", EXIT_USAGE) from exc
        raise
    return 0


#: The longest path a Unix socket can be bound to (sun_path less its NUL).
MAX_SOCKET_PATH: Final = 107


def check_socket_path(path: str) -> None:
    """Refuse a socket path that cannot be served, before any memory is
    reserved: too long for ``AF_UNIX``, in a missing folder, or served by a
    running hypervisor already."""
    from pvemu.hypervisor.server import ServerError, prepare_socket_path

    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise UserError(
            f"--socket {path} is {size} bytes long; a Unix socket path holds at most "
            f"{MAX_SOCKET_PATH}: choose a shorter one"
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--socket {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--socket {path}: cannot create a socket in {folder} (permission denied)")
    try:
        prepare_socket_path(path)
    except ServerError as exc:
        raise UserError(f"{exc}: stop that hypervisor or choose another --socket") from exc


def harden_process() -> None:
    """Non-dumpable: /proc/PID/fd and ptrace are closed to same-user processes
    (root keeps CAP_SYS_PTRACE). More descriptors: one per connection."""
    import ctypes
    import resource

    pr_set_dumpable = 4
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_dumpable, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
