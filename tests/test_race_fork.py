"""The fork race (``pvemu race --workload fork``, docs/race.md "fork"): its
data oracles, the scenario in-process in every mode, an oracle catching a
fork that forgets copy-on-write, and the real race between processes where
naive loses Dirty bits and no other mode loses anything."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest

from pvemu.guest.kernel import Kernel, boot, kernel_for
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.race_fork import CHILD_TAG, ForkOracle, ForkRaceResult, run_fork_race
from pvemu.hypervisor import Hypervisor
from tests.loopback import loopback_domain

# --- the data oracles -------------------------------------------------------------------


def test_parent_reads_short_pages_once_and_leaks_each_time() -> None:
    oracle = ForkOracle()
    # page 0 holds its last completed store; page 1 an older one; page 2 a
    # value no store had been issued for
    oracle.parent_read([5, 3, 9], completed=[5, 4, 0], issued=[7, 4, 8])
    assert (oracle.short_parent_pages, oracle.leaked) == ({1}, 1)
    oracle.parent_read([5, 3, CHILD_TAG | 1], completed=[5, 4, 0], issued=[7, 4, 8])
    assert (oracle.short_parent_pages, oracle.leaked) == ({1}, 2)  # pages, not reads


def test_child_reads_its_snapshot_and_its_own_stores() -> None:
    oracle = ForkOracle()
    before, issued = [5, 3, 0, 0], [6, 3, 6, 0]
    # page 0 a store in flight at fork (legal), page 1 older than the fork,
    # page 2 a store issued after fork returned, page 3 the child's own
    oracle.child_read([6, 2, 7, CHILD_TAG | 4], before, issued, {3: CHILD_TAG | 4})
    assert (oracle.short_child_reads, oracle.leaked) == (1, 1)
    oracle.child_read([5, 3, 0, CHILD_TAG | 4], before, issued, {})  # not its own store
    assert (oracle.short_child_reads, oracle.leaked) == (1, 2)
    oracle.child_read([5, 3, 0, 0], before, issued, {3: CHILD_TAG | 4})  # its store lost
    assert (oracle.short_child_reads, oracle.leaked) == (2, 2)
    result = ForkRaceResult("xen", 4, 1, 1, 1)
    oracle.parent_read([4, 3, 0, 0], completed=[5, 3, 0, 0], issued=[5, 3, 0, 0])
    oracle.report(result)
    assert (result.lost_writes_parent, result.lost_writes_child, result.lost_writes) == (1, 2, 3)
    assert result.leaked_writes == 2
    assert result.lost_anything
    assert result.as_dict()["workload"] == "fork"


# --- the scenario in-process --------------------------------------------------------------


async def make_kernel(mode: str, vcpus: int = 3) -> AsyncIterator[Kernel]:
    if mode == "native":
        async with boot(mode="native", memory_mib=32, vcpus=vcpus) as kernel:
            yield kernel
        return
    hv = Hypervisor(48)
    yield kernel_for(await loopback_domain(hv, memory_mib=32, vcpus=vcpus), mode)


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_the_scenario_runs_clean_in_every_mode(mode: str) -> None:
    """In-process every hypercall runs to its end before a writer's store,
    so not even naive loses a Dirty bit here: the loss needs the real
    hypervisor's slices (the last test)."""
    async for kernel in make_kernel(mode):
        result = await run_fork_race(kernel, pages=40, writers=2, iterations=3)
        assert (result.forks, result.child_writes) == (3, 15)  # pages 0-2 mod 8
        assert result.writes >= 3 * 2 * 40  # two whole rounds of every page per fork
        assert not result.lost_anything, result.as_dict()
        assert result.counts_agree
        assert result.audit == []


async def test_the_oracles_catch_a_fork_that_forgets_copy_on_write() -> None:
    """fork that does not count the child's mapping of each page
    (``page_dup_rmap`` forgotten): the write faults reuse the frames in
    place, and the parent reads the child's stores."""

    class Forgetful(dict[int, int]):
        def __setitem__(self, mfn: int, count: int) -> None:
            pass

    async for kernel in make_kernel("xen"):
        kernel._mapcount = Forgetful()
        result = await run_fork_race(kernel, pages=16, writers=1, iterations=1)
        assert result.leaked_writes > 0
        assert result.lost_anything


# --- the real race, two processes -------------------------------------------------------

#: 48 pages, 10 forks: naive lost 16 to 27 Dirty bits in each of our runs
#: (seeds 1 to 5; about 2 per fork), the other modes nothing; 36 s on a
#: shared 2-core machine. Fewer pages lose fewer: a fork's batch is shorter
#: (5 to 8 per 10 forks with 32).
FORK_PAGES = 48
FORK_ITERATIONS = 10


def test_pvemu_race_fork_naive_loses_dirty_bits_and_no_mode_loses_data() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pvemu.scripts",
            "race",
            "--workload",
            "fork",
            "--json",
            "--iterations",
            str(FORK_ITERATIONS),
            "--pages",
            str(FORK_PAGES),
            "--modes",
            ",".join(MODE_NAMES),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["schema"] == "pvemu-race/1"
    assert doc["run"]["config"]["workload"] == "fork"
    by_mode = {r["mode"]: r for r in doc["results"]}
    assert set(by_mode) == set(MODE_NAMES)
    for mode, r in by_mode.items():
        assert r["workload"] == "fork"
        assert r["forks"] == r["iterations"] == FORK_ITERATIONS
        assert r["writes"] >= FORK_ITERATIONS * 2 * FORK_PAGES, mode
        assert r["child_writes"] > 0
        assert r["audit_clean"], mode
        assert r["counts_agree"], mode
        data = (r["lost_writes"], r["leaked_writes"], r["stale_tlb_writes"])
        assert data == (0, 0, 0), mode  # no reclaim or swap: a lost D bit loses no data
        if mode == "naive":
            assert r["lost_dirty"] > 0, "naive should lose Dirty bits while fork write-protects"
        else:
            assert r["lost_dirty"] == 0, mode
