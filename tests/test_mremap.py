"""mremap over the kernel: exact trap counts per mode, data following the
pages, frames and mapcounts accounted, audit() clean.

Counts (docs/architecture.md, "mremap"). A move walks extents (up to the
next 2 MiB boundary of source and destination). An extent whose PTE page
moves whole (both sides 2 MiB aligned, destination PMD entry empty) costs 4
in every hypervisor mode. Otherwise, with n non-none source entries, F = 1
if a present entry moved (process 1 has run on both vCPUs, so every flush
is one MULTI op) else 0, and 2 per new destination table:

  native        0
  trap          n traps + n mmu_update + F
  ptwr          n trapped xchg + n trapped stores + F
  xen           n traps + ceil(n / 31) + F
  batched       1 MMU_PT_XCHG_PVEMU exchange + 1 multicall of set_ptes + F
  naive         1 (queued clears and sets, one hypercall) + F

The unmap of the source after the move frees each source page table no VMA
needs any more: 2 hypercalls each, and one flush for them all.
"""

from __future__ import annotations

import errno
import math
import mmap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvemu.guest.kernel import Kernel, SegmentationFault, kernel_for
from pvemu.guest.machine import NativeMachine
from pvemu.guest.modes import make_native_backend
from pvemu.guest.mremap import extent_of
from pvemu.guest.vma import AddressSpace
from pvemu.guest.vma_tree import (
    MAP_FIXED_NOREPLACE,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    MremapError,
    MremapStep,
    PageMove,
    Vma,
)
from pvemu.hypervisor import Hypervisor
from pvemu.shared.x86 import PAGE_SIZE
from tests.loopback import loopback_domain

P = PAGE_SIZE
B = 0x4000_0000  # 2 MiB aligned; L3 slot 1
D = 0x5000_0000  # same PMD page as B (L3 slot 1), another PTE page
FAR = 0x8000_0000  # L3 slot 2: no PMD page yet
RW = mmap.PROT_READ | mmap.PROT_WRITE
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
MOVE = MREMAP_MAYMOVE | MREMAP_FIXED
HV_MODES = ["trap", "ptwr", "xen", "batched", "naive"]


async def make_kernel(mode: str) -> Kernel:
    if mode == "native":
        machine = NativeMachine(48, 2)
        return Kernel(machine, [make_native_backend(machine, v) for v in range(2)])
    hv = Hypervisor(56)
    domain = await loopback_domain(hv, memory_mib=48, vcpus=2)
    return kernel_for(domain, mode)


async def counts(kernel: Kernel) -> tuple[int, int]:
    """(transitions, emulated page-table writes) so far."""
    if kernel.mode == "native":
        return 0, 0
    total = (await kernel.stats())["hypervisor"]["total"]
    return total["traps"], total.get("ptwr", 0)


def move_cost(
    mode: str, extents: list[tuple[int, bool, int]], tables: int, whole: int, freed: int = 0
) -> int:
    """Transitions of a move: ``extents`` (non-none entries, any present,
    pages) moved PTE by PTE, ``whole`` PTE pages moved whole, ``tables``
    new destination tables, ``freed`` source tables freed by the unmap."""
    if mode == "native":
        return 0
    total = 4 * whole + 2 * tables + (2 * freed + 1 if freed else 0)
    for n, present, _pages in extents:
        flush = 1 if present else 0  # one MULTI op whatever the extent's size
        if mode in ("trap", "ptwr"):
            total += 2 * n + flush
        elif mode == "xen":
            total += n + math.ceil(n / 31) + flush
        elif mode == "batched":
            total += (2 if n else 0) + flush
        else:
            total += (1 if n else 0) + flush
    return total


async def fill(kernel: Kernel, addr: int, pages: list[int]) -> None:
    """Write page ``i``'s tag (``i % 251 + 1``) at ``addr + i * P``."""
    await kernel.run_user(1, [(addr + i * P, "w", bytes([i % 251 + 1])) for i in pages])


async def check_data(kernel: Kernel, addr: int, npages: int, written: list[int]) -> None:
    reads = await kernel.run_user(1, [(addr + i * P, "r", 1) for i in range(npages)])
    want = [bytes([i % 251 + 1]) if i in written else b"\0" for i in range(npages)]
    assert reads == want


# --- exact counts ------------------------------------------------------------------------------

# (name, source, pages, written pages, destination, PTE-by-PTE extents,
#  new tables, whole moves, source tables freed)
CASES = [
    ("within one PTE page", B + 8 * P, 16, range(16), B + 100 * P, [(16, True, 16)], 0, 0, 0),
    (
        "two PTE pages, 256 + 256",
        B + 256 * P,
        512,
        range(512),
        D + 256 * P,
        [(256, True, 256), (256, True, 256)],
        2,
        0,
        2,
    ),
    ("whole 2 MiB", B, 512, range(512), D, [], 0, 1, 0),
    ("whole 2 MiB, new PMD page", B, 512, range(512), FAR, [], 1, 1, 1),
    ("4 MiB: two whole PTE pages", B, 1024, range(0, 1024, 3), D, [], 0, 2, 0),
    (
        "sparse, destination skewed",
        B,
        512,
        range(10),
        D + 7 * P,
        [(10, True, 505), (0, False, 7)],
        2,
        0,
        1,
    ),
    ("34 pages", B + 8 * P, 34, range(34), B + 100 * P, [(34, True, 34)], 0, 0, 0),
    ("nothing written: no PTE page", B, 40, [], D, [], 0, 0, 0),
]


@pytest.mark.parametrize("mode", ["native", *HV_MODES])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_move_counts(mode: str, case: tuple[Any, ...]) -> None:
    _, src, npages, written, dst, extents, tables, whole, freed = case
    written_pages = list(written)
    kernel = await make_kernel(mode)
    await kernel.mmap(npages * P, RW, ANON, addr=src)
    await fill(kernel, src, written_pages)
    free = kernel.free_frame_count()
    before, ptwr_before = await counts(kernel)
    assert await kernel.mremap(src, npages * P, npages * P, MOVE, dst) == dst
    after, ptwr_after = await counts(kernel)
    assert after - before == move_cost(mode, extents, tables, whole, freed)
    moved = sum(n for n, _, _ in extents)
    trapped = {"ptwr": 2 * moved, "trap": moved, "xen": moved}  # batched, naive: none
    if mode != "native":
        assert ptwr_after - ptwr_before == trapped.get(mode, 0)
    assert kernel.free_frame_count() == free - tables + freed  # no page lost
    assert kernel.vmas() == [(dst, dst + npages * P, RW, ANON)]
    await check_data(kernel, dst, npages, written_pages)
    with pytest.raises(SegmentationFault):
        await kernel.read(src, 1)
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", *HV_MODES])
async def test_prot_none_entries_move_and_are_flushed(mode: str) -> None:
    """PROT_NONE PTEs have P clear but keep their frame, and x86's
    ``pte_present`` is true for them: each is moved like a present one and
    the extent is flushed (Linux's ``force_flush``)."""
    kernel = await make_kernel(mode)
    await kernel.mmap(40 * P, RW, ANON, addr=B + 8 * P)
    await fill(kernel, B + 8 * P, list(range(40)))
    await kernel.mprotect(B + 8 * P, 40 * P, 0)
    before, _ = await counts(kernel)
    await kernel.mremap(B + 8 * P, 40 * P, 40 * P, MOVE, B + 100 * P)
    after, _ = await counts(kernel)
    assert after - before == move_cost(mode, [(40, True, 40)], 0, 0)
    await kernel.mprotect(B + 100 * P, 40 * P, RW)
    await check_data(kernel, B + 100 * P, 40, list(range(40)))
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", *HV_MODES])
async def test_munmap_frees_the_destination_pte_page_so_the_pmd_moves_whole(mode: str) -> None:
    """A PTE page an earlier munmap emptied is freed by it (no VMA left in
    its 2 MiB), so the destination PMD entry is empty again and the 2 MiB
    move takes the whole-PMD path: 4, not 512 PTEs one by one."""
    kernel = await make_kernel(mode)
    await kernel.mmap(P, RW, ANON, addr=D)
    await fill(kernel, D, [0])
    await kernel.munmap(D, P)
    await kernel.mmap(512 * P, RW, ANON, addr=B)
    await fill(kernel, B, list(range(512)))
    before, _ = await counts(kernel)
    await kernel.mremap(B, 512 * P, 512 * P, MOVE, D)
    after, _ = await counts(kernel)
    assert after - before == move_cost(mode, [], 0, 1)
    await check_data(kernel, D, 512, list(range(512)))
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", *HV_MODES])
async def test_grow_in_place_and_shrink(mode: str) -> None:
    """Growing into free room changes no PTE (0 transitions); shrinking
    unmaps the tail as munmap does: k trapped clears (one exchange in
    batched and naive) + one MULTI flush."""
    kernel = await make_kernel(mode)
    await kernel.mmap(16 * P, RW, ANON, addr=B)
    await fill(kernel, B, list(range(16)))
    before, _ = await counts(kernel)
    assert await kernel.mremap(B, 16 * P, 32 * P) == B
    grown, _ = await counts(kernel)
    assert grown == before
    assert kernel.vmas() == [(B, B + 32 * P, RW, ANON)]
    free = kernel.free_frame_count()
    assert await kernel.mremap(B, 32 * P, 4 * P) == B
    shrunk, _ = await counts(kernel)
    clears = {"native": 0, "batched": 1, "naive": 1}.get(mode, 12)
    assert shrunk - grown == clears + (0 if mode == "native" else 1)
    assert kernel.free_frame_count() == free + 12
    await check_data(kernel, B, 4, list(range(4)))
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_maymove_grow_moves_and_keeps_data(mode: str) -> None:
    kernel = await make_kernel(mode)
    await kernel.mmap(8 * P, RW, ANON, addr=B)
    await kernel.mmap(P, mmap.PROT_READ, ANON, addr=B + 8 * P)
    await fill(kernel, B, list(range(8)))
    with pytest.raises(OSError) as info:
        await kernel.mremap(B, 8 * P, 16 * P)
    assert info.value.errno == errno.ENOMEM
    new = await kernel.mremap(B, 8 * P, 16 * P, MREMAP_MAYMOVE)
    assert new != B
    await check_data(kernel, new, 16, list(range(8)))
    assert (B, B + 8 * P, RW, ANON) not in kernel.vmas()
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_dontunmap_leaves_an_empty_source(mode: str) -> None:
    kernel = await make_kernel(mode)
    await kernel.mmap(8 * P, RW, ANON, addr=B)
    await fill(kernel, B, list(range(8)))
    await kernel.mremap(B, 8 * P, 8 * P, MOVE | MREMAP_DONTUNMAP, D)
    await check_data(kernel, D, 8, list(range(8)))
    await check_data(kernel, B, 8, [])  # fresh zero pages
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_fixed_destination_pages_are_freed(mode: str) -> None:
    kernel = await make_kernel(mode)
    await kernel.mmap(8 * P, RW, ANON, addr=B)
    await kernel.mmap(8 * P, RW, ANON, addr=B + 64 * P)
    await fill(kernel, B, list(range(8)))
    await fill(kernel, B + 64 * P, list(range(8)))
    free = kernel.free_frame_count()
    await kernel.mremap(B, 4 * P, 4 * P, MOVE, B + 66 * P)
    assert kernel.free_frame_count() == free + 4
    reads = await kernel.run_user(1, [(B + (64 + i) * P, "r", 1) for i in range(8)])
    assert reads == [bytes([t]) for t in (1, 2, 1, 2, 3, 4, 7, 8)]
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_multi_vma_move(mode: str) -> None:
    """MREMAP_FIXED without resizing moves every VMA of the range, gaps kept."""
    kernel = await make_kernel(mode)
    await kernel.mmap(2 * P, RW, ANON, addr=B)
    await kernel.mmap(2 * P, mmap.PROT_READ, ANON, addr=B + 3 * P)
    await fill(kernel, B, [0, 1])
    await kernel.read(B + 3 * P, 1)
    await kernel.mremap(B, 5 * P, 5 * P, MOVE, D)
    assert kernel.vmas() == [(D, D + 2 * P, RW, ANON), (D + 3 * P, D + 5 * P, mmap.PROT_READ, ANON)]
    await check_data(kernel, D, 2, [0, 1])
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", "xen"])
async def test_failed_fixed_move_still_zaps_the_destination(mode: str) -> None:
    """EPERM below mmap_min_addr comes after the destination was unmapped
    (Linux's order): its pages are gone and freed."""
    kernel = await make_kernel(mode)
    await kernel.mmap(16 * P, RW, ANON, addr=0x10000)
    await kernel.mmap(16 * P, RW, ANON, addr=B)
    await fill(kernel, 0x10000, list(range(16)))
    free = kernel.free_frame_count()
    with pytest.raises(MremapError) as info:
        await kernel.mremap(B, 16 * P, 16 * P, MOVE, 0x8000)
    assert info.value.errno == errno.EPERM
    assert kernel.free_frame_count() == free + 8
    kept = await kernel.run_user(1, [(0x18000 + i * P, "r", 1) for i in range(8)])
    assert kept == [bytes([i + 1]) for i in range(8, 16)]
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_move_after_fork_keeps_cow(mode: str) -> None:
    """The parent moves pages it shares with its child: the mapcounts stay,
    so a write at the new address still copies and the child keeps its data."""
    kernel = await make_kernel(mode)
    await kernel.mmap(8 * P, RW, ANON, addr=B)
    await fill(kernel, B, list(range(8)))
    child = await kernel.fork()
    await kernel.mremap(B, 8 * P, 8 * P, MOVE, D)
    copies = kernel.counters.cow_copies
    await kernel.write(D + 2 * P, b"\xee")
    assert kernel.counters.cow_copies == copies + 1
    await kernel.switch_to(1, child)
    await check_data(kernel, B, 8, list(range(8)))
    await kernel.switch_to(1, 1)
    assert (await kernel.read(D + 2 * P, 1)) == b"\xee"
    await kernel.exit_process(child)
    await kernel.write(D + 3 * P, b"\xdd")  # the last mapper: reused in place
    assert kernel.counters.cow_copies == copies + 1
    assert await kernel.audit() == []


def test_extent_stops_at_either_pmd_boundary() -> None:
    assert extent_of(B, D, B + 1024 * P) == 512 * P
    assert extent_of(B, D + 7 * P, B + 1024 * P) == 505 * P
    assert extent_of(B + 9 * P, D, B + 20 * P) == 11 * P


# --- random sequences --------------------------------------------------------------------------

REGION = 2048  # pages from B: four PTE pages
_page = st.one_of(
    st.integers(0, 3).map(lambda s: s * 512),
    st.integers(0, 31).map(lambda s: s * 64),
    st.integers(0, REGION - 1),
)
_count = st.one_of(st.integers(1, 40), st.sampled_from([512, 520]))
_mremap_op = st.tuples(
    st.just("mremap"),
    _page,
    _count,
    _count,
    st.sampled_from([0, MREMAP_MAYMOVE, MOVE, MOVE | MREMAP_DONTUNMAP]),
    _page,
)
_op = st.one_of(
    _mremap_op,
    _mremap_op,
    st.tuples(st.just("mmap"), _page, _count, st.sampled_from([RW, mmap.PROT_READ])),
    st.tuples(st.just("write"), _page, st.integers(1, 40), st.integers(1, 255)),
    st.tuples(st.just("munmap"), _page, _count),
    st.tuples(st.just("mprotect"), _page, _count, st.sampled_from([RW, mmap.PROT_READ, 0])),
)


class Shadow:
    """What the process must read: an AddressSpace mirror decides each
    call, and ``data`` (page address -> byte) follows its steps."""

    def __init__(self) -> None:
        self.mm = AddressSpace()
        self.data: dict[int, int] = {}

    def drop(self, vma: Vma) -> None:
        for va in range(vma.start, vma.end, P):
            self.data.pop(va, None)

    def apply(self, steps: list[MremapStep]) -> None:
        for step in steps:
            if isinstance(step, PageMove):
                moved = {
                    va - step.src + step.dst: self.data.pop(va)
                    for va in range(step.src, step.src + step.length, P)
                    if va in self.data
                }
                self.data.update(moved)
            else:
                for piece in step.pieces:
                    self.drop(piece)


async def _call(kernel: Kernel, shadow: Shadow, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "write":
        _, page, count, value = op
        pages = range(B + page * P, B + min(page + count, REGION) * P, P)
        writable = [va for va in pages if (vma := shadow.mm.find(va)) and vma.writable]
        await kernel.run_user(1, [(va, "w", bytes([value])) for va in writable])
        shadow.data.update(dict.fromkeys(writable, value))
        return
    want: object
    got: object
    if kind == "mremap":
        _, page, old, new, flags, dest = op
        args = (B + page * P, old * P, new * P, flags, B + dest * P)
        try:
            result = shadow.mm.mremap(*args)
            shadow.apply(result.steps)
            want = result.addr
        except OSError as exc:
            if isinstance(exc, MremapError):
                shadow.apply(exc.steps)
            want = exc.errno
        try:
            got = await kernel.mremap(*args)
        except OSError as exc:
            got = exc.errno
        assert got == want
        return
    _, page, count, *rest = op
    addr, length = B + page * P, count * P
    if kind == "mmap":
        flags = ANON | MAP_FIXED_NOREPLACE
        prot = rest[0]
        try:
            want = shadow.mm.do_mmap(length, prot, flags, addr=addr).addr
        except OSError as exc:
            want = exc.errno
        try:
            got = await kernel.mmap(length, prot, flags, addr=addr)
        except OSError as exc:
            got = exc.errno
    elif kind == "munmap":
        for vma in shadow.mm.munmap(addr, length):
            shadow.drop(vma)
        await kernel.munmap(addr, length)
        return
    else:
        prot = rest[0]
        try:
            shadow.mm.mprotect(addr, length, prot)
            want = 0
        except OSError as exc:
            want = exc.errno
        try:
            await kernel.mprotect(addr, length, prot)
            got = 0
        except OSError as exc:
            got = exc.errno
    assert got == want


async def run_sequence(kernel: Kernel, ops: list[tuple[Any, ...]]) -> None:
    """Start from 4 MiB mapped at ``B`` with every 7th page written (so
    moves find PTE pages, whole ones too), then ``ops``."""
    shadow = Shadow()
    for op in [("mmap", 0, 1024, RW), *[("write", i, 1, i % 250 + 1) for i in range(0, 1024, 7)]]:
        await _call(kernel, shadow, op)
    for op in ops:
        await _call(kernel, shadow, op)
        assert kernel.vmas() == [(v.start, v.end, v.prot, v.flags) for v in shadow.mm.vmas()]
        assert await kernel.audit() == [], op
    readable = sorted(va for va in shadow.data if (vma := shadow.mm.find(va)) and vma.readable)
    reads = await kernel.run_user(1, [(va, "r", 1) for va in readable])
    assert reads == [bytes([shadow.data[va]]) for va in readable]


SETTINGS = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.mark.parametrize("mode", ["native", "xen", "batched", "trap"])
@SETTINGS
@given(ops=st.lists(_op, min_size=1, max_size=10))
async def test_random_sequences(mode: str, ops: list[tuple[Any, ...]]) -> None:
    await run_sequence(await make_kernel(mode), ops)


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_shared_file_pages_follow_their_file_offset(mode: str, tmp_path: Path) -> None:
    """A shared file mapping keeps its file offsets when moved: stores at the
    new address reach the file at msync, and the page cache is not duplicated."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(1, 9)) * (4 * P // 8))
    kernel = await make_kernel(mode)
    addr = await kernel.mmap(4 * P, RW, mmap.MAP_SHARED, path=str(path), addr=B)
    await kernel.write(addr + 2 * P, b"moved")
    free = kernel.free_frame_count()
    await kernel.mremap(addr, 4 * P, 4 * P, MOVE, D)
    # a new PTE page at the destination, the source's freed by the unmap
    assert kernel.free_frame_count() == free
    assert await kernel.read(D + 2 * P, 5) == b"moved"
    await kernel.write(D + 3 * P, b"after")
    await kernel.msync(D, 4 * P)
    data = path.read_bytes()
    assert data[2 * P : 2 * P + 5] == b"moved"
    assert data[3 * P : 3 * P + 5] == b"after"
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", *HV_MODES])
async def test_whole_pmd_move_in_a_forked_child_to_a_new_l4_slot(mode: str) -> None:
    """A forked process has a user L4 mirroring its kernel L4: the new L4
    entry for the destination (slot 1, 512 GiB) goes to both in the one
    ``mmu_update``; PUD and PMD pages new (2 + 2), the PTE page moved whole
    (4); the unmap of the source frees the emptied PMD and PUD pages (2 + 2)
    and flushes once (1)."""
    kernel = await make_kernel(mode)
    await kernel.mmap(512 * P, RW, ANON, addr=B)
    await fill(kernel, B, list(range(0, 512, 5)))
    child = await kernel.fork()
    far = 1 << 39
    before, _ = await counts(kernel)
    assert await kernel.mremap(B, 512 * P, 512 * P, MOVE, far, pid=child) == far
    after, _ = await counts(kernel)
    assert after - before == (0 if mode == "native" else 8 + 5)
    await kernel.switch_to(1, child)
    await check_data(kernel, far, 512, list(range(0, 512, 5)))
    await kernel.switch_to(1, 1)
    await check_data(kernel, B, 512, list(range(0, 512, 5)))
    await kernel.exit_process(child)
    assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", *HV_MODES])
async def test_each_unmap_flushes_on_its_own(mode: str) -> None:
    """MREMAP_FIXED with a shrink is two munmaps in Linux (the destination,
    then the tail), each with its own flush (two MULTI ops, not one); then
    30 PTEs move within the PTE page."""
    kernel = await make_kernel(mode)
    await kernel.mmap(60 * P, RW, ANON, addr=B)
    await kernel.mmap(30 * P, RW, ANON, addr=B + 100 * P)
    await fill(kernel, B, list(range(60)))
    await fill(kernel, B + 100 * P, list(range(30)))
    free = kernel.free_frame_count()
    before, _ = await counts(kernel)
    await kernel.mremap(B, 60 * P, 30 * P, MOVE, B + 100 * P)
    after, _ = await counts(kernel)
    clears = {"native": 0, "batched": 1, "naive": 1}.get(mode, 30)
    unmaps = 0 if mode == "native" else 2 * (clears + 1)
    assert after - before == unmaps + move_cost(mode, [(30, True, 30)], 0, 0)
    assert kernel.free_frame_count() == free + 60
    await check_data(kernel, B + 100 * P, 30, list(range(30)))
    assert await kernel.audit() == []
