"""``pvemu load`` in small form: real processes, exact counts, no timing asserts."""

from __future__ import annotations

import json
import subprocess
import sys

from pvemu.scripts.load_cmd import split_probe_samples
from pvemu.scripts.load_worker import ENTRIES, big_batch
from pvemu.shared.x86 import PTE_MFN_MASK, maddr_of_entry


def test_small_load_run_reports_every_figure_and_exact_counts() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pvemu.scripts",
            "load",
            "--guests",
            "2",
            "--pages",
            "64",
            "--records",
            "20000",
            "--baseline",
            "0.5",
            "--interval-ms",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] is True
    assert doc["failed"] == []
    assert doc["audit"] == []
    assert doc["big_batch"]["rc"] == 0
    assert doc["big_batch"]["done"] == 20000
    # Every mprotect of a 64-page region is exactly 64 mmu_update records.
    assert doc["load"]["mprotects"] > 0
    assert doc["load"]["records"] == doc["load"]["mprotects"] * 64
    assert doc["load"]["records_per_s"] > 0
    for phase in ("without_big_batch", "during_big_batch"):
        latency = doc["probe"][phase]
        assert latency["n"] > 0
        assert 0 < latency["median_ms"] <= latency["p99_ms"] <= latency["max_ms"]
    memory = doc["hypervisor_memory_kib"]
    assert 0 < memory["rss_before_guests"] <= memory["peak_rss"]
    assert doc["config"]["quantum"] == 32


def test_records_over_the_wire_ceiling_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pvemu.scripts", "load", "--records", str((1 << 20) + 1)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "at most 1048576" in done.stderr


def test_big_batch_rewrites_500_entries_alternately_read_only_and_writable() -> None:
    batch = big_batch(l1=7, frames=[100, 101], records=ENTRIES * 2 + 1)
    assert len(batch) == ENTRIES * 2 + 1
    assert batch[0][0] == maddr_of_entry(7, 1)
    assert batch[ENTRIES][0] == maddr_of_entry(7, 1)
    first, second = batch[0][1], batch[ENTRIES][1]
    assert (first & PTE_MFN_MASK) >> 12 == 100 == (second & PTE_MFN_MASK) >> 12
    assert not first & 0x2  # read-only pass
    assert second & 0x2  # then read-write


def test_a_probe_trap_overlapping_the_batch_counts_as_during_it() -> None:
    """(start ns, latency ns) samples against a batch from 100 to 200: one
    ended before it, one in flight when it began, one sent inside it, one
    still in flight when it ended, one sent after it."""
    samples = [(10, 50), (90, 30), (150, 5), (195, 40), (250, 1)]
    without, during = split_probe_samples(samples, 100, 200)
    assert without == [50]
    assert during == [30, 5, 40]
    assert split_probe_samples([(99, 1)], 100, 200) == ([], [1])  # ends as it begins
    assert split_probe_samples([(201, 1)], 100, 200) == ([], [])
