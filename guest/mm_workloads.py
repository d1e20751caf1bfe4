"""Workloads of the operations that change many PTEs at once besides
mprotect: munmap, MADV_DONTNEED and mremap, measured phase by phase like the
mprotect workload (:func:`~pvemu.guest.workload.measure`) over a region of
N anonymous private pages at the same 2 MiB-aligned address. Syscalls run on
vCPU 0, user code on vCPU 1 (on a one-vCPU guest, both on 0). Data is
checked and ``audit()`` runs at the end.

* ``munmap``: write every page (``populate``), unmap the region
  (``munmap``: ``zap_pte_range`` per PTE page, the PTE pages freed, one
  flush), then check that a read of it faults.
* ``dontneed``: ``populate``, ``madvise(MADV_DONTNEED)`` over the region
  (``dontneed``: the same zap, the tables kept), then write every page again
  (``refault``: first-touch faults into the kept tables) and read it back.
* ``populate``: map the region with ``MAP_POPULATE`` (``map_populate``: every
  page written in by the fault handler, no user fault), drop it with
  ``MADV_DONTNEED`` (``dontneed``), fill it again with
  ``madvise(MADV_POPULATE_WRITE)`` (``populate_write``: the tables are
  kept), then write every page from user space (``touch``: no fault left).
* ``mremap``: ``populate``; move the region to a 2 MiB-aligned destination
  (``mremap_pmd``: each full 2 MiB moves as a whole PTE page, the rest PTE by
  PTE); move it back to a destination 7 pages past the region's start
  (``mremap_ptes``: every PTE moved one by one, ``move_ptes``); read back.

A one-page VMA at the end of the region's 1 GiB, never touched, keeps the
region's PMD page in use (the reference's worked example has other VMAs in
the same 1 GiB), so an unmap frees the region's PTE pages and nothing above
them. Regions, and mremap's two copies, stay below it: at most
:data:`MAX_MM_PAGES` pages.
"""

from __future__ import annotations

import mmap as mman
from collections.abc import Callable
from typing import Final

from pvemu.shared.x86 import PAGE_SIZE

from .kernel import Kernel, SegmentationFault
from .vma_tree import MAP_POPULATE, MREMAP_FIXED, MREMAP_MAYMOVE
from .workload import REGION_ADDR, WorkloadError, WorkloadResult, measure

#: The workloads this module runs, by name (``pvemu run --workload``).
MM_WORKLOADS: Final = ("munmap", "dontneed", "mremap", "populate")
#: Phases each one reports, in order.
MM_PHASES: Final = {
    "munmap": ("populate", "munmap"),
    "dontneed": ("populate", "dontneed", "refault"),
    "mremap": ("populate", "mremap_pmd", "mremap_ptes"),
    "populate": ("map_populate", "dontneed", "populate_write", "touch"),
}
#: Pages past the region's start where ``mremap_ptes`` puts it back.
SKEW_PAGES: Final = 7
PMD_SIZE: Final = 2 << 20
#: The untouched one-page VMA that keeps the region's PMD page in use.
NEIGHBOUR_ADDR: Final = REGION_ADDR + (1 << 30) - PAGE_SIZE
#: The largest region whose mremap copies (region, 2 MiB-aligned copy past
#: it) stay below the neighbour: 2N + 7 pages + up to one 2 MiB rounding.
MAX_MM_PAGES: Final = ((1 << 30) - PMD_SIZE) // PAGE_SIZE // 2 - 2 * SKEW_PAGES

_RW: Final = mman.PROT_READ | mman.PROT_WRITE
_PRIVATE_ANON: Final = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
_MOVE: Final = MREMAP_MAYMOVE | MREMAP_FIXED

Step = Callable[[str], None] | None


def aligned_destination(pages: int) -> int:
    """``mremap_pmd``'s destination: the first 2 MiB boundary past the
    region and the skewed copy of it, so no move overlaps its source."""
    end = REGION_ADDR + (pages + SKEW_PAGES) * PAGE_SIZE
    return (end + PMD_SIZE - 1) & ~(PMD_SIZE - 1)


def _pattern(addr: int, pages: int, tag: int) -> list[tuple[int, str, bytes | int]]:
    return [(addr + i * PAGE_SIZE, "w", bytes([(i * 7 + tag) & 0xFF])) for i in range(pages)]


async def _expect(kernel: Kernel, vcpu: int, addr: int, pages: int, tag: int) -> None:
    """Every page at ``addr`` holds what :func:`_pattern` wrote with ``tag``."""
    wrote = _pattern(addr, pages, tag)
    reads = await kernel.run_user(vcpu, [(va, "r", 1) for va, _, _ in wrote])
    for i, (got, (_, _, want)) in enumerate(zip(reads, wrote, strict=True)):
        if got != want:
            raise WorkloadError(f"page {i} at {addr:#x} read {got!r}, expected {want!r}")


async def _setup(
    kernel: Kernel, pages: int, *, map_region: bool = True
) -> tuple[WorkloadResult, int]:
    """The region (unless the workload maps it as a phase), its untouched
    neighbour, the result, the user vCPU."""
    if not 0 < pages <= MAX_MM_PAGES:
        raise ValueError(f"pages must be 1 to {MAX_MM_PAGES:,}")
    await kernel.mmap(PAGE_SIZE, _RW, _PRIVATE_ANON, addr=NEIGHBOUR_ADDR)
    if map_region:
        await _map_region(kernel, pages, 0)
    return WorkloadResult(kernel.mode, pages, unsafe=kernel.unsafe), min(
        1, kernel.machine.nr_vcpus - 1
    )


async def _map_region(kernel: Kernel, pages: int, flags: int) -> None:
    addr = await kernel.mmap(pages * PAGE_SIZE, _RW, _PRIVATE_ANON | flags, addr=REGION_ADDR)
    if addr != REGION_ADDR:
        raise WorkloadError(f"region landed at {addr:#x}, not {REGION_ADDR:#x}")


async def run_munmap_workload(
    kernel: Kernel, pages: int, *, on_step: Step = None
) -> WorkloadResult:
    """Populate the region, unmap it, check it is gone."""
    result, vcpu = await _setup(kernel, pages)
    length = pages * PAGE_SIZE

    async def populate() -> None:
        await kernel.run_user(vcpu, _pattern(REGION_ADDR, pages, 1))

    async def munmap() -> None:
        await kernel.munmap(REGION_ADDR, length)

    await measure(kernel, result, "populate", populate, on_step)
    await _expect(kernel, vcpu, REGION_ADDR, pages, 1)
    await measure(kernel, result, "munmap", munmap, on_step)
    if on_step is not None:
        on_step("check")
    try:
        await kernel.read(REGION_ADDR + length - PAGE_SIZE, 1)
    except SegmentationFault:
        pass
    else:
        raise WorkloadError("the unmapped region can still be read")
    result.audit = await kernel.audit()
    return result


async def run_dontneed_workload(
    kernel: Kernel, pages: int, *, on_step: Step = None
) -> WorkloadResult:
    """Populate, MADV_DONTNEED (the pages go, zero-fill next), write again."""
    result, vcpu = await _setup(kernel, pages)

    async def populate() -> None:
        await kernel.run_user(vcpu, _pattern(REGION_ADDR, pages, 1))

    async def dontneed() -> None:
        await kernel.madvise_dontneed(REGION_ADDR, pages * PAGE_SIZE)

    async def refault() -> None:
        await kernel.run_user(vcpu, _pattern(REGION_ADDR, pages, 2))

    await measure(kernel, result, "populate", populate, on_step)
    await measure(kernel, result, "dontneed", dontneed, on_step)
    last = REGION_ADDR + (pages - 1) * PAGE_SIZE
    if await kernel.run_user(vcpu, [(last, "r", 1)]) != [b"\0"]:
        raise WorkloadError("a page kept its data after MADV_DONTNEED")
    await measure(kernel, result, "refault", refault, on_step)
    if on_step is not None:
        on_step("check")
    await _expect(kernel, vcpu, REGION_ADDR, pages, 2)
    result.audit = await kernel.audit()
    return result


async def run_mremap_workload(
    kernel: Kernel, pages: int, *, on_step: Step = None
) -> WorkloadResult:
    """Populate, move to a 2 MiB-aligned destination, move back skewed."""
    result, vcpu = await _setup(kernel, pages)
    length = pages * PAGE_SIZE
    aligned = aligned_destination(pages)
    skewed = REGION_ADDR + SKEW_PAGES * PAGE_SIZE

    async def populate() -> None:
        await kernel.run_user(vcpu, _pattern(REGION_ADDR, pages, 1))

    async def move(src: int, dst: int) -> None:
        got = await kernel.mremap(src, length, length, _MOVE, dst)
        if got != dst:
            raise WorkloadError(f"mremap returned {got:#x}, not {dst:#x}")

    async def mremap_pmd() -> None:
        await move(REGION_ADDR, aligned)

    async def mremap_ptes() -> None:
        await move(aligned, skewed)

    await measure(kernel, result, "populate", populate, on_step)
    await measure(kernel, result, "mremap_pmd", mremap_pmd, on_step)
    await _expect(kernel, vcpu, aligned, pages, 1)
    await measure(kernel, result, "mremap_ptes", mremap_ptes, on_step)
    if on_step is not None:
        on_step("check")
    await _expect(kernel, vcpu, skewed, pages, 1)
    result.audit = await kernel.audit()
    return result


async def run_populate_workload(
    kernel: Kernel, pages: int, *, on_step: Step = None
) -> WorkloadResult:
    """MAP_POPULATE, MADV_DONTNEED, MADV_POPULATE_WRITE, then user writes."""
    result, vcpu = await _setup(kernel, pages, map_region=False)
    length = pages * PAGE_SIZE

    async def map_populate() -> None:
        await _map_region(kernel, pages, MAP_POPULATE)

    async def dontneed() -> None:
        await kernel.madvise_dontneed(REGION_ADDR, length)

    async def populate_write() -> None:
        await kernel.madvise_populate(REGION_ADDR, length, write=True)

    async def touch() -> None:
        await kernel.run_user(vcpu, _pattern(REGION_ADDR, pages, 1))

    faults = kernel.counters.page_faults
    await measure(kernel, result, "map_populate", map_populate, on_step)
    await measure(kernel, result, "dontneed", dontneed, on_step)
    await measure(kernel, result, "populate_write", populate_write, on_step)
    await measure(kernel, result, "touch", touch, on_step)
    if on_step is not None:
        on_step("check")
    if kernel.counters.page_faults != faults:
        raise WorkloadError("a populated page still faulted")
    await _expect(kernel, vcpu, REGION_ADDR, pages, 1)
    result.audit = await kernel.audit()
    return result


__all__ = [
    "MAX_MM_PAGES",
    "MM_PHASES",
    "MM_WORKLOADS",
    "SKEW_PAGES",
    "aligned_destination",
    "run_dontneed_workload",
    "run_populate_workload",
    "run_mremap_workload",
    "run_munmap_workload",
]
