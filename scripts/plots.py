"""``pvemu bench plot``: PNG and SVG plots of one run (matplotlib, Agg).

This is the only module that imports matplotlib. It uses the object API
(``Figure``), never pyplot's global state, and saves reproducibly: a fixed
``svg.hashsalt`` and no date in the metadata, so two saves of the same run
are byte-identical.

Plots (mprotect workload; the two mprotect phases added together, since the
populate phase is the same demand-paging cost in every hypervisor mode):

* ``traps_vs_pages``: traps against region size, one line per mode (log-log);
* ``time_per_pte_vs_pages``: wall time per PTE changed, median with a p10-p90 band;
* ``buffer_sweep``: traps per PTE and time per PTE against each multicall
  buffer limit that the run swept (mode xen), one line per region size,
  with Linux's own limit (512 argument bytes, 32 entries) marked.

Axes are ticked at the values the run swept; a series of fewer than three
points is drawn as points, without a line.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from pvemu.guest.modes import MODE_NAMES
from pvemu.scripts.results import Point, Run, Timing, param_words

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: The phases the plots add up: one mprotect to read-only and one back.
PLOT_PHASES: Final = ("protect_ro", "protect_rw")
#: Fixed salt for SVG element ids (reproducible SVG output).
SVG_HASHSALT: Final = "pvemu-bench"
#: Series styles: markers and dash patterns cycle so that equal series
#: (trap and ptwr trap exactly alike) stay visible on top of each other.
MARKERS: Final = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES: Final = ("-", "--", "-.", ":")
PARAM_LABELS: Final = {
    "mc_entries": "multicall entries per buffer",
    "mc_bytes": "multicall argument bytes per buffer",
    "mc_records": "mmu_update records per flush (cap)",
}
#: Linux's own multicall-buffer limits (arch/x86/xen/multicalls.c:
#: MC_BATCH 32 entries, MC_ARGS 512 bytes), marked on the buffer sweep.
LINUX_DEFAULTS: Final = {"mc_entries": 32, "mc_bytes": 512}
#: A series with fewer points than this is drawn as points, not a line: two
#: points joined on log-log axes read as a trend that was never measured.
MIN_POINTS_FOR_LINE: Final = 3
#: One value of a series: (region size in pages, y).
_V = TypeVar("_V", bound=tuple[int, Any])


def _mprotect_points(run: Run) -> list[Point]:
    return [
        p
        for p in run.points
        if p.valid and p.workload == "mprotect" and all(ph in p.counts for ph in PLOT_PHASES)
    ]


def mprotect_traps(point: Point) -> int:
    return sum(point.counts[ph].get("traps", 0) for ph in PLOT_PHASES)


def time_per_pte_us(point: Point) -> Timing | None:
    """Wall time of the two mprotect phases per PTE changed (2 x pages), in µs."""
    total = point.total_timing(PLOT_PHASES)
    if total is None:
        return None
    scale = 1e6 / (len(PLOT_PHASES) * point.pages)
    return Timing(total.median * scale, total.p10 * scale, total.p90 * scale, total.n)


def _series_label(point: Point) -> str:
    return " ".join([point.mode, *param_words(point.params)])


def _label_order(label: str) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Legend order: modes as ``guest.modes.MODE_NAMES`` lists them, then limits numerically."""
    mode, *params = label.split()
    rank = MODE_NAMES.index(mode) if mode in MODE_NAMES else len(MODE_NAMES)
    return rank, tuple((k, int(v)) for k, _, v in (p.partition("=") for p in params))


def _in_legend_order(series: dict[str, list[_V]]) -> list[tuple[str, list[_V]]]:
    """The series by :func:`_label_order`, each one's values sorted by x."""
    ordered = sorted(series.items(), key=lambda item: _label_order(item[0]))
    for _label, values in ordered:
        values.sort(key=lambda v: v[0])
    return ordered


def swept_ticks(ax: Axes, values: Iterable[int]) -> None:
    """Major ticks at exactly the values swept, written out (``4,096``, not
    ``4x10^3``), and no minor tick labels between them."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = sorted(set(values))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{round(v):,}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _log_log(ax: Axes, ylabel: str, title: str, xs: Iterable[int]) -> None:
    """Log-log axes over the region size, ticked at the sizes swept."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    swept_ticks(ax, xs)
    ax.set_xlabel("region size (pages = PTEs)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


def _style(i: int, n: int, points: int) -> dict[str, Any]:
    """Marker, dashes and a size that shrinks along the series (overlaps
    show); no line at all under :data:`MIN_POINTS_FOR_LINE` points."""
    dashes = LINESTYLES[i % len(LINESTYLES)] if points >= MIN_POINTS_FOR_LINE else "none"
    return {
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": dashes,
        "markersize": 9 - 4 * i / max(1, n - 1),
    }


def _new_figure(nrows: int = 1, ncols: int = 1) -> tuple[Figure, list[list[Axes]]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * ncols, 4.8 * nrows), layout="constrained")
    axes = [
        [fig.add_subplot(nrows, ncols, row * ncols + col + 1) for col in range(ncols)]
        for row in range(nrows)
    ]
    return fig, axes


def _save(fig: Figure, out: Path, stem: str) -> list[Path]:
    import matplotlib as mpl

    paths = [out / f"{stem}.png", out / f"{stem}.svg"]
    with mpl.rc_context({"svg.hashsalt": SVG_HASHSALT}):
        fig.savefig(paths[0], dpi=100, metadata={"Software": None})
        fig.savefig(paths[1], metadata={"Date": None, "Creator": None})
    return paths


def _subtitle(run: Run) -> str:
    sha = (run.git_sha or "unknown")[:10] + ("+dirty" if run.git_dirty else "")
    ident = f"run #{run.id}" if run.id is not None else (run.origin or "run")
    return f"{ident}, commit {sha}, {run.created_utc}"


def plot_traps_vs_pages(run: Run, out: Path) -> tuple[list[Path], list[str]]:
    series: dict[str, list[tuple[int, int]]] = defaultdict(list)
    zero: set[str] = set()
    for point in _mprotect_points(run):
        traps = mprotect_traps(point)
        label = _series_label(point)
        if traps > 0:
            series[label].append((point.pages, traps))
        else:
            zero.add(label)
    if not series:
        return [], ["traps_vs_pages: no mprotect point with traps to plot"]
    fig, ((ax,),) = _new_figure()
    ordered = _in_legend_order(series)
    for i, (label, values) in enumerate(ordered):
        style = _style(i, len(ordered), len(values))
        ax.plot([v[0] for v in values], [v[1] for v in values], label=label, **style)
    _log_log(
        ax,
        "traps (mprotect RO + RW)",
        f"Traps per mprotect pair\n{_subtitle(run)}",
        (v[0] for _, values in ordered for v in values),
    )
    legend_title = f"0 traps, not on log axis: {', '.join(sorted(zero))}" if zero else None
    ax.legend(title=legend_title, fontsize=8, title_fontsize=8)
    return _save(fig, out, "traps_vs_pages"), []


def plot_time_per_pte(run: Run, out: Path) -> tuple[list[Path], list[str]]:
    series: dict[str, list[tuple[int, Timing]]] = defaultdict(list)
    for point in _mprotect_points(run):
        timing = time_per_pte_us(point)
        if timing is not None:
            series[_series_label(point)].append((point.pages, timing))
    if not series:
        return [], ["time_per_pte_vs_pages: no timings to plot"]
    fig, ((ax,),) = _new_figure()
    ordered = _in_legend_order(series)
    for i, (label, values) in enumerate(ordered):
        xs = [v[0] for v in values]
        style = _style(i, len(ordered), len(values))
        (line,) = ax.plot(xs, [v[1].median for v in values], label=label, **style)
        if len(values) < MIN_POINTS_FOR_LINE:
            ax.vlines(
                xs,
                [v[1].p10 for v in values],
                [v[1].p90 for v in values],
                color=line.get_color(),
                alpha=0.5,
            )
            continue
        ax.fill_between(
            xs,
            [v[1].p10 for v in values],
            [v[1].p90 for v in values],
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    _log_log(
        ax,
        "wall time per PTE changed (µs, pvemu)",
        f"Emulator time per PTE (median, p10-p90 band)\n{_subtitle(run)}",
        (v[0] for _, values in ordered for v in values),
    )
    ax.legend(fontsize=8)
    return _save(fig, out, "time_per_pte_vs_pages"), []


def plot_buffer_sweep(run: Run, out: Path) -> tuple[list[Path], list[str]]:
    xen = [p for p in _mprotect_points(run) if p.mode == "xen" and p.params]
    swept = sorted(
        name
        for name in {n for p in xen for n in p.params}
        if len({p.params.get(name) for p in xen}) > 1
    )
    if not swept:
        return [], ["buffer_sweep: the run swept no multicall-buffer limit (try --mc-bytes)"]
    fig, grid = _new_figure(nrows=len(swept), ncols=2)
    for row, name in enumerate(swept):
        lines: dict[tuple[int, str], list[Point]] = defaultdict(list)
        for point in xen:
            if name not in point.params:
                continue
            others = " ".join(param_words({k: v for k, v in point.params.items() if k != name}))
            lines[(point.pages, others)].append(point)
        traps_ax, time_ax = grid[row]
        for (pages, others), points in sorted(lines.items()):
            label = f"{pages} pages {others}".strip()
            points.sort(key=lambda p: p.params[name])
            xs = [p.params[name] for p in points]
            dashes = "-" if len(xs) >= MIN_POINTS_FOR_LINE else "none"
            traps_ax.plot(
                xs,
                [mprotect_traps(p) / (2 * p.pages) for p in points],
                marker="o",
                linestyle=dashes,
                label=label,
            )
            timed = [(x, t) for x, p in zip(xs, points, strict=True) if (t := time_per_pte_us(p))]
            if timed:
                time_ax.plot(
                    [x for x, _ in timed],
                    [t.median for _, t in timed],
                    marker="o",
                    linestyle="-" if len(timed) >= MIN_POINTS_FOR_LINE else "none",
                    label=label,
                )
        values_swept = sorted({p.params[name] for p in xen if name in p.params})
        for ax, ylabel in (
            (traps_ax, "traps per PTE changed"),
            (time_ax, "wall time per PTE changed (µs)"),
        ):
            ax.set_xscale("log", base=2)
            swept_ticks(ax, values_swept)
            ax.set_yscale("log")
            if name in LINUX_DEFAULTS:
                ax.axvline(
                    LINUX_DEFAULTS[name],
                    color="grey",
                    linestyle=":",
                    label=f"Linux default ({LINUX_DEFAULTS[name]})",
                )
            ax.set_xlabel(PARAM_LABELS.get(name, name) + " (mode xen)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"Multicall buffer limits\n{_subtitle(run)}", fontsize=10)
    return _save(fig, out, "buffer_sweep"), []


def render(run: Run, out: Path) -> tuple[list[Path], list[str]]:
    """Write every plot the run supports into ``out``; (paths, notes)."""
    import matplotlib

    matplotlib.use("Agg")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    notes: list[str] = []
    for plot in (plot_traps_vs_pages, plot_time_per_pte, plot_buffer_sweep):
        paths, why = plot(run, out)
        written += paths
        notes += why
    return written, notes
