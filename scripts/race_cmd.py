"""``pvemu race``: the A/D race of the seed patch, in every mode, for real.

A hypervisor process (small preemption quantum, so user writes land between
the slices of a kernel batch) and one guest process per mode: vCPU 0 toggles a
shared file mapping RW <-> RO and writes it back while vCPUs 1..W write into
it. Reports what each mode lost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pvemu.guest.modes import MODE_NAMES, UNSAFE_MODES
from pvemu.scripts.argtypes import mode_list, positive_int
from pvemu.scripts.procs import HypervisorStartError, maybe_hypervisor

EPILOG = """\
columns: writes (stores that completed), lost dirty (D bits set by hardware
that vanished unseen), lost writes (pages whose file held less than the last
completed store after an msync), stale TLB (stores through a stale TLB entry
after the guest's flush; stores still in flight before the flush are legal
and shown in the JSON), faults and traps.

Exit status 1 if any mode other than naive lost anything. naive is UNSAFE by
design: it commits without PRESERVE_AD and is expected to lose data.

example:
  pvemu race --modes xen,naive --iterations 80 --json
"""

REPORTED = ("iterations", "writes", "lost_dirty", "lost_writes", "stale_tlb_writes", "traps")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--modes",
        type=mode_list,
        default=MODE_NAMES,
        help=f"comma-separated (default {','.join(MODE_NAMES)})",
    )
    parser.add_argument("--pages", type=positive_int, default=64, help="shared mapping size (64)")
    parser.add_argument("--writers", type=positive_int, default=2, help="user threads (default 2)")
    parser.add_argument("--iterations", type=positive_int, default=40, help="RW/RO toggles (40)")
    parser.add_argument("--seed", type=int, default=1, help="writers' random seed (default 1)")
    parser.add_argument("--quantum", type=positive_int, default=8, help="hypervisor quantum (8)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _run_mode(mode: str, socket_path: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pvemu.scripts", "guest", "--workload", "race", "--mode", mode]
    cmd += ["--pages", str(args.pages), "--writers", str(args.writers)]
    cmd += ["--iterations", str(args.iterations), "--seed", str(args.seed), "--json"]
    if mode != "native":
        cmd += ["--socket", socket_path]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 3) or not done.stdout.strip():
        error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"mode": mode, "unsafe": mode in UNSAFE_MODES, "error": error}
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _lost(result: dict[str, Any]) -> bool:
    if "error" in result:
        return True
    if not result.get("audit_clean", False) or not result.get("counts_agree", False):
        return True
    return any(result[k] for k in ("lost_dirty", "lost_writes", "stale_tlb_writes"))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    if args.writers > 14:
        print("pvemu race: at most 14 writers", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    needs_hypervisor = any(m != "native" for m in args.modes)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="pvemu-race-", dir="/tmp") as tmp,
            maybe_hypervisor(needs_hypervisor, Path(tmp), 512, quantum=args.quantum) as hv,
            Progress(console=Console(stderr=True), transient=True) as progress,
        ):
            socket_path = hv.socket_path if hv is not None else ""
            task = progress.add_task("race", total=len(args.modes))
            for mode in args.modes:
                progress.update(task, description=f"mode {mode}")
                results.append(_run_mode(mode, socket_path, args))
                progress.advance(task)
    except HypervisorStartError as exc:
        print(f"pvemu race: {exc}", file=sys.stderr)
        return 1
    failed = [r["mode"] for r in results if r["mode"] not in UNSAFE_MODES and _lost(r)]
    if args.json:
        print(json.dumps({"schema": 1, "results": results}))
    else:
        table = Table(
            title=f"A/D race: {args.pages} shared pages, {args.writers} writers, "
            f"{args.iterations} RW/RO toggles, seed {args.seed}"
        )
        headers = {"stale_tlb_writes": "stale tlb"}
        for column in ("mode", *REPORTED, "faults", "verdict"):
            name = headers.get(column, column.replace("_", " "))
            if column in ("mode", "verdict"):
                table.add_column(name)
            else:
                table.add_column(name, justify="right")
        for r in results:
            name = r["mode"] + (" (UNSAFE)" if r.get("unsafe") else "")
            if "error" in r:
                table.add_row(name, *["-"] * (len(REPORTED) + 1), f"FAILED: {r['error']}")
                continue
            lost = _lost(r)
            if not lost:
                verdict = "nothing lost"
            else:
                verdict = "expected loss" if r["mode"] in UNSAFE_MODES else "LOST DATA"
            table.add_row(name, *(str(r[k]) for k in REPORTED), str(r["page_faults"]), verdict)
        console = Console()
        if not console.is_terminal:
            console = Console(width=120)
        console.print(table)
        if failed:
            print(f"modes that must not lose anything did: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
