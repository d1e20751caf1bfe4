"""``pvemu trace``: record a real program's memory syscalls with strace, show
a recorded trace, and replay it in guest kernels (``docs/traces.md``)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvemu.scripts import checks
from pvemu.scripts.argtypes import mode_list, output_file, positive_int
from pvemu.scripts.errors import UserError
from pvemu.scripts.procs import child_error, maybe_hypervisor
from pvemu.scripts.report import Tabular, add_format_options, output_format

if TYPE_CHECKING:
    from pvemu.scripts.progress import Progress

HELP = "record a real program's memory syscalls (strace) and replay them in the guest"

DESCRIPTION = """\
Real programs as workloads. 'record' runs a command under strace, following
threads and child processes, and keeps their mmap, mprotect, munmap, mremap,
brk and discarding madvise calls with the process tree (fork, vfork, execve,
exit_group) as a normalised JSON trace (schema 2; schema-1 traces still
load). 'show' summarises a trace. 'replay' runs it in one guest per mode,
like 'pvemu run' does for the mprotect workload, and prints what each phase
cost; the same replay is 'pvemu guest --workload trace:FILE' and 'pvemu
bench --workload trace:FILE'.

Replay policy (docs/traces.md): every range keeps the program's own address
when it is free in the guest, else the guest places it and later calls are
translated; pages are populated by writing (or reading, for read-only memory)
the first 64 pages of every range that becomes accessible (an mmap, brk or
mremap growth, an mprotect from PROT_NONE), at most 2048 pages at once. Each
process runs as a guest process: forks, execs and exits are the kernel's,
and after a fork each side writes 8 of its pages when it next runs
(copy-on-write faults)."""

EPILOG = """\
examples:
  pvemu trace record -o node.json -- node -e "console.log(1)"
  pvemu trace show benchmarks/traces/python-json.json
  pvemu trace replay benchmarks/traces/node-alloc.json --modes trap,batched
  pvemu guest --mode xen --workload trace:node.json   # against 'pvemu hypervisor'
"""

#: The syscalls recorded: memory, plus the process tree (what tells threads
#: from processes, what replaces an address space and what ends one).
STRACE_FILTER = "trace=%memory,clone,clone3,fork,vfork,execve,exit_group"
STRACE_FLAGS = ("-f", "-qq", "-y", "-e", STRACE_FILTER)
#: What 'replay' compares by default: bare metal, the unbatched worst case,
#: Linux's multicall batching and pvemu's headline mode.
DEFAULT_MODES = ("native", "trap", "xen", "batched")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="trace_command", metavar="ACTION", required=True)

    record = sub.add_parser(
        "record",
        help="run a command under strace and save its normalised trace",
        description="Run CMD under strace -f (memory syscalls, and fork/clone/vfork/"
        "execve/exit_group for the process tree) and save the normalised trace to FILE.",
        epilog="example:\n  pvemu trace record -o py.json -- python3 -c 'import json'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    record.add_argument(
        "-o", "--output", type=output_file, required=True, metavar="FILE", help="trace to write"
    )
    record.add_argument("--strace", default="strace", metavar="PATH", help="strace binary")
    record.add_argument(
        "--raw",
        type=output_file,
        metavar="FILE",
        help="also keep strace's own output in FILE (for debugging)",
    )
    record.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...", help="the program")
    record.set_defaults(trace_run=_record)

    show = sub.add_parser(
        "show",
        help="summarise a trace: event counts, pages mapped and protected",
        description="Summarise a trace file: its command, event counts per syscall, "
        "pages mapped/protected/unmapped, and what the parser skipped.",
    )
    show.add_argument("file", metavar="FILE")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(trace_run=_show)

    replay = sub.add_parser(
        "replay",
        help="replay a trace in one guest process per mode and compare",
        description="Replay FILE in one guest process per mode (a hypervisor process "
        "is started unless --socket names one) and print the traps of every phase.",
        epilog="phases: mmap, mprotect, munmap, mremap, brk, madvise, mlock (the syscalls) and "
        "touch (the user accesses that populate pages); a trace of processes adds fork, "
        "cow (the writes after a fork), context_switch, exec and exit.",
    )
    replay.add_argument("file", metavar="FILE")
    replay.add_argument(
        "--modes",
        type=mode_list,
        default=DEFAULT_MODES,
        help=f"comma-separated pv-ops modes (default {','.join(DEFAULT_MODES)})",
    )
    replay.add_argument(
        "--socket",
        metavar="PATH",
        help="connect to the hypervisor running there instead of starting one",
    )
    replay.add_argument(
        "--memory-mib",
        type=positive_int,
        default=64,
        metavar="N",
        help=f"each guest's memory in MiB (default 64, at most {checks.MAX_DOMAIN_MIB}); "
        "the hypervisor started gets twice that plus 64",
    )
    add_format_options(replay)
    replay.set_defaults(trace_run=_replay)


def run(args: argparse.Namespace) -> int:
    status: int = args.trace_run(args)
    return status


# --- record -------------------------------------------------------------------------


def strace_version(strace: str) -> str:
    done = subprocess.run([strace, "-V"], capture_output=True, text=True, check=False)
    first = (done.stdout.splitlines() or ["strace"])[0]
    return first.replace("-- version", "").replace("  ", " ").strip()


def _run_strace(cmd: list[str]) -> int:
    """strace's exit status (the traced command's). Interrupted, the traced
    command and strace are stopped before the interrupt goes on."""
    from pvemu.scripts.procs import die_with_parent, stop_tree

    with subprocess.Popen(cmd, preexec_fn=die_with_parent) as proc:
        try:
            return proc.wait()
        except BaseException:
            stop_tree(proc)
            raise


def check_record(args: argparse.Namespace) -> tuple[list[str], str]:
    """The command to trace and the strace binary to trace it with, both
    found before anything runs: a missing program is no empty trace."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UserError("no command given (put it after --)")
    checks.check_program(cmd[0])
    try:
        strace = checks.check_program(args.strace, "strace binary")
    except UserError as exc:
        raise UserError(f"{exc.message}; install strace or give --strace PATH") from None
    return cmd, strace


def _record(args: argparse.Namespace) -> int:
    from pvemu.scripts.strace import parse_strace
    from pvemu.shared.trace import save_trace

    cmd, strace = check_record(args)
    recorded_with = f"{strace_version(strace)} {' '.join(STRACE_FLAGS)}"
    with tempfile.TemporaryDirectory(prefix="pvemu-trace-") as tmp:
        raw_path = os.path.join(tmp, "strace.txt")
        returncode = _run_strace([strace, *STRACE_FLAGS, "-o", raw_path, "--", *cmd])
        if not os.path.exists(raw_path):
            print(f"pvemu trace record: strace failed (exit {returncode})", file=sys.stderr)
            return 1
        with open(raw_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if args.raw:
            shutil.copyfile(raw_path, args.raw)
    trace = parse_strace(text, command=cmd, recorded_with=recorded_with)
    if not trace.events:
        print("pvemu trace record: strace saw no memory syscalls", file=sys.stderr)
        return 1
    save_trace(trace, args.output)
    print(f"wrote {args.output}")
    print_summary(trace.summary(), sys.stdout)
    if returncode != 0:
        print(
            f"pvemu trace record: the command exited with status {returncode} (trace saved anyway)",
            file=sys.stderr,
        )
        return 1
    return 0


# --- show -------------------------------------------------------------------------------


def print_summary(summary: dict[str, Any], out: Any) -> None:
    by_op = ", ".join(f"{op} {n}" for op, n in summary["by_op"].items())
    print(f"command:       {shlex.join(summary['command'])}", file=out)
    print(f"recorded with: {summary['recorded_with']}", file=out)
    print(f"events:        {summary['events']} ({by_op})", file=out)
    if summary.get("trace_schema", 1) >= 2:
        by_op = summary["by_op"]
        print(
            f"processes:     {summary['processes']} ({by_op['fork']} fork, {by_op['vfork']} "
            f"vfork, {by_op['exec']} exec, {by_op['exit']} exit)",
            file=out,
        )
    print(f"threads:       {summary['threads']}", file=out)
    print(
        f"pages:         {summary['pages_mapped']} mapped, {summary['pages_protected']} "
        f"mprotected, {summary['pages_unmapped']} unmapped, {summary['pages_discarded']} "
        f"discarded, {summary['brk_pages_grown']} grown by brk",
        file=out,
    )
    if summary["mprotect_to"]:
        prots = ", ".join(f"{p} {n}" for p, n in summary["mprotect_to"].items())
        print(f"mprotect to:   {prots}", file=out)
    parser = summary["parser"]
    if parser:
        print(f"parser:        {', '.join(f'{k} {v}' for k, v in parser.items())}", file=out)


def _show(args: argparse.Namespace) -> int:
    from pvemu.shared.trace import TraceError, load_trace

    try:
        trace = load_trace(args.file)
    except (OSError, TraceError) as exc:
        print(f"pvemu trace show: {exc}", file=sys.stderr)
        return 1
    summary = trace.summary()
    if args.json:
        from pvemu.scripts.bench.documents import TRACE_SHOW_SCHEMA
        from pvemu.scripts.bench.provenance import document

        body = {"file": args.file, **summary}
        print(json.dumps(document(TRACE_SHOW_SCHEMA, {"file": args.file}, body)))
    else:
        print(f"trace:         {args.file}")
        print_summary(summary, sys.stdout)
    return 0


# --- replay ------------------------------------------------------------------------------


def replay_steps() -> int:
    """Steps one mode's replay reports: boot, the events' steps, verify."""
    from pvemu.guest.replay import PROGRESS_STEPS

    return 1 + PROGRESS_STEPS + 1


def _replay_mode(
    mode: str,
    path: str,
    socket_path: str,
    memory_mib: int,
    progress: Progress,
    label: str,
    tmpdir: Path | None = None,
) -> dict[str, Any]:
    """One mode's replay in its own guest; its reports move ``progress``
    (:func:`replay_steps` steps); its temporary files go in ``tmpdir``."""
    from pvemu.scripts.progress import run_counted

    progress.update(advance=1, description=f"{label}: boot")
    cmd = [sys.executable, "-m", "pvemu.scripts", "guest", "--mode", mode, "--json"]
    cmd += ["--workload", f"trace:{path}", "--memory-mib", str(memory_mib)]
    if mode != "native":
        cmd += ["--socket", socket_path]
    done = run_counted(cmd, progress, label, replay_steps(), tmpdir, already=1)
    if done.returncode not in (0, 3) or not done.stdout.strip():
        error = child_error(done.stderr, done.returncode)
        return {"mode": mode, "error": error, "counts_agree": False, "audit_clean": False}
    from pvemu.scripts.bench.provenance import without_metadata

    return without_metadata(json.loads(done.stdout))


def _valid(result: dict[str, Any]) -> bool:
    trace = result.get("trace", {})
    return bool(result["counts_agree"] and result["audit_clean"] and trace.get("replay_clean"))


def hypervisor_memory(guest_mib: int) -> int:
    """What ``trace replay`` gives the hypervisor it starts."""
    return guest_mib * 2 + checks.HEADROOM_MIB


def check_replay(args: argparse.Namespace, host_mib: int) -> None:
    """Each guest is one domain, and the hypervisor one this host can emulate."""
    checks.check_modes(args.modes)
    checks.check_guest_memory(args.memory_mib)
    if any(m != "native" for m in args.modes) and not args.socket:
        limit = checks.max_machine_mib(host_mib)
        if hypervisor_memory(args.memory_mib) > limit:
            raise UserError(
                f"--memory-mib {args.memory_mib:,}: the hypervisor would need "
                f"{hypervisor_memory(args.memory_mib):,} MiB, more than this host can emulate "
                f"({limit:,})"
            )


def _replay(args: argparse.Namespace) -> int:
    from pvemu.scripts.progress import Progress
    from pvemu.shared.trace import TraceError, load_trace

    check_replay(args, checks.host_memory_mib())
    try:
        load_trace(args.file)  # fail early, with a clear message
    except (OSError, TraceError) as exc:
        print(f"pvemu trace replay: {exc}", file=sys.stderr)
        return 1
    path = os.path.abspath(args.file)
    results: list[dict[str, Any]] = []
    needs_hypervisor = any(m != "native" for m in args.modes) and not args.socket
    with (
        tempfile.TemporaryDirectory(prefix="pvemu-trace-") as tmp,
        maybe_hypervisor(needs_hypervisor, Path(tmp), hypervisor_memory(args.memory_mib)) as hv,
        Progress("pvemu trace replay", len(args.modes) * replay_steps()) as progress,
    ):
        socket_path = hv.socket_path if hv is not None else (args.socket or "")
        for n, mode in enumerate(args.modes):
            label = f"mode {mode} ({n + 1}/{len(args.modes)})"
            results.append(
                _replay_mode(mode, path, socket_path, args.memory_mib, progress, label, Path(tmp))
            )
    valid = all(_valid(r) for r in results)
    fmt = output_format(args)
    if fmt == "json":
        from pvemu.scripts.bench.documents import TRACE_REPLAY_SCHEMA
        from pvemu.scripts.bench.provenance import document

        config = {"file": args.file, "modes": list(args.modes), "memory_mib": args.memory_mib}
        body = {"file": args.file, "valid": valid, "results": results}
        print(json.dumps(document(TRACE_REPLAY_SCHEMA, config, body)))
    else:
        print_replay_table(args.file, results, fmt, wide=args.wide)
        if not valid:
            print("some replays were NOT valid (see the 'ok' column)", file=sys.stderr)
    return 0 if valid else 1


def replay_tabular(name: str, results: list[dict[str, Any]]) -> Tabular:
    """The replay table: one row per mode and phase that cost anything."""
    from pvemu.scripts.report import HEADERS, headline, mode_entries
    from pvemu.shared.counts import PHASE_FIELDS

    tab = Tabular(
        title=f"trace {name} (traps per phase; lower is better)",
        header=["mode", "phase", *(HEADERS[f] for f in PHASE_FIELDS), "ms", "ok"],
        csv_header=["mode", "phase", *PHASE_FIELDS, "wall_ms", "ok"],
        left=frozenset({"ok"}),
        blank_repeats=frozenset({"mode", "ok"}),
        priority=("traps", "ms", "ok"),
    )
    for result in results:
        if "error" in result:
            tab.rows.append([result["mode"], "-", *["-"] * (len(PHASE_FIELDS) + 1), "FAILED"])
            continue
        phases = {k: v for k, v in result["phases"].items() if any(v[f] for f in PHASE_FIELDS)}
        trace = result.get("trace", {})
        ok = "yes" if _valid(result) else f"NO ({trace.get('errors', '?')} errors)"
        for phase, counts in phases.items():
            tab.rows.append(
                [
                    result["mode"],
                    phase,
                    *(str(counts[f]) for f in PHASE_FIELDS),
                    f"{counts['wall_s'] * 1000:.1f}",
                    ok,
                ]
            )
        if not phases:
            tab.rows.append([result["mode"], "(all)", *["0"] * len(PHASE_FIELDS), "-", ok])
        if trace.get("processes"):
            tab.notes.append(f"{result['mode']}: {process_note(trace['processes'])}")
    tab.headline = headline(mode_entries(results, None), "the whole replay (every phase)")
    return tab


def process_note(counts: dict[str, int]) -> str:
    """One line of a replay's process counts (``TraceResult.processes``)."""
    names = {
        "forks": "fork",
        "vforks": "vfork",
        "execs": "exec",
        "exits": "exit",
        "context_switches": "context switch",
        "cow_copies": "COW copy",
        "cow_reuses": "COW reuse",
    }
    return ", ".join(f"{counts.get(key, 0)} {name}" for key, name in names.items())


def print_replay_table(
    name: str, results: list[dict[str, Any]], fmt: str = "table", *, wide: bool = False
) -> None:
    from pvemu.scripts.report import print_tabular

    print_tabular(replay_tabular(name, results), fmt, wide=wide)
