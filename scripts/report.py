"""How pvemu prints a table: one :class:`Tabular` per table, rendered as a
rich table that fits the terminal (stacked parts on a narrow one, the full
table with ``--wide``), as CSV or as markdown, and always followed by its
headline sentence (what the numbers say, computed from the run itself).

The comparison table of ``pvemu run`` and ``pvemu guest`` and the headline
arithmetic shared by ``run``, ``bench`` and ``trace replay`` live here too.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TextIO

from pvemu.shared.counts import PHASE_FIELDS

if TYPE_CHECKING:
    import argparse

    from rich.console import Console

#: Short headers so the table fits a terminal; ``pvemu run --help`` spells them out.
HEADERS: Final = {
    "traps": "traps",
    "hypercalls": "hcalls",
    "multicall_entries": "mc.ent",
    "records": "records",
    "ptwr": "ptwr",
    "page_faults": "faults",
    "flush_ops": "flushes",
}
COLUMNS: Final = ("traps", "/PTE", *(HEADERS[f] for f in PHASE_FIELDS[1:]), "ms")
#: Width of a table written to a pipe or a file when ``COLUMNS`` is not set.
PIPE_WIDTH: Final = 160
#: What rich's default box costs: one space either side of every cell and a
#: rule before every column and after the last.
_CELL_EXTRA: Final = 3


# --- one table, four renderings --------------------------------------------------


@dataclass
class Tabular:
    """A table as data: every row full (CSV needs each row to stand alone);
    the rich and markdown renderings blank a repeated cell of a column in
    ``blank_repeats`` so a mode or point reads once per section."""

    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    #: Leading columns that name a row; every stacked part repeats them.
    keys: int = 2
    #: Column names for CSV (machine-readable); the header if empty.
    csv_header: list[str] = field(default_factory=list)
    #: Columns left-justified (the keys always are); the rest are numbers.
    left: frozenset[str] = frozenset()
    #: Columns whose repeats are blanked within a section (the first key starts one).
    blank_repeats: frozenset[str] = frozenset()
    #: Non-key columns in the order a narrow layout fills its first part.
    priority: tuple[str, ...] = ()
    #: Rows for CSV when the displayed cells are formatted for people (else :attr:`rows`).
    csv_rows: list[list[str]] = field(default_factory=list)
    #: The sentence after the table: what the numbers say.
    headline: str = ""
    #: Lines after the headline (footnotes).
    notes: list[str] = field(default_factory=list)

    def widths(self) -> list[int]:
        """The natural width of every column (its longest cell or header)."""
        return [
            max([len(h), *(len(row[i]) for row in self.rows)]) for i, h in enumerate(self.header)
        ]

    def natural_width(self, columns: Sequence[int] | None = None) -> int:
        """Characters the full table (or the given columns) needs on one line."""
        widths = self.widths()
        chosen = range(len(widths)) if columns is None else columns
        return sum(widths[i] + _CELL_EXTRA for i in chosen) + 1

    def parts(self, width: int) -> list[list[int]]:
        """Column indexes of each stacked part that fits ``width``: the key
        columns in every part, the others in :attr:`priority` order. A single
        part when the whole table fits."""
        if self.natural_width() <= width:
            return [list(range(len(self.header)))]
        keys = list(range(self.keys))
        named = {h: i for i, h in enumerate(self.header)}
        rest = [named[h] for h in self.priority if h in named and named[h] >= self.keys]
        rest += [i for i in range(self.keys, len(self.header)) if i not in rest]
        parts: list[list[int]] = []
        current: list[int] = []
        for index in rest:
            if current and self.natural_width([*keys, *current, index]) > width:
                parts.append(current)
                current = []
            current.append(index)
        if current:
            parts.append(current)
        return [[*keys, *sorted(part)] for part in parts]

    def display_rows(self, columns: Sequence[int]) -> list[tuple[list[str], bool]]:
        """(cells, ends a section) of the chosen columns, repeats blanked."""
        blank = {i for i, h in enumerate(self.header) if h in self.blank_repeats}
        # Rules between sections only when a section has several rows (a
        # table of one row per mode needs none).
        grouped = any(a[0] == b[0] for a, b in zip(self.rows, self.rows[1:], strict=False))
        out: list[tuple[list[str], bool]] = []
        for n, row in enumerate(self.rows):
            previous = self.rows[n - 1] if n else None
            same_section = previous is not None and previous[0] == row[0]
            cells = [
                "" if same_section and i in blank and previous and previous[i] == row[i] else row[i]
                for i in columns
            ]
            following = self.rows[n + 1] if n + 1 < len(self.rows) else None
            out.append((cells, grouped and following is not None and following[0] != row[0]))
        return out

    def rich_tables(self, width: int, *, wide: bool) -> list[Any]:
        """The rich table, or its stacked parts when it does not fit ``width``."""
        from rich.table import Table

        parts = [list(range(len(self.header)))] if wide else self.parts(width)
        tables = []
        widths = self.widths()
        for n, columns in enumerate(parts):
            title = self.title
            if len(parts) > 1:  # later parts: a short title that fits their width
                title = (
                    f"{title} ({n + 1}/{len(parts)})"
                    if n == 0
                    else f"continued ({n + 1}/{len(parts)})"
                )
            table = Table(title=title)
            for i in columns:
                name = self.header[i]
                is_key = i < self.keys
                table.add_column(
                    name,
                    justify="left" if is_key or name in self.left else "right",
                    no_wrap=is_key,
                    # A name is never cut: rich shrinks the numbers first.
                    min_width=widths[i] if is_key else None,
                )
            for cells, end in self.display_rows(columns):
                table.add_row(*cells, end_section=end)
            tables.append(table)
        return tables

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.csv_header or self.header)
        writer.writerows(self.csv_rows or self.rows)
        return buffer.getvalue()

    def markdown_text(self) -> str:
        columns = list(range(len(self.header)))
        lines = [markdown_table(self.header, [c for c, _ in self.display_rows(columns)])]
        if self.headline:
            lines += ["", self.headline]
        lines += ["", *self.notes] if self.notes else []
        return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def output_width(stream: TextIO | None = None) -> int:
    """The columns to fit: ``COLUMNS`` when set (also on a pipe, so
    ``COLUMNS=80 pvemu run | less`` is an 80-column table), else the
    terminal's, else :data:`PIPE_WIDTH` for a log or a pipe."""
    stream = stream or sys.stdout
    text = os.environ.get("COLUMNS", "")
    if text.isdigit() and int(text) > 0:
        return int(text)
    if stream.isatty():
        return shutil.get_terminal_size().columns
    return PIPE_WIDTH


def print_tabular(
    tab: Tabular, fmt: str = "table", *, wide: bool = False, file: TextIO | None = None
) -> None:
    """Print ``tab`` as a rich table (fitted to the width), CSV or markdown."""
    out = file or sys.stdout
    if fmt == "csv":
        out.write(tab.csv_text())
        return
    if fmt == "markdown":
        print(tab.markdown_text(), file=out)
        return
    width = output_width(out)
    tables = tab.rich_tables(width, wide=wide)
    console = _console(out, max(width, tab.natural_width()) if wide else width)
    for table in tables:
        console.print(table)
    for line in [tab.headline, *tab.notes] if tab.headline else tab.notes:
        console.print(line, markup=False, highlight=False, soft_wrap=False)


def _console(out: TextIO, width: int) -> Console:
    from rich.console import Console

    return Console(file=out, width=width)


def wide_console(width: int) -> Console:
    """A console on stdout as wide as :func:`output_width` says (``width``
    on a pipe when ``COLUMNS`` is unset)."""
    from rich.console import Console

    if os.environ.get("COLUMNS", "").isdigit() or sys.stdout.isatty():
        return Console(width=output_width())
    return Console(width=width)


# --- the options every table command takes ----------------------------------------


def add_format_options(parser: argparse._ActionsContainer, *, wide: bool = True) -> None:
    """``--json``, ``--csv``, ``--markdown`` (one of them) and ``--wide``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--json", action="store_true", help="one JSON document on stdout (with metadata)"
    )
    group.add_argument("--csv", action="store_true", help="the table as CSV on stdout")
    group.add_argument("--markdown", action="store_true", help="the table as markdown on stdout")
    if wide:
        parser.add_argument(
            "--wide",
            action="store_true",
            help="one table with every column, however narrow the terminal "
            "(default: stacked parts when it does not fit)",
        )


def output_format(args: argparse.Namespace) -> str:
    """``table``, ``json``, ``csv`` or ``markdown`` from the parsed options."""
    for fmt in ("json", "csv", "markdown"):
        if getattr(args, fmt, False):
            return fmt
    return "table"


# --- headlines ---------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One mode's (or point's) total over the compared phases."""

    label: str
    mode: str
    traps: int
    seconds: float | None
    unsafe: bool = False


#: The multiplication sign of "1,024x fewer" (written as an escape for ruff).
TIMES: Final = "\u00d7"


def times(ratio: float) -> str:
    """``1,024x``, ``41x``, ``3.2x`` (with the sign): whole numbers from 10 up."""
    return f"{ratio:,.0f}{TIMES}" if ratio >= 10 else f"{ratio:.1f}{TIMES}"


def headline(entries: Sequence[Entry], what: str) -> str:
    """The sentence under a table: the safe mode with the fewest traps (then
    the fastest) against ``trap`` when it ran, else against the mode with
    the most traps, saying which. ``what`` names the compared phases."""
    hyper = [e for e in entries if e.mode != "native"]
    safe = [e for e in hyper if not e.unsafe]
    if not safe:
        return f"headline: no safe hypervisor mode ran, so there is nothing to compare {what} with"
    best = min(safe, key=lambda e: (e.traps, e.seconds if e.seconds is not None else 0.0))
    trap = next((e for e in hyper if e.mode == "trap"), None)
    base = trap or max(hyper, key=lambda e: e.traps)
    if base is best:
        return (
            f"headline: {best.label}: {best.traps:,} traps for {what}; "
            "nothing to compare with (pvemu run --modes trap,batched compares)"
        )
    against = (
        "trap" if trap is not None else f"{base.label} (the most traps here; trap did not run)"
    )
    text = f"headline: {best.label}: {base.traps:,} → {best.traps:,} traps for {what}"
    if best.traps > 0:
        text += f" ({times(base.traps / best.traps)} fewer)"
    else:
        text += " (none at all)"
    if best.seconds and base.seconds:
        ratio = base.seconds / best.seconds
        speed = f"{times(ratio)} faster" if ratio >= 1 else f"{times(1 / ratio)} slower"
        text += f", {speed} than {against}"
    else:
        text += f", compared with {against}"
    return text


#: The reference of a process workload's headline: Linux on Xen PV.
XEN: Final = "xen"


def process_headline(entries: Sequence[Entry], size: str, what: str, verb: str) -> str:
    """The sentence under a process workload's table: ``what`` (its
    mode-dependent phases) in ``xen``, the reference (Linux on Xen PV), against
    the safe mode with the fewest traps; without xen, against the mode with
    the most traps, saying so. ``size`` leads (``4,096 pages``)."""
    hyper = [e for e in entries if e.mode != "native"]
    safe = [e for e in hyper if not e.unsafe]
    if not safe:
        return f"headline: no safe hypervisor mode ran, so there is nothing to compare {what} with"
    best = min(safe, key=lambda e: (e.traps, e.seconds if e.seconds is not None else 0.0))
    xen = [e for e in hyper if e.mode == XEN]
    base = next((e for e in xen if e.label == XEN), xen[0] if xen else None)
    if base is None:
        base = max(hyper, key=lambda e: e.traps)
        where = f"{base.label} (the most here; xen did not run)"
    else:
        where = f"{base.label} (Linux on Xen PV)" if base.label == XEN else base.label
    if len(safe) > 1 and base.traps <= best.traps:  # every safe mode alike
        modes = ", ".join(e.label for e in safe)
        return f"headline: {size}: {what} {verb} {best.traps:,} traps in each of {modes}"
    text = f"headline: {size}: {what} {verb} {base.traps:,} traps in {where}"
    if base is best or base.traps <= best.traps:
        return f"{text}; nothing to compare with (--modes xen,batched compares)"
    text += f", {best.traps:,} in {best.label}: "
    text += f"{times(base.traps / best.traps)} fewer" if best.traps else "none at all"
    if best.seconds and base.seconds:
        ratio = base.seconds / best.seconds
        text += f", {times(ratio)} faster" if ratio >= 1 else f", {times(1 / ratio)} slower"
    return text


def mode_entries(results: Sequence[dict[str, Any]], phases: Sequence[str] | None) -> list[Entry]:
    """One :class:`Entry` per valid result (``guest --json`` documents),
    summed over ``phases`` (every phase if None)."""
    entries = []
    for result in results:
        if "error" in result or not result.get("phases"):
            continue
        names = list(result["phases"]) if phases is None else phases
        if not all(p in result["phases"] for p in names):
            continue
        chosen = [result["phases"][p] for p in names]
        entries.append(
            Entry(
                label=result["mode"],
                mode=result["mode"],
                traps=sum(int(c["traps"]) for c in chosen),
                seconds=sum(float(c.get("wall_s", 0.0)) for c in chosen),
                unsafe=bool(result.get("unsafe")),
            )
        )
    return entries


# --- the pvemu run / pvemu guest table ---------------------------------------------


def comparison_tabular(
    pages: int,
    results: list[dict[str, Any]],
    workload: str = "mprotect",
    loops: int | None = None,
) -> Tabular:
    """The ``pvemu run`` table: one row per mode and phase, the phases as
    each result reports them; ``loops`` are forkexec's rounds."""
    rounds = f", {loops} loops" if loops is not None else ""
    tab = Tabular(
        title=f"{workload} workload, {pages} pages{rounds} (traps per phase; lower is better)",
        header=["mode", "phase", *COLUMNS, "ok"],
        csv_header=["mode", "phase", "traps", "traps_per_pte", *PHASE_FIELDS[1:], "wall_ms", "ok"],
        left=frozenset({"ok"}),
        blank_repeats=frozenset({"mode", "ok"}),
        priority=("traps", "/PTE", "ms", "ok"),
    )
    for result in results:
        mode = result["mode"] + (" (UNSAFE)" if result.get("unsafe") else "")
        valid = "yes" if result["counts_agree"] and result["audit_clean"] else "NO"
        if "error" in result:
            tab.rows.append([mode, "-", *["-"] * len(COLUMNS), f"FAILED: {result['error']}"])
            continue
        for phase, counts in result["phases"].items():
            tab.rows.append(
                [
                    mode,
                    phase,
                    str(counts["traps"]),
                    f"{counts['traps'] / pages:.3f}",
                    *(str(counts[f]) for f in PHASE_FIELDS[1:]),
                    f"{counts['wall_s'] * 1000:.1f}",
                    valid,
                ]
            )
    tab.headline = workload_headline(workload, pages, loops, mode_entries_for(workload, results))
    return tab


def mode_entries_for(workload: str, results: Sequence[dict[str, Any]]) -> list[Entry]:
    """:func:`mode_entries` over the phases ``workload``'s headline compares
    (every phase for a trace)."""
    from pvemu.scripts.workloads import HEADLINES

    compared = HEADLINES.get(workload)
    return mode_entries(results, compared.phases if compared is not None else None)


def workload_headline(workload: str, pages: int, loops: int | None, entries: list[Entry]) -> str:
    """The headline of one workload at one size: mprotect's against ``trap``,
    a process workload's against ``xen``, a trace's over all its phases."""
    from pvemu.scripts.workloads import HEADLINES, MPROTECT

    compared = HEADLINES.get(workload)
    if compared is None:
        return headline(entries, "the whole replay (every phase)")
    if workload == MPROTECT:
        return headline(entries, compared.what)
    size = f"{pages:,} pages" + (f", {loops} loops" if loops is not None else "")
    return process_headline(entries, size, compared.what, compared.verb)


def print_table(
    pages: int,
    results: list[dict[str, Any]],
    fmt: str = "table",
    *,
    wide: bool = False,
    workload: str = "mprotect",
    loops: int | None = None,
) -> None:
    print_tabular(comparison_tabular(pages, results, workload, loops), fmt, wide=wide)
