"""``pvemu hypervisor``: serve the hypervisor on a Unix socket until signalled."""

from __future__ import annotations

import argparse
import os
import sys

from scripts.argtypes import positive_int

DEFAULT_SOCKET = "/tmp/pvemu.sock"

EPILOG = """\
The process prints one line 'pvemu-hypervisor ready socket=PATH pid=PID' on
stdout once it accepts connections; logs go to stderr. SIGINT or SIGTERM
destroys every domain, removes the socket file and exits 0.

example:
  pvemu hypervisor --socket /tmp/hv.sock --memory-mib 512 --quantum 64
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
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
        help="machine memory shared by all domains, in MiB (default 1024)",
    )
    parser.add_argument(
        "--max-domains",
        type=positive_int,
        default=64,
        metavar="N",
        help="refuse a hello beyond this many live domains (default 64)",
    )
    parser.add_argument(
        "--quantum",
        type=positive_int,
        default=256,
        metavar="K",
        help="entries processed before a long hypercall yields to other domains (default 256)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the MFN shuffle that scatters each domain's frames (default 0)",
    )
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=None,
        help="log renderer (default: console on a terminal, json otherwise)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning"),
        default="info",
        help="'info' logs one line per hypercall; 'warning' only problems (default info)",
    )


def run(args: argparse.Namespace) -> int:
    import trio

    from hypervisor import Hypervisor
    from hypervisor.server import ServerError, run_server
    from shared.logs import configure_logging

    configure_logging(args.log_format or "auto", args.log_level)
    hv = Hypervisor(args.memory_mib, seed=args.seed)
    ready = f"pvemu-hypervisor ready socket={args.socket} pid={os.getpid()}"
    try:
        trio.run(
            lambda: run_server(
                args.socket,
                hv,
                quantum=args.quantum,
                max_domains=args.max_domains,
                ready_line=(ready,),
            )
        )
    except ServerError as exc:
        print(f"pvemu hypervisor: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
