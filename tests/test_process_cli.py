"""``pvemu run`` and ``pvemu guest`` with the process workloads (fork, exec,
forkexec): real processes over the real socket at a few pages, their JSON
and tables phase by phase, the headline against xen, progress steps and the
options' errors. The exact counts of every phase are tests/test_fork_counts.py's;
here the mode-dependent phases are checked against the same formulas."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pvemu.guest.proc_workloads import DEFAULT_LOOPS, PROCESS_PHASES
from pvemu.scripts import checks, cli, workloads
from pvemu.scripts.bench import documents
from pvemu.scripts.errors import EXIT_USAGE, UserError
from pvemu.scripts.report import TIMES as X
from pvemu.scripts.report import Entry, comparison_tabular, process_headline
from pvemu.shared.counts import PHASE_FIELDS
from tests.hvproc import hypervisor_process
from tests.test_fork_counts import exec_traps, exit_traps, fork_traps, pte_pages

REPO = Path(__file__).resolve().parent.parent


def pvemu(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PVEMU_BENCH_NO_GIT": "1", "COLUMNS": "160"}
    return subprocess.run(
        [sys.executable, "-m", "pvemu.scripts", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def mode_dependent(workload: str, mode: str, pages: int, loops: int = 1) -> dict[str, int]:
    """The traps of the phases that do not fault, from test_fork_counts' formulas."""
    switch = 0 if mode == "native" else 1
    if workload == "fork":
        exit_ = exit_traps(mode, len(pte_pages(pages)))
        return {"fork": fork_traps(mode, pages), "context_switch": switch, "exit": exit_}
    if workload == "exec":
        return {
            "context_switch": switch,
            "exec": exec_traps(mode, pages),
            "exit": exit_traps(mode, 1),
        }
    return {
        "fork": loops * fork_traps(mode, pages),
        "context_switch": loops * switch,
        "exec": loops * exec_traps(mode, pages),
        "exit": loops * exit_traps(mode, 1),
    }


def assert_valid(result: dict[str, Any]) -> None:
    assert result["counts_agree"] is True, result
    assert result["audit_clean"] is True, result["audit"]


# --- end to end, one workload each ---------------------------------------------------------


def test_run_fork_json_phase_by_phase() -> None:
    pages = 9
    done = pvemu(
        "run", "--workload", "fork", "--pages", str(pages), "--modes", "xen,batched", "--json"
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema"] == documents.RUN_CMD_SCHEMA
    assert (doc["workload"], doc["pages"], doc["run"]["config"]["workload"]) == ("fork", 9, "fork")
    assert "loops" not in doc
    assert [r["mode"] for r in doc["results"]] == ["xen", "batched"]
    for result in doc["results"]:
        assert_valid(result)
        assert result["workload"] == "fork"
        assert list(result["phases"]) == list(PROCESS_PHASES["fork"])
        phases = result["phases"]
        for phase, traps in mode_dependent("fork", result["mode"], pages).items():
            assert phases[phase]["traps"] == traps, (result["mode"], phase)
        # the child copies pages 0, 2, ..., 8; the parent reuses 1, 3, 5, 7
        assert phases["cow_copy"]["page_faults"] == 5
        assert phases["cow_reuse"]["page_faults"] == 4
        assert phases["fork"]["ptwr"] == (pages if result["mode"] == "xen" else 0)
        for counts in phases.values():
            assert {"hypercalls", "records", "ptwr", "flush_ops", "wall_s"} <= set(counts)


def test_run_exec_csv_rows_come_from_the_result() -> None:
    pages = 6
    done = pvemu(
        "run", "--workload", "exec", "--pages", str(pages), "--modes", "native,trap", "--csv"
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [(r["mode"], r["phase"]) for r in rows] == [
        (mode, phase) for mode in ("native", "trap") for phase in PROCESS_PHASES["exec"]
    ]
    by = {(r["mode"], r["phase"]): int(r["traps"]) for r in rows}
    for mode in ("native", "trap"):
        for phase, traps in mode_dependent("exec", mode, pages).items():
            assert by[mode, phase] == traps, (mode, phase)
    assert {r["ok"] for r in rows} == {"yes"}


def test_run_forkexec_table_with_loops_and_its_headline() -> None:
    pages, loops = 5, 2
    argv = ["run", "--workload", "forkexec", "--loops", str(loops), "--pages", str(pages)]
    done = pvemu(*argv, "--modes", "xen,batched")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"forkexec workload, {pages} pages, {loops} loops" in out
    for phase in PROCESS_PHASES["forkexec"]:
        assert phase in out
    xen, batched = (
        sum(mode_dependent("forkexec", mode, pages, loops)[p] for p in ("fork", "exec", "exit"))
        for mode in ("xen", "batched")
    )
    sentence = (
        f"headline: {pages} pages, {loops} loops: fork + exec + exit cost {xen} traps in xen "
        f"(Linux on Xen PV), {batched} in batched: "
    )
    assert sentence in out, out


def test_guest_runs_a_process_workload_against_a_running_hypervisor() -> None:
    with hypervisor_process(tag="procs") as hvp:
        common = ["guest", "--socket", hvp.socket_path, "--mode", "ptwr", "--pages", "4"]
        done = pvemu(*common, "--workload", "forkexec", "--loops", "1", "--json")
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["schema"] == documents.GUEST_SCHEMA
        assert (doc["workload"], doc["loops"], doc["run"]["config"]["loops"]) == ("forkexec", 1, 1)
        assert_valid(doc)
        for phase, traps in mode_dependent("forkexec", "ptwr", 4).items():
            assert doc["phases"][phase]["traps"] == traps, phase
        table = pvemu(*common, "--workload", "exec")
        assert table.returncode == 0, table.stderr
        assert "exec workload, 4 pages" in table.stdout
        assert "headline: 4 pages: exec costs" in table.stdout


def test_guest_reports_every_round_as_progress_steps() -> None:
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "pvemu.scripts", "guest", "--mode", "native", "--pages", "3"]
    cmd += ["--workload", "forkexec", "--loops", "2", "--json", "--progress-fd", str(write_fd)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, pass_fds=(write_fd,))
    os.close(write_fd)
    with os.fdopen(read_fd) as reader:
        steps = reader.read().split()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert steps == ["populate", *workloads.FORKEXEC_ROUND * 2, "check"]
    assert workloads.progress_steps("forkexec", 2) == 1 + len(steps)  # and boot
    assert json.loads(out)["loops"] == 2


def test_progress_steps_count_every_phase_boot_and_check() -> None:
    assert workloads.progress_steps("mprotect") == 5
    assert workloads.progress_steps("fork") == 1 + 6 + 1
    assert workloads.progress_steps("exec") == 1 + 4 + 1
    assert workloads.progress_steps("forkexec") == 1 + 1 + 5 * DEFAULT_LOOPS + 1
    assert workloads.PHASES["mprotect"] == ("populate", "protect_ro", "protect_rw")


# --- tables and headlines --------------------------------------------------------------------


def _result(mode: str, phases: dict[str, int], wall: float = 0.01) -> dict[str, Any]:
    return {
        "mode": mode,
        "unsafe": mode == "naive",
        "counts_agree": True,
        "audit_clean": True,
        "phases": {
            name: {**dict.fromkeys(PHASE_FIELDS, 0), "traps": t, "wall_s": wall}
            for name, t in phases.items()
        },
    }


def test_process_headline_is_against_xen() -> None:
    entries = [
        Entry("trap", "trap", 8_400, 1.0),
        Entry("xen", "xen", 4_339, 0.6),
        Entry("batched", "batched", 8, 0.02),
        Entry("naive", "naive", 8, 0.01, unsafe=True),
        Entry("native", "native", 0, 0.001),
    ]
    assert process_headline(entries, "4,096 pages", "fork", "costs") == (
        f"headline: 4,096 pages: fork costs 4,339 traps in xen (Linux on Xen PV), 8 in batched: "
        f"542{X} fewer, 30{X} faster"
    )
    without_xen = process_headline([entries[0], entries[2]], "64 pages", "exec", "costs")
    assert "exec costs 8,400 traps in trap (the most here; xen did not run), 8 in batched" in (
        without_xen
    )
    alone = process_headline([entries[1]], "64 pages", "fork", "costs")
    assert alone.endswith(
        "in xen (Linux on Xen PV); nothing to compare with (--modes xen,batched compares)"
    )
    tie = process_headline(
        [Entry("ptwr", "ptwr", 3, 0.1), Entry("batched", "batched", 3, 0.1)],
        "16 pages",
        "exec",
        "costs",
    )
    assert tie == "headline: 16 pages: exec costs 3 traps in each of ptwr, batched"
    assert "no safe hypervisor mode" in process_headline(entries[3:], "1 page", "fork", "costs")


def test_the_table_takes_its_phases_from_the_results() -> None:
    fork = {
        "populate": 30,
        "fork": 14,
        "context_switch": 1,
        "cow_copy": 20,
        "exit": 2,
        "cow_reuse": 8,
    }
    results = [_result("xen", fork), _result("batched", {**fork, "fork": 1})]
    tab = comparison_tabular(10, results, "fork")
    assert tab.title == "fork workload, 10 pages (traps per phase; lower is better)"
    assert [row[1] for row in tab.rows] == list(fork) * 2
    assert tab.headline.startswith(
        "headline: 10 pages: fork costs 14 traps in xen (Linux on Xen PV), 1 in batched"
    )
    mprotect = comparison_tabular(10, [_result("trap", {"protect_ro": 21, "protect_rw": 20})])
    assert mprotect.title.startswith("mprotect workload, 10 pages")
    assert "mprotect RO + RW" in mprotect.headline


# --- the options' errors ---------------------------------------------------------------------


REFUSED = [
    (["run", "--workload", "fork", "--vcpus", "1"], "--vcpus 1: the fork workload needs 2 vCPUs"),
    (["guest", "--workload", "exec", "--vcpus", "1"], "--vcpus 1: the exec workload needs 2 vCPUs"),
    (["run", "--loops", "3"], "--loops counts the forkexec workload's rounds"),
    (["guest", "--workload", "fork", "--loops", "3"], "drop it for --workload fork"),
    (["run", "--workload", "fork", "--pages", "9000000"], "(fork's child copies half the pages)"),
    (["bench", "--workload", "exec", "--vcpus", "1", "--no-store"], "the exec workload needs 2"),
]


@pytest.mark.parametrize(
    ("argv", "message"), REFUSED, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_refused_in_one_line_before_anything_starts(
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def no_process(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    assert cli.main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"pvemu {argv[0]}: ")
    assert message in err, err


def test_an_unknown_workload_is_refused_by_the_parser() -> None:
    done = pvemu("run", "--workload", "spawn")
    assert done.returncode == EXIT_USAGE
    assert (
        "argument --workload: expected one of mprotect, fork, exec, forkexec, munmap, dontneed, "
        "mremap, populate, got 'spawn'" in done.stderr
    )


def test_fork_needs_memory_for_its_copies() -> None:
    """fork fills 1.5 regions; the largest --pages is the one whose guest fits."""
    assert checks.workload_pages("fork", 9) == 14
    assert checks.workload_pages("forkexec", 9) == 9
    for mib in (16, 100, checks.MAX_DOMAIN_MIB):
        largest = checks.max_workload_pages("fork", mib)
        assert (
            checks.guest_memory("fork", largest) <= mib < checks.guest_memory("fork", largest + 1)
        )
    checks.check_pages(checks.max_workload_pages("fork", 4096), 4096, workload="fork")
    with pytest.raises(UserError, match="give --pages"):
        checks.check_pages(checks.max_workload_pages("fork", 4096) + 1, 4096, workload="fork")
