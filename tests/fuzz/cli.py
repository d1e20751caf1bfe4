"""``python -m tests.fuzz``: the long fuzz campaign (``make fuzz``) with a
progress bar per fuzzer and a summary table. Exit status 1 on any crash."""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tests.fuzz import bookkeeping
from tests.fuzz.bookkeeping import COUNTS, STATS
from tests.fuzz.campaign import FUZZERS, Campaign, run_campaign

if TYPE_CHECKING:
    from rich.console import Console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fuzz",
        description=(
            "Run pvemu's hypothesis fuzzers long: the wire decoder (streams of valid, "
            "mutated and hostile msgpack fed to shared.wire.Connection as server and "
            "client) and hypercall arguments (targeted mmu_update/mmuext_op/"
            "update_va_mapping/multicall/ptwr/run_user requests against an in-process "
            "hypervisor with two domains, through the wire types, sliced). Each fuzzer "
            "runs hypothesis with fresh seeds until it has processed --min-count "
            "messages/requests, then a table shows counts, crashes, time and rate. "
            "Exit status 1 if any crash was found."
        ),
    )
    parser.add_argument(
        "--min-count",
        type=int,
        default=1_000_000,
        help="messages (wire) / requests (hypercall) each fuzzer must process (default 1000000)",
    )
    parser.add_argument(
        "--fuzzers",
        default=",".join(FUZZERS),
        help=f"comma-separated subset of {', '.join(FUZZERS)} (default: all)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="first hypothesis seed (default: random); run i uses seed+i",
    )
    parser.add_argument(
        "--no-shrink",
        action="store_true",
        help="report failures unshrunk (faster, bigger examples)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=math.inf,
        help="stop a fuzzer after this long even below --min-count",
    )
    return parser


def run_with_progress(
    console: Console, names: Sequence[str], args: argparse.Namespace, base_seed: int
) -> list[Campaign]:
    """Each fuzzer's campaign in turn, under a live progress bar (inputs,
    rate, crashes so far); crash reports print above the bars."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    campaigns: list[Campaign] = []
    with Progress(
        TextColumn("[bold]{task.description:<9}"),
        BarColumn(bar_width=20),
        TextColumn("{task.completed:>9,.0f} {task.fields[unit]:<8}"),
        TextColumn("{task.fields[rate]:>6}/s  crashes {task.fields[crashes]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for name in names:
            unit = FUZZERS[name][1]
            task = progress.add_task(name, total=args.min_count, unit=unit, rate="-", crashes=0)
            begin, t0 = COUNTS[name], time.perf_counter()
            crashes: list[str] = []

            def hook(
                name: str = name, task: Any = task, begin: int = begin, t0: float = t0
            ) -> None:
                done = COUNTS[name] - begin
                rate = done / max(time.perf_counter() - t0, 1e-9)
                progress.update(task, completed=min(done, args.min_count), rate=f"{rate:,.0f}")

            def report(text: str, crashes: list[str] = crashes, task: Any = task) -> None:
                crashes.append(text)
                progress.update(task, crashes=len(crashes))
                progress.console.print(text, markup=False, highlight=False)

            bookkeeping.PROGRESS_HOOK = hook
            try:
                campaigns.append(
                    run_campaign(
                        name,
                        args.min_count,
                        seed=base_seed,
                        shrink=not args.no_shrink,
                        max_seconds=args.max_seconds,
                        report=report,
                    )
                )
            finally:
                bookkeeping.PROGRESS_HOOK = None
            hook()
    return campaigns


def print_summary(console: Console, base_seed: int, campaigns: Sequence[Campaign]) -> None:
    """The table (counts, crashes, time, rate), then outcomes and crashes."""
    from rich.table import Table

    table = Table(title=f"pvemu fuzzing (seed {base_seed})")
    for column in ("fuzzer", "processed", "unit", "crashes", "time", "rate", "examples", "runs"):
        table.add_column(column, justify="left" if column in ("fuzzer", "unit") else "right")
    for c in campaigns:
        table.add_row(
            c.name,
            f"{c.processed:,}",
            c.unit,
            str(c.distinct_crashes),
            f"{c.seconds:,.1f} s",
            f"{c.processed / max(c.seconds, 1e-9):,.0f}/s",
            f"{c.examples:,}",
            str(c.runs),
        )
    console.print(table)
    for c in campaigns:
        top = ", ".join(f"{k} {v:,}" for k, v in STATS[c.name].most_common(12) if k != "examples")
        console.print(f"[bold]{c.name}[/bold] outcomes: {top}", highlight=False)
        for sig, times in c.crashes.items():
            console.print(f"  crash: {sig} (failed {times} run(s))", markup=False, highlight=False)
        for sig, hits in c.known.items():
            console.print(f"  known bug: {sig} (hit {hits:,} times)", markup=False, highlight=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tests.fuzz``: the long fuzz campaign (``make fuzz``)."""
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.fuzzers.split(",") if n.strip()]
    unknown = [n for n in names if n not in FUZZERS]
    if unknown or args.min_count < 1:
        parser.error(f"unknown fuzzers {unknown}" if unknown else "--min-count must be positive")
    base_seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no 80-column wrapping
        console = Console(width=120)
    console.print(f"fuzzing {', '.join(names)}: at least {args.min_count:,} each, seed {base_seed}")
    campaigns = run_with_progress(console, names, args, base_seed)
    print_summary(console, base_seed, campaigns)
    return 1 if any(c.distinct_crashes for c in campaigns) else 0
