"""The options of ``pvemu bench`` and its actions (argparse), and the sweep
they describe."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from pvemu.guest.modes import MODE_NAMES
from pvemu.scripts import checks
from pvemu.scripts.argtypes import (
    mode_list,
    output_file_in_new_folder,
    output_folder,
    positive_float,
    positive_int,
)
from pvemu.scripts.bench.comparison import DEFAULT_BASELINE
from pvemu.scripts.bench.documents import baseline_sweep
from pvemu.scripts.bench.runner import DEFAULT_REPEAT, DEFAULT_TIMEOUT_S
from pvemu.scripts.bench.store import DEFAULT_DB
from pvemu.scripts.bench.sweep import (
    DEFAULT_MODES,
    DEFAULT_PAGES,
    DEFAULT_VCPUS,
    Sweep,
    UsageError,
)
from pvemu.scripts.results import BUFFER_PARAMS, ResultsError
from pvemu.scripts.workloads import MPROTECT

#: Where ``pvemu bench plot`` writes without ``--out``.
DEFAULT_PLOTS: Final = Path(".pvemu") / "plots"
#: What each ``--mc-*`` option limits, for its help line.
BUFFER_HELP: Final = {
    "mc_entries": "multicall entries (Linux: 32)",
    "mc_bytes": "multicall argument bytes (Linux: 512)",
    "mc_records": "cap on mmu_update records per flush (none)",
}
#: The options that make up a sweep (``--sweep-from`` replaces them all).
SWEEP_OPTIONS: Final = ("modes", "pages", "workload", *BUFFER_PARAMS, "vcpus")

#: ``default(value)``: an option's default (argparse.SUPPRESS on ``run``).
Default = Callable[[Any], Any]
Container = argparse._ActionsContainer


# --- value types -------------------------------------------------------------------


def _limit_list(text: str) -> tuple[int | None, ...]:
    """Comma-separated positive integers; ``default`` means the guest's own."""
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers")
    return tuple(None if v == "default" else positive_int(v) for v in items)


def _int_list(text: str) -> tuple[int, ...]:
    values = tuple(positive_int(v.strip()) for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list of integers")
    return values


def _inject(text: str) -> tuple[str, list[str]]:
    mode, sep, rest = text.partition("=")
    if not sep or mode not in MODE_NAMES or not rest.strip():
        raise argparse.ArgumentTypeError(f"expected MODE=ARGS with a known mode, got {text!r}")
    return mode, shlex.split(rest)


# --- the run options -----------------------------------------------------------------


def add_run_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The sweep options; on the ``run`` action their defaults are suppressed
    so that ``pvemu bench --pages 64 run`` keeps the value."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    _add_sweep_options(parser.add_argument_group("sweep"), default)
    _add_measurement_options(parser.add_argument_group("measurement"), default)
    _add_output_options(parser.add_argument_group("output"), default)


def _add_sweep_options(sweep: Container, default: Default) -> None:
    sweep.add_argument(
        "--modes",
        type=mode_list,
        default=default(None),
        help=f"comma-separated modes (default {','.join(DEFAULT_MODES)})",
    )
    sweep.add_argument(
        "--pages",
        type=_int_list,
        default=default(None),
        help="comma-separated region sizes in pages (default 512,4096; 65536 is a 256 MiB "
        f"region; at most {checks.MAX_PAGES:,}, a 16 GiB guest)",
    )
    sweep.add_argument(
        "--workload",
        action="append",
        default=default(None),
        metavar="mprotect|fork|exec|forkexec|trace:FILE",
        help="a workload; repeat the option or separate with commas (default mprotect; "
        "fork, exec and forkexec need 2 vCPUs; forkexec runs 4 rounds; see pvemu run --help)",
    )
    for name, option in BUFFER_PARAMS.items():
        minimum = f"; at least {checks.MIN_MC_BYTES}" if name == "mc_bytes" else ""
        sweep.add_argument(
            option,
            dest=name,
            type=_limit_list,
            default=default(None),
            help=f"mode xen only: comma-separated {BUFFER_HELP[name]}; 'default' = the "
            f"guest's{minimum}",
        )
    sweep.add_argument(
        "--vcpus",
        type=positive_int,
        default=default(None),
        help=f"vCPUs per guest (default 2, at most {checks.MAX_VCPUS})",
    )
    sweep.add_argument(
        "--sweep-from",
        metavar="FILE",
        default=default(None),
        help="take the sweep (modes, pages, workloads, --mc-*) from a baseline file",
    )


def _add_measurement_options(measure: Container, default: Default) -> None:
    measure.add_argument(
        "--repeat",
        type=positive_int,
        default=default(DEFAULT_REPEAT),
        help=f"guest processes per point, for timings (default {DEFAULT_REPEAT})",
    )
    measure.add_argument(
        "--timeout",
        type=positive_float,
        default=default(DEFAULT_TIMEOUT_S),
        help=f"seconds one guest process may take, more than 0 (default {DEFAULT_TIMEOUT_S:g})",
    )
    measure.add_argument(
        "--memory-mib",
        type=positive_int,
        default=default(None),
        metavar="N",
        help="the hypervisor's machine memory in MiB (default: twice the largest guest's, "
        "plus 64; at least the largest guest's plus 1)",
    )
    measure.add_argument(
        "--cost-model",
        metavar="FILE|default",
        default=default(None),
        help="add an 'est. real us' column: counts x published costs (docs/cost-model.md)",
    )
    measure.add_argument(
        "--inject-guest-args",
        dest="inject",
        action="append",
        type=_inject,
        default=default(None),
        metavar="MODE=ARGS",
        help=(
            "pass ARGS to every MODE guest without changing the point keys, to simulate a "
            "regression (the gate's own test uses it); recorded in the run"
        ),
    )


def _add_output_options(out: Container, default: Default) -> None:
    _add_db_option(out, default(None), what="results database", writes=True)
    out.add_argument("--no-store", action="store_true", default=default(False), help="do not store")
    out.add_argument(
        "--tag", default=default(None), metavar="NAME", help="name the stored run (for compare)"
    )
    out.add_argument(
        "--output",
        "-o",
        type=output_file_in_new_folder,
        default=default(None),
        metavar="FILE",
        help="also write the JSON here (its folder is created)",
    )
    _add_format_options(out, default(False))
    out.add_argument(
        "--quiet", "-q", action="store_true", default=default(False), help="no progress bar"
    )


def _add_db_option(
    parser: Container, default: Any = None, *, what: str = "database", writes: bool = False
) -> None:
    """``--db``; where a run is stored, its folder must be one this process can create."""
    parser.add_argument(
        "--db",
        type=output_file_in_new_folder if writes else str,
        default=default,
        metavar="PATH",
        help=f"{what} ({DEFAULT_DB})",
    )


def _add_format_options(parser: Container, default: Any = False) -> None:
    """``--json``, ``--csv`` or ``--markdown`` instead of the rich table, and
    ``--wide`` for the rich table in one piece on a narrow terminal."""
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json", action="store_true", default=default, help="JSON on stdout (with metadata)"
    )
    fmt.add_argument("--csv", action="store_true", default=default, help="CSV on stdout")
    fmt.add_argument("--markdown", action="store_true", default=default, help="markdown on stdout")
    parser.add_argument(
        "--wide",
        action="store_true",
        default=default,
        help="one table with every column however narrow the terminal (default: stacked parts)",
    )


# --- the other actions -----------------------------------------------------------------


def add_compare_options(compare: argparse.ArgumentParser) -> None:
    compare.add_argument(
        "--baseline",
        metavar="FILE|RUN",
        default=None,
        help=f"what to compare against (default {DEFAULT_BASELINE})",
    )
    compare.add_argument(
        "--against", metavar="RUN", default="latest", help="the run to check (default latest)"
    )
    compare.add_argument(
        "--update-baseline",
        action="store_true",
        help="rewrite the baseline FILE with the --against run's counts (on purpose)",
    )
    _add_db_option(compare)
    _add_format_options(compare)


def add_plot_options(plot: argparse.ArgumentParser) -> None:
    plot.add_argument(
        "--run", dest="run_ref", metavar="RUN", default="latest", help="default latest"
    )
    plot.add_argument(
        "--out",
        type=output_folder,
        default=str(DEFAULT_PLOTS),
        metavar="DIR",
        help=f"output directory (default {DEFAULT_PLOTS})",
    )
    _add_db_option(plot)


def add_list_options(listing: argparse.ArgumentParser) -> None:
    _add_db_option(listing)
    listing.add_argument("--limit", type=positive_int, default=20, help="newest N (default 20)")
    _add_format_options(listing)


# --- reading them back -------------------------------------------------------------------


def sweep_from_args(args: argparse.Namespace) -> Sweep:
    explicit = {name: getattr(args, name, None) for name in SWEEP_OPTIONS}
    sweep_from = getattr(args, "sweep_from", None)
    if sweep_from is not None:
        given = [name for name, value in explicit.items() if value is not None]
        if given:
            raise UsageError(f"--sweep-from replaces the sweep options; drop {', '.join(given)}")
        try:
            return Sweep.from_json(baseline_sweep(sweep_from))
        except ResultsError as exc:
            raise UsageError(str(exc)) from exc
    workloads: tuple[str, ...] = (MPROTECT,)
    if explicit["workload"]:
        workloads = tuple(
            w.strip() for item in explicit["workload"] for w in item.split(",") if w.strip()
        )
    sweep = Sweep(
        modes=explicit["modes"] or DEFAULT_MODES,
        pages=explicit["pages"] or DEFAULT_PAGES,
        workloads=workloads,
        mc_entries=explicit["mc_entries"] or (),
        mc_bytes=explicit["mc_bytes"] or (),
        mc_records=explicit["mc_records"] or (),
        vcpus=explicit["vcpus"] or DEFAULT_VCPUS,
    )
    sweep.check()
    if (sweep.mc_entries or sweep.mc_bytes or sweep.mc_records) and "xen" not in sweep.modes:
        raise UsageError("--mc-* options apply to mode xen only, and xen is not in --modes")
    return sweep
