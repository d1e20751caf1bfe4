"""``pvemu run``: the main comparison. Starts a hypervisor process, then one
guest process per mode (real processes over the real socket; ``native`` in
its own process with no hypervisor), and prints what each mode cost."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pvemu.guest.modes import MODE_NAMES, SAFE_MODES, UNSAFE_MODES
from pvemu.scripts.argtypes import mode_list, output_file, positive_int
from pvemu.scripts.procs import HypervisorStartError, maybe_hypervisor

DEFAULT_MODES = SAFE_MODES

EPILOG = f"""\
Each mode runs the canonical workload (populate, mprotect RO, mprotect RW) in
its own guest process. The table shows, per phase, the traps the hypervisor
counted, traps per PTE, the hypercalls, multicall entries, mmu_update
records, emulated page-table writes (ptwr), page faults and TLB-flush ops,
and the wall time. 'valid' says guest- and hypervisor-side counts agreed and
audit() was clean; the exit status is 1 if any run was not valid.

modes: {", ".join(MODE_NAMES)} (naive is UNSAFE: it loses A/D bits by design)

--timeline FILE writes one Chrome trace-event JSON file for the whole run:
every trap the hypervisor counted (a span per trap on its domain's vCPU
track), each trap's round trip as the guest saw it, and the workload's
phases. Open it in ui.perfetto.dev or chrome://tracing (docs/timeline.md).

examples:
  pvemu run
  pvemu run --pages 512 --modes xen,batched --json | jq .results[].phases
  pvemu run --pages 600 --modes trap,batched --timeline run.json
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--pages", type=positive_int, default=4096, help="region size (default 4096)"
    )
    parser.add_argument(
        "--modes",
        type=mode_list,
        default=DEFAULT_MODES,
        help=f"comma-separated modes (default {','.join(DEFAULT_MODES)})",
    )
    parser.add_argument("--vcpus", type=positive_int, default=2, help="vCPUs per guest (default 2)")
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
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")


def _run_guest(
    mode: str, socket_path: str, pages: int, vcpus: int, timeline: Path | None
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pvemu.scripts", "guest", "--mode", mode, "--pages", str(pages)]
    cmd += ["--vcpus", str(vcpus), "--json"]
    if mode != "native":
        cmd += ["--socket", socket_path]
    if timeline is not None:
        cmd += ["--timeline", str(timeline)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 3) or not done.stdout.strip():
        error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {
            "mode": mode,
            "unsafe": mode in UNSAFE_MODES,
            "error": error,
            "counts_agree": False,
            "audit_clean": False,
            "phases": {},
        }
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _merge_timelines(parts: list[Path], out: str) -> None:
    """The run's one timeline, from the hypervisor's and each guest's files."""
    from pvemu.shared import timeline

    documents = [timeline.load(p) for p in parts if p.stat().st_size]
    Path(out).write_text(json.dumps(timeline.merge(documents), separators=(",", ":")) + "\n")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from pvemu.scripts.guest_cmd import memory_for

    pages: int = args.pages
    results: list[dict[str, Any]] = []
    needs_hypervisor = any(m != "native" for m in args.modes)
    memory = memory_for(pages) * 2 + 64
    start_one = needs_hypervisor and args.socket is None
    try:
        with tempfile.TemporaryDirectory(prefix="pvemu-run-", dir="/tmp") as tmp:
            timelines = Path(tmp)  # one file per process, merged once they are done
            extra = ["--timeline", str(timelines / "hypervisor.json")] if args.timeline else []
            with (
                maybe_hypervisor(start_one, Path(tmp), memory, extra=extra) as hv,
                Progress(console=Console(stderr=True), transient=True) as progress,
            ):
                socket_path = hv.socket_path if hv is not None else args.socket or ""
                task = progress.add_task("running", total=len(args.modes))
                for mode in args.modes:
                    progress.update(task, description=f"mode {mode}")
                    guest_timeline = timelines / f"guest-{mode}.json" if args.timeline else None
                    results.append(_run_guest(mode, socket_path, pages, args.vcpus, guest_timeline))
                    progress.advance(task)
            if args.timeline:  # the hypervisor has exited: its file is complete
                _merge_timelines(sorted(timelines.glob("*.json")), args.timeline)
    except HypervisorStartError as exc:
        print(f"pvemu run: {exc}", file=sys.stderr)
        return 1
    valid = all(r["counts_agree"] and r["audit_clean"] for r in results)
    if args.json:
        print(json.dumps({"schema": 1, "pages": pages, "results": results}))
    else:
        from pvemu.scripts.report import print_table

        print_table(pages, results)
        if not valid:
            print("some runs were NOT valid (see the 'valid' column)", file=sys.stderr)
    return 0 if valid else 1
