"""The results database: one SQLite file (stdlib ``sqlite3``) with STRICT
tables, WAL, ``PRAGMA user_version`` migrations, and one transaction per run,
so a run killed while it is being written leaves no trace.
``docs/benchmarks.md`` documents the tables."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from pvemu.scripts.results import Point, ResultsError, Run

DEFAULT_DB: Final = Path(".pvemu") / "results.db"
#: ``runs.schema_version``: the layout of one run's rows.
RUN_ROWS_VERSION: Final = 1

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

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; any exception rolls back."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def _migrate(self, migrations: Sequence[Sequence[str]]) -> None:
        with self._transaction():
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

    # -- writing ----------------------------------------------------------------------

    def save_run(self, run: Run) -> int:
        """Store a run and all its points and metrics in one transaction;
        returns its id (also set on ``run.id``)."""
        with self._transaction():
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
        with self._transaction():
            self.conn.execute(
                "INSERT INTO baselines (name, run_id, created_utc) "
                "VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%SZ', 'now')) "
                "ON CONFLICT (name) DO UPDATE SET run_id = excluded.run_id, "
                "created_utc = excluded.created_utc",
                (name, run_id),
            )

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
        run.points = self._load_points(run_id)
        return run

    def _load_points(self, run_id: int) -> list[Point]:
        """A stored run's points, in run order, with their counts and samples."""
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
        return list(points.values())

    def runs_summary(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest runs: id, tags, time, commit, validity, point count and
        the recorded configuration (its sweep says what was measured)."""
        tags: dict[int, list[str]] = {}
        for name, run_id in self.conn.execute("SELECT name, run_id FROM baselines ORDER BY name"):
            tags.setdefault(int(run_id), []).append(name)
        out = []
        for run_id, created, sha, dirty, valid, config_json, npoints in self.conn.execute(
            "SELECT r.id, r.created_utc, r.git_sha, r.git_dirty, r.valid, r.config_json, "
            "(SELECT count(*) FROM points p WHERE p.run_id = r.id) "
            "FROM runs r ORDER BY r.id DESC LIMIT ?",
            (limit,),
        ):
            out.append(
                {
                    "id": run_id,
                    "tags": tags.get(int(run_id), []),
                    "created_utc": created,
                    "git_sha": sha,
                    "git_dirty": None if dirty is None else bool(dirty),
                    "valid": bool(valid),
                    "points": npoints,
                    "config": json.loads(config_json),
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
