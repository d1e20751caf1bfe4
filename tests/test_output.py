"""What pvemu prints (issue 13, items 3 and 4): tables that fit 80 columns
without cutting a name, a headline under every table, progress with an ETA,
JSON with a metadata block that ``bench compare`` reads, CSV and markdown,
``bench compare``/``list``/``plot`` output. Real CLI runs at tiny sizes."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvemu.scripts import bench_cmd
from pvemu.scripts.bench import documents
from pvemu.scripts.bench.store import ResultStore
from pvemu.scripts.progress import Progress, plain_line
from pvemu.scripts.report import TIMES as X
from pvemu.scripts.report import Entry, Tabular, headline
from tests.test_bench import plot_run
from tests.test_kernel_counts import expected_traps
from tests.test_results import counts, make_point, make_run

REPO = Path(__file__).resolve().parent.parent
PHASES = ("populate", "protect_ro", "protect_rw")


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PVEMU_BENCH_NO_GIT", "1")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("COLUMNS", raising=False)


def pvemu(*argv: str, columns: int | None = None, timeout: float = 180) -> Any:
    env = {**os.environ, "PVEMU_BENCH_NO_GIT": "1"}
    env.pop("COLUMNS", None)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "pvemu.scripts", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def words(text: str) -> set[str]:
    """Every whitespace- and rule-separated token of a rendered table."""
    return set(re.split(r"[\s│┃|]+", text))


# --- pvemu run, end to end ------------------------------------------------------------


def test_run_at_80_columns_shows_every_mode_and_phase_whole() -> None:
    modes = ("trap", "ptwr", "xen", "batched")
    done = pvemu("run", "--pages", "64", "--modes", ",".join(modes), columns=80)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "…" not in out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    tokens = words(out)
    for name in (*modes, *PHASES):
        assert name in tokens, (name, out)
    # Every count column is still there, in one of the stacked parts.
    for header in ("traps", "/PTE", "hcalls", "mc.ent", "records", "ptwr", "faults", "flushes"):
        assert header in tokens, header
    sentence = re.search(r"headline: batched: 257 → (\d+) traps for mprotect RO \+ RW", out)
    assert sentence, out
    assert "than trap" in out

    wide = pvemu("run", "--pages", "64", "--modes", "trap,batched", "--wide", columns=80)
    assert wide.returncode == 0, wide.stderr
    header_line = next(line for line in wide.stdout.splitlines() if "┃ mode" in line)
    assert "flushes" in header_line  # one table: every column on the same line
    assert len(header_line) > 80


def test_run_json_carries_metadata_and_compare_reads_it(tmp_path: Path) -> None:
    done = pvemu("run", "--pages", "16", "--modes", "trap,batched", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema"] == documents.RUN_CMD_SCHEMA
    meta = doc["run"]
    for key in ("created_utc", "git_sha", "host", "machine", "python", "pvemu_version"):
        assert key in meta, key
    assert meta["machine"]["cpu_model"]
    assert meta["pvemu_version"] == meta["packages"]["pvemu"]
    assert meta["config"]["modes"] == ["trap", "batched"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["created_utc"])
    # The guests' own metadata blocks are not repeated per result.
    assert all("run" not in r and "schema" not in r for r in doc["results"])
    saved = tmp_path / "run.json"
    saved.write_text(done.stdout)
    compared = pvemu("bench", "compare", "--baseline", str(saved), "--against", str(saved))
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "compared 2 point(s)" in compared.stdout


def test_run_csv_parses() -> None:
    done = pvemu("run", "--pages", "16", "--modes", "trap,batched", "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["mode"], r["phase"]) for r in rows] == [
        (mode, phase) for mode in ("trap", "batched") for phase in PHASES
    ]
    by = {(r["mode"], r["phase"]): r for r in rows}
    for mode, phase in by:
        assert int(by[mode, phase]["traps"]) == expected_traps(mode, 16, phase)
    assert {r["ok"] for r in rows} == {"yes"}
    assert float(by["trap", "populate"]["wall_ms"]) > 0


def test_guest_reports_each_step_on_its_progress_fd() -> None:
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "pvemu.scripts", "guest", "--mode", "native", "--pages", "8"]
    cmd += ["--json", "--progress-fd", str(write_fd)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, pass_fds=(write_fd,))
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        steps = reader.read().split()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert steps == [*PHASES, "check"]
    assert json.loads(out)["schema"] == documents.GUEST_SCHEMA


# --- tables and headlines -----------------------------------------------------------------


def render(tab: Tabular, width: int, *, wide: bool = False) -> str:
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=max(width, tab.natural_width()) if wide else width)
    for table in tab.rich_tables(width, wide=wide):
        console.print(table)
    return buffer.getvalue()


NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=14)


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(NAME, min_size=1, max_size=5, unique=True),
    phases=st.lists(NAME, min_size=1, max_size=3, unique=True),
    columns=st.integers(1, 12),
    width=st.integers(60, 140),
    data=st.data(),
)
def test_stacked_parts_fit_and_keep_every_name(
    keys: list[str], phases: list[str], columns: int, width: int, data: st.DataObject
) -> None:
    header = ["mode", "phase", *(f"col{i}" for i in range(columns))]
    number = st.integers(0, 10**7).map(str)
    rows = [
        [key, phase, *data.draw(st.lists(number, min_size=columns, max_size=columns))]
        for key in keys
        for phase in phases
    ]
    tab = Tabular("t", header, rows, blank_repeats=frozenset({"mode"}))
    parts = tab.parts(width)
    assert sorted({i for part in parts for i in part}) == list(range(len(header)))
    for part in parts:
        assert part[:2] == [0, 1]
        if len(part) > 3:  # a part of more than one value column fits the width
            assert tab.natural_width(part) <= width
    tokens = words(render(tab, width))
    assert set(keys) | set(phases) <= tokens
    assert set(header) <= tokens


def test_headline_against_trap() -> None:
    entries = [
        Entry("trap", "trap", 8193, 4.1),
        Entry("xen", "xen", 260, 0.5),
        Entry("batched", "batched", 8, 0.1),
        Entry("naive", "naive", 2, 0.05, unsafe=True),
        Entry("native", "native", 0, 0.01),
    ]
    assert headline(entries, "mprotect RO + RW") == (
        f"headline: batched: 8,193 → 8 traps for mprotect RO + RW (1,024{X} fewer), "
        f"41{X} faster than trap"
    )
    without_trap = headline(entries[1:3], "x")
    assert "batched: 260 → 8 traps" in without_trap
    assert "xen (the most traps here; trap did not run)" in without_trap
    slower = headline([Entry("trap", "trap", 10, 0.1), Entry("xen", "xen", 5, 0.2)], "x")
    assert f"(2.0{X} fewer), 2.0{X} slower than trap" in slower
    assert "nothing to compare with" in headline(entries[:1], "x")
    assert "no safe hypervisor mode" in headline(entries[3:], "x")


def test_every_table_ends_with_its_headline(capsys: pytest.CaptureFixture[str]) -> None:
    from pvemu.scripts.bench.render import print_run

    run = make_run(
        make_point("trap", 600, 601, samples=[0.1, 0.1, 0.1]),
        make_point("batched", 600, 2, samples=[0.01, 0.01, 0.01]),
    )
    for point in run.points:  # protect_rw as protect_ro
        point.counts["protect_rw"] = counts(point.counts["protect_ro"]["traps"] - 1)
        point.samples["protect_rw"] = point.samples["protect_ro"]

    print_run(run, None, "table")
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1] == (
        "headline: batched 600: 1,201 → 3 traps for mprotect RO + RW of 600 pages "
        f"(400{X} fewer), 10{X} faster than trap"
    )
    print_run(run, None, "markdown")
    assert "headline: batched 600" in capsys.readouterr().out
    print_run(run, None, "csv")
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["point"] == rows[1]["point"] == "trap 600"  # labels repeat in CSV
    assert {"median_ms", "p10_ms", "p90_ms", "traps_per_pte"} <= set(rows[0])


# --- bench compare, list and plot ---------------------------------------------------------


def test_compare_says_plainly_when_nothing_was_comparable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base.json"
    base.write_text(json.dumps(documents.baseline_to_json(make_run(make_point()), {})))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(documents.run_to_json(make_run(make_point("trap", 64)))))
    status = bench_cmd.main(["compare", "--baseline", str(base), "--against", str(other)])
    out = capsys.readouterr().out
    assert status != 0
    assert "NOTHING COMPARED" in out
    assert "mprotect xen pages=600" in out
    assert "mprotect trap pages=64" in out
    assert "exactly the baseline" not in out


def test_compare_explains_documents_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    race = tmp_path / "race.json"
    race.write_text(json.dumps({"schema": documents.RACE_SCHEMA, "run": {}, "results": []}))
    base = tmp_path / "base.json"
    base.write_text(json.dumps(documents.baseline_to_json(make_run(make_point()), {})))
    assert bench_cmd.main(["compare", "--baseline", str(base), "--against", str(race)]) == 2
    assert "pvemu race" in capsys.readouterr().err
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": 1, "pages": 4, "results": []}))
    assert bench_cmd.main(["compare", "--baseline", str(base), "--against", str(old)]) == 2
    assert "rerun it" in capsys.readouterr().err


def test_list_shows_tags_modes_sizes_and_workloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "r.db"
    run = make_run(make_point())
    run.config["sweep"] = {
        "modes": ["trap", "xen"],
        "pages": [512, 4096],
        "workloads": ["mprotect"],
        "mc_bytes": [256, None],
    }
    with ResultStore(db) as store:
        run_id = store.save_run(run)
        store.tag("main", run_id)
        store.tag("before-fix", run_id)
    assert bench_cmd.main(["list", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    for text in ("before-fix,main", "trap,xen", "512,4096", "mc_bytes=256,default", "mprotect"):
        assert text in out, text
    assert "headline: 1 run(s)" in out
    assert bench_cmd.main(["list", "--db", str(db), "--csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["tags"] == "before-fix,main"
    assert row["modes"] == "trap,xen"
    assert bench_cmd.main(["list", "--db", str(db), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["runs"][0]["tags"] == ["before-fix", "main"]
    assert "created_utc" in doc["run"]


def test_plot_defaults_to_pvemu_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.save_run(plot_run())
    monkeypatch.chdir(tmp_path)
    assert bench_cmd.main(["plot", "--db", str(db)]) == 0
    assert (tmp_path / ".pvemu" / "plots" / "traps_vs_pages.svg").is_file()
    capsys.readouterr()


def test_plot_ticks_linux_default_and_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pvemu.scripts import plots

    figures: dict[str, Any] = {}
    real_save = plots._save

    def keep(fig: Any, out: Path, stem: str) -> list[Path]:
        figures[stem] = fig
        return real_save(fig, out, stem)

    monkeypatch.setattr(plots, "_save", keep)
    run = plot_run()
    # One series of two sizes only: drawn as points.
    run.points = [p for p in run.points if not (p.mode == "batched" and p.pages == 4096)]
    plots.render(run, tmp_path)
    traps_ax = figures["traps_vs_pages"].axes[0]
    assert list(traps_ax.get_xticks()) == [64, 600, 4096]
    formatter = traps_ax.xaxis.get_major_formatter()
    assert [formatter(v, 0) for v in (64, 600, 4096)] == ["64", "600", "4,096"]
    styles = {line.get_label(): line.get_linestyle() for line in traps_ax.get_lines()}
    assert styles["batched"] == "None"
    assert styles["trap"] != "None"
    buffer_axes = figures["buffer_sweep"].axes
    assert list(buffer_axes[0].get_xticks()) == [128, 256, 512]
    marks = [line for line in buffer_axes[0].get_lines() if "Linux default" in line.get_label()]
    assert marks
    assert list(marks[0].get_xdata()) == [512, 512]


# --- progress ------------------------------------------------------------------------------


def test_plain_progress_line_has_an_eta() -> None:
    assert plain_line("pvemu run", "mode xen (2/4): protect_ro", 5, 20, 30.0) == (
        "pvemu run:  25% mode xen (2/4): protect_ro, 0:30 elapsed, about 1:30 left"
    )
    assert "left" not in plain_line("p", "x", 0, 20, 3.0)
    stream = io.StringIO()
    with Progress("pvemu test", 4, stream=stream, interval=0.05) as progress:
        progress.update(advance=2, description="half")
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert lines, "no plain progress line without a terminal"
    assert lines[-1].startswith("pvemu test:  50% half")
    assert "left" in lines[-1]


def test_sections_are_ruled_only_when_a_key_has_several_rows() -> None:
    one_row_each = Tabular("t", ["mode", "x"], [["a", "1"], ["b", "2"]], keys=1)
    assert not any(end for _, end in one_row_each.display_rows([0, 1]))
    grouped = Tabular(
        "t", ["mode", "phase", "x"], [["a", "p", "1"], ["a", "q", "2"], ["b", "p", "3"]]
    )
    assert [end for _, end in grouped.display_rows([0, 1, 2])] == [False, True, False]
    assert [cells[0] for cells, _ in grouped.display_rows([0, 1, 2])] == ["a", "a", "b"]


def test_bench_table_fits_80_columns_with_every_label_whole(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pvemu.scripts import costmodel
    from pvemu.scripts.bench.render import print_run

    monkeypatch.setenv("COLUMNS", "80")
    run = plot_run()
    print_run(run, costmodel.DEFAULT, "table")
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert "…" not in out
    text = " ".join(out.split())
    for label in ("xen 4096 mc_bytes=128", "trap 64", "native 600", "ptwr 64"):
        assert label in text, label
    for header in ("traps", "median ms", "p10-p90 ms", "est. real µs*", "flush", "records"):
        assert header in text, header
    assert "headline: batched 4096:" in out
    monkeypatch.setenv("COLUMNS", "300")
    print_run(run, costmodel.DEFAULT, "table")
    assert "(1/" not in capsys.readouterr().out  # wide enough: one table


def test_load_csv_rows_are_raw_figures() -> None:
    from pvemu.scripts.load_cmd import flat_measures, report_tabular

    latency = {"n": 3, "median_ms": 1.2, "p99_ms": 2.5, "max_ms": 2.5, "slowest_ms": [1.0, 2.5]}
    doc = {
        "schema": 1,
        "config": {"guests": 2, "pages": 64, "mode": "xen", "records": 20000, "quantum": 32}
        | {"scheduler": "fair"},
        "load": {"mprotects": 10, "records": 1000, "records_per_s": 7848},
        "big_batch": {"rc": 0, "done": 20000, "seconds": 0.1, "records_per_s": 200000},
        "probe": {"without_big_batch": latency, "during_big_batch": latency},
        "p99_goal_ms": 2.0,
        "p99_goal_met": False,
        "hypervisor_memory_kib": {"rss_before_guests": 1024, "peak_rss": 2048, "hwm": 2048},
        "audit": [],
        "failed": [],
        "ok": True,
    }
    rows = dict(csv.reader(io.StringIO(report_tabular(doc).csv_text())))
    assert rows["load.records_per_s"] == "7848"
    assert rows["probe.during_big_batch.p99_ms"] == "2.5"
    assert rows["probe.during_big_batch.slowest_ms"] == "1.0;2.5"
    assert "schema" not in dict(flat_measures(doc))
    tab = report_tabular(doc)
    assert tab.headline == (
        "headline: 2 guests sustained 7,848 records/s; the probe's p99 during the "
        "20,000-record batch was 2.5 ms (goal <= 2.0 ms: NOT met)"
    )


def test_trace_replay_and_failed_modes_read_as_points() -> None:
    phases = {"mmap": {"traps": 3, "hypercalls": 3, "wall_s": 0.01}}
    doc = {
        "schema": documents.TRACE_REPLAY_SCHEMA,
        "run": {"created_utc": "2026-01-02T03:04:05Z", "host": "h"},
        "file": "benchmarks/traces/x.json",
        "results": [
            {"mode": "xen", "counts_agree": True, "audit_clean": True, "phases": phases},
            {"mode": "trap", "error": "boom", "counts_agree": False, "audit_clean": False},
        ],
    }
    run = documents.run_from_json(doc, origin="replay.json")
    xen, trap = run.points
    assert xen.key == "trace:benchmarks/traces/x.json xen pages=0"
    assert xen.counts == {"mmap": {"traps": 3, "hypercalls": 3}}
    assert xen.samples == {"mmap": [0.01]}
    assert xen.valid
    assert not trap.valid
    assert "boom" in trap.reason


def test_guest_csv_and_markdown() -> None:
    done = pvemu("guest", "--mode", "native", "--pages", "8", "--csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [r["phase"] for r in rows] == list(PHASES)
    assert {r["traps"] for r in rows} == {"0"}
    md = pvemu("guest", "--mode", "native", "--pages", "8", "--markdown")
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("| mode | phase | traps | /PTE |")
    assert "headline:" in md.stdout


def test_terminal_progress_is_a_bar_with_an_eta() -> None:
    import pty
    import select

    master, slave = pty.openpty()
    with open(slave, "w", encoding="utf-8") as stream:
        with Progress("pvemu test", 4, stream=stream) as progress:
            progress.update(advance=1, description="mode trap (1/2): populate")
            time.sleep(0.3)
            progress.update(advance=1, description="mode trap (1/2): protect_ro")
            time.sleep(0.3)
        seen = b""
        while select.select([master], [], [], 0.2)[0]:
            seen += os.read(master, 65536)
    os.close(master)
    text = seen.decode(errors="replace")
    assert "mode trap (1/2): protect_ro" in text
    assert "ETA" in text
    assert "50%" in text
