"""``pvemu bench`` (scripts/bench_cmd.py, scripts/bench/), its plots and its cost model:
argument handling, compare exit codes, a real sweep in real processes, the
CI gate (it passes on the current code and bites on a de-batched guest)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pvemu.guest.mm_workloads import MM_PHASES
from pvemu.guest.modes import SAFE_MODES
from pvemu.guest.proc_workloads import DEFAULT_LOOPS, PROCESS_PHASES
from pvemu.scripts import bench_cmd, checks, costmodel, results
from pvemu.scripts.bench import documents, provenance
from pvemu.scripts.bench.options import sweep_from_args
from pvemu.scripts.bench.render import print_run
from pvemu.scripts.bench.runner import (
    DEFAULT_REPEAT,
    guest_command,
    hypervisor_memory,
    record_repeat,
)
from pvemu.scripts.bench.store import ResultStore
from pvemu.scripts.bench.sweep import DEFAULT_MODES, Sweep, UsageError
from pvemu.scripts.errors import UserError
from pvemu.scripts.report import TIMES as X
from pvemu.scripts.results import Point, Run
from tests import test_fork_counts as fork_counts
from tests import test_mm_workloads as mm_counts
from tests.test_kernel_counts import expected_traps, pte_pages
from tests.test_results import counts, make_point, make_run

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "benchmarks" / "baseline.json"


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("PVEMU_BENCH_NO_GIT", "1")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


def bench(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``pvemu bench ARGV`` in a real process (``python -m pvemu.scripts.bench_cmd``)."""
    env = {**os.environ, "PVEMU_BENCH_NO_GIT": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pvemu.scripts.bench_cmd", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def write_json(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


# --- arguments and the sweep plan --------------------------------------------------


def pvemu_parser() -> argparse.ArgumentParser:
    """The shape cli.py gives a subcommand: a child parser that ``configure`` fills."""
    parser = argparse.ArgumentParser(prog="pvemu")
    sub = parser.add_subparsers(dest="command")
    bench_cmd.configure(sub.add_parser("bench"))
    return parser


@pytest.mark.parametrize(
    ("argv", "action", "pages"),
    [
        (["bench", "--pages", "512"], None, (512,)),
        (["bench", "run", "--pages", "64,600"], "run", (64, 600)),
        (["bench", "--pages", "64", "run"], "run", (64,)),
        (["bench"], None, None),
    ],
)
def test_run_is_the_default_action(argv: list[str], action: str | None, pages: Any) -> None:
    args = pvemu_parser().parse_args(argv)
    assert args.bench_action == action
    assert args.pages == pages
    assert args.repeat == DEFAULT_REPEAT


def test_the_cli_row() -> None:
    """The row scripts/cli.py registers: ``pvemu bench`` parses and dispatches."""
    from pvemu.scripts import cli

    row = cli.Subcommand("bench", bench_cmd.HELP, bench_cmd.configure, bench_cmd.run)
    args = cli.build_parser((row,)).parse_args(["bench", "--pages", "64", "--modes", "xen"])
    assert args.run is bench_cmd.run
    assert (args.command, args.bench_action, args.pages, args.modes) == (
        "bench",
        None,
        (64,),
        ("xen",),
    )
    args = cli.build_parser((row,)).parse_args(["bench", "plot", "--out", "d"])
    assert args.run is bench_cmd.run


def test_compare_and_plot_actions_parse() -> None:
    args = pvemu_parser().parse_args(["bench", "compare", "--baseline", "b.json", "--json"])
    assert (args.bench_action, args.baseline, args.against, args.json) == (
        "compare",
        "b.json",
        "latest",
        True,
    )
    args = pvemu_parser().parse_args(["bench", "plot", "--out", "d"])
    assert (args.bench_action, args.out, args.run_ref) == ("plot", "d", "latest")


def test_sweep_plan_applies_buffer_limits_to_xen_only() -> None:
    sweep = Sweep(modes=("trap", "xen"), pages=(64, 600), mc_bytes=(None, 256), mc_records=(8,))
    keys = [p.key for p in sweep.plan()]
    assert keys == [
        "mprotect trap pages=64",
        "mprotect trap pages=600",
        "mprotect xen pages=64 mc_records=8",
        "mprotect xen pages=64 mc_bytes=256 mc_records=8",
        "mprotect xen pages=600 mc_records=8",
        "mprotect xen pages=600 mc_bytes=256 mc_records=8",
    ]
    assert Sweep.from_json(json.loads(json.dumps(sweep.as_json()))) == sweep
    # duplicates collapse; trace workloads do not sweep pages
    trace = REPO / "pyproject.toml"  # any existing file will do for planning
    twice = Sweep(modes=("batched", "batched"), pages=(64, 64), workloads=(f"trace:{trace}",))
    assert [p.key for p in twice.plan()] == [f"trace:{trace} batched pages=0"]


def test_process_workloads_sweep_pages_and_need_two_vcpus() -> None:
    sweep = Sweep(modes=("xen", "batched"), pages=(8,), workloads=("fork", "forkexec"))
    assert [p.key for p in sweep.plan()] == [
        "fork xen pages=8",
        "fork batched pages=8",
        "forkexec xen pages=8",
        "forkexec batched pages=8",
    ]
    assert Sweep.from_json(sweep.as_json()) == sweep
    with pytest.raises(UserError, match="the fork workload needs 2 vCPUs"):
        Sweep(pages=(8,), workloads=("fork",), vcpus=1).check()
    with pytest.raises(UsageError, match="unknown workload 'spawn': mprotect, fork, exec"):
        Sweep(workloads=("spawn",)).check()
    # fork's guest holds the child's copies: the hypervisor is sized for them
    big = Sweep(pages=(4096,), workloads=("mprotect", "fork"))
    assert hypervisor_memory(big) == 2 * checks.guest_memory("fork", 4096) + checks.HEADROOM_MIB
    assert checks.guest_memory("fork", 4096) > checks.memory_for(4096)
    cmd = guest_command(Point("exec", "batched", 8), socket_path="/s", vcpus=2, memory_pages=8)
    assert "--pages 8 --vcpus 2 --workload exec --json" in " ".join(cmd)


def test_sweep_options_are_checked() -> None:
    def sweep_of(*argv: str) -> Sweep:
        return sweep_from_args(pvemu_parser().parse_args(["bench", *argv]))

    assert sweep_of().modes == DEFAULT_MODES
    assert sweep_of("--workload", "mprotect,mprotect").workloads == ("mprotect", "mprotect")
    assert sweep_of("--workload", "fork,exec", "--workload", "forkexec").workloads == (
        "fork",
        "exec",
        "forkexec",
    )
    assert sweep_of("--mc-bytes", "default,256").mc_bytes == (None, 256)
    with pytest.raises(UsageError, match="xen only"):
        sweep_of("--modes", "trap", "--mc-bytes", "256")
    with pytest.raises(UsageError, match="no trace file"):
        sweep_of("--workload", "trace:/no/such/file")
    with pytest.raises(UsageError, match="replaces the sweep"):
        sweep_of("--sweep-from", str(BASELINE), "--pages", "64")
    assert sweep_of("--sweep-from", str(BASELINE)).pages == (64, 600)
    with pytest.raises(SystemExit):
        sweep_of("--modes", "warp")


def test_guest_command_line() -> None:
    point = Point("mprotect", "xen", 600, {"mc_bytes": 256, "mc_records": 8})
    cmd = guest_command(
        point, socket_path="/tmp/s", vcpus=2, memory_pages=4096, extra=["--mc-records", "1"]
    )
    assert cmd[1:4] == ["-m", "pvemu.scripts", "guest"]
    text = " ".join(cmd[4:])
    assert "--mode xen --pages 600 --vcpus 2 --workload mprotect --json" in text
    assert text.endswith("--socket /tmp/s --mc-bytes 256 --mc-records 8 --mc-records 1")
    native = guest_command(
        Point("trace:t.json", "native", 0), socket_path=None, vcpus=1, memory_pages=4096
    )
    assert "--socket" not in native
    assert native[native.index("--pages") + 1] == "4096"


def guest_doc(traps: int = 21, *, agree: bool = True, audit: list[str] | None = None) -> Any:
    phase = {**counts(traps), "wall_s": 0.01}
    return {
        "mode": "xen",
        "unsafe": False,
        "pages": 600,
        "phases": {"protect_ro": phase},
        "counts_agree": agree,
        "audit_clean": not audit,
        "audit": audit or [],
    }


def test_repeats_must_agree_and_cross_checks_must_hold() -> None:
    point = Point("mprotect", "xen", 600)
    record_repeat(point, guest_doc(), "")
    record_repeat(point, guest_doc(), "")
    assert point.valid
    assert point.samples == {"protect_ro": [0.01, 0.01]}
    assert "wall_s" not in point.counts["protect_ro"]
    record_repeat(point, guest_doc(22), "")
    assert (point.valid, point.reason) == (
        False,
        "counts differ between repeats (phase protect_ro)",
    )

    for doc, why in (
        (guest_doc(agree=False), "counts disagree"),
        (guest_doc(audit=["frame 9 mapped writable"]), "audit() not clean: frame 9"),
        (None, "guest exit 1: boom"),
    ):
        point = Point("mprotect", "xen", 600)
        record_repeat(point, doc, "guest exit 1: boom")
        assert not point.valid
        assert why in point.reason


def test_git_head_is_read_from_the_git_directory(tmp_path: Path) -> None:
    sha = "c0ffee" * 6 + "abcd"
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert provenance._git_head(tmp_path) == sha
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text(sha[::-1] + "\n")
    assert provenance._git_head(tmp_path) == sha[::-1]
    assert provenance._git_head(tmp_path / "nowhere") is None


# --- output ------------------------------------------------------------------------


def test_table_markdown_and_json_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(make_point(samples=[0.01, 0.012, 0.011], mc_bytes=256), make_point("native"))
    run.points[1].counts = {"protect_ro": dict.fromkeys(results.COUNT_FIELDS, 0)}
    print_run(run, costmodel.DEFAULT, "table")
    table = capsys.readouterr().out
    assert "xen 600 mc_bytes=256" in table
    assert "est. real µs*" in table
    assert "ESTIMATE, not a measurement" in table
    print_run(run, None, "markdown")
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| point | phase | traps | /PTE |")
    assert "est. real" not in md[0]
    assert md[2].startswith("| xen 600 mc_bytes=256 | populate | 1206 | 2.010 |")
    print_run(run, costmodel.DEFAULT, "json")
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == documents.RUN_SCHEMA
    assert doc["cost_model"]["name"] == "default"
    ro = doc["points"][0]["phases"]["protect_ro"]
    assert ro["estimate_us"] == pytest.approx(
        costmodel.DEFAULT.estimate_ns(run.points[0].counts["protect_ro"], 600) / 1000, abs=1e-3
    )
    assert ro["time"]["median_s"] == pytest.approx(0.011)


def process_point(workload: str, mode: str, phases: dict[str, int]) -> Point:
    point = Point(workload, mode, 600)
    point.counts = {phase: counts(traps) for phase, traps in phases.items()}
    point.samples = {phase: [0.01 * traps or 0.001] for phase, traps in phases.items()}
    return point


def test_process_points_print_by_phase_with_a_headline_each(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fork = {"populate": 1809, "fork": 622, "context_switch": 1, "exit": 2}
    run = make_run(
        process_point("fork", "xen", fork),
        process_point("fork", "batched", {**fork, "fork": 2}),
        process_point("exec", "xen", {"context_switch": 1, "exec": 4, "exit": 2}),
        make_point("trap", 600, 601, samples=[0.1]),
    )
    run.points[-1].counts["protect_rw"] = counts(600)
    run.points[-1].samples["protect_rw"] = [0.1]
    print_run(run, costmodel.DEFAULT, "table")
    out = capsys.readouterr().out
    for label in ("fork xen 600", "fork batched 600", "exec xen 600", "trap 600"):
        assert label in out, label
    assert (
        f"headline: 600 pages: fork costs 622 traps in xen (Linux on Xen PV), 2 in batched: 311{X}"
        in out
    )
    assert (
        "headline: 600 pages: exec costs 4 traps in xen (Linux on Xen PV); nothing to compare"
        in out
    )
    assert "mprotect RO + RW of 600 pages" in out
    assert "published, for scale (recalled, UNCONFIRMED)" in out
    print_run(run, costmodel.DEFAULT, "json")
    doc = json.loads(capsys.readouterr().out)
    xen_fork = doc["points"][0]["phases"]["fork"]
    assert xen_fork["estimate_us"] == pytest.approx(
        costmodel.DEFAULT.estimate_ns(counts(622), 1200) / 1000, abs=1e-3
    )
    print_run(make_run(run.points[-1]), costmodel.DEFAULT, "table")  # mprotect only
    assert "published" not in capsys.readouterr().out


def test_run_documents_of_process_workloads_compare_as_their_points() -> None:
    meta = {"created_utc": "2026-01-01T00:00:00Z"}
    result = {"mode": "xen", "counts_agree": True, "audit_clean": True, "phases": {}}
    fork = documents.run_from_json(
        {
            "schema": documents.RUN_CMD_SCHEMA,
            "run": meta,
            "pages": 8,
            "workload": "fork",
            "results": [result],
        }
    )
    assert [p.key for p in fork.points] == ["fork xen pages=8"]
    loops = {
        "schema": documents.RUN_CMD_SCHEMA,
        "run": meta,
        "pages": 8,
        "workload": "forkexec",
        "results": [result],
    }
    assert documents.run_from_json({**loops, "loops": 4}).points[0].key == "forkexec xen pages=8"
    other = documents.run_from_json({**loops, "loops": 2}).points[0].key
    assert other == "forkexec xen pages=8 loops=2"  # never compared with bench's 4 rounds
    old = {"schema": documents.RUN_CMD_SCHEMA, "run": meta, "pages": 8, "results": [result]}
    assert documents.run_from_json(old).points[0].key == "mprotect xen pages=8"


# --- compare exit codes ------------------------------------------------------------


def compare(*argv: str) -> int:
    return bench_cmd.main(["compare", *argv])


def test_compare_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = write_json(
        tmp_path / "baseline.json",
        documents.baseline_to_json(make_run(make_point(), make_point("trap", 64, 129)), {}),
    )

    def against(*points: Point) -> str:
        return str(write_json(tmp_path / "run.json", documents.run_to_json(make_run(*points))))

    same = against(make_point(), make_point("trap", 64, 129))
    assert compare("--baseline", str(base), "--against", same) == 0
    assert "every count is exactly the baseline's" in capsys.readouterr().out

    better = against(make_point(traps=2), make_point("trap", 64, 129))
    assert compare("--baseline", str(base), "--against", better) == 0
    assert "update the baseline on purpose" in capsys.readouterr().out

    worse = against(make_point(traps=22), make_point("trap", 64, 129))
    assert compare("--baseline", str(base), "--against", worse, "--markdown") == 1
    out = capsys.readouterr().out
    assert "| mprotect xen pages=600 | protect_ro | traps | 21 | 22 | +1 | REGRESSION |" in out

    broken = make_point("trap", 64, 129)
    broken.invalidate("guest- and hypervisor-side counts disagree")
    invalid = against(make_point(), broken)
    assert compare("--baseline", str(base), "--against", invalid, "--json") == 3
    assert json.loads(capsys.readouterr().out)["status"] == 3

    partial = against(make_point())
    assert compare("--baseline", str(base), "--against", partial) == 2
    assert "MISSING" in capsys.readouterr().out

    # usage errors
    assert compare("--baseline", str(tmp_path / "nope.json"), "--against", same) == 2
    assert compare("--baseline", str(base), "--against", "7", "--db", str(tmp_path / "x.db")) == 2
    assert "no results database" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()  # compare never creates a database
    (tmp_path / "junk.json").write_text("{not json")
    assert compare("--baseline", str(tmp_path / "junk.json"), "--against", same) == 2
    assert compare("--no-such-option") == 2


def test_compare_against_stored_runs_and_tags(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        first = store.save_run(make_run(make_point(traps=21)))
        store.tag("main", first)
        store.save_run(make_run(make_point(traps=23)))
    assert compare("--baseline", "main", "--against", "latest", "--db", str(db)) == 1
    assert compare("--baseline", "2", "--against", str(first), "--db", str(db)) == 0
    assert compare("--baseline", "no-such-tag", "--db", str(db)) == 2


def test_update_baseline_on_purpose(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "benchmarks" / "baseline.json"
    run = make_run(make_point(traps=21), make_point("trap", 64, 129))
    source = write_json(tmp_path / "run.json", documents.run_to_json(run))
    argv = ["--baseline", str(target), "--against", str(source), "--update-baseline"]
    assert compare(*argv) == 0
    written = json.loads(target.read_text())
    assert written["schema"] == documents.BASELINE_SCHEMA
    assert written["sweep"] == run.config["sweep"]
    assert written["points"]["mprotect xen pages=600"]["counts"]["protect_ro"]["traps"] == 21
    assert compare("--baseline", str(target), "--against", str(source)) == 0

    run.points[0].invalidate("audit() not clean")
    write_json(source, documents.run_to_json(run))
    assert compare(*argv) == 3
    run = make_run(make_point())
    run.config["inject"] = {"xen": ["--mc-records", "1"]}
    write_json(source, documents.run_to_json(run))
    assert compare(*argv) == 2
    assert "injected" in capsys.readouterr().err
    assert json.loads(target.read_text()) == written  # untouched by the refusals


# --- the cost model ------------------------------------------------------------------


def test_cost_model_arithmetic() -> None:
    model = costmodel.CostModel(
        name="round",
        cpu_ghz=2.0,
        hypercall_cycles=2000,
        ptwr_cycles=4000,
        page_fault_cycles=1000,
        record_ns=10,
        flush_op_ns=100,
        native_pte_ns=20,
    )
    assert model.ns(2000) == 1000.0
    trap_mode = {"traps": 1201, "hypercalls": 601, "ptwr": 600, "records": 600, "flush_ops": 1}
    parts = model.breakdown_ns(trap_mode, ptes=600)
    assert parts == {
        "hypercalls": 601 * 1000.0,
        "ptwr": 600 * 2000.0,
        "page_faults": 0.0,
        "records": 6000.0,
        "flush_ops": 100.0,
        "native_ptes": 12000.0,
    }
    assert model.estimate_ns(trap_mode, 600) == sum(parts.values())
    populate = {"traps": 1206, "hypercalls": 606, "ptwr": 0, "records": 603, "page_faults": 600}
    assert model.breakdown_ns(populate, 600)["page_faults"] == 600 * 500.0
    # native: no traps, so only the PTE work, even though it takes page faults
    native = {"traps": 0, "hypercalls": 0, "page_faults": 600}
    assert model.estimate_ns(native, 600) == 600 * 20.0


def test_default_cost_model_and_files(tmp_path: Path) -> None:
    d = costmodel.DEFAULT
    assert (d.hypercall_cycles, d.flush_op_ns, d.native_pte_ns) == (2000.0, 100.0, 17.0)
    assert d.ns(d.hypercall_cycles) == pytest.approx(682.6, abs=0.1)
    assert costmodel.load("default") is d
    assert costmodel.load(str(REPO / "benchmarks" / "costs.json")) == d
    custom = write_json(tmp_path / "amd.json", {"cpu_ghz": 3.0, "hypercall_cycles": 1350})
    model = costmodel.load(str(custom))
    assert (model.name, model.cpu_ghz, model.hypercall_cycles, model.record_ns) == (
        "amd",
        3.0,
        1350,
        d.record_ns,
    )
    for bad in ({"warp_ns": 1}, {"record_ns": -1}, {"cpu_ghz": 0}, {"flush_op_ns": "fast"}):
        with pytest.raises(costmodel.CostModelError):
            costmodel.load(str(write_json(tmp_path / "bad.json", bad)))
    with pytest.raises(costmodel.CostModelError):
        costmodel.load(str(tmp_path / "missing.json"))


def test_every_default_cost_has_a_documented_source() -> None:
    doc = (REPO / "docs" / "cost-model.md").read_text()
    sources = json.loads((REPO / "benchmarks" / "costs.json").read_text())["sources"]
    for name, value in costmodel.DEFAULT.as_dict().items():
        if name == "name":
            continue
        assert f"`{name}`" in doc, name
        assert name in sources, name
        assert f"{value:g}" in doc or f"{value:,g}" in doc, (name, value)


def test_process_phases_are_estimated_with_the_ptes_bare_metal_writes() -> None:
    n, ptes = 600, costmodel.ptes_changed
    assert [ptes("mprotect", ph, n) for ph in ("populate", "protect_ro", "protect_rw")] == [n] * 3
    fork = {ph: ptes("fork", ph, 9) for ph in ("populate", "fork", "context_switch")}
    assert fork == {"populate": 9, "fork": 18, "context_switch": 0}
    assert (ptes("fork", "cow_copy", 9), ptes("fork", "cow_reuse", 9), ptes("fork", "exit", 9)) == (
        5,
        4,
        9,
    )
    assert (ptes("exec", "exec", n), ptes("exec", "exit", n)) == (n + 1, 1)
    assert ptes("forkexec", "fork", n, loops=3) == 3 * 2 * n
    assert ptes("forkexec", "cow_reuse", n) == 4 * n  # bench runs the default 4 rounds
    assert ptes("trace:x.json", "mmap", n) == ptes("fork", "unknown", n) == 0

    # The xen fork phase of 600 pages (pvemu bench --workload fork): 600
    # trapped write-protects, 20 mmu_updates of the child's PTEs, the pin's
    # multicall, the flush.
    model = costmodel.DEFAULT
    xen_fork = {"traps": 622, "hypercalls": 22, "ptwr": 600, "records": 600, "flush_ops": 3}
    parts = model.breakdown_ns(xen_fork, ptes("fork", "fork", n))
    assert parts["page_faults"] == 0
    assert parts["native_ptes"] == 1200 * 17.0
    point = Point("fork", "xen", n)
    point.counts = {"fork": xen_fork}
    from pvemu.scripts.bench.render import estimates_us

    assert estimates_us(point, model) == {"fork": pytest.approx(sum(parts.values()) / 1000)}
    assert estimates_us(point, model)["fork"] == pytest.approx(884.8, abs=0.1)


def test_published_figures_are_kept_once_and_marked_unconfirmed() -> None:
    doc = json.loads((REPO / "benchmarks" / "costs.json").read_text())
    assert doc["published"]["rows"] == costmodel.published_json()
    assert "UNCONFIRMED" in doc["published"]["source"]
    rows = {p.name: p for p in costmodel.PUBLISHED}
    assert (rows["fork proc"].linux_us, rows["fork proc"].xenolinux_us) == (110, 198)
    assert rows["exec proc"].xen_over_linux == pytest.approx(768 / 530)
    note = costmodel.published_note()
    for words in ("UNCONFIRMED", "fork proc 110 µs Linux vs 198 µs XenoLinux", "768"):
        assert words in note, words
    text = (REPO / "docs" / "cost-model.md").read_text()
    assert "unconfirmed" in text.lower()
    for row in costmodel.PUBLISHED:
        assert f"| {row.name} |" in text, row.name


# --- plots ---------------------------------------------------------------------------


def plot_run() -> Run:
    points = []
    for pages in (64, 600, 4096):
        for mode, per_pte in (("trap", 2.0), ("batched", 1 / 512), ("native", 0.0)):
            point = make_point(
                mode, pages, math.ceil(per_pte * pages), samples=[0.001, 0.002, 0.003]
            )
            point.counts["protect_rw"] = counts(math.ceil(per_pte * pages))
            point.samples["protect_rw"] = [0.001, 0.002, 0.003]
            points.append(point)
        for mc_bytes in (128, 256, 512):
            traps = math.ceil(pages / ((mc_bytes - 1) // 16))
            point = make_point(
                "xen", pages, traps, samples=[0.001, 0.0015, 0.002], mc_bytes=mc_bytes
            )
            point.counts["protect_rw"] = counts(traps)
            point.samples["protect_rw"] = [0.001, 0.002, 0.003]
            points.append(point)
    bad = make_point("ptwr", 64)
    bad.invalidate("skipped")
    return make_run(*points, bad)


def test_plots_are_written_and_reproducible(tmp_path: Path) -> None:
    from pvemu.scripts import plots

    written, notes = plots.render(plot_run(), tmp_path / "a")
    names = sorted(p.name for p in written)
    assert names == sorted(
        f"{stem}.{ext}"
        for stem in ("traps_vs_pages", "time_per_pte_vs_pages", "buffer_sweep")
        for ext in ("png", "svg")
    )
    assert notes == []
    for path in written:
        data = path.read_bytes()
        if path.suffix == ".png":
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
        else:
            assert b"<svg" in data
    again, _ = plots.render(plot_run(), tmp_path / "b")
    for first, second in zip(sorted(written), sorted(again), strict=True):
        assert first.read_bytes() == second.read_bytes(), first.name
    # A run with no buffer sweep says so rather than drawing an empty plot.
    _, notes = plots.render(make_run(make_point(samples=[0.1])), tmp_path / "c")
    assert any("swept no multicall-buffer limit" in n for n in notes)


def test_plot_action_reads_a_stored_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.save_run(plot_run())
    out = tmp_path / "plots"
    assert bench_cmd.main(["plot", "--db", str(db), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(out / "traps_vs_pages.png") in printed
    assert (out / "buffer_sweep.svg").is_file()
    assert bench_cmd.main(["plot", "--db", str(tmp_path / "none.db"), "--out", str(out)]) == 2


# --- real processes --------------------------------------------------------------------


def test_a_real_sweep_stores_and_prints_json(tmp_path: Path) -> None:
    db = tmp_path / "results.db"
    done = bench(
        "--modes",
        "native,xen",
        "--pages",
        "40",
        "--mc-bytes",
        "default,256",
        "--repeat",
        "2",
        "--db",
        str(db),
        "--cost-model",
        "default",
        "--json",
        "--tag",
        "smoke",
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema"] == documents.RUN_SCHEMA
    assert doc["valid"] is True
    meta = doc["run"]
    assert meta["id"] == 1
    assert meta["config"]["sweep"]["modes"] == ["native", "xen"]
    assert meta["config"]["repeat"] == 2
    assert {"trio", "msgpack", "rich"} <= set(meta["packages"])
    assert [p["key"] for p in doc["points"]] == [
        "mprotect native pages=40",
        "mprotect xen pages=40",
        "mprotect xen pages=40 mc_bytes=256",
    ]
    for point in doc["points"]:
        assert point["valid"] is True
        assert list(point["phases"]) == ["populate", "protect_ro", "protect_rw"]
        for phase, entry in point["phases"].items():
            assert entry["time"]["n"] == 2
            assert len(entry["samples_s"]) == 2
            assert entry["time"]["p10_s"] <= entry["time"]["median_s"] <= entry["time"]["p90_s"]
            assert entry["estimate_us"] >= 0
            if not point["params"]:
                assert entry["counts"]["traps"] == expected_traps(point["mode"], 40, phase)
    xen256 = doc["points"][2]["phases"]["protect_ro"]["counts"]
    assert xen256["traps"] == math.ceil(40 / 15) + 1
    assert "stored as run #1" in done.stderr
    with ResultStore(db) as store:
        stored = store.load_run(store.resolve("smoke"))
    assert [p.key for p in stored.points] == [p["key"] for p in doc["points"]]
    assert stored.points[1].counts["protect_ro"]["traps"] == expected_traps("xen", 40, "protect_ro")


def test_a_real_sweep_of_the_process_workloads() -> None:
    done = bench(
        *("--workload", "fork,exec", "--workload", "forkexec", "--modes", "xen,batched"),
        *("--pages", "5", "--repeat", "1", "--no-store", "--json"),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["run"]["config"]["sweep"]["workloads"] == ["fork", "exec", "forkexec"]
    points = {p["key"]: p for p in doc["points"]}
    assert list(points) == [
        f"{w} {m} pages=5" for w in ("fork", "exec", "forkexec") for m in ("xen", "batched")
    ]
    for point in points.values():
        assert point["valid"] is True, point["reason"]
        assert list(point["phases"]) == list(PROCESS_PHASES[point["workload"]])
    for mode in ("xen", "batched"):
        fork = points[f"fork {mode} pages=5"]["phases"]
        assert fork["fork"]["counts"]["traps"] == fork_counts.fork_traps(mode, 5)
        exec_ = points[f"exec {mode} pages=5"]["phases"]["exec"]["counts"]["traps"]
        assert exec_ == fork_counts.exec_traps(mode, 5)
        rounds = points[f"forkexec {mode} pages=5"]["phases"]
        assert rounds["fork"]["counts"]["traps"] == DEFAULT_LOOPS * fork_counts.fork_traps(mode, 5)
        assert rounds["cow_reuse"]["counts"]["page_faults"] == DEFAULT_LOOPS * 5


def test_bench_usage_errors_exit_2(tmp_path: Path) -> None:
    assert bench("--modes", "trap", "--mc-bytes", "256", "--no-store").returncode == 2
    assert bench("--pages", "0").returncode == 2
    assert bench("--cost-model", str(tmp_path / "none.json"), "--no-store").returncode == 2


# --- the CI gate -----------------------------------------------------------------------


def xen_per_flush(params: dict[str, int]) -> int:
    """Records per multicall flush: the >= rule on argument bytes, then the cap."""
    per_flush = (params.get("mc_bytes", 512) - 1) // 16
    return min(per_flush, params.get("mc_records", per_flush))


def formula(workload: str, mode: str, pages: int, params: dict[str, int], phase: str) -> int:
    if workload in MM_PHASES:
        return mm_counts.expected_traps(workload, mode, pages, xen_per_flush(params))[phase]
    if workload != "mprotect":
        expected = fork_counts.expected_phase_traps(
            workload, mode, pages, per_flush=xen_per_flush(params)
        )
        return expected[phase]
    if mode != "xen" or phase == "populate" or not params:
        return expected_traps(mode, pages, phase)
    flush = 1 if phase == "protect_ro" else 0  # one MULTI op: the mm ran on both vCPUs
    return sum(math.ceil(k / xen_per_flush(params)) for k in pte_pages(pages)) + flush


def test_the_baseline_matches_the_trap_formulas() -> None:
    doc = json.loads(BASELINE.read_text())
    assert doc["schema"] == documents.BASELINE_SCHEMA
    sweep = Sweep.from_json(doc["sweep"])
    assert sorted(p.key for p in sweep.plan()) == sorted(doc["points"])
    assert set(sweep.workloads) == {"mprotect", *PROCESS_PHASES, *MM_PHASES}
    assert set(sweep.modes) == set(SAFE_MODES)
    for key, point in doc["points"].items():
        workload, mode, pages = point["workload"], point["mode"], point["pages"]
        if workload != "mprotect":
            assert list(point["counts"]) == list({**PROCESS_PHASES, **MM_PHASES}[workload]), key
        for phase, values in point["counts"].items():
            expected = formula(workload, mode, pages, point["params"], phase)
            assert values["traps"] == expected, (key, phase)
            assert set(values) == set(results.GATED_COUNTS)


def small_gate(tmp_path: Path) -> Path:
    """The baseline cut to its 64-page xen and batched points of mprotect and
    fork (make bench-ci runs all of it; this keeps the suite's copy short)."""
    doc = json.loads(BASELINE.read_text())
    sweep = {**doc["sweep"], "modes": ["xen", "batched"], "pages": [64]}
    sweep["workloads"] = ["mprotect", "fork"]
    keys = [p.key for p in Sweep.from_json(sweep).plan()]
    assert len(keys) == 10
    doc["sweep"], doc["points"] = sweep, {k: doc["points"][k] for k in keys}
    return write_json(tmp_path / "gate.json", doc)


def test_the_gate_passes_on_this_code_and_bites_on_a_debatched_guest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cut of the CI sweep twice, concurrently: as is (exit 0) and with
    every xen guest capped at one record per flush (exit 1, xen counts up in
    mprotect and in fork's child installs)."""
    gate = small_gate(tmp_path)
    clean, debatched = tmp_path / "clean.json", tmp_path / "debatched.json"
    common = ["--sweep-from", str(gate), "--repeat", "1", "--no-store", "--quiet"]
    env = {**os.environ, "PVEMU_BENCH_NO_GIT": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pvemu.scripts.bench_cmd", *common, *extra],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for extra in (
            ["--output", str(clean)],
            ["--output", str(debatched), "--inject-guest-args", "xen=--mc-records 1"],
        )
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert "deliberately altered" in err

    assert compare("--baseline", str(gate), "--against", str(clean)) == 0
    capsys.readouterr()
    assert compare("--baseline", str(gate), "--against", str(debatched), "--json") == 1
    regressions = json.loads(capsys.readouterr().out)["regressions"]
    assert {r["key"].split()[1] for r in regressions} == {"xen"}
    assert {r["key"].split()[0] for r in regressions} == {"mprotect", "fork"}
    worst = max(regressions, key=lambda r: r["delta"])
    assert worst["metric"] in ("traps", "hypercalls")
    assert worst["new"] >= 64  # one hypercall per PTE
