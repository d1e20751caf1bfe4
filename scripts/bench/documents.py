"""The JSON forms of benchmark results: the ``pvemu bench --json`` run
document and the checked-in baseline file (``benchmarks/baseline.json``),
written and read back. ``docs/benchmarks.md`` documents both schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from pvemu.scripts.bench.provenance import run_block
from pvemu.scripts.results import GATED_COUNTS, Point, ResultsError, Run, Timing

#: Version of the bench-run JSON document (``pvemu bench --json``).
RUN_SCHEMA: Final = "pvemu-bench/1"
#: Version of the checked-in baseline file (``benchmarks/baseline.json``).
BASELINE_SCHEMA: Final = "pvemu-baseline/1"
#: The ``--json`` documents of the other commands (each with the same
#: metadata block as a bench run, ``provenance.document``).
RUN_CMD_SCHEMA: Final = "pvemu-run/1"
GUEST_SCHEMA: Final = "pvemu-guest/1"
RACE_SCHEMA: Final = "pvemu-race/1"
LOAD_SCHEMA: Final = "pvemu-load/1"
TRACE_REPLAY_SCHEMA: Final = "pvemu-trace-replay/1"
TRACE_SHOW_SCHEMA: Final = "pvemu-trace-show/1"
COMPARE_SCHEMA: Final = "pvemu-compare/1"
INFO_SCHEMA: Final = "pvemu-info/1"
#: Documents that hold no per-phase trap counts, and so cannot be compared.
_NOT_COMPARABLE: Final = {
    RACE_SCHEMA: "pvemu race (lost bits per mode, not counts per phase)",
    LOAD_SCHEMA: "pvemu load (throughput and latency, not counts per phase)",
    TRACE_SHOW_SCHEMA: "pvemu trace show (a trace's summary, not a measurement)",
    COMPARE_SCHEMA: "pvemu bench compare (a comparison, not a run)",
    INFO_SCHEMA: "pvemu info (the ABI served, not a measurement)",
}


def timing_json(timing: Timing) -> dict[str, float | int]:
    return {
        "median_s": round(timing.median, 9),
        "p10_s": round(timing.p10, 9),
        "p90_s": round(timing.p90, 9),
        "n": timing.n,
    }


def _point_fields(point: Point) -> dict[str, Any]:
    """What names a point, in both documents: the fields of its key."""
    return {
        "workload": point.workload,
        "mode": point.mode,
        "pages": point.pages,
        "params": dict(sorted(point.params.items())),
    }


def point_to_json(point: Point) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    for phase in dict.fromkeys([*point.counts, *point.samples]):
        entry: dict[str, Any] = {"counts": dict(point.counts.get(phase, {}))}
        timing = point.timing(phase)
        if timing is not None:
            entry["time"] = timing_json(timing)
            entry["samples_s"] = [round(s, 9) for s in point.samples[phase]]
        phases[phase] = entry
    return {
        "key": point.key,
        **_point_fields(point),
        "unsafe": point.unsafe,
        "valid": point.valid,
        "reason": point.reason,
        "phases": phases,
    }


def run_to_json(run: Run) -> dict[str, Any]:
    """The ``pvemu bench --json`` document (schema :data:`RUN_SCHEMA`)."""
    return {
        "schema": RUN_SCHEMA,
        "run": run_block(run),
        "valid": run.valid,
        "points": [point_to_json(p) for p in run.points],
    }


def _int_counts(doc: Any, where: str) -> dict[str, int]:
    if not isinstance(doc, dict):
        raise ResultsError(f"{where}: counts must be an object")
    out: dict[str, int] = {}
    for name, value in doc.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise ResultsError(f"{where}: count {name} must be an integer")
        out[str(name)] = value
    return out


def _point_from_json(doc: Any, where: str) -> Point:
    if not isinstance(doc, dict):
        raise ResultsError(f"{where}: a point must be an object")
    try:
        point = Point(
            workload=str(doc["workload"]),
            mode=str(doc["mode"]),
            pages=int(doc["pages"]),
            params={str(k): int(v) for k, v in doc.get("params", {}).items()},
            valid=bool(doc.get("valid", True)),
            reason=str(doc.get("reason", "")),
            unsafe=bool(doc.get("unsafe", False)),
        )
        phases = doc["phases"]
        if not isinstance(phases, dict):
            raise ResultsError(f"{where}: phases must be an object")
        for phase, entry in phases.items():
            here = f"{where} {point.key} {phase}"
            if "counts" in entry:
                point.counts[phase] = _int_counts(entry["counts"], here)
            if "samples_s" in entry:
                point.samples[phase] = [float(s) for s in entry["samples_s"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ResultsError(f"{where}: malformed point ({exc!r})") from exc
    return point


def run_from_json(doc: Any, origin: str = "") -> Run:
    """Read a bench-run document or a baseline document (counts only)."""
    if not isinstance(doc, dict):
        raise ResultsError(f"{origin}: not a JSON object")
    schema = doc.get("schema")
    if schema == BASELINE_SCHEMA:
        return _baseline_from_json(doc, origin)
    if schema in (RUN_CMD_SCHEMA, TRACE_REPLAY_SCHEMA):
        return _modes_from_json(doc, origin)
    if schema in _NOT_COMPARABLE:
        raise ResultsError(
            f"{origin} is the output of {_NOT_COMPARABLE[schema]}: it cannot be compared; "
            f"use pvemu bench --json, pvemu run --json, pvemu trace replay --json or a baseline"
        )
    if schema != RUN_SCHEMA:
        readable = ", ".join((RUN_SCHEMA, RUN_CMD_SCHEMA, TRACE_REPLAY_SCHEMA, BASELINE_SCHEMA))
        hint = " (pvemu run --json before its metadata block: rerun it)" if schema == 1 else ""
        raise ResultsError(f"{origin}: unknown schema {schema!r}{hint}; expected one of {readable}")
    meta = doc.get("run", {})
    if not isinstance(meta, dict) or not isinstance(doc.get("points"), list):
        raise ResultsError(f"{origin}: malformed run document")
    return Run(
        created_utc=str(meta.get("created_utc", "")),
        git_sha=meta.get("git_sha"),
        git_dirty=meta.get("git_dirty"),
        host=str(meta.get("host", "")),
        python=str(meta.get("python", "")),
        packages=dict(meta.get("packages", {})),
        config=dict(meta.get("config", {})),
        points=[_point_from_json(p, origin) for p in doc["points"]],
        id=meta.get("id"),
        origin=origin,
    )


def _modes_from_json(doc: dict[str, Any], origin: str) -> Run:
    """A ``pvemu run --json`` or ``pvemu trace replay --json`` document as a
    run: one point per mode, keyed as ``pvemu bench`` keys the same
    measurement (``fork MODE pages=N``, ``trace:FILE MODE pages=0``), so
    that a run compares against a bench run or a baseline of the same size.
    A forkexec run of other rounds than bench's default says so in its key
    (``loops=N``), so that it is never compared with the default's counts."""
    from pvemu.scripts.workloads import FORKEXEC, effective_loops

    meta = doc.get("run")
    results = doc.get("results")
    if not isinstance(meta, dict) or not isinstance(results, list):
        raise ResultsError(f"{origin}: malformed {doc.get('schema')} document")
    params: dict[str, int] = {}
    if doc["schema"] == TRACE_REPLAY_SCHEMA:
        workload, pages = f"trace:{doc.get('file', '')}", 0
    else:  # a run written before --workload ran mprotect
        workload, pages = str(doc.get("workload", "mprotect")), doc.get("pages", 0)
        loops = doc.get("loops")
        if (
            workload == FORKEXEC
            and isinstance(loops, int)
            and loops != effective_loops(workload, None)
        ):
            params["loops"] = loops
    points = []
    for result in results:
        if not isinstance(result, dict) or "mode" not in result:
            raise ResultsError(f"{origin}: a result must be an object with a mode")
        mode = str(result["mode"])
        point = Point(workload, mode, int(pages), dict(params), unsafe=bool(result.get("unsafe")))
        if "error" in result:
            point.invalidate(f"the guest failed: {result['error']}")
        elif not result.get("counts_agree") or not result.get("audit_clean"):
            point.invalidate("guest- and hypervisor-side counts disagree or audit() not clean")
        phases = result.get("phases", {})
        if not isinstance(phases, dict):
            raise ResultsError(f"{origin}: {point.key}: phases must be an object")
        for phase, values in phases.items():
            counts = {k: v for k, v in values.items() if k != "wall_s"}
            point.counts[phase] = _int_counts(counts, f"{origin} {point.key} {phase}")
            if isinstance(values.get("wall_s"), int | float):
                point.samples[phase] = [float(values["wall_s"])]
        points.append(point)
    return Run(
        created_utc=str(meta.get("created_utc", "")),
        git_sha=meta.get("git_sha"),
        git_dirty=meta.get("git_dirty"),
        host=str(meta.get("host", "")),
        python=str(meta.get("python", "")),
        packages=dict(meta.get("packages", {})),
        config=dict(meta.get("config", {})),
        points=points,
        origin=origin,
    )


def baseline_to_json(run: Run, sweep: dict[str, Any]) -> dict[str, Any]:
    """The checked-in baseline: the exact gated counts of every point of a
    valid run, and the sweep that reproduces them. Keys sorted for diffs."""
    points: dict[str, Any] = {}
    for point in sorted(run.points, key=lambda p: p.key):
        points[point.key] = {
            **_point_fields(point),
            "counts": {
                phase: {name: counts[name] for name in GATED_COUNTS if name in counts}
                for phase, counts in point.counts.items()
            },
        }
    return {
        "schema": BASELINE_SCHEMA,
        "note": (
            "Exact counts of the CI sweep (make bench-ci). Any increase fails the gate; "
            "rewrite on purpose with: pvemu bench compare --against RUN --update-baseline"
        ),
        "sweep": sweep,
        "points": points,
    }


def _baseline_from_json(doc: dict[str, Any], origin: str) -> Run:
    points_doc = doc.get("points")
    if not isinstance(points_doc, dict):
        raise ResultsError(f"{origin}: baseline points must be an object")
    points: list[Point] = []
    for key, entry in points_doc.items():
        point = _point_from_json({**entry, "phases": {}}, origin)
        if point.key != key:
            raise ResultsError(f"{origin}: point {key!r} does not match its fields ({point.key})")
        counts = entry.get("counts", {})
        if not isinstance(counts, dict):
            raise ResultsError(f"{origin}: {key}: counts must be an object")
        point.counts = {phase: _int_counts(c, f"{origin} {key}") for phase, c in counts.items()}
        points.append(point)
    sweep = doc.get("sweep", {})
    return Run(
        created_utc="",
        git_sha=None,
        git_dirty=None,
        host="",
        python="",
        config={"sweep": sweep} if isinstance(sweep, dict) else {},
        points=points,
        origin=origin,
    )


def load_json_file(path: str | Path) -> Run:
    """A run or baseline from a JSON file."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not JSON: {exc}") from exc
    return run_from_json(doc, origin=str(path))


def baseline_sweep(path: str | Path) -> dict[str, Any]:
    """The sweep configuration recorded in a baseline file."""
    run = load_json_file(path)
    sweep = run.config.get("sweep")
    if not isinstance(sweep, dict) or not sweep:
        raise ResultsError(f"{path} records no sweep")
    return sweep
