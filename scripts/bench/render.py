"""What ``pvemu bench`` prints: a run as a rich table, markdown or JSON (with
cost-model estimates if asked), a comparison as tables and a summary, and the
list of stored runs. rich is imported only when a table is drawn."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from pvemu.scripts.bench.comparison import Comparison
from pvemu.scripts.bench.documents import run_to_json
from pvemu.scripts.bench.sweep import MPROTECT
from pvemu.scripts.results import GATED_COUNTS, Point, Run, param_words

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from pvemu.scripts.costmodel import CostModel

#: Short headers of the run table's count columns.
SHORT_HEADERS: Final = {
    "traps": "traps",
    "hypercalls": "hcalls",
    "multicall_entries": "mc.ent",
    "records": "records",
    "ptwr": "ptwr",
    "page_faults": "faults",
    "flush_ops": "flush",
}
#: The count columns of the run table (the phase counts, in table order),
#: with their short headers.
TABLE_COUNTS: Final = tuple((name, SHORT_HEADERS[name]) for name in GATED_COUNTS)
ESTIMATE_HEADER: Final = "est. real µs*"
ESTIMATE_NOTE: Final = (
    "* ESTIMATE, not a measurement: counts x per-event costs of cost model '{name}' "
    "(docs/cost-model.md)"
)
#: Width of a table printed to a log or a pipe (a terminal uses its own).
PIPE_WIDTH: Final = 160

#: A table: (title, header, rows).
TitledTable = tuple[str, list[str], list[list[str]]]


# --- cost-model estimates --------------------------------------------------------


def ptes_changed(point: Point, phase: str) -> int:
    """PTEs one phase changes, for the cost model's native term: every phase
    of the mprotect workload changes one PTE per page; traces are not known."""
    return point.pages if point.workload == MPROTECT else 0


def estimates_us(point: Point, model: CostModel) -> dict[str, float]:
    return {
        phase: model.estimate_ns(counts, ptes_changed(point, phase)) / 1000.0
        for phase, counts in point.counts.items()
    }


def run_document(run: Run, model: CostModel | None) -> dict[str, Any]:
    """``pvemu bench --json``: the run, plus cost-model estimates if asked."""
    doc = run_to_json(run)
    if model is not None:
        doc["cost_model"] = model.as_dict()
        for point, entry in zip(run.points, doc["points"], strict=True):
            for phase, est in estimates_us(point, model).items():
                entry["phases"][phase]["estimate_us"] = round(est, 3)
    return doc


# --- the run table ---------------------------------------------------------------


def point_label(point: Point) -> str:
    """``xen 600 mc_bytes=256``; trace workloads lead with the workload."""
    parts = [] if point.workload == MPROTECT else [point.workload]
    parts.append(point.mode + (" (UNSAFE)" if point.unsafe else ""))
    if point.pages:
        parts.append(str(point.pages))
    return " ".join([*parts, *param_words(point.params)])


def table_header(model: CostModel | None) -> list[str]:
    header = ["point", "phase", "traps", "/PTE"]
    header += [short for name, short in TABLE_COUNTS if name != "traps"]
    header += ["median ms", "p10-p90 ms"]
    if model is not None:
        header.append(ESTIMATE_HEADER)
    header.append("ok")
    return header


def table_rows(run: Run, model: CostModel | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the rich table and the markdown table."""
    header = table_header(model)
    rows: list[list[str]] = []
    for point in run.points:
        ok = "yes" if point.valid else "NO"
        phases = list(dict.fromkeys([*point.counts, *point.samples]))
        if not phases:
            rows.append([point_label(point), "-", *["-"] * (len(header) - 3), ok])
            continue
        estimates = estimates_us(point, model) if model is not None else None
        for i, phase in enumerate(phases):
            row = [point_label(point) if i == 0 else "", *_phase_cells(point, phase, estimates)]
            rows.append([*row, ok if i == 0 else ""])
    return header, rows


def _phase_cells(point: Point, phase: str, estimates: dict[str, float] | None) -> list[str]:
    """One phase's cells: counts, timing, and the estimate if there is a model."""
    counts = point.counts.get(phase, {})
    timing = point.timing(phase)
    cells = [phase, str(counts.get("traps", "-"))]
    cells.append(f"{counts.get('traps', 0) / point.pages:.3f}" if point.pages else "-")
    cells += [str(counts.get(name, "-")) for name, _ in TABLE_COUNTS if name != "traps"]
    if timing is None:
        cells += ["-", "-"]
    else:
        cells.append(f"{timing.median * 1e3:.2f}")
        cells.append(f"{timing.p10 * 1e3:.2f}-{timing.p90 * 1e3:.2f}")
    if estimates is not None:
        cells.append(f"{estimates[phase]:.1f}" if phase in estimates else "-")
    return cells


def rich_table(run: Run, model: CostModel | None) -> Table:
    from rich.table import Table

    header, rows = table_rows(run, model)
    repeats = run.config.get("repeat", "?")
    title = f"pvemu bench: exact counts per phase, wall time over {repeats} repeat(s)"
    table = Table(title=title)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=i == 0)
    last = 0
    for i, row in enumerate(rows):
        if row[0] and i > 0:
            table.rows[last].end_section = True
        table.add_row(*row)
        last = i
    return table


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _console() -> Console:
    from pvemu.scripts.report import wide_console

    return wide_console(PIPE_WIDTH)


def print_run(run: Run, model: CostModel | None, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(run_document(run, model), indent=2))
        return
    if fmt == "markdown":
        header, rows = table_rows(run, model)
        print(markdown_table(header, rows))
        if model is not None:
            print()
            print(ESTIMATE_NOTE.format(name=model.name))
        return
    console = _console()
    console.print(rich_table(run, model))
    if model is not None:
        console.print(ESTIMATE_NOTE.format(name=model.name))


# --- comparisons -----------------------------------------------------------------


def comparison_tables(cmp: Comparison) -> list[TitledTable]:
    """(title, header, rows) of the count changes and of the timings."""
    tables = []
    count_rows = [
        [
            c.key,
            c.phase,
            c.metric,
            "-" if c.baseline is None else str(c.baseline),
            "-" if c.new is None else str(c.new),
            f"{c.delta:+d}",
            "REGRESSION" if c.regression else "improved",
        ]
        for c in sorted(cmp.changes, key=lambda c: (not c.regression, c.key, c.phase, c.metric))
    ]
    if count_rows:
        header = ["point", "phase", "count", "baseline", "new", "delta", "verdict"]
        tables.append(("count changes", header, count_rows))
    time_rows = [
        [
            t.key,
            t.phase,
            f"{t.baseline.median * 1e3:.2f}",
            f"{t.new.median * 1e3:.2f}",
            f"{t.ratio:.3f}",
            t.describe(),
        ]
        for t in cmp.times
    ]
    if time_rows:
        header = ["point", "phase", "baseline ms", "new ms", "ratio", "timing (reported only)"]
        tables.append(("timings", header, time_rows))
    return tables


def summary_lines(cmp: Comparison) -> list[str]:
    """The verdict in words: what was compared, what is invalid, changed, missing."""
    lines = [f"compared {cmp.compared} point(s): {cmp.against} against {cmp.baseline}"]
    lines += [f"INVALID: {item}" for item in cmp.invalid]
    if cmp.regressions:
        lines.append(f"COUNT REGRESSION: {len(cmp.regressions)} count(s) increased")
    if cmp.improvements:
        lines.append(
            f"{len(cmp.improvements)} count(s) decreased: update the baseline on purpose "
            "(pvemu bench compare --update-baseline)"
        )
    if not cmp.changes and not cmp.invalid:
        lines.append("every count is exactly the baseline's")
    lines += [f"MISSING (baseline point not measured): {key}" for key in cmp.missing]
    if cmp.new_points:
        lines.append(f"{len(cmp.new_points)} point(s) not in the baseline (not gated)")
    return lines


def print_comparison(cmp: Comparison, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(cmp.as_json(), indent=2))
        return
    tables = comparison_tables(cmp)
    if fmt == "markdown":
        for title, header, rows in tables:
            print(f"### {title}\n")
            print(markdown_table(header, rows))
            print()
        for line in summary_lines(cmp):
            print(f"- {line}")
        return
    from rich.table import Table

    console = _console()
    for title, header, rows in tables:
        table = Table(title=title)
        for name in header:
            table.add_column(name)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in summary_lines(cmp):
        console.print(line, markup=False, highlight=False)


# --- stored runs -----------------------------------------------------------------


def runs_markdown(runs: Sequence[dict[str, Any]]) -> str:
    """``pvemu bench list``: the rows of ``ResultStore.runs_summary``."""
    header = ["run", "created (UTC)", "commit", "points", "valid"]
    body = [
        [
            str(r["id"]),
            r["created_utc"],
            (r["git_sha"] or "?")[:12] + ("+dirty" if r["git_dirty"] else ""),
            str(r["points"]),
            "yes" if r["valid"] else "NO",
        ]
        for r in runs
    ]
    return markdown_table(header, body)
