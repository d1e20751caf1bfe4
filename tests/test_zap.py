"""munmap and MADV_DONTNEED through ``zap_pte_range``: exact counts per mode,
the mmu_gather's flush (local or one MULTI op), page-table pages freed,
and what the pages hold afterwards (docs/architecture.md, "munmap and
MADV_DONTNEED").

For n present pages starting ``off`` pages into a 2 MiB-aligned region,
touching m PTE pages, with a guard VMA elsewhere in the same 1 GiB so that
only PTE pages are freed (F: guest.tlb.flush_cost, one op when the mm's
CPU mask holds another vCPU):

  munmap    trap, ptwr, xen   n + F(R) + 2m   R = off mod 512 + n (the gather
            batched, naive    m + F(R) + 2m   is widened to each freed PTE
                                              page's 2 MiB-aligned start)
  DONTNEED  trap, ptwr, xen   n + F(n)
            batched, naive    m + F(n)
  native    0

batched clears a PTE page with one MMU_PT_XCHG_PVEMU exchange (the old
values, A/D included, come back), naive with queued NORMAL records of 0
(the old values are its earlier read: it loses a Dirty bit set between).

The worked example: 512 present PTEs in one aligned PTE page: munmap
512 + 1 + 2 = 515, MADV_DONTNEED 512 + 1 = 513.
"""

from __future__ import annotations

import errno
import mmap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvemu.guest.kernel import Kernel, SegmentationFault, boot, kernel_for
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.pagetree import walk_user_tree
from pvemu.guest.process import IDLE_PID, INIT_PID
from pvemu.guest.tlb import MmuGather, flush_cost, tlb_flush_all_op, tlb_flush_ops
from pvemu.hypervisor import Hypervisor
from pvemu.shared import abi
from pvemu.shared.x86 import PAGE_SIZE
from tests.loopback import loopback_domain

RW = mmap.PROT_READ | mmap.PROT_WRITE
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
BASE = 0x4000_0000
#: One page in the same 1 GiB as BASE, far from it: keeps the PMD page alive.
GUARD = BASE + (256 << 20)
PER_PTE = ("trap", "ptwr", "xen")
SIZES = [1, 33, 34, 513]


async def make_kernel(mode: str, memory_mib: int = 24) -> AsyncIterator[Kernel]:
    if mode == "native":
        async with boot(mode="native", memory_mib=memory_mib) as kernel:
            yield kernel
        return
    hv = Hypervisor(memory_mib + 16)
    yield kernel_for(await loopback_domain(hv, memory_mib=memory_mib, vcpus=2), mode)


async def traps(kernel: Kernel) -> int:
    stats = await kernel.stats()
    counted = int(stats["hypervisor"]["total"]["traps"])
    assert counted == stats["guest"]["total"]["traps"]
    return counted


async def flush_ops(kernel: Kernel) -> int:
    return int((await kernel.stats())["hypervisor"]["total"].get("tlb_flush_ops", 0))


def pte_pages(off: int, n: int) -> int:
    return (off + n - 1) // 512 - off // 512 + 1


def expected(mode: str, n: int, off: int, op: str, multi: bool) -> int:
    if mode == "native":
        return 0
    m = pte_pages(off, n)
    zap = n if mode in PER_PTE else m
    if op == "dontneed":
        return zap + flush_cost(n, multi)
    return zap + flush_cost(off % 512 + n, multi) + 2 * m


async def populated(kernel: Kernel, n: int, off: int, *, multi: bool) -> tuple[int, int]:
    """Map and write n pages at BASE + off pages (and an untouched guard
    page) in a process loaded on both vCPUs (``multi``: process 1) or only
    on vCPU 0 (a spawned one); returns (pid, vCPU to touch it from)."""
    if multi:
        pid, vcpu = INIT_PID, 1
    else:
        pid, vcpu = await kernel.spawn(), 0
        await kernel.switch_to(0, pid)
    addr = BASE + off * PAGE_SIZE
    assert await kernel.mmap(n * PAGE_SIZE, RW, ANON, addr=addr, pid=pid) == addr
    assert await kernel.mmap(PAGE_SIZE, RW, ANON, addr=GUARD, pid=pid) == GUARD
    await kernel.run_user(
        vcpu, [(addr + i * PAGE_SIZE, "w", bytes([i % 251 + 1])) for i in range(n)]
    )
    return pid, vcpu


@pytest.mark.parametrize("multi", [False, True], ids=["local", "multi"])
@pytest.mark.parametrize("off", [0, 100], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_munmap_counts(mode: str, n: int, off: int, multi: bool) -> None:
    async for kernel in make_kernel(mode):
        pid, _ = await populated(kernel, n, off, multi=multi)
        free = kernel.free_frame_count()
        before = await traps(kernel)
        await kernel.munmap(BASE + off * PAGE_SIZE, n * PAGE_SIZE, pid=pid)
        assert await traps(kernel) - before == expected(mode, n, off, "munmap", multi)
        # every data frame and every PTE page is back in the pool
        assert kernel.free_frame_count() - free == n + pte_pages(off, n)
        assert kernel._lookup_l1(BASE + off * PAGE_SIZE, kernel.process(pid)) is None
        assert await kernel.audit() == []


@pytest.mark.parametrize("multi", [False, True], ids=["local", "multi"])
@pytest.mark.parametrize("off", [0, 100], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_dontneed_counts(mode: str, n: int, off: int, multi: bool) -> None:
    async for kernel in make_kernel(mode):
        pid, vcpu = await populated(kernel, n, off, multi=multi)
        addr = BASE + off * PAGE_SIZE
        free = kernel.free_frame_count()
        before = await traps(kernel)
        await kernel.madvise_dontneed(addr, n * PAGE_SIZE, pid=pid)
        assert await traps(kernel) - before == expected(mode, n, off, "dontneed", multi)
        assert kernel.free_frame_count() - free == n  # no page-table page freed
        assert kernel._lookup_l1(addr, kernel.process(pid)) is not None
        assert await kernel.audit() == []
        # zero-fill on the next touch
        assert await kernel.read(addr + (n - 1) * PAGE_SIZE, 4, vcpu=vcpu) == bytes(4)


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_the_worked_example(mode: str) -> None:
    """512 present PTEs in one aligned PTE page: munmap 515, DONTNEED 513 in
    xen (trap and ptwr too); one hypercall per PTE page in batched and naive."""
    for op, xen_count in (("munmap", 515), ("dontneed", 513)):
        async for kernel in make_kernel(mode):
            await populated(kernel, 512, 0, multi=True)
            before = await traps(kernel)
            if op == "munmap":
                await kernel.munmap(BASE, 512 * PAGE_SIZE)
            else:
                await kernel.madvise_dontneed(BASE, 512 * PAGE_SIZE)
            count = await traps(kernel) - before
            if mode in PER_PTE:
                assert count == xen_count
            else:
                assert count == expected(mode, 512, 0, op, True)
            if mode != "native":
                ptwr = (await kernel.stats())["hypervisor"]["total"]["ptwr"]
                assert (ptwr > 0) == (mode in PER_PTE)


@pytest.mark.parametrize("mode", ["trap", "xen", "batched"])
async def test_freeing_the_last_vma_of_a_gigabyte_frees_the_pmd_page_too(mode: str) -> None:
    """No guard: the PMD page goes as well (2 more hypercalls, one more
    frame), and the gather widens to its 1 GiB-aligned start, so a local
    flush of 5 pages becomes one full flush."""
    async for kernel in make_kernel(mode):
        pid = await kernel.spawn()
        await kernel.switch_to(0, pid)
        addr = BASE + (4 << 20) + 7 * PAGE_SIZE
        await kernel.mmap(5 * PAGE_SIZE, RW, ANON, addr=addr, pid=pid)
        await kernel.run_user(0, [(addr + i * PAGE_SIZE, "w", b"x") for i in range(5)])
        free = kernel.free_frame_count()
        before = await traps(kernel)
        await kernel.munmap(addr, 5 * PAGE_SIZE, pid=pid)
        zap = 5 if mode in PER_PTE else 1
        # PTE page, PMD page, PUD page (the spawned tree has nothing else)
        assert await traps(kernel) - before == zap + 1 + 2 * 3
        assert kernel.free_frame_count() - free == 5 + 3
        assert await kernel.audit() == []
        await kernel.mmap(PAGE_SIZE, RW, ANON, addr=BASE, pid=pid)
        await kernel.run_user(0, [(BASE, "w", b"again")])  # the tables are built anew
        assert await kernel.run_user(0, [(BASE, "r", 5)]) == [b"again"]
        assert await kernel.audit() == []


async def test_a_partial_unmap_keeps_the_pte_page() -> None:
    async for kernel in make_kernel("xen"):
        await populated(kernel, 10, 0, multi=True)
        free = kernel.free_frame_count()
        before = await traps(kernel)
        await kernel.munmap(BASE + 2 * PAGE_SIZE, 3 * PAGE_SIZE)
        assert await traps(kernel) - before == 3 + 1  # no table freed
        assert kernel.free_frame_count() - free == 3
        assert await kernel.read(BASE + 5 * PAGE_SIZE, 1) == bytes([6])
        with pytest.raises(SegmentationFault):
            await kernel.read(BASE + 2 * PAGE_SIZE, 1)
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_the_mm_cpumask_keeps_a_stale_bit(mode: str) -> None:
    """A process that ran on vCPU 1 and left it still gets one MULTI flush
    (x86 trims mm_cpumask lazily); one that only ran on vCPU 0 gets one
    INVLPG_LOCAL per page."""
    async for kernel in make_kernel(mode):
        pid, _ = await populated(kernel, 5, 0, multi=False)
        ops = await flush_ops(kernel)
        before = await traps(kernel)
        await kernel.munmap(BASE, 2 * PAGE_SIZE, pid=pid)  # keeps the PTE page
        if mode != "native":
            assert await flush_ops(kernel) - ops == 2
            assert await traps(kernel) - before == expected(mode, 2, 0, "dontneed", False)
        await kernel.switch_to(1, pid)
        await kernel.switch_to(1, IDLE_PID)
        assert kernel.process(pid).cpumask == 0b11
        ops = await flush_ops(kernel)
        before = await traps(kernel)
        await kernel.munmap(BASE + 2 * PAGE_SIZE, 2 * PAGE_SIZE, pid=pid)
        if mode != "native":
            assert await flush_ops(kernel) - ops == 1
            assert await traps(kernel) - before == expected(mode, 2, 0, "dontneed", True)
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_the_multi_flush_reaches_the_other_vcpu(mode: str) -> None:
    """Process 1's pages are cached in vCPU 1's TLB; munmap runs on vCPU 0.
    The next access on vCPU 1 faults (no stale translation survives) and the
    oracle saw no stale write."""
    async for kernel in make_kernel(mode):
        await populated(kernel, 3, 0, multi=True)
        await kernel.read(BASE, 1, vcpu=1)
        await kernel.munmap(BASE, 3 * PAGE_SIZE)
        with pytest.raises(SegmentationFault):
            await kernel.write(BASE + PAGE_SIZE, b"late", vcpu=1)
        hardware = (await kernel.stats())["hypervisor"]["hardware"]
        assert hardware["stale_tlb_writes"] == 0
        assert hardware["lost_dirty"] == 0


def test_flush_ops_local_and_multi() -> None:
    vas = [BASE + i * PAGE_SIZE for i in range(3)]
    assert tlb_flush_ops(vas, 0, 0b01) == [(abi.MMUEXT_INVLPG_LOCAL, va, 0) for va in vas]
    assert tlb_flush_ops(vas, 0, 0) == [(abi.MMUEXT_INVLPG_LOCAL, va, 0) for va in vas]
    assert tlb_flush_ops(vas, 0, 0b10) == [(abi.MMUEXT_TLB_FLUSH_MULTI, 0, 0b11)]
    assert tlb_flush_ops(vas[:1], 1, 0b01) == [(abi.MMUEXT_INVLPG_MULTI, BASE, 0b11)]
    many = [BASE + i * PAGE_SIZE for i in range(34)]
    assert tlb_flush_ops(many, 0, 0b01) == [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)]
    assert len(tlb_flush_ops(many[:33], 0, 0b01)) == 33
    assert tlb_flush_ops([], 0, 0b11) == []
    assert tlb_flush_all_op(0, 0b01) == (abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)
    assert tlb_flush_all_op(0, 0b100) == (abi.MMUEXT_TLB_FLUSH_MULTI, 0, 0b101)
    assert [flush_cost(r, False) for r in (0, 1, 33, 34)] == [0, 1, 33, 1]
    assert [flush_cost(r, True) for r in (0, 1, 33, 34)] == [0, 1, 1, 1]


def test_the_gather_is_a_range_union() -> None:
    gather = MmuGather()
    assert not gather
    assert (gather.pages, gather.vas()) == (0, [])
    gather.add_range(BASE + 10 * PAGE_SIZE, BASE + 12 * PAGE_SIZE)
    gather.add_range(BASE + 3 * PAGE_SIZE, BASE + 4 * PAGE_SIZE)
    assert gather.pages == 9  # pages 3..11, the hole included
    assert gather.vas() == [BASE + i * PAGE_SIZE for i in range(3, 12)]
    gather.add_range(BASE, BASE)  # empty: no change
    gather.add_range(BASE + 100 * PAGE_SIZE, BASE + 101 * PAGE_SIZE)
    assert (gather.pages, len(gather.vas())) == (98, 34)


# --- what the pages hold afterwards -------------------------------------------------


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_munmap_writes_a_shared_file_page_dirty_in_hardware(
    mode: str, tmp_path: Path
) -> None:
    """The store sets D in the PTE only; the zap's clear hands it to the page
    cache, which writes the page to the file."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(3 * PAGE_SIZE))
    async for kernel in make_kernel(mode):
        addr = await kernel.mmap(3 * PAGE_SIZE, RW, mmap.MAP_SHARED, path=str(path))
        await kernel.write(addr + PAGE_SIZE + 8, b"kept by munmap")
        await kernel.munmap(addr, 3 * PAGE_SIZE)
        assert path.read_bytes()[PAGE_SIZE + 8 : PAGE_SIZE + 22] == b"kept by munmap"
        assert await kernel.audit() == []


async def dontneed_with_a_stale_store(kernel: Kernel, addr: int, data: bytes) -> None:
    """MADV_DONTNEED of the page at ``addr``, vCPU 1 storing ``data`` into it
    just before the flush (through its still-cached writable entry)."""
    backend = kernel.backends[0]
    flush = backend.flush_tlb

    async def store_then_flush(vas: Sequence[int], mask: int) -> None:
        await kernel.run_user(1, [(addr, "w", data)])
        await flush(vas, mask)

    backend.flush_tlb = store_then_flush  # type: ignore[method-assign]
    try:
        await kernel.madvise_dontneed(addr, PAGE_SIZE)
    finally:
        backend.flush_tlb = flush  # type: ignore[method-assign]


@pytest.mark.parametrize("mode", ["xen", "batched"])
async def test_a_store_through_a_stale_tlb_before_the_flush_reaches_the_file(
    mode: str, tmp_path: Path
) -> None:
    """vCPU 1 still has the page in its TLB until the zap's flush, so its
    store lands in the page-cache page after the clear: the page must go to
    the file after the flush (Linux's delayed rmap), not at the clear."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(PAGE_SIZE))
    async for kernel in make_kernel(mode):
        addr = await kernel.mmap(PAGE_SIZE, RW, mmap.MAP_SHARED, path=str(path))
        await kernel.run_user(1, [(addr, "w", b"1")])
        await kernel.run_user(1, [(addr, "w", b"2")])  # vCPU 1 caches the writable entry
        await dontneed_with_a_stale_store(kernel, addr, b"3")
        assert path.read_bytes()[:1] == b"3"
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_dontneed_keeps_shared_file_data_and_drops_private_data(
    mode: str, tmp_path: Path
) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"F" * (2 * PAGE_SIZE))
    async for kernel in make_kernel(mode):
        shared = await kernel.mmap(2 * PAGE_SIZE, RW, mmap.MAP_SHARED, path=str(path))
        private = await kernel.mmap(2 * PAGE_SIZE, RW, mmap.MAP_PRIVATE, path=str(path))
        anon = await kernel.mmap(2 * PAGE_SIZE, RW, ANON)
        # the shared mapping writes the file's second page, the others their first
        for addr in (shared + PAGE_SIZE, private, anon):
            await kernel.write(addr, b"written")
        for addr in (shared, private, anon):
            await kernel.madvise_dontneed(addr, 2 * PAGE_SIZE)
            assert kernel._lookup_l1(addr) is not None
        assert await kernel.read(shared + PAGE_SIZE, 7) == b"written"  # from the page cache
        assert path.read_bytes()[PAGE_SIZE : PAGE_SIZE + 7] == b"written"  # and the file
        assert await kernel.read(private, 7) == b"FFFFFFF"  # the file again
        assert await kernel.read(anon, 7) == bytes(7)  # zero-fill
        assert await kernel.audit() == []


async def test_dontneed_errors() -> None:
    async for kernel in make_kernel("xen"):
        await kernel.mmap(PAGE_SIZE, RW, ANON, addr=BASE)
        await kernel.mmap(PAGE_SIZE, RW, ANON, addr=BASE + 2 * PAGE_SIZE)
        await kernel.write(BASE, b"a")
        await kernel.write(BASE + 2 * PAGE_SIZE, b"b")
        with pytest.raises(OSError) as unaligned:
            await kernel.madvise_dontneed(BASE + 1, PAGE_SIZE)
        assert unaligned.value.errno == errno.EINVAL
        with pytest.raises(OSError) as wraps:
            await kernel.madvise_dontneed(BASE, -PAGE_SIZE)
        assert wraps.value.errno == errno.EINVAL
        await kernel.madvise_dontneed(BASE, 0)  # nothing
        assert await kernel.read(BASE, 1) == b"a"
        with pytest.raises(OSError) as hole:  # both pages zapped, then ENOMEM
            await kernel.madvise_dontneed(BASE, 3 * PAGE_SIZE)
        assert hole.value.errno == errno.ENOMEM
        assert await kernel.read(BASE, 1) == b"\0"
        assert await kernel.read(BASE + 2 * PAGE_SIZE, 1) == b"\0"
        assert await kernel.audit() == []


# --- naive loses a Dirty bit; the exchange does not --------------------------------


def store_between_read_and_clear(kernel: Kernel, addr: int) -> None:
    """Make the next zap on vCPU 0 first run a store to ``addr`` on vCPU 1."""
    backend = kernel.backend
    original = backend.zap_ptes

    async def racing_zap(table: int, indexes: Any, seen: Any) -> Any:
        outcome = await kernel.machine.run_user(1, [(addr, "w", b"LATER")])
        assert outcome["fault"] is None
        return await original(table, indexes, seen)

    backend.zap_ptes = racing_zap  # type: ignore[method-assign]


@pytest.mark.parametrize("mode", ["xen", "batched", "naive"])
async def test_a_store_between_the_read_and_the_clear(mode: str, tmp_path: Path) -> None:
    """A store on vCPU 1 lands after the zap read the PTEs and before it
    clears them. The trapped XCHG (xen) and the batched exchange
    (``MMU_PT_XCHG_PVEMU``, batched) hand its D bit back and the page
    reaches the file; naive's queued clear overwrites it: the data never
    reaches the file and the oracle counts one lost Dirty bit."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(PAGE_SIZE))
    async for kernel in make_kernel(mode):
        addr = await kernel.mmap(PAGE_SIZE, RW, mmap.MAP_SHARED, path=str(path))
        await kernel.write(addr, b"first")
        await kernel.msync(addr, PAGE_SIZE)  # clean and read-only again
        await kernel.handle_fault(addr, 0x2 | 0x4, vcpu=1)  # write-notified: RW, clean
        store_between_read_and_clear(kernel, addr)
        await kernel.munmap(addr, PAGE_SIZE)
        lost = (await kernel.stats())["hypervisor"]["hardware"]["lost_dirty"]
        if mode == "naive":
            assert path.read_bytes()[:5] == b"first"
            assert lost == 1
        else:
            assert path.read_bytes()[:5] == b"LATER"
            assert lost == 0
        assert await kernel.audit() == []


# --- the range form is the per-PTE loop --------------------------------------------


#: 48 pages across a PTE-page boundary, for the random sequences.
SPAN = 48
SPAN_BASE = BASE + (512 - 24) * PAGE_SIZE
piece = st.tuples(st.integers(0, SPAN - 1), st.integers(1, SPAN))


async def _zapped_state(
    kernel: Kernel,
    written: list[int],
    protnone: tuple[int, int],
    dontneed: tuple[int, int],
    unmap: tuple[int, int],
) -> tuple[object, ...]:
    """Write ``written``, make a piece PROT_NONE (entries that are present
    for the kernel without P), MADV_DONTNEED one and munmap one; return
    what every page reads, the frames free, and every user-half entry."""

    def rng(p: tuple[int, int]) -> tuple[int, int]:
        first, count = p
        return SPAN_BASE + first * PAGE_SIZE, min(count, SPAN - first) * PAGE_SIZE

    await kernel.mmap(SPAN * PAGE_SIZE, RW, ANON, addr=SPAN_BASE)
    await kernel.mmap(PAGE_SIZE, RW, ANON, addr=GUARD)
    await kernel.run_user(1, [(SPAN_BASE + p * PAGE_SIZE, "w", bytes([p + 1])) for p in written])
    await kernel.mprotect(*rng(protnone), 0)
    await kernel.madvise_dontneed(*rng(dontneed))
    await kernel.munmap(*rng(unmap))
    reads = []
    for page in range(SPAN):
        try:
            reads.append(await kernel.read(SPAN_BASE + page * PAGE_SIZE, 1))
        except SegmentationFault:
            reads.append(None)
    tree: list[int] = []
    for table in walk_user_tree(kernel._read_table, kernel.process().l4):
        tree.extend(np.frombuffer(kernel._read_table(table.mfn, 0, 512), "<u8").tolist())
    assert await kernel.audit() == []
    return reads, kernel.free_frame_count(), tree


@pytest.mark.parametrize("mode", ["native", "batched", "naive"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    written=st.lists(st.integers(0, SPAN - 1), unique=True, max_size=SPAN),
    protnone=piece,
    dontneed=piece,
    unmap=piece,
)
async def test_zap_ptes_equals_the_per_pte_reference(
    mode: str,
    written: list[int],
    protnone: tuple[int, int],
    dontneed: tuple[int, int],
    unmap: tuple[int, int],
) -> None:
    """``zap_ptes`` of the backend (one array call: xchg of the run,
    ``MMU_PT_XCHG_PVEMU``, or queued clears) and the reference loop of
    ``ptep_get_and_clear`` (``Kernel(per_pte=True)``) leave the same
    tables, free the same frames and read back the same data."""
    states = []
    for per_pte in (False, True):
        async for booted in make_kernel(mode):
            kernel = Kernel(booted.machine, booted.backends, per_pte=per_pte)
            states.append(await _zapped_state(kernel, written, protnone, dontneed, unmap))
    assert states[0] == states[1]
