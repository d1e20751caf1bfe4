"""What ``pvemu bench`` prints: a run as a rich table, CSV, markdown or JSON
(with cost-model estimates if asked), a comparison as tables and a summary,
and the list of stored runs. Tables go through ``scripts/report.py`` (fitted
to the terminal, each with its headline sentence); rich is imported only
when a table is drawn."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from pvemu.scripts.bench.comparison import Comparison
from pvemu.scripts.bench.documents import run_to_json
from pvemu.scripts.report import (
    PIPE_WIDTH,
    Entry,
    Tabular,
    headline,
    markdown_table,
    print_tabular,
    wide_console,
    workload_headline,
)
from pvemu.scripts.results import GATED_COUNTS, Point, Run, param_words
from pvemu.scripts.workloads import HEADLINES, MPROTECT, effective_loops

if TYPE_CHECKING:
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
#: A table: (title, header, rows).
TitledTable = tuple[str, list[str], list[list[str]]]


# --- cost-model estimates --------------------------------------------------------


def estimates_us(point: Point, model: CostModel) -> dict[str, float]:
    """Each phase's estimate; the native term from
    :func:`costmodel.ptes_changed` (0 for traces, whose PTEs are not known)."""
    from pvemu.scripts.costmodel import ptes_changed

    return {
        phase: model.estimate_ns(counts, ptes_changed(point.workload, phase, point.pages)) / 1000.0
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
    """``xen 600 mc_bytes=256``; other workloads than mprotect lead with
    the workload (``fork xen 600``)."""
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


def csv_header(model: CostModel | None) -> list[str]:
    """Machine-readable names of the run table's columns, for ``--csv``."""
    header = ["point", "phase", "traps", "traps_per_pte", *GATED_COUNTS[1:]]
    header += ["median_ms", "p10_ms", "p90_ms"]
    return [*header, *(["estimate_us"] if model is not None else []), "ok"]


def table_rows(run: Run, model: CostModel | None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the run table, every row full (the point's label
    and ok repeated on each of its phases)."""
    header = table_header(model)
    rows: list[list[str]] = []
    for point in run.points:
        ok = "yes" if point.valid else "NO"
        phases = list(dict.fromkeys([*point.counts, *point.samples]))
        if not phases:
            rows.append([point_label(point), "-", *["-"] * (len(header) - 3), ok])
            continue
        estimates = estimates_us(point, model) if model is not None else None
        for phase in phases:
            rows.append([point_label(point), *_phase_cells(point, phase, estimates), ok])
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


def _mode_label(point: Point) -> str:
    """``xen mc_bytes=256``: a point within a sentence that names its workload and size."""
    return " ".join(
        [point.mode + (" (UNSAFE)" if point.unsafe else ""), *param_words(point.params)]
    )


def _entries(run: Run, workload: str, pages: int) -> list[Entry]:
    """The valid points of one workload and size, summed over the phases
    its headline compares (``workloads.HEADLINES``)."""
    phases = HEADLINES[workload].phases
    return [
        Entry(
            label=point_label(p) if workload == MPROTECT else _mode_label(p),
            mode=p.mode,
            traps=sum(p.counts[ph].get("traps", 0) for ph in phases),
            seconds=total.median if (total := p.total_timing(phases)) else None,
            unsafe=p.unsafe,
        )
        for p in run.points
        if p.valid
        and p.workload == workload
        and p.pages == pages
        and all(ph in p.counts for ph in phases)
    ]


def run_headline(run: Run) -> str:
    """One sentence per workload and region size, from the run's own
    numbers: the best safe mode's two mprotects against ``trap``
    (:func:`report.headline`), a process workload's mode-dependent phases
    against ``xen`` (:func:`report.workload_headline`). Points with --mc-*
    limits compete too, under their own label."""
    sentences = []
    for workload in dict.fromkeys(p.workload for p in run.points if p.workload in HEADLINES):
        sizes = sorted({p.pages for p in run.points if p.workload == workload and p.pages})
        for pages in sizes:
            entries = _entries(run, workload, pages)
            if not entries:
                continue
            if workload == MPROTECT:
                sentences.append(headline(entries, f"mprotect RO + RW of {pages:,} pages"))
            else:
                loops = effective_loops(workload, None)
                sentences.append(workload_headline(workload, pages, loops, entries))
    if not sentences:
        return "headline: no valid point of a workload with a headline to compare"
    return "\n".join(sentences)


def run_tabular(run: Run, model: CostModel | None) -> Tabular:
    """The run table as a :class:`report.Tabular` (rich, CSV or markdown)."""
    header, rows = table_rows(run, model)
    repeats = run.config.get("repeat", "?")
    notes = [ESTIMATE_NOTE.format(name=model.name)] if model is not None else []
    if model is not None and any(
        p.workload in HEADLINES and p.workload != MPROTECT for p in run.points
    ):
        from pvemu.scripts.costmodel import published_note

        notes.append(published_note())
    return Tabular(
        title=f"pvemu bench: exact counts per phase, wall time over {repeats} repeat(s)",
        header=header,
        rows=rows,
        csv_header=csv_header(model),
        left=frozenset({"ok"}),
        blank_repeats=frozenset({"point", "ok"}),
        priority=("traps", "/PTE", "median ms", "ok", ESTIMATE_HEADER),
        headline=run_headline(run),
        notes=notes,
    )


def csv_rows(tab: Tabular) -> Tabular:
    """``tab`` with the p10-p90 cell split in two, as :func:`csv_header` names them."""
    if "p10-p90 ms" not in tab.header:
        return tab
    at = tab.header.index("p10-p90 ms")
    rows = []
    for row in tab.rows:
        low, _, high = row[at].partition("-")
        rows.append([*row[:at], low, high or low, *row[at + 1 :]])
    return Tabular(
        tab.title,
        [*tab.header[:at], "p10", "p90", *tab.header[at + 1 :]],
        rows,
        csv_header=tab.csv_header,
    )


def print_run(run: Run, model: CostModel | None, fmt: str, *, wide: bool = False) -> None:
    if fmt == "json":
        print(json.dumps(run_document(run, model), indent=2))
        return
    tab = run_tabular(run, model)
    print_tabular(csv_rows(tab) if fmt == "csv" else tab, fmt, wide=wide)


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


#: How many point keys a summary line lists before it says "and N more".
LISTED_KEYS: Final = 4


def _some(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f" and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else "")


def summary_lines(cmp: Comparison) -> list[str]:
    """The verdict in words: what was compared, what is invalid, changed,
    missing; and, first and plainly, when nothing was comparable at all."""
    if cmp.compared == 0:
        lines = [
            f"NOTHING COMPARED: none of the {len(cmp.missing)} baseline point(s) in "
            f"{cmp.baseline} was measured in {cmp.against}",
            f"baseline points: {_some(cmp.missing) or 'none'}",
            f"{cmp.against} measured: {_some(cmp.new_points) or 'nothing'}",
            "points match on workload, mode, pages and --mc-* values; to measure the "
            "baseline's own points run: pvemu bench --sweep-from BASELINE_FILE",
        ]
        return [*lines, *(f"INVALID: {item}" for item in cmp.invalid)]
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


def comparison_tabular(cmp: Comparison) -> Tabular:
    """Every change and timing as one table, for ``--csv``: count rows carry
    the counts, timing rows the median milliseconds (metric ``median_ms``)."""
    tab = Tabular(
        title="comparison",
        header=["point", "phase", "metric", "baseline", "new", "change", "verdict"],
    )
    for _title, _header, rows in comparison_tables(cmp):
        for row in rows:
            if len(row) == 7:
                tab.rows.append(row)
            else:
                key, phase, old, new, ratio, note = row
                tab.rows.append([key, phase, "median_ms", old, new, f"x{ratio}", note])
    return tab


def print_comparison(cmp: Comparison, fmt: str, *, wide: bool = False) -> None:
    if fmt == "json":
        from pvemu.scripts.bench.provenance import document

        doc = cmp.as_json()
        config = {"baseline": cmp.baseline, "against": cmp.against}
        print(json.dumps({**document(str(doc.pop("schema")), config, {}), **doc}, indent=2))
        return
    if fmt == "csv":
        print_tabular(comparison_tabular(cmp), "csv")
        return
    tables = comparison_tables(cmp)
    summary = summary_lines(cmp)
    if fmt == "markdown":
        for title, header, rows in tables:
            print(f"### {title}\n")
            print(markdown_table(header, rows))
            print()
        for line in summary:
            print(f"- {line}")
        return
    for title, header, rows in tables:
        print_tabular(
            Tabular(title, header, rows, left=frozenset({"count", header[-1]})), wide=wide
        )
    console = wide_console(PIPE_WIDTH)
    for line in summary:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


# --- stored runs -----------------------------------------------------------------


def _sweep_words(config: dict[str, Any]) -> tuple[str, str, str]:
    """(modes, sizes, workloads) of a stored run's sweep, as ``bench list`` shows them."""
    sweep = config.get("sweep") if isinstance(config.get("sweep"), dict) else {}
    assert isinstance(sweep, dict)
    modes = ",".join(str(m) for m in sweep.get("modes", [])) or "?"
    sizes = ",".join(str(p) for p in sweep.get("pages", [])) or "?"
    limits = [
        f"{name}={','.join('default' if v is None else str(v) for v in values)}"
        for name in ("mc_entries", "mc_bytes", "mc_records")
        if (values := sweep.get(name))
    ]
    if limits:
        sizes = " ".join([sizes, *limits])
    workloads = ",".join(str(w) for w in sweep.get("workloads", [])) or "?"
    return modes, sizes, workloads


#: The columns of ``pvemu bench list`` (CSV names).
LIST_HEADER: Final = (
    "run",
    "tags",
    "created_utc",
    "commit",
    "modes",
    "pages",
    "workloads",
    "points",
    "valid",
)


def runs_tabular(runs: Sequence[dict[str, Any]]) -> Tabular:
    """``pvemu bench list``: the rows of ``ResultStore.runs_summary``."""
    tab = Tabular(
        title="stored runs, newest first",
        header=[*LIST_HEADER[:2], "created (UTC)", *LIST_HEADER[3:]],
        keys=1,
        csv_header=list(LIST_HEADER),
        left=frozenset({"tags", "created (UTC)", "commit", "modes", "pages", "workloads"}),
        priority=("tags", "modes", "pages", "workloads", "valid", "created (UTC)"),
    )
    for r in runs:
        modes, sizes, workloads = _sweep_words(r.get("config", {}))
        tab.rows.append(
            [
                str(r["id"]),
                ",".join(r.get("tags", [])) or "-",
                r["created_utc"],
                (r["git_sha"] or "?")[:12] + ("+dirty" if r["git_dirty"] else ""),
                modes,
                sizes,
                workloads,
                str(r["points"]),
                "yes" if r["valid"] else "NO",
            ]
        )
    if runs:
        tab.headline = (
            f"headline: {len(runs)} run(s); compare two with: pvemu bench compare "
            f"--baseline RUN --against RUN (a run id, a tag or 'latest')"
        )
    else:
        tab.headline = "headline: no stored runs yet: run 'pvemu bench'"
    return tab


def runs_markdown(runs: Sequence[dict[str, Any]]) -> str:
    return runs_tabular(runs).markdown_text()
