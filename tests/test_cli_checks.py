"""Checks before work: a command line that cannot succeed fails at once, in one
line that says what to do, before any hypervisor, guest or worker starts.

Unit tests pin each check to the limit the code enforces; in-process runs of
``cli.main`` with process creation forbidden show that nothing starts; one
subprocess per class of mistake drives the real CLI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

from pvemu.guest.multicall import KernelBug, McBuffer
from pvemu.hypervisor.core import MAX_VCPUS as CORE_MAX_VCPUS
from pvemu.scripts import checks, cli, load_cmd, race_cmd, run_cmd
from pvemu.scripts.argtypes import output_file, output_folder
from pvemu.scripts.errors import EXIT_USAGE, UserError
from pvemu.shared import abi, wire

PVEMU = [sys.executable, "-m", "pvemu.scripts"]
#: A host with plenty of RAM, so that only the limit under test can fail.
BIG_HOST_MIB = 1 << 20


# --- the limits are the code's --------------------------------------------------------


def test_max_pages_is_the_largest_region_whose_guest_fits_a_domain() -> None:
    assert checks.memory_for(checks.MAX_PAGES) <= wire.MAX_MEMORY_MIB
    assert checks.memory_for(checks.MAX_PAGES + 1) > wire.MAX_MEMORY_MIB
    for mib in (16, 17, 100, 1481, 4096):
        pages = checks.max_pages_for(mib)
        assert checks.memory_for(pages) <= mib < checks.memory_for(pages + 1)


def test_vcpu_and_writer_limits_are_the_domains() -> None:
    assert checks.MAX_VCPUS == wire.MAX_VCPUS == CORE_MAX_VCPUS
    assert checks.MAX_WRITERS + checks.RACE_OTHER_VCPUS == checks.MAX_VCPUS


def test_the_smallest_multicall_buffer_holds_the_largest_entry_and_one_less_does_not() -> None:
    McBuffer(max_arg_bytes=checks.MIN_MC_BYTES).queue_mmuext(abi.MMUEXT_TLB_FLUSH_LOCAL)
    with pytest.raises(KernelBug):
        McBuffer(max_arg_bytes=checks.MIN_MC_BYTES - 1).queue_mmuext(abi.MMUEXT_TLB_FLUSH_LOCAL)


def test_machine_memory_limit_follows_the_host_and_the_frame_numbers() -> None:
    assert checks.max_machine_mib(1024) == 1024 * (1 << 20) // (40 * 256)
    assert checks.max_machine_mib(1 << 40) == checks.MAX_MACHINE_MIB == 1 << 24


# --- each check -----------------------------------------------------------------------


def test_pages_over_a_domain_are_refused_with_the_largest_that_fits() -> None:
    checks.check_pages(checks.MAX_PAGES, BIG_HOST_MIB)
    with pytest.raises(UserError, match="give --pages 3,352,371 or fewer") as raised:
        checks.check_pages(99_999_999_999, BIG_HOST_MIB)
    assert raised.value.exit_code == EXIT_USAGE


def test_pages_over_the_hosts_ram_are_refused() -> None:
    checks.check_pages(4096, 100)
    with pytest.raises(UserError, match="this host's 100 MiB of RAM"):
        checks.check_pages(100_000, 100)


def test_machine_memory_over_the_host_is_refused_with_its_limit() -> None:
    checks.check_machine_memory(1024, 24_000)
    limit = checks.max_machine_mib(24_000)
    with pytest.raises(UserError, match=f"give --memory-mib {limit} or less"):
        checks.check_machine_memory(99_999_999, 24_000)


def test_too_little_memory_says_how_much_to_give() -> None:
    checks.check_enough_memory(None, 1481, "a guest")
    checks.check_enough_memory(1481, 1481, "a guest")
    with pytest.raises(UserError, match=r"need 1,481 MiB .* give --memory-mib 1481 or more"):
        checks.check_enough_memory(1480, 1481, "a guest")


def test_guest_memory_is_one_domain() -> None:
    checks.check_guest_memory(wire.MAX_MEMORY_MIB)
    with pytest.raises(UserError, match="16384"):
        checks.check_guest_memory(wire.MAX_MEMORY_MIB + 1)


def test_vcpus_writers_and_guests_have_limits() -> None:
    checks.check_vcpus(64)
    with pytest.raises(UserError, match="at most 64 vCPUs"):
        checks.check_vcpus(1000)
    checks.check_writers(62, 64)
    with pytest.raises(UserError, match="at most 62"):
        checks.check_writers(63, 64)
    with pytest.raises(UserError, match="a page each"):
        checks.check_writers(4, 3)
    checks.check_guests(checks.MAX_LOAD_GUESTS)
    with pytest.raises(UserError, match="at most 511"):
        checks.check_guests(10_000)


def test_buffer_sizes_under_the_largest_entry_are_refused() -> None:
    checks.check_mc_bytes([None, 25, 512])
    with pytest.raises(UserError, match=r"--mc-bytes 7: .* give 25 or more"):
        checks.check_mc_bytes([512, 7, 24])


def test_modes_come_from_the_registry() -> None:
    checks.check_modes(("trap", "batched"))
    with pytest.raises(UserError, match=r"unknown mode.*bogus"):
        checks.check_modes(("xen", "bogus"))


def test_output_files_need_a_folder_that_takes_files(tmp_path: Path) -> None:
    assert output_file(str(tmp_path / "x.json")) == str(tmp_path / "x.json")
    with pytest.raises(argparse.ArgumentTypeError, match="no folder"):
        output_file(str(tmp_path / "missing" / "x.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder"):
        output_file(str(tmp_path))
    if Path("/proc/self").is_dir():  # access() says root may write there; a file cannot be made
        with pytest.raises(argparse.ArgumentTypeError, match="cannot write in /proc"):
            output_file("/proc/x.json")


def test_output_folders_may_be_created_unless_a_file_is_in_the_way(tmp_path: Path) -> None:
    assert output_folder(str(tmp_path / "a" / "b"))
    (tmp_path / "file").write_text("")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file"):
        output_folder(str(tmp_path / "file" / "plots"))
    assert not (tmp_path / "a").exists()  # checking creates nothing


def test_programs_must_exist_and_be_executable(tmp_path: Path) -> None:
    assert Path(checks.check_program("sh")).name == "sh"
    with pytest.raises(UserError, match="no such program: /no/such/cmd"):
        checks.check_program("/no/such/cmd")
    with pytest.raises(UserError, match="no such program: no-such-cmd-pvemu"):
        checks.check_program("no-such-cmd-pvemu")
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(UserError, match="not an executable file"):
        checks.check_program(str(script))


def test_load_sizes_its_hypervisor_for_every_domain() -> None:
    args = cli.build_parser().parse_args(["load", "--guests", "100"])
    # 100 guests of 17 MiB, the probe (4), the big batch (8) and Xen's frame:
    # the old 16 MiB a guest (1,696 MiB) left the last guests without memory.
    assert load_cmd.domains_memory(args) == 100 * 17 + 4 + 8 + 1
    load_cmd.check(args, BIG_HOST_MIB)
    args.memory_mib = 1000
    with pytest.raises(UserError, match=r"not enough machine memory.*--memory-mib 1713"):
        load_cmd.check(args, BIG_HOST_MIB)


def test_run_memory_must_hold_the_guest_and_not_come_with_a_socket() -> None:
    parse = cli.build_parser().parse_args
    run_cmd.check(parse(["run", "--pages", "300000", "--memory-mib", "1481"]), BIG_HOST_MIB)
    with pytest.raises(UserError, match="--memory-mib 1481 or more"):
        run_cmd.check(parse(["run", "--pages", "300000", "--memory-mib", "1480"]), BIG_HOST_MIB)
    with pytest.raises(UserError, match="drop it with --socket"):
        run_cmd.check(parse(["run", "--socket", "/tmp/s", "--memory-mib", "64"]), BIG_HOST_MIB)


def test_race_default_memory_grows_with_the_pages() -> None:
    assert race_cmd.hypervisor_memory(64) == 512  # what race has always given
    assert race_cmd.hypervisor_memory(200_000) >= checks.memory_for(200_000) + 1


# --- a guest that did not start is no lost data -------------------------------------------


def _race_result(mode: str, **lost: int) -> dict[str, Any]:
    base = {"mode": mode, "unsafe": mode == "naive", "audit_clean": True, "counts_agree": True}
    counts = {"iterations": 40, "writes": 100, "traps": 10, "page_faults": 3}
    return {**base, **counts, "lost_dirty": 0, "lost_writes": 0, "stale_tlb_writes": 0, **lost}


def test_race_reports_a_guest_that_never_started_as_not_run() -> None:
    not_started = {"mode": "xen", "unsafe": False, "error": "pvemu guest: out of memory"}
    results = [_race_result("trap"), not_started, _race_result("naive", lost_dirty=3)]
    headline = race_cmd.race_headline(results)
    assert "1 of 1 safe mode(s) lost nothing" in headline
    assert "did not run (guest failed to start or crashed): xen" in headline
    assert "LOST" not in headline
    args = cli.build_parser().parse_args(["race"])
    rows = {row[0]: row[-1] for row in race_cmd.race_tabular(args, results).rows}
    assert rows["xen"] == "DID NOT RUN: pvemu guest: out of memory"
    assert rows["trap"] == "nothing lost"


def test_race_still_reports_real_loss_as_lost_data() -> None:
    headline = race_cmd.race_headline([_race_result("xen", lost_writes=2)])
    assert "LOST DATA or failed checks: xen" in headline


def test_fork_race_table_has_leaked_writes_and_counts_them_as_loss() -> None:
    fork = {"workload": "fork", "leaked_writes": 0}
    results = [
        {**_race_result("xen"), **fork, "leaked_writes": 1},
        {**_race_result("batched"), **fork},
        {**_race_result("naive", lost_dirty=5), **fork},
    ]
    args = cli.build_parser().parse_args(["race", "--workload", "fork"])
    tab = race_cmd.race_tabular(args, results)
    assert tab.title.startswith("fork race:")
    assert tab.header[:2] == ["mode", "forks"]
    assert "leaked writes" in tab.header
    assert {row[0]: row[-1] for row in tab.rows} == {
        "xen": "LOST DATA",
        "batched": "nothing lost",
        "naive (UNSAFE)": "expected loss",
    }
    headline = race_cmd.race_headline(results)
    assert "LOST DATA or failed checks: xen" in headline
    assert "naive (UNSAFE) lost 5 dirty bit(s)" in headline
    assert "without reclaim or swap" in headline


def test_fork_race_gives_room_for_a_copy_of_every_page() -> None:
    assert race_cmd.hypervisor_memory(64, "fork") == race_cmd.hypervisor_memory(64) == 512
    big = 200_000
    assert race_cmd.hypervisor_memory(big, "fork") >= 2 * checks.memory_for(2 * big)
    race_cmd.check(cli.build_parser().parse_args(["race", "--pages", "2000000"]), BIG_HOST_MIB)
    with pytest.raises(UserError, match="room for 2 copies of each page"):
        race_cmd.check(
            cli.build_parser().parse_args(["race", "--workload", "fork", "--pages", "2000000"]),
            BIG_HOST_MIB,
        )


# --- nothing starts: in process, with process creation forbidden ------------------------------


REFUSED = [
    ["run", "--pages", "99999999999"],
    ["run", "--vcpus", "1000"],
    ["run", "--memory-mib", "99999999"],
    ["run", "--pages", "300000", "--memory-mib", "100"],
    ["race", "--pages", "100000000"],
    ["race", "--writers", "63"],
    ["race", "--pages", "4", "--writers", "8"],
    ["race", "--workload", "fork", "--pages", "2000000"],
    ["bench", "--mc-bytes", "7", "--modes", "xen", "--no-store"],
    ["bench", "--pages", "99999999", "--no-store"],
    ["bench", "--vcpus", "65", "--no-store"],
    ["bench", "--workload", "bogus", "--no-store"],
    ["bench", "--memory-mib", "100", "--pages", "300000", "--no-store"],
    ["load", "--guests", "10000"],
    ["load", "--guests", "100", "--memory-mib", "1000"],
    ["hypervisor", "--memory-mib", "99999999"],
    ["guest", "--pages", "99999999999"],
    ["guest", "--workload", "trace:/no/such/trace.json"],
    ["guest", "--mode", "xen", "--mc-bytes", "7"],
    ["trace", "replay", "benchmarks/traces/python-json.json", "--memory-mib", "99999"],
    ["trace", "record", "-o", "x.json", "--", "/no/such/cmd"],
    ["trace", "record", "--strace", "/no/such/strace", "-o", "x.json", "--", "true"],
]


@pytest.mark.parametrize("argv", REFUSED, ids=" ".join)
def test_refused_before_any_process_starts(
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    def no_process(*_args: object, **_kwargs: object) -> NoReturn:
        raise AssertionError(f"pvemu {' '.join(argv)} started a process")

    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    root = Path(__file__).resolve().parent.parent
    argv = [str(root / a) if a.startswith("benchmarks/") else a for a in argv]
    assert cli.main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"pvemu {argv[0]}")
    assert list(tmp_path.iterdir()) == []


# --- the real CLI, one subprocess per class of mistake --------------------------------------------


def _pvemu(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    started = time.monotonic()
    done = subprocess.run(
        [*PVEMU, *argv], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    return done, time.monotonic() - started


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one error line: every other line may only be argparse's usage
    block (until the parser prints one line too)."""
    assert "Traceback" not in done.stderr, done.stderr
    *before, last = done.stderr.strip().splitlines()
    assert before == [] or (
        before[0].startswith("usage:") and all(line.startswith(" ") for line in before[1:])
    ), done.stderr
    return last


SUBPROCESS_CASES = [
    # sizes against memory
    (["run", "--pages", "99999999999"], "pvemu run: --pages 99,999,999,999 needs", True),
    (["hypervisor", "--memory-mib", "99999999"], "more than this host can emulate", True),
    # vCPUs and writers
    (["run", "--vcpus", "1000"], "pvemu run: --vcpus 1,000: a domain has at most 64", True),
    (["race", "--writers", "100"], "pvemu race: --writers 100: at most 62", True),
    # buffer sizes and timeouts
    (["bench", "--mc-bytes", "7", "--no-store"], "pvemu bench: --mc-bytes 7:", True),
    (["bench", "--timeout", "0", "--no-store"], "argument --timeout: must be positive", False),
    # modes and workloads
    (["load", "--mode", "bogus"], "argument --mode: unknown mode 'bogus'", False),
    (["race", "--modes", "xen,bogus"], "unknown mode(s) ['bogus']", False),
    (["race", "--workload", "bogus"], "argument --workload: invalid choice: 'bogus'", False),
    # guests
    (["load", "--guests", "10000"], "pvemu load: --guests 10,000: at most 511", True),
    (["load", "--guests", "100", "--memory-mib", "1000"], "give --memory-mib 1713", True),
    # output folders
    (["trace", "record", "-o", "/no/such/dir/x.json", "--", "true"], "no folder", False),
    # a traced command that exists
    (["trace", "record", "-o", "{tmp}/x.json", "--", "/no/such/cmd"], "no such program", True),
]


@pytest.mark.parametrize(("argv", "message", "one_line"), SUBPROCESS_CASES, ids=lambda v: str(v))
def test_the_real_cli_refuses_at_once(
    argv: list[str], message: str, one_line: bool, tmp_path: Path
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    done, seconds = _pvemu(tmp_path, *argv)
    assert done.returncode == EXIT_USAGE, done.stderr
    line = _error_line(done)
    assert message in line
    if one_line:
        assert done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""
    assert seconds < 20  # a started hypervisor or guest would take longer; nothing ran
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not (tmp_path / "x.json").exists()


def test_bench_plot_refuses_an_out_folder_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    done, _ = _pvemu(tmp_path, "bench", "plot", "--out", str(tmp_path / "file" / "plots"))
    assert done.returncode == EXIT_USAGE
    assert "is a file, not a folder" in _error_line(done)


def test_bench_checks_where_it_will_store_before_the_sweep(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def no_process(*_args: object, **_kwargs: object) -> NoReturn:
        raise AssertionError("bench started a process")

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".pvemu").write_text("")  # the default database's folder cannot be made
    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    assert cli.main(["bench", "--modes", "native", "--pages", "16"]) == EXIT_USAGE
    assert "is a file, not a folder" in capsys.readouterr().err
