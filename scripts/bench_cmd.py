"""``pvemu bench``: the benchmark harness.

``pvemu bench [run]`` sweeps modes x sizes x multicall-buffer limits x
workloads in real processes (one hypervisor process for the sweep, one guest
process per point per repeat), stores the run in SQLite and prints a table.
``pvemu bench compare`` diffs counts exactly against a baseline (the CI gate),
``pvemu bench plot`` draws the run, ``pvemu bench list`` lists stored runs.
Exit codes: 0 ok, 1 count regression, 2 usage error, 3 invalid run.

This module is the command line's entry point (``pvemu bench`` and
``python -m pvemu.scripts.bench_cmd``); the pieces live in ``scripts/bench/``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Final

from pvemu.guest.modes import MODE_NAMES
from pvemu.scripts.bench import actions, options
from pvemu.scripts.bench.comparison import DEFAULT_BASELINE, EXIT_USAGE
from pvemu.scripts.bench.store import DEFAULT_DB
from pvemu.scripts.bench.sweep import UsageError
from pvemu.scripts.errors import UserError
from pvemu.scripts.results import ResultsError

#: The help line of the ``bench`` row in scripts/cli.py.
HELP: Final = "sweep modes x sizes x buffer limits, store, compare (CI gate) and plot"

EPILOG = f"""\
actions:
  run (default)  sweep and store; the table goes to stdout, progress to stderr
  compare        diff counts against a baseline file or a stored run (the CI gate)
  plot           PNG + SVG plots of a run
  list           the stored runs

A sweep is modes x pages x workloads; for mode xen also x every combination
of the --mc-* lists. Each point runs --repeat times in fresh guest processes
(rounds interleaved); counts come from the first repeat and must be equal in
every repeat, times are reported as the median and p10-p90 of the repeats.
A point is invalid if the guest's and the hypervisor's counts disagree, if
audit() is not clean, or if repeats disagree; an invalid run exits 3.

modes: {", ".join(MODE_NAMES)} (naive is UNSAFE)

examples:
  pvemu bench                                   # default sweep, stored in {DEFAULT_DB}
  pvemu bench --pages 512 --modes xen,batched --repeat 5
  pvemu bench --modes xen --mc-bytes 128,256,512,1024 --cost-model default
  pvemu bench --pages 65536 --modes xen,batched --repeat 1
  pvemu bench compare --baseline 3 --against latest
  pvemu bench compare --baseline {DEFAULT_BASELINE}
  pvemu bench plot --out .pvemu/plots
"""

COMPARE_DESCRIPTION: Final = (
    "Counts are diffed exactly: any increase is a regression (exit 1). Times are "
    "ratios of medians with a note: 'significant' when the p10-p90 bands of the two "
    "sides do not overlap (both sides need 3+ repeats), never an exit status. "
    "Exit 0 ok, 1 count regression, 2 usage error or baseline points not measured, "
    "3 invalid run. RUN is a stored run id, 'latest', a --tag name or a JSON file."
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    options.add_run_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="bench_action", title="actions", metavar="[ACTION]")
    run_parser = sub.add_parser("run", help="sweep, store and print (the default)")
    options.add_run_options(run_parser, suppress=True)
    options.add_compare_options(
        sub.add_parser(
            "compare",
            help="diff counts against a baseline; exit 1 on any increase",
            description=COMPARE_DESCRIPTION,
        )
    )
    options.add_plot_options(sub.add_parser("plot", help="PNG and SVG plots of a run"))
    options.add_list_options(sub.add_parser("list", help="list the stored runs"))


ACTIONS: Final[dict[str | None, Callable[[argparse.Namespace], int]]] = {
    None: actions.action_run,
    "run": actions.action_run,
    "compare": actions.action_compare,
    "plot": actions.action_plot,
    "list": actions.action_list,
}


def run(args: argparse.Namespace) -> int:
    action = ACTIONS[getattr(args, "bench_action", None)]
    try:
        return action(args)
    except (UsageError, ResultsError) as exc:
        actions.err(str(exc))
        return EXIT_USAGE
    except UserError as exc:
        actions.err(exc.message)
        return exc.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pvemu.scripts.bench_cmd``: the same as ``pvemu bench``."""
    parser = argparse.ArgumentParser(prog="pvemu bench", description=HELP)
    configure(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    from pvemu.scripts.error_path import exit_status

    # The one error path of 'pvemu bench': one line, SIGTERM as SIGINT.
    return exit_status("pvemu bench", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
