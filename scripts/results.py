"""Benchmark results: the in-memory model, its JSON forms, the SQLite store
and the comparison of two runs.

A *run* is one ``pvemu bench`` sweep: metadata (time, git commit, host,
versions, the full configuration) and its *points*. A point is one
(workload, mode, pages, multicall-buffer params) configuration; it holds the
exact counts per phase (deterministic: taken from the first repeat and
checked equal in every other) and the wall time of each repeat per phase.

The store is one SQLite file (stdlib ``sqlite3``): STRICT tables, WAL,
``PRAGMA user_version`` migrations, and one transaction per run, so a run
killed while it is being written leaves no trace. ``docs/benchmarks.md``
documents the tables and the JSON schemas.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: Version of the bench-run JSON document (``pvemu bench --json``).
RUN_SCHEMA: Final = "pvemu-bench/1"
#: Version of the checked-in baseline file (``benchmarks/baseline.json``).
BASELINE_SCHEMA: Final = "pvemu-baseline/1"
#: Version of the ``pvemu bench compare --json`` document.
COMPARE_SCHEMA: Final = "pvemu-compare/1"
#: ``runs.schema_version``: the layout of one run's rows.
RUN_ROWS_VERSION: Final = 1

#: Counts the gate compares (the per-phase counters of ``pvemu guest --json``;
#: equal to ``guest.workload.PHASE_FIELDS``, which a test checks).
GATED_COUNTS: Final = (
    "traps",
    "hypercalls",
    "multicall_entries",
    "records",
    "ptwr",
    "page_faults",
    "flush_ops",
)
#: Every count kept per phase: the gated ones and the guest's own trap count.
COUNT_FIELDS: Final = (*GATED_COUNTS, "guest_traps")
#: Multicall-buffer parameters, named as the point keys and JSON name them,
#: with the ``pvemu guest`` option each one maps to.
BUFFER_PARAMS: Final = {
    "mc_entries": "--mc-entries",
    "mc_bytes": "--mc-bytes",
    "mc_records": "--mc-records",
}

DEFAULT_DB: Final = Path(".pvemu") / "results.db"


class ResultsError(Exception):
    """A results file or store that cannot be used (missing, wrong schema)."""


# --- the model ---------------------------------------------------------------------


def point_key(workload: str, mode: str, pages: int, params: dict[str, int]) -> str:
    """The stable name of a point, e.g. ``mprotect xen pages=600 mc_bytes=256``."""
    parts = [workload, mode, f"pages={pages}"]
    parts += [f"{name}={params[name]}" for name in sorted(params)]
    return " ".join(parts)


@dataclass(frozen=True)
class Timing:
    """Median and p10/p90 of the repeats, in seconds."""

    median: float
    p10: float
    p90: float
    n: int


def percentile(samples: Sequence[float], q: float) -> float:
    """The sample at quantile ``q`` (nearest rank, no interpolation): a p99 is
    a latency some request really had."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(samples: Sequence[float]) -> Timing:
    """Median, p10 and p90 (inclusive quantiles) of one phase's wall times."""
    if not samples:
        raise ValueError("no samples")
    median = statistics.median(samples)
    if len(samples) < 2:
        return Timing(median, median, median, len(samples))
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(median, deciles[0], deciles[-1], len(samples))


@dataclass
class Point:
    """One configuration of a sweep and what it measured."""

    workload: str
    mode: str
    pages: int
    params: dict[str, int] = field(default_factory=dict)
    valid: bool = True
    reason: str = ""
    unsafe: bool = False
    #: phase -> count name -> value (first repeat; identical in every repeat).
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    #: phase -> wall seconds of each repeat, in run order.
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return point_key(self.workload, self.mode, self.pages, self.params)

    def timing(self, phase: str) -> Timing | None:
        samples = self.samples.get(phase)
        return summarize(samples) if samples else None

    def total_timing(self, phases: Sequence[str]) -> Timing | None:
        """Timing of several phases added up repeat by repeat."""
        columns = [self.samples.get(p, []) for p in phases]
        if not columns or not all(columns) or len({len(c) for c in columns}) != 1:
            return None
        return summarize([sum(values) for values in zip(*columns, strict=True)])

    def invalidate(self, reason: str) -> None:
        if self.valid:
            self.valid = False
            self.reason = reason


@dataclass
class Run:
    """One sweep: metadata and points."""

    created_utc: str
    git_sha: str | None
    git_dirty: bool | None
    host: str
    python: str
    packages: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    points: list[Point] = field(default_factory=list)
    id: int | None = None
    #: Where the run came from, for messages: ``run #3``, a file name.
    origin: str = ""

    @property
    def valid(self) -> bool:
        return all(p.valid for p in self.points)

    def by_key(self) -> dict[str, Point]:
        return {p.key: p for p in self.points}

    @property
    def injected(self) -> bool:
        """True if guest arguments were injected (a deliberately altered run)."""
        return bool(self.config.get("inject"))


# --- JSON --------------------------------------------------------------------------


def _timing_json(timing: Timing) -> dict[str, float | int]:
    return {
        "median_s": round(timing.median, 9),
        "p10_s": round(timing.p10, 9),
        "p90_s": round(timing.p90, 9),
        "n": timing.n,
    }


def point_to_json(point: Point) -> dict[str, Any]:
    phases: dict[str, Any] = {}
    for phase in dict.fromkeys([*point.counts, *point.samples]):
        entry: dict[str, Any] = {"counts": dict(point.counts.get(phase, {}))}
        timing = point.timing(phase)
        if timing is not None:
            entry["time"] = _timing_json(timing)
            entry["samples_s"] = [round(s, 9) for s in point.samples[phase]]
        phases[phase] = entry
    return {
        "key": point.key,
        "workload": point.workload,
        "mode": point.mode,
        "pages": point.pages,
        "params": dict(sorted(point.params.items())),
        "unsafe": point.unsafe,
        "valid": point.valid,
        "reason": point.reason,
        "phases": phases,
    }


def run_to_json(run: Run) -> dict[str, Any]:
    """The ``pvemu bench --json`` document (schema :data:`RUN_SCHEMA`)."""
    return {
        "schema": RUN_SCHEMA,
        "run": {
            "id": run.id,
            "created_utc": run.created_utc,
            "git_sha": run.git_sha,
            "git_dirty": run.git_dirty,
            "host": run.host,
            "python": run.python,
            "packages": run.packages,
            "config": run.config,
        },
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
    if schema != RUN_SCHEMA:
        raise ResultsError(
            f"{origin}: unknown schema {schema!r} (expected {RUN_SCHEMA} or {BASELINE_SCHEMA})"
        )
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


def baseline_to_json(run: Run, sweep: dict[str, Any]) -> dict[str, Any]:
    """The checked-in baseline: the exact gated counts of every point of a
    valid run, and the sweep that reproduces them. Keys sorted for diffs."""
    points: dict[str, Any] = {}
    for point in sorted(run.points, key=lambda p: p.key):
        points[point.key] = {
            "workload": point.workload,
            "mode": point.mode,
            "pages": point.pages,
            "params": dict(sorted(point.params.items())),
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


# --- the SQLite store ----------------------------------------------------------------

#: Migrations: entry i (0-based) takes ``user_version`` i to i + 1. Append only.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            created_utc TEXT NOT NULL,
            git_sha TEXT,
            git_dirty INTEGER,
            host TEXT NOT NULL,
            python TEXT NOT NULL,
            packages_json TEXT NOT NULL,
            config_json TEXT NOT NULL,
            schema_version INTEGER NOT NULL,
            valid INTEGER NOT NULL
        ) STRICT""",
        """CREATE TABLE points (
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            point_key TEXT NOT NULL,
            workload TEXT NOT NULL,
            mode TEXT NOT NULL,
            pages INTEGER NOT NULL,
            params_json TEXT NOT NULL,
            valid INTEGER NOT NULL,
            reason TEXT NOT NULL,
            unsafe INTEGER NOT NULL,
            PRIMARY KEY (run_id, point_key)
        ) STRICT""",
        """CREATE TABLE metrics (
            run_id INTEGER NOT NULL,
            point_key TEXT NOT NULL,
            workload TEXT NOT NULL,
            mode TEXT NOT NULL,
            pages INTEGER NOT NULL,
            params_json TEXT NOT NULL,
            phase TEXT NOT NULL,
            metric TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('count', 'time')),
            unit TEXT NOT NULL,
            sample INTEGER NOT NULL,
            value REAL NOT NULL,
            FOREIGN KEY (run_id, point_key) REFERENCES points(run_id, point_key)
                ON DELETE CASCADE
        ) STRICT""",
        "CREATE INDEX metrics_by_point ON metrics(run_id, point_key, phase)",
        """CREATE TABLE baselines (
            name TEXT PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            created_utc TEXT NOT NULL
        ) STRICT""",
    ),
)


class ResultStore:
    """The results database. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        path: str | Path = DEFAULT_DB,
        *,
        migrations: Sequence[Sequence[str]] = MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every transaction is an explicit BEGIN ... COMMIT.
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(migrations)
        except BaseException:
            self.conn.close()
            raise

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    @property
    def user_version(self) -> int:
        version: int = self.conn.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _migrate(self, migrations: Sequence[Sequence[str]]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            current = self.user_version
            if current > len(migrations):
                raise ResultsError(
                    f"{self.path} has schema version {current}, newer than this pvemu "
                    f"understands ({len(migrations)}); upgrade pvemu or use another --db"
                )
            for version in range(current, len(migrations)):
                for statement in migrations[version]:
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {version + 1}")
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    # -- writing ----------------------------------------------------------------------

    def save_run(self, run: Run) -> int:
        """Store a run and all its points and metrics in one transaction;
        returns its id (also set on ``run.id``)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = self.conn.execute(
                "INSERT INTO runs (created_utc, git_sha, git_dirty, host, python, "
                "packages_json, config_json, schema_version, valid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.created_utc,
                    run.git_sha,
                    None if run.git_dirty is None else int(run.git_dirty),
                    run.host,
                    run.python,
                    json.dumps(run.packages, sort_keys=True),
                    json.dumps(run.config, sort_keys=True),
                    RUN_ROWS_VERSION,
                    int(run.valid),
                ),
            )
            run_id = cursor.lastrowid
            assert run_id is not None
            for point in run.points:
                self._insert_point(run_id, point)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        run.id = run_id
        return run_id

    def _insert_point(self, run_id: int, point: Point) -> None:
        params_json = json.dumps(point.params, sort_keys=True)
        ident = (run_id, point.key, point.workload, point.mode, point.pages, params_json)
        self.conn.execute(
            "INSERT INTO points (run_id, point_key, workload, mode, pages, params_json, "
            "valid, reason, unsafe) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*ident, int(point.valid), point.reason, int(point.unsafe)),
        )
        rows: list[tuple[Any, ...]] = []
        for phase, counts in point.counts.items():
            for metric, value in counts.items():
                rows.append((*ident, phase, metric, "count", "count", 0, float(value)))
        for phase, samples in point.samples.items():
            for i, seconds in enumerate(samples):
                rows.append((*ident, phase, "wall", "time", "s", i, seconds))
        self.conn.executemany(
            "INSERT INTO metrics (run_id, point_key, workload, mode, pages, params_json, "
            "phase, metric, kind, unit, sample, value) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    def tag(self, name: str, run_id: int) -> None:
        """Name a stored run (``pvemu bench --tag NAME``); a name moves."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                "INSERT INTO baselines (name, run_id, created_utc) "
                "VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%SZ', 'now')) "
                "ON CONFLICT (name) DO UPDATE SET run_id = excluded.run_id, "
                "created_utc = excluded.created_utc",
                (name, run_id),
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    # -- reading ----------------------------------------------------------------------

    def run_ids(self) -> list[int]:
        return [row[0] for row in self.conn.execute("SELECT id FROM runs ORDER BY id")]

    def latest_run_id(self) -> int | None:
        row = self.conn.execute("SELECT max(id) FROM runs").fetchone()
        return None if row[0] is None else int(row[0])

    def resolve(self, ref: str) -> int:
        """A run id from ``latest``, a number or a tag name."""
        if ref == "latest":
            latest = self.latest_run_id()
            if latest is None:
                raise ResultsError(f"{self.path} holds no runs yet")
            return latest
        if ref.isdigit():
            row = self.conn.execute("SELECT id FROM runs WHERE id = ?", (int(ref),)).fetchone()
        else:
            row = self.conn.execute(
                "SELECT run_id FROM baselines WHERE name = ?", (ref,)
            ).fetchone()
        if row is None:
            raise ResultsError(f"no run {ref!r} in {self.path}")
        return int(row[0])

    def load_run(self, run_id: int) -> Run:
        row = self.conn.execute(
            "SELECT created_utc, git_sha, git_dirty, host, python, packages_json, config_json "
            "FROM runs WHERE id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise ResultsError(f"no run #{run_id} in {self.path}")
        run = Run(
            created_utc=row[0],
            git_sha=row[1],
            git_dirty=None if row[2] is None else bool(row[2]),
            host=row[3],
            python=row[4],
            packages=json.loads(row[5]),
            config=json.loads(row[6]),
            id=run_id,
            origin=f"run #{run_id}",
        )
        points: dict[str, Point] = {}
        for key, workload, mode, pages, params_json, valid, reason, unsafe in self.conn.execute(
            "SELECT point_key, workload, mode, pages, params_json, valid, reason, unsafe "
            "FROM points WHERE run_id = ? ORDER BY rowid",
            (run_id,),
        ):
            points[key] = Point(
                workload=workload,
                mode=mode,
                pages=pages,
                params=json.loads(params_json),
                valid=bool(valid),
                reason=reason,
                unsafe=bool(unsafe),
            )
        for key, phase, metric, kind, value in self.conn.execute(
            "SELECT point_key, phase, metric, kind, value FROM metrics "
            "WHERE run_id = ? ORDER BY rowid",
            (run_id,),
        ):
            point = points[key]
            if kind == "count":
                point.counts.setdefault(phase, {})[metric] = int(value)
            else:
                point.samples.setdefault(phase, []).append(float(value))
        run.points = list(points.values())
        return run

    def runs_summary(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest runs: id, time, commit, validity and point count."""
        out = []
        for run_id, created, sha, dirty, valid, npoints in self.conn.execute(
            "SELECT r.id, r.created_utc, r.git_sha, r.git_dirty, r.valid, "
            "(SELECT count(*) FROM points p WHERE p.run_id = r.id) "
            "FROM runs r ORDER BY r.id DESC LIMIT ?",
            (limit,),
        ):
            out.append(
                {
                    "id": run_id,
                    "created_utc": created,
                    "git_sha": sha,
                    "git_dirty": None if dirty is None else bool(dirty),
                    "valid": bool(valid),
                    "points": npoints,
                }
            )
        return out

    def count_history(
        self, point_key_: str, phase: str, metric: str = "traps"
    ) -> list[tuple[int, str, str | None, int]]:
        """(run id, time, commit, value) of one count across every stored run."""
        return [
            (int(run_id), created, sha, int(value))
            for run_id, created, sha, value in self.conn.execute(
                "SELECT r.id, r.created_utc, r.git_sha, m.value FROM metrics m "
                "JOIN runs r ON r.id = m.run_id "
                "WHERE m.point_key = ? AND m.phase = ? AND m.metric = ? AND m.kind = 'count' "
                "ORDER BY r.id",
                (point_key_, phase, metric),
            )
        ]


# --- comparison ----------------------------------------------------------------------

#: Exit codes shared by ``pvemu bench`` and ``pvemu bench compare``.
EXIT_OK: Final = 0
EXIT_REGRESSION: Final = 1
EXIT_USAGE: Final = 2
EXIT_INVALID: Final = 3

#: Fewer repeats than this on either side: timings are shown, never judged.
MIN_REPEATS_FOR_SIGNIFICANCE: Final = 3


@dataclass(frozen=True)
class CountChange:
    key: str
    phase: str
    metric: str
    baseline: int | None
    new: int | None

    @property
    def delta(self) -> int:
        return (self.new or 0) - (self.baseline or 0)

    @property
    def regression(self) -> bool:
        """An increase, or a count one side lacks (the gate cannot vouch for it)."""
        if self.baseline is None or self.new is None:
            return True
        return self.delta > 0


@dataclass(frozen=True)
class TimeRatio:
    key: str
    phase: str
    baseline: Timing
    new: Timing

    @property
    def ratio(self) -> float:
        """New median over baseline median (> 1 is slower)."""
        return self.new.median / self.baseline.median if self.baseline.median > 0 else 1.0

    @property
    def judgeable(self) -> bool:
        return min(self.baseline.n, self.new.n) >= MIN_REPEATS_FOR_SIGNIFICANCE

    @property
    def significant(self) -> bool:
        """The p10-p90 bands of the two sides do not overlap."""
        if not self.judgeable:
            return False
        return self.new.p10 > self.baseline.p90 or self.new.p90 < self.baseline.p10

    def describe(self) -> str:
        """pyperf-style wording, e.g. ``1.07x slower (within noise)``."""
        r = self.ratio
        if r >= 1.0:
            text = "same speed" if r == 1.0 else f"{r:.2f}x slower"
        else:
            text = f"{1 / r:.2f}x faster"
        if not self.judgeable:
            return f"{text} (too few repeats to judge)"
        return f"{text} ({'significant' if self.significant else 'within noise'})"


@dataclass
class Comparison:
    """Counts diffed exactly and times as ratios; :attr:`status` is the exit code."""

    baseline: str
    against: str
    changes: list[CountChange] = field(default_factory=list)
    times: list[TimeRatio] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    new_points: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    compared: int = 0

    @property
    def regressions(self) -> list[CountChange]:
        return [c for c in self.changes if c.regression]

    @property
    def improvements(self) -> list[CountChange]:
        return [c for c in self.changes if not c.regression]

    @property
    def status(self) -> int:
        """3 invalid run, 1 count regression, 2 baseline points not measured, else 0."""
        if self.invalid:
            return EXIT_INVALID
        if self.regressions:
            return EXIT_REGRESSION
        if self.missing:
            return EXIT_USAGE
        return EXIT_OK

    def as_json(self) -> dict[str, Any]:
        def change(c: CountChange) -> dict[str, Any]:
            return {
                "key": c.key,
                "phase": c.phase,
                "metric": c.metric,
                "baseline": c.baseline,
                "new": c.new,
                "delta": c.delta,
            }

        return {
            "schema": COMPARE_SCHEMA,
            "baseline": self.baseline,
            "against": self.against,
            "status": self.status,
            "compared_points": self.compared,
            "regressions": [change(c) for c in self.regressions],
            "improvements": [change(c) for c in self.improvements],
            "missing": self.missing,
            "new_points": self.new_points,
            "invalid": self.invalid,
            "timings": [
                {
                    "key": t.key,
                    "phase": t.phase,
                    "ratio": round(t.ratio, 4),
                    "significant": t.significant,
                    "note": t.describe(),
                    "baseline": _timing_json(t.baseline),
                    "new": _timing_json(t.new),
                }
                for t in self.times
            ],
        }


def compare_runs(baseline: Run, against: Run) -> Comparison:
    """Diff every gated count of every baseline point exactly; ratio the times."""
    result = Comparison(baseline=baseline.origin, against=against.origin)
    result.invalid = [
        f"{against.origin}: {p.key}: {p.reason}" for p in against.points if not p.valid
    ]
    result.invalid += [
        f"{baseline.origin}: {p.key}: {p.reason}" for p in baseline.points if not p.valid
    ]
    new = against.by_key()
    old = baseline.by_key()
    result.missing = [key for key in old if key not in new]
    result.new_points = [key for key in new if key not in old]
    for key, before in old.items():
        after = new.get(key)
        if after is None:
            continue
        result.compared += 1
        for phase in dict.fromkeys([*before.counts, *after.counts]):
            b = before.counts.get(phase, {})
            a = after.counts.get(phase, {})
            for metric in GATED_COUNTS:
                if metric not in b and metric not in a:
                    continue
                if b.get(metric) != a.get(metric):
                    result.changes.append(
                        CountChange(key, phase, metric, b.get(metric), a.get(metric))
                    )
            tb, ta = before.timing(phase), after.timing(phase)
            if tb is not None and ta is not None:
                result.times.append(TimeRatio(key, phase, tb, ta))
    return result
