"""Rendering of workload results: the comparison table ``pvemu run`` and
``pvemu guest`` print (rich), shared so both read the same way."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from pvemu.shared.counts import PHASE_FIELDS

#: Short headers so the table fits a terminal; ``pvemu run --help`` spells them out.
HEADERS = {
    "traps": "traps",
    "hypercalls": "hcalls",
    "multicall_entries": "mc.ent",
    "records": "records",
    "ptwr": "ptwr",
    "page_faults": "faults",
    "flush_ops": "flushes",
}
COLUMNS = ("traps", "/PTE", *(HEADERS[f] for f in PHASE_FIELDS[1:]), "ms")


def comparison_table(pages: int, results: list[dict[str, Any]]) -> Table:
    table = Table(title=f"mprotect workload, {pages} pages (traps per phase; lower is better)")
    table.add_column("mode")
    table.add_column("phase")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    table.add_column("ok")
    for result in results:
        mode = result["mode"] + (" (UNSAFE)" if result.get("unsafe") else "")
        valid = "yes" if result["counts_agree"] and result["audit_clean"] else "NO"
        if "error" in result:
            table.add_row(mode, "-", *["-"] * len(COLUMNS), f"FAILED: {result['error']}")
            continue
        for i, (phase, counts) in enumerate(result["phases"].items()):
            per_pte = counts["traps"] / pages
            table.add_row(
                mode if i == 0 else "",
                phase,
                str(counts["traps"]),
                f"{per_pte:.3f}",
                *(str(counts[f]) for f in PHASE_FIELDS[1:]),
                f"{counts['wall_s'] * 1000:.1f}",
                valid if i == 0 else "",
                end_section=i == len(result["phases"]) - 1,
            )
    return table


def wide_console(width: int) -> Console:
    """A console on stdout; on a log or a pipe ``width`` columns wide (rather
    than squeezed into 80)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=width)
    return console


def print_table(pages: int, results: list[dict[str, Any]]) -> None:
    wide_console(120).print(comparison_table(pages, results))
