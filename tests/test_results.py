"""The results model, store and comparisons (scripts/results.py,
scripts/bench/store.py, scripts/bench/comparison.py): round trips,
migrations, one transaction per run, and the count/time comparison rules."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pvemu.scripts import results
from pvemu.scripts.bench import comparison, documents
from pvemu.scripts.bench.comparison import TimeRatio, compare_runs
from pvemu.scripts.bench.store import MIGRATIONS, ResultStore
from pvemu.scripts.results import (
    GATED_COUNTS,
    Point,
    ResultsError,
    Run,
    Timing,
    summarize,
)
from pvemu.shared.counts import PHASE_FIELDS

REPO = Path(__file__).resolve().parent.parent


def counts(traps: int, **extra: int) -> dict[str, int]:
    base = dict.fromkeys(GATED_COUNTS, 0)
    base.update(traps=traps, hypercalls=traps, guest_traps=traps, **extra)
    return base


def make_point(
    mode: str = "xen",
    pages: int = 600,
    traps: int = 21,
    samples: list[float] | None = None,
    **params: int,
) -> Point:
    point = Point("mprotect", mode, pages, dict(params))
    point.counts = {"populate": counts(1206, page_faults=pages), "protect_ro": counts(traps)}
    if samples is not None:
        point.samples = {"populate": [s * 10 for s in samples], "protect_ro": list(samples)}
    return point


def make_run(*points: Point) -> Run:
    return Run(
        created_utc="2026-01-02T03:04:05Z",
        git_sha="0123456789abcdef0123456789abcdef01234567",
        git_dirty=False,
        host="testhost",
        python="CPython 3.11.7",
        packages={"trio": "0.35.0"},
        config={"sweep": {"modes": ["xen"], "pages": [600]}, "repeat": 3},
        points=list(points),
        origin="test",
    )


def test_gated_counts_are_the_guest_phase_fields() -> None:
    assert GATED_COUNTS is PHASE_FIELDS  # one tuple, not two lists kept equal


def test_point_key_is_stable_and_sorted() -> None:
    assert results.point_key("mprotect", "xen", 600, {"mc_records": 8, "mc_bytes": 256}) == (
        "mprotect xen pages=600 mc_bytes=256 mc_records=8"
    )
    assert make_point("trap", 64).key == "mprotect trap pages=64"


def test_summarize_median_and_deciles() -> None:
    assert summarize([2.0]) == Timing(2.0, 2.0, 2.0, 1)
    t = summarize([float(v) for v in range(1, 12)])  # 1..11
    assert t.median == 6.0
    assert t.p10 == pytest.approx(2.0)
    assert t.p90 == pytest.approx(10.0)
    assert t.n == 11
    with pytest.raises(ValueError):
        summarize([])


# --- the store -------------------------------------------------------------------


def test_store_round_trip(tmp_path: Path) -> None:
    run = make_run(
        make_point("xen", 600, 21, samples=[0.01, 0.012, 0.011], mc_bytes=256),
        make_point("trap", 64, 129, samples=[0.02, 0.021, 0.022]),
    )
    run.points[1].invalidate("counts differ between repeats (phase populate)")
    db = tmp_path / "sub" / "results.db"  # the directory is created
    with ResultStore(db) as store:
        run_id = store.save_run(run)
        assert run.id == run_id
        loaded = store.load_run(run_id)
        assert store.resolve("latest") == run_id
        assert store.resolve(str(run_id)) == run_id
        store.tag("main", run_id)
        assert store.resolve("main") == run_id
        with pytest.raises(ResultsError):
            store.resolve("no-such-tag")
        with pytest.raises(ResultsError):
            store.resolve("999")
        summary = store.runs_summary()
        history = store.count_history("mprotect trap pages=64", "protect_ro")
    assert (loaded.created_utc, loaded.git_sha, loaded.git_dirty) == (
        run.created_utc,
        run.git_sha,
        False,
    )
    assert (loaded.host, loaded.python, loaded.packages, loaded.config) == (
        run.host,
        run.python,
        run.packages,
        run.config,
    )
    assert [p.key for p in loaded.points] == [p.key for p in run.points]
    for before, after in zip(run.points, loaded.points, strict=True):
        assert after.counts == before.counts
        assert after.samples == before.samples
        assert (after.valid, after.reason, after.params) == (
            before.valid,
            before.reason,
            before.params,
        )
    assert not loaded.valid
    assert summary == [
        {
            "id": run_id,
            "tags": ["main"],
            "created_utc": run.created_utc,
            "git_sha": run.git_sha,
            "git_dirty": False,
            "valid": False,
            "points": 2,
            "config": run.config,
        }
    ]
    assert history == [(run_id, run.created_utc, run.git_sha, 129)]


def test_store_schema_strict_wal_and_user_version(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        assert store.user_version == len(MIGRATIONS) == 1
        mode = store.conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
        tables = dict(store.conn.execute("SELECT name, sql FROM sqlite_master WHERE type='table'"))
        assert set(tables) == {"runs", "points", "metrics", "baselines"}
        assert all(sql.rstrip().endswith("STRICT") for sql in tables.values())
        store.save_run(make_run(make_point()))
        with pytest.raises(sqlite3.IntegrityError):  # STRICT: no TEXT in an INTEGER column
            store.conn.execute(
                "INSERT INTO runs (created_utc, host, python, packages_json, config_json, "
                "schema_version, valid) VALUES ('t', 'h', 'p', '{}', '{}', 'one', 1)"
            )
        with pytest.raises(sqlite3.IntegrityError):  # kind is count or time
            store.conn.execute(
                "INSERT INTO metrics VALUES (1, 'mprotect xen pages=600', 'mprotect', 'xen', "
                "600, '{}', 'populate', 'traps', 'guess', 'count', 0, 1.0)"
            )
    # Reopening does not re-run a migration (it would fail: the tables exist).
    with ResultStore(db) as store:
        assert store.user_version == 1
        assert len(store.run_ids()) == 1


def test_migrations_upgrade_an_old_database_and_refuse_a_newer_one(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.save_run(make_run(make_point()))
    newer = (*MIGRATIONS, ("ALTER TABLE runs ADD COLUMN note TEXT NOT NULL DEFAULT ''",))
    with ResultStore(db, migrations=newer) as store:
        assert store.user_version == 2
        assert store.conn.execute("SELECT note FROM runs").fetchall() == [("",)]
        assert len(store.load_run(1).points) == 1
    with pytest.raises(ResultsError, match="newer than this pvemu"):
        ResultStore(db)
    # A failing migration rolls back entirely: the version does not move.
    broken = (*newer, ("CREATE TABLE extra (x INTEGER) STRICT", "THIS IS NOT SQL"))
    with pytest.raises(sqlite3.OperationalError):
        ResultStore(db, migrations=broken)
    with ResultStore(db, migrations=newer) as store:
        assert store.user_version == 2
        names = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master")}
        assert "extra" not in names


def _table_sizes(db: Path) -> tuple[int, int, int]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return (
            conn.execute("SELECT count(*) FROM runs").fetchone()[0],
            conn.execute("SELECT count(*) FROM points").fetchone()[0],
            conn.execute("SELECT count(*) FROM metrics").fetchone()[0],
        )
    finally:
        conn.close()


def test_an_error_inside_the_transaction_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.save_run(make_run(make_point()))
    before = _table_sizes(db)
    calls = 0
    original = ResultStore._insert_point

    def failing(self: ResultStore, run_id: int, point: Point) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("disk on fire")
        original(self, run_id, point)

    monkeypatch.setattr(ResultStore, "_insert_point", failing)
    with ResultStore(db) as store, pytest.raises(RuntimeError, match="disk on fire"):
        store.save_run(make_run(make_point("xen"), make_point("trap"), make_point("batched")))
    assert calls == 2
    assert _table_sizes(db) == before


KILLED_WRITER = """
import sys, time
from pvemu.scripts.bench.store import ResultStore
from tests.test_results import make_point, make_run

db = sys.argv[1]
with ResultStore(db) as store:
    store.save_run(make_run(make_point("trap", 64, 129)))
    original = ResultStore._insert_point
    def slow(self, run_id, point):
        original(self, run_id, point)
        print("inside", flush=True)
        time.sleep(60)
    ResultStore._insert_point = slow
    store.save_run(make_run(make_point("xen"), make_point("batched")))
"""


def test_a_run_killed_mid_write_leaves_the_database_consistent(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_WRITER), str(db)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "inside"  # first point of run 2 written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == -signal.SIGKILL
    # Only the first run: one point, two phases of every count field.
    assert _table_sizes(db) == (1, 1, 2 * len(results.COUNT_FIELDS))
    with ResultStore(db) as store:
        assert store.run_ids() == [1]
        assert [p.key for p in store.load_run(1).points] == ["mprotect trap pages=64"]
        assert store.save_run(make_run(make_point())) == 2  # still writable


# --- JSON --------------------------------------------------------------------------


def test_run_json_round_trip() -> None:
    run = make_run(make_point(samples=[0.01, 0.02, 0.03], mc_bytes=256), make_point("trap", 64))
    run.id = 7
    doc = json.loads(json.dumps(documents.run_to_json(run)))
    assert doc["schema"] == documents.RUN_SCHEMA
    assert doc["run"]["id"] == 7
    assert doc["points"][0]["phases"]["protect_ro"]["time"]["n"] == 3
    back = documents.run_from_json(doc, origin="x.json")
    assert [(p.key, p.counts, p.samples) for p in back.points] == [
        (p.key, p.counts, p.samples) for p in run.points
    ]
    assert back.config == run.config


def test_baseline_json_keeps_gated_counts_only() -> None:
    run = make_run(make_point(), make_point("trap", 64, 129))
    doc = documents.baseline_to_json(run, {"modes": ["xen", "trap"], "pages": [64, 600]})
    assert list(doc["points"]) == sorted(doc["points"])
    entry = doc["points"]["mprotect xen pages=600"]
    assert "guest_traps" not in entry["counts"]["protect_ro"]
    back = documents.run_from_json(json.loads(json.dumps(doc)), origin="b.json")
    assert back.config["sweep"]["pages"] == [64, 600]
    assert back.by_key()["mprotect trap pages=64"].counts["protect_ro"]["traps"] == 129
    assert not back.by_key()["mprotect trap pages=64"].samples


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"schema": "pvemu-bench/99", "points": []},
        {"schema": documents.RUN_SCHEMA, "run": {}, "points": [{"mode": "xen"}]},
        {"schema": documents.BASELINE_SCHEMA, "points": {"wrong key": make_point().__dict__}},
    ],
)
def test_malformed_documents_are_refused(doc: object) -> None:
    with pytest.raises(ResultsError):
        documents.run_from_json(doc, origin="bad.json")


# --- comparison rules --------------------------------------------------------------


def test_identical_counts_compare_clean() -> None:
    cmp = compare_runs(make_run(make_point()), make_run(make_point()))
    assert (cmp.status, cmp.changes, cmp.compared) == (0, [], 1)


def test_any_count_increase_is_a_regression_and_a_decrease_is_not() -> None:
    up = compare_runs(make_run(make_point(traps=21)), make_run(make_point(traps=22)))
    assert up.status == comparison.EXIT_REGRESSION
    assert [c.metric for c in up.regressions] == ["traps", "hypercalls"]
    change = up.regressions[0]
    assert (change.phase, change.metric, change.baseline, change.new, change.delta) == (
        "protect_ro",
        "traps",
        21,
        22,
        1,
    )
    down = compare_runs(make_run(make_point(traps=21)), make_run(make_point(traps=2)))
    assert down.status == 0
    assert len(down.improvements) == 2  # traps and hypercalls
    # A count that only the new run has cannot be vouched for.
    extra = make_point()
    extra.counts["protect_rw"] = counts(1)
    assert compare_runs(make_run(make_point()), make_run(extra)).status == 1


def test_missing_points_and_invalid_runs() -> None:
    baseline = make_run(make_point(), make_point("trap", 64, 129))
    partial = compare_runs(baseline, make_run(make_point(), make_point("batched")))
    assert partial.missing == ["mprotect trap pages=64"]
    assert partial.new_points == ["mprotect batched pages=600"]
    assert partial.status == comparison.EXIT_USAGE
    bad = make_point(traps=22)
    bad.invalidate("audit() not clean: frame 7")
    invalid = compare_runs(make_run(make_point()), make_run(bad))
    assert invalid.status == comparison.EXIT_INVALID  # invalid wins over the regression
    assert "audit() not clean" in invalid.invalid[0]


@pytest.mark.parametrize(
    ("old", "new", "text"),
    [
        ([1.0, 1.1, 1.2], [1.05, 1.15, 1.25], "1.05x slower (within noise)"),
        ([1.0, 1.01, 1.02], [2.0, 2.02, 2.04], "2.00x slower (significant)"),
        ([2.0, 2.02, 2.04], [1.0, 1.01, 1.02], "2.00x faster (significant)"),
        ([1.0, 1.1], [2.0, 2.2], "2.00x slower (too few repeats to judge)"),
        ([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], "same speed (within noise)"),
    ],
)
def test_time_ratio_wording(old: list[float], new: list[float], text: str) -> None:
    ratio = TimeRatio("k", "protect_ro", summarize(old), summarize(new))
    assert ratio.describe() == text


def test_timings_never_change_the_status() -> None:
    slow = compare_runs(
        make_run(make_point(samples=[0.01, 0.01, 0.01])),
        make_run(make_point(samples=[1.0, 1.0, 1.0])),
    )
    assert slow.status == 0
    assert {t.phase for t in slow.times} == {"populate", "protect_ro"}
    assert all(t.significant for t in slow.times)
    doc = slow.as_json()
    assert doc["schema"] == comparison.COMPARE_SCHEMA
    assert doc["timings"][0]["note"].endswith("(significant)")
