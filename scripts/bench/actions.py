"""The actions of ``pvemu bench``: run (sweep, store, print), compare (the CI
gate), plot and list. Each takes the parsed arguments and returns the exit
status; a :class:`UsageError` or :class:`ResultsError` is the caller's exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pvemu.scripts.bench import render
from pvemu.scripts.bench.comparison import (
    DEFAULT_BASELINE,
    EXIT_INVALID,
    EXIT_OK,
    compare_runs,
)
from pvemu.scripts.bench.documents import baseline_to_json, load_json_file
from pvemu.scripts.bench.options import sweep_from_args
from pvemu.scripts.bench.provenance import new_run
from pvemu.scripts.bench.runner import SweepOptions, execute
from pvemu.scripts.bench.store import DEFAULT_DB, ResultStore
from pvemu.scripts.bench.sweep import Sweep, UsageError
from pvemu.scripts.report import print_tabular
from pvemu.scripts.results import ResultsError, Run

if TYPE_CHECKING:
    from pvemu.scripts.costmodel import CostModel

#: The ``pvemu bench list --json`` document.
LIST_SCHEMA = "pvemu-bench-list/1"
#: The exit status of an interrupted run (128 + SIGINT), which stores nothing.
EXIT_INTERRUPTED = 130


def err(message: str) -> None:
    print(f"pvemu bench: {message}", file=sys.stderr)


def _format(args: argparse.Namespace) -> str:
    from pvemu.scripts.report import output_format

    return output_format(args)


def _wide(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "wide", False))


def _db_path(args: argparse.Namespace) -> Path:
    db = getattr(args, "db", None)
    return Path(db) if db else DEFAULT_DB


def _existing_db(db: Path, hint: str = "") -> Path:
    """``db`` if it exists: reading never creates a database."""
    if not db.is_file():
        raise ResultsError(f"no results database at {db}{hint}")
    return db


# --- run -------------------------------------------------------------------------


def check_run(sweep: Sweep, options: SweepOptions, host_mib: int) -> None:
    """What would fail every point of the sweep, before the hypervisor starts."""
    from pvemu.scripts import checks
    from pvemu.scripts.workloads import RUN_WORKLOADS

    largest = max(sweep.pages)
    for workload in [w for w in sweep.workloads if w in RUN_WORKLOADS] or ["mprotect"]:
        checks.check_pages(largest, host_mib, workload=workload)
    if options.memory_mib is not None and sweep.needs_hypervisor:
        checks.check_machine_memory(options.memory_mib, host_mib)
        need = sweep.largest_guest_mib() + 1
        checks.check_enough_memory(options.memory_mib, need, f"a {largest:,}-page guest and Xen")


def action_run(args: argparse.Namespace) -> int:
    from pvemu.scripts import checks

    sweep = sweep_from_args(args)
    model = _cost_model(args)
    options = _sweep_options(args)
    check_run(sweep, options, checks.host_memory_mib())
    if not getattr(args, "no_store", False):  # the run is stored at its end: check now
        checks.check_output_folder(str(_db_path(args).absolute().parent), "--db")
    if options.inject:
        err(f"WARNING: injected guest arguments {options.inject}: this run is deliberately altered")
    config = _run_config(sweep, options, model)
    started = time.perf_counter()
    try:
        points = execute(sweep, options)
    except KeyboardInterrupt:
        err("interrupted: nothing was stored")
        return EXIT_INTERRUPTED
    except RuntimeError as exc:
        err(str(exc))
        return EXIT_INVALID
    config["elapsed_s"] = round(time.perf_counter() - started, 3)
    run = new_run(config, points)
    if not getattr(args, "no_store", False):
        _store(run, args)
    output = getattr(args, "output", None)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(render.run_document(run, model), indent=2) + "\n")
    render.print_run(run, model, _format(args), wide=_wide(args))
    bad = [p for p in run.points if not p.valid]
    for point in bad:
        err(f"INVALID point {point.key}: {point.reason}")
    return EXIT_INVALID if bad else EXIT_OK


def _cost_model(args: argparse.Namespace) -> CostModel | None:
    from pvemu.scripts import costmodel

    if not getattr(args, "cost_model", None):
        return None
    try:
        return costmodel.load(args.cost_model)
    except costmodel.CostModelError as exc:
        raise UsageError(str(exc)) from exc


def _sweep_options(args: argparse.Namespace) -> SweepOptions:
    return SweepOptions(
        repeat=args.repeat,
        timeout=args.timeout,
        inject={mode: extra for mode, extra in (getattr(args, "inject", None) or [])},
        progress=not getattr(args, "quiet", False),
        memory_mib=getattr(args, "memory_mib", None),
    )


def _run_config(sweep: Sweep, options: SweepOptions, model: CostModel | None) -> dict[str, Any]:
    """The run's recorded configuration (``elapsed_s`` and the machine follow)."""
    return {
        "sweep": sweep.as_json(),
        "repeat": options.repeat,
        "timeout_s": options.timeout,
        "inject": options.inject,
        "cost_model": model.as_dict() if model is not None else None,
    }


def _store(run: Run, args: argparse.Namespace) -> None:
    with ResultStore(_db_path(args)) as store:
        run_id = store.save_run(run)
        if getattr(args, "tag", None):
            store.tag(args.tag, run_id)
    err(f"stored as run #{run_id} in {_db_path(args)}")


# --- compare ---------------------------------------------------------------------


def load_ref(ref: str, db: Path) -> Run:
    """A run from a JSON file (run or baseline) or from the store."""
    path = Path(ref)
    if path.is_file():
        return load_json_file(path)
    if ref.endswith(".json") or os.sep in ref:
        raise ResultsError(f"no such file: {ref}")
    with ResultStore(_existing_db(db, " (run 'pvemu bench' first)")) as store:
        return store.load_run(store.resolve(ref))


def action_compare(args: argparse.Namespace) -> int:
    db = _db_path(args)
    baseline_ref = args.baseline or str(DEFAULT_BASELINE)
    against = load_ref(args.against, db)
    if args.update_baseline:
        return _update_baseline(Path(baseline_ref), against)
    baseline = load_ref(baseline_ref, db)
    cmp = compare_runs(baseline, against)
    if against.injected:
        err(f"note: {against.origin} ran with injected guest arguments {against.config['inject']}")
    render.print_comparison(cmp, _format(args), wide=_wide(args))
    return cmp.status


def _update_baseline(path: Path, against: Run) -> int:
    if not against.valid:
        bad = next(p for p in against.points if not p.valid)
        err(f"{against.origin} is invalid ({bad.key}: {bad.reason}); baseline not written")
        return EXIT_INVALID
    if against.injected:
        raise UsageError(f"{against.origin} ran with injected guest arguments; refusing")
    sweep = against.config.get("sweep")
    if not isinstance(sweep, dict):
        raise UsageError(f"{against.origin} records no sweep configuration")
    if path.is_file():
        with contextlib.suppress(ResultsError):
            for line in render.summary_lines(compare_runs(load_json_file(path), against)):
                err(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline_to_json(against, sweep), indent=2) + "\n")
    err(f"wrote {path} from {against.origin} ({len(against.points)} points)")
    return EXIT_OK


# --- plot and list ---------------------------------------------------------------


def action_plot(args: argparse.Namespace) -> int:
    from pvemu.scripts.plots import render as render_plots

    run = load_ref(args.run_ref, _db_path(args))
    invalid = [p.key for p in run.points if not p.valid]
    if invalid:
        err(f"skipping {len(invalid)} invalid point(s): {', '.join(invalid)}")
    written, notes = render_plots(run, Path(args.out))
    for note in notes:
        err(note)
    for path in written:
        print(path)
    return EXIT_OK


def action_list(args: argparse.Namespace) -> int:
    with ResultStore(_existing_db(_db_path(args))) as store:
        rows = store.runs_summary(args.limit)
    fmt = _format(args)
    if fmt == "json":
        from pvemu.scripts.bench.provenance import document

        config = {"db": str(_db_path(args)), "limit": args.limit}
        print(json.dumps(document(LIST_SCHEMA, config, {"runs": rows}), indent=2))
    else:
        print_tabular(render.runs_tabular(rows), fmt, wide=_wide(args))
    return EXIT_OK
