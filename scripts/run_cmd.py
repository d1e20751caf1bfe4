"""``pvemu run``: the main comparison. Starts a hypervisor process, then one
guest process per mode (real processes over the real socket; ``native`` in
its own process with no hypervisor), and prints what each mode cost."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvemu.guest.modes import MODE_NAMES, SAFE_MODES, UNSAFE_MODES
from pvemu.guest.proc_workloads import PROCESS_WORKLOADS
from pvemu.scripts import checks
from pvemu.scripts.argtypes import mode_list, output_file, positive_int
from pvemu.scripts.errors import UserError
from pvemu.scripts.procs import child_error, maybe_hypervisor
from pvemu.scripts.report import add_format_options, output_format
from pvemu.scripts.workloads import (
    DEFAULT_LOOPS,
    MPROTECT,
    RUN_WORKLOADS,
    effective_loops,
    progress_steps,
)
from pvemu.scripts.workloads import HELP as WORKLOAD_HELP

if TYPE_CHECKING:
    from pvemu.scripts.progress import Progress

DEFAULT_MODES = SAFE_MODES

EPILOG = f"""\
Each mode runs the workload (by default mprotect: populate, mprotect RO,
mprotect RW) in its own guest process. The table shows, per phase, the traps
the hypervisor counted, traps per PTE, the hypercalls, multicall entries,
mmu_update records, emulated page-table writes (ptwr), page faults and
TLB-flush ops, and the wall time. 'valid' says guest- and hypervisor-side
counts agreed and audit() was clean; the exit status is 1 if any run was not
valid.

{WORKLOAD_HELP}

modes: {", ".join(MODE_NAMES)} (naive is UNSAFE: it loses A/D bits by design)

--timeline FILE writes one Chrome trace-event JSON file for the whole run:
every trap the hypervisor counted (a span per trap on its domain's vCPU
track), each trap's round trip as the guest saw it, and the workload's
phases. Open it in ui.perfetto.dev or chrome://tracing (docs/timeline.md).

Under the table, a headline sentence compares the two mprotect phases of
the safe mode with the fewest traps against 'trap' (when it ran); for a
process workload, its fork, exec or fork + exec + exit against xen. On a
narrow terminal the table is stacked in parts that fit; --wide prints it in
one.
--json (with a metadata block: version, host, CPU, time, commit; 'pvemu
bench compare --baseline' reads it), --csv and --markdown export it.

examples:
  pvemu run
  pvemu run --pages 512 --modes xen,batched --json | jq .results[].phases
  pvemu run --pages 600 --modes trap,batched --timeline run.json
  pvemu run --csv > run.csv
  pvemu run --workload fork --pages 4096
  pvemu run --workload forkexec --loops 8 --modes xen,batched
"""


def run_workload(text: str) -> str:
    """One of the workloads ``pvemu run`` runs in every mode."""
    if text not in RUN_WORKLOADS:
        names = ", ".join(RUN_WORKLOADS)
        raise argparse.ArgumentTypeError(f"expected one of {names}, got {text!r}")
    return text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--pages",
        type=positive_int,
        default=4096,
        help=f"region size (default 4096; at most {checks.MAX_PAGES:,}, whose guest is a "
        f"16 GiB domain, or {checks.max_workload_pages('fork', checks.MAX_DOMAIN_MIB):,} for "
        "fork, whose child copies half; and within this host's RAM)",
    )
    parser.add_argument(
        "--workload",
        type=run_workload,
        default=MPROTECT,
        help=f"what each guest runs: {', '.join(RUN_WORKLOADS)} (default {MPROTECT}; phases below)",
    )
    parser.add_argument(
        "--loops",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"forkexec only: fork+exec+exit rounds (default {DEFAULT_LOOPS})",
    )
    parser.add_argument(
        "--modes",
        type=mode_list,
        default=DEFAULT_MODES,
        help=f"comma-separated modes (default {','.join(DEFAULT_MODES)})",
    )
    parser.add_argument(
        "--vcpus",
        type=positive_int,
        default=2,
        help=f"vCPUs per guest (default 2, at most {checks.MAX_VCPUS})",
    )
    parser.add_argument(
        "--memory-mib",
        type=positive_int,
        default=None,
        metavar="N",
        help="the hypervisor's machine memory in MiB (default: twice the guest's, "
        "plus 64; at least the guest's, one more MiB for Xen's frame)",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="connect to the hypervisor running there instead of starting one "
        "(default: start a private one in a temporary folder)",
    )
    parser.add_argument(
        "--timeline",
        metavar="FILE",
        type=output_file,
        help="write the run's traps and phases there as trace-event JSON; with --socket, "
        "only the guests' side (start that hypervisor with --timeline for its side)",
    )
    add_format_options(parser)


def _run_guest(
    mode: str,
    socket_path: str,
    args: argparse.Namespace,
    timeline: Path | None,
    progress: Progress,
    label: str,
    tmpdir: Path,
) -> dict[str, Any]:
    """One guest process; its phase reports move ``progress`` (one step per
    phase, with boot and the check). Interrupted, it stops the guest
    (SIGTERM, then SIGKILL) before going on."""
    from pvemu.scripts.progress import run_counted

    cmd = [sys.executable, "-m", "pvemu.scripts", "guest", "--mode", mode]
    cmd += ["--pages", str(args.pages), "--vcpus", str(args.vcpus), "--json"]
    cmd += ["--workload", args.workload]
    if args.loops is not None:
        cmd += ["--loops", str(args.loops)]
    if mode != "native":
        cmd += ["--socket", socket_path]
    if timeline is not None:
        cmd += ["--timeline", str(timeline)]
    done = run_counted(cmd, progress, label, progress_steps(args.workload, args.loops), tmpdir)
    if done.returncode not in (0, 3) or not done.stdout.strip():
        error = child_error(done.stderr, done.returncode)
        return {
            "mode": mode,
            "unsafe": mode in UNSAFE_MODES,
            "error": error,
            "counts_agree": False,
            "audit_clean": False,
            "phases": {},
        }
    from pvemu.scripts.bench.provenance import without_metadata

    return without_metadata(json.loads(done.stdout))


def _merge_timelines(parts: list[Path], out: str) -> None:
    """The run's one timeline, from the hypervisor's and each guest's files."""
    from pvemu.shared import timeline

    documents = [timeline.load(p) for p in parts if p.stat().st_size]
    Path(out).write_text(json.dumps(timeline.merge(documents), separators=(",", ":")) + "\n")


def hypervisor_memory(pages: int, workload: str = MPROTECT) -> int:
    """What ``run`` gives the hypervisor without ``--memory-mib``."""
    return checks.guest_memory(workload, pages) * 2 + checks.HEADROOM_MIB


def check(args: argparse.Namespace, host_mib: int) -> None:
    """Everything that would make the run fail, before anything starts."""
    checks.check_modes(args.modes)
    checks.check_loops(args.workload, args.loops)
    checks.check_pages(args.pages, host_mib, workload=args.workload)
    checks.check_vcpus(args.vcpus)
    if args.workload in PROCESS_WORKLOADS:
        checks.check_process_vcpus(args.workload, args.vcpus)
    if args.memory_mib is not None:
        checks.check_machine_memory(args.memory_mib, host_mib)
        need = checks.guest_memory(args.workload, args.pages) + 1
        checks.check_enough_memory(args.memory_mib, need, f"a {args.pages:,}-page guest and Xen")
    if args.socket is not None and args.memory_mib is not None:
        raise UserError("--memory-mib sizes the hypervisor run starts; drop it with --socket")


def run(args: argparse.Namespace) -> int:
    from pvemu.scripts.progress import Progress

    check(args, checks.host_memory_mib())
    pages: int = args.pages
    fmt = output_format(args)
    results: list[dict[str, Any]] = []
    needs_hypervisor = any(m != "native" for m in args.modes)
    memory = args.memory_mib or hypervisor_memory(pages, args.workload)
    steps = progress_steps(args.workload, args.loops)
    start_one = needs_hypervisor and args.socket is None
    # Everything this run creates is in one folder under $TMPDIR, removed on
    # the way out, also when interrupted (see scripts/error_path.py).
    with tempfile.TemporaryDirectory(prefix="pvemu-run-") as tmp:
        timelines = Path(tmp)  # one file per process, merged once they are done
        extra = ["--timeline", str(timelines / "hypervisor.json")] if args.timeline else []
        with (
            maybe_hypervisor(start_one, Path(tmp), memory, extra=extra) as hv,
            Progress("pvemu run", len(args.modes) * steps) as progress,
        ):
            socket_path = hv.socket_path if hv is not None else args.socket or ""
            for n, mode in enumerate(args.modes):
                label = f"mode {mode} ({n + 1}/{len(args.modes)})"
                progress.update(description=f"{label}: boot")
                guest_timeline = timelines / f"guest-{mode}.json" if args.timeline else None
                results.append(
                    _run_guest(mode, socket_path, args, guest_timeline, progress, label, Path(tmp))
                )
        if args.timeline:  # the hypervisor has exited: its file is complete
            _merge_timelines(sorted(timelines.glob("*.json")), args.timeline)
    valid = all(r["counts_agree"] and r["audit_clean"] for r in results)
    loops = effective_loops(args.workload, args.loops)
    if fmt == "json":
        from pvemu.scripts.bench.documents import RUN_CMD_SCHEMA
        from pvemu.scripts.bench.provenance import document

        workload = {"workload": args.workload, **({"loops": loops} if loops is not None else {})}
        config = {"pages": pages, "modes": list(args.modes), "vcpus": args.vcpus, **workload}
        body = {"pages": pages, **workload, "valid": valid, "results": results}
        print(json.dumps(document(RUN_CMD_SCHEMA, config, body)))
    else:
        from pvemu.scripts.report import print_table

        print_table(pages, results, fmt, wide=args.wide, workload=args.workload, loops=loops)
        for r in results:  # a guest that never started measured nothing: no invalid run
            if "error" in r:
                print(f"pvemu run: mode {r['mode']} did not run: {r['error']}", file=sys.stderr)
        if any("error" not in r and not (r["counts_agree"] and r["audit_clean"]) for r in results):
            print("some runs were NOT valid (see the 'ok' column)", file=sys.stderr)
    return 0 if valid else 1
