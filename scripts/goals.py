"""Issue 12's speed goals, measured side by side in one run (``make bench-goals``).

Each goal is a ratio or a per-PTE figure taken from real processes over the
real socket, by the same commands a user runs: ``pvemu run`` (two sizes) and
the round-trip benchmark. Nothing here is asserted in the test suite; the
table says which goals this machine met in this run, and ``--json`` keeps the
raw figures. ``--quick`` shrinks every size so that the suite can check the
plumbing in seconds (its figures then say nothing about the goals).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

from pvemu.guest.modes import MODE_NAMES

SCHEMA: Final = "pvemu.goals/1"
#: Issue 12's sizes: 1 GiB and 64 MiB of 4 KiB pages.
LARGE_PAGES: Final = 262_144
SMALL_PAGES: Final = 16_384


@dataclass(frozen=True, slots=True)
class Goal:
    """One row of the table: what was measured, against which target."""

    name: str
    measured: float
    unit: str
    target: float
    #: True when smaller is better (a time), False for a ratio that must grow.
    at_most: bool
    command: str
    detail: str

    @property
    def met(self) -> bool:
        return self.measured <= self.target if self.at_most else self.measured >= self.target


def _pvemu(*args: str) -> list[str]:
    return [sys.executable, "-m", "pvemu.scripts", *args]


def _run_json(argv: list[str], what: str) -> tuple[dict[str, Any], float]:
    """Run a command that prints one JSON document; its output and wall time."""
    print(f"pvemu goals: {what} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"pvemu goals: {' '.join(argv[2:])} failed (exit {done.returncode})")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc, wall


def _phase_wall(doc: dict[str, Any], mode: str, phase: str) -> float:
    for result in doc["results"]:
        if result["mode"] == mode:
            return float(result["phases"][phase]["wall_s"])
    raise SystemExit(f"pvemu goals: no {mode} result in the run")


def _rtt_median(doc: dict[str, Any], server: str, records: int) -> float:
    for row in doc["results"]:
        if row["server"] == server and row["records"] == records:
            return float(row["median_us"])
    raise SystemExit(f"pvemu goals: the round-trip benchmark has no {server!r} row")


def measure(large: int, small: int, rtt_rounds: int) -> list[Goal]:
    """Run the three measurements and turn them into goals."""
    small_cmd = ["run", "--pages", str(small), "--modes", "trap,batched", "--json"]
    small_doc, _ = _run_json(_pvemu(*small_cmd), f"trap vs batched on {small} pages")
    trap_s = _phase_wall(small_doc, "trap", "protect_ro")
    batched_s = _phase_wall(small_doc, "batched", "protect_ro")

    large_cmd = ["run", "--pages", str(large), "--modes", ",".join(MODE_NAMES), "--json"]
    large_doc, large_wall = _run_json(_pvemu(*large_cmd), f"every mode on {large} pages")
    per_pte_ns = _phase_wall(large_doc, "batched", "protect_ro") / large * 1e9

    rtt_cmd = [sys.executable, "-m", "pvemu.scripts.rtt", "--json", "--rounds", str(rtt_rounds)]
    rtt_cmd += ["--warmup", str(max(1, rtt_rounds // 10))]
    rtt_doc, _ = _run_json(rtt_cmd, "trap round trip vs a trio echo")
    pvemu_us = _rtt_median(rtt_doc, "pvemu", 1)
    echo_us = _rtt_median(rtt_doc, "trio echo", 1)

    shown = "pvemu "
    return [
        Goal(
            f"batched mprotect RW→RO of {large:,} PTEs, per PTE",
            round(per_pte_ns, 1),
            "ns",
            200,
            True,
            shown + " ".join(large_cmd),
            f"protect_ro {_phase_wall(large_doc, 'batched', 'protect_ro') * 1e3:.0f} ms",
        ),
        Goal(
            f"mprotect RW→RO of {small:,} PTEs: trap / batched wall time",
            round(trap_s / batched_s, 1),
            "x",
            300,
            False,
            shown + " ".join(small_cmd),
            f"{trap_s * 1e3:.0f} ms vs {batched_s * 1e3:.1f} ms",
        ),
        Goal(
            "one-record trap round trip / minimal trio echo",
            round(pvemu_us / echo_us, 2),
            "x",
            1.3,
            True,
            "make bench-rtt",
            f"{pvemu_us:.1f} µs vs {echo_us:.1f} µs median",
        ),
        Goal(
            f"pvemu run --pages {large:,}, all {len(MODE_NAMES)} modes",
            round(large_wall / 60, 2),
            "min",
            5,
            True,
            shown + " ".join(large_cmd),
            f"{large_wall:.0f} s wall",
        ),
    ]


def _print_table(goals: list[Goal]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="issue 12 goals, measured in one run")
    for column in ("goal", "measured", "target", "met", "detail"):
        table.add_column(column, justify="left" if column in ("goal", "detail") else "right")
    for goal in goals:
        sign = "≤" if goal.at_most else "≥"
        table.add_row(
            goal.name,
            f"{goal.measured:g} {goal.unit}",
            f"{sign} {goal.target:g} {goal.unit}",
            "yes" if goal.met else "NO",
            goal.detail,
        )
    console = Console()
    console.print(table)
    met = sum(goal.met for goal in goals)
    console.print(f"{met} of {len(goals)} goals met on this machine in this run.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pvemu.scripts.goals", description=__doc__)
    parser.add_argument("--large", type=int, default=LARGE_PAGES, help="pages of the big run")
    parser.add_argument("--small", type=int, default=SMALL_PAGES, help="pages of trap vs batched")
    parser.add_argument("--rtt-rounds", type=int, default=3000, help="timed round trips")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: plumbing only")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.quick:
        args.large, args.small, args.rtt_rounds = 600, 600, 50
    if min(args.large, args.small, args.rtt_rounds) <= 0:
        parser.error("sizes and rounds must be positive")
    goals = measure(args.large, args.small, args.rtt_rounds)
    if args.json:
        rows = [{**asdict(goal), "met": goal.met} for goal in goals]
        print(json.dumps({"schema": SCHEMA, "goals": rows}, indent=2))
    else:
        _print_table(goals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
