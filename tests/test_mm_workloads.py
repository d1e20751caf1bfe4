"""The munmap, dontneed and mremap workloads: exact traps per phase and mode,
over the kernel in-process and through ``pvemu run`` over real processes.

For N pages at the 2 MiB-aligned region, P1 = ⌈N/512⌉ PTE pages. Process 1
has run on both vCPUs, so every flush is one MULTI op (F = 1). With the
untouched neighbour VMA in the region's 1 GiB, an unmap frees the PTE pages
only (2 hypercalls each: pmd_clear, then unpin + remap writable):

  populate     3N + 2·P1 + 2 (fault, install, iret; the PMD and PTE pages)
  munmap       trap, ptwr, xen: N + 1 + 2·P1   batched, naive: P1 + 1 + 2·P1
  dontneed     trap, ptwr, xen: N + 1          batched, naive: P1 + 1
  refault      3N (the tables were kept)
  mremap_pmd   4 per full 2 MiB moved whole; a remainder r moves PTE by PTE
               (move(r)) into a new PTE page (2), and the unmap of the source
               frees its emptied PTE page and flushes (2 + 1)
  mremap_ptes  move(e) for each extent (505, 7, 505, 7, ...: the destination
               is 7 pages off), 2 per destination PTE page, then the source's
               P1 PTE pages freed and one flush (2·P1 + 1)

  move(e)      trap, ptwr: 2e + 1   xen: e + ⌈e/31⌉ + 1   batched: 3   naive: 2

populate (no fault anywhere: the fault handler is called directly; the
region's PMD page is new too, 2 more):

  map_populate    trap, ptwr, xen: N + 2·P1 + 2   batched, naive: P1 + 2·P1 + 2
  dontneed        as above
  populate_write  trap, ptwr, xen: N (tables kept)   batched, naive: P1
  touch           0

(docs/architecture.md, "munmap and MADV_DONTNEED" and "mremap").
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from pvemu.guest.kernel import boot
from pvemu.guest.mm_workloads import (
    MAX_MM_PAGES,
    MM_PHASES,
    SKEW_PAGES,
    run_dontneed_workload,
    run_mremap_workload,
    run_munmap_workload,
    run_populate_workload,
)
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.workload import WorkloadResult
from pvemu.scripts import costmodel
from tests.test_fork_counts import FAULT, make_kernel, pte_pages

SIZES = [1, 512, 1100]
RUNNERS = {
    "munmap": run_munmap_workload,
    "dontneed": run_dontneed_workload,
    "mremap": run_mremap_workload,
    "populate": run_populate_workload,
}


def move(mode: str, entries: int, per_flush: int = 31) -> int:
    """One extent of ``entries`` present PTEs moved PTE by PTE, its flush
    (``per_flush``: xen's records per mmu_update, less under the bench's
    buffer limits)."""
    if mode in ("trap", "ptwr"):
        return 2 * entries + 1
    if mode == "xen":
        return entries + math.ceil(entries / per_flush) + 1
    return 3 if mode == "batched" else 2


def skewed_extents(n: int) -> list[int]:
    """``mremap_ptes``'s extents: from a 2 MiB-aligned source to a
    destination SKEW_PAGES off, each up to the next boundary of either."""
    extents, src, dst = [], 0, SKEW_PAGES
    while src < n:
        extent = min(n - src, 512 - src % 512, 512 - dst % 512)
        extents.append(extent)
        src, dst = src + extent, dst + extent
    return extents


def expected_traps(workload: str, mode: str, n: int, per_flush: int = 31) -> dict[str, int]:
    if mode == "native":
        return dict.fromkeys(MM_PHASES[workload], 0)
    p1 = len(pte_pages(n))
    per_pte = mode in ("trap", "ptwr", "xen")
    clears = n if per_pte else p1
    populate = FAULT * n + 2 * p1 + 2
    if workload == "munmap":
        return {"populate": populate, "munmap": clears + 1 + 2 * p1}
    if workload == "dontneed":
        return {"populate": populate, "dontneed": clears + 1, "refault": FAULT * n}
    if workload == "populate":
        return {
            "map_populate": clears + 2 * p1 + 2,
            "dontneed": clears + 1,
            "populate_write": clears,
            "touch": 0,
        }
    full, rest = divmod(n, 512)
    pmd = 4 * full + (move(mode, rest, per_flush) + 2 + 3 if rest else 0)
    dst_pages = math.ceil((n + SKEW_PAGES) / 512)
    moves = sum(move(mode, e, per_flush) for e in skewed_extents(n))
    ptes = moves + 2 * dst_pages + 2 * p1 + 1
    return {"populate": populate, "mremap_pmd": pmd, "mremap_ptes": ptes}


async def run(workload: str, mode: str, n: int) -> WorkloadResult:
    if mode == "native":
        async with boot(mode="native", memory_mib=48) as kernel:
            return await RUNNERS[workload](kernel, n)
    return await RUNNERS[workload](await make_kernel(mode), n)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODE_NAMES)
@pytest.mark.parametrize("workload", list(RUNNERS))
async def test_exact_traps_per_phase(workload: str, mode: str, n: int) -> None:
    result = await run(workload, mode, n)
    traps = {name: phase.counts["traps"] for name, phase in result.phases.items()}
    assert traps == expected_traps(workload, mode, n)
    assert result.counts_agree
    assert result.audit_clean, result.audit


def test_the_reference_worked_example_in_xen() -> None:
    """512 present PTEs in one aligned PTE page, other VMAs in its 1 GiB:
    munmap 512 + 1 + 2 = 515, MADV_DONTNEED 512 + 1 = 513."""
    assert expected_traps("munmap", "xen", 512)["munmap"] == 515
    assert expected_traps("dontneed", "xen", 512)["dontneed"] == 513
    assert skewed_extents(1100) == [505, 7, 505, 7, 76]


async def test_region_size_is_checked() -> None:
    kernel = await make_kernel("xen")
    with pytest.raises(ValueError, match=f"1 to {MAX_MM_PAGES:,}"):
        await run_munmap_workload(kernel, MAX_MM_PAGES + 1)


def pvemu_run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pvemu.scripts", "run", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_pvemu_run_reports_the_phases_and_a_headline() -> None:
    done = pvemu_run("--workload", "mremap", "--pages", "600", "--modes", "xen,batched", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["workload"] == "mremap"
    for result in doc["results"]:
        traps = {name: phase["traps"] for name, phase in result["phases"].items()}
        assert traps == expected_traps("mremap", result["mode"], 600)
    table = pvemu_run("--workload", "dontneed", "--pages", "40", "--modes", "xen,batched")
    assert table.returncode == 0, table.stderr
    words = " ".join(table.stdout.split())  # the table wraps to the terminal
    assert "40 pages: MADV_DONTNEED costs 41 traps in xen (Linux on Xen PV), 2 in batched" in words


def test_pvemu_run_refuses_a_region_past_the_neighbour() -> None:
    done = pvemu_run("--workload", "munmap", "--pages", str(MAX_MM_PAGES + 1), "--modes", "native")
    assert done.returncode == 2
    assert done.stderr.startswith("pvemu run: --pages")
    assert f"give --pages {MAX_MM_PAGES:,} or fewer" in done.stderr


def test_the_cost_model_knows_the_ptes_each_phase_writes() -> None:
    """Bare metal's own PTE writes, the native term of every estimate."""
    assert [costmodel.ptes_changed("munmap", p, 600) for p in MM_PHASES["munmap"]] == [600, 600]
    assert costmodel.ptes_changed("dontneed", "refault", 600) == 600
    assert costmodel.ptes_changed("mremap", "mremap_pmd", 1100) == 2 * 76  # 2 pages moved whole
    assert costmodel.ptes_changed("mremap", "mremap_ptes", 1100) == 2200
