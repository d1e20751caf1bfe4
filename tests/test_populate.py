"""MAP_POPULATE, MADV_POPULATE_READ/WRITE, mlock and mmap(MAP_FIXED) over
existing mappings: exact counts per mode, what the pages hold, the errnos
(docs/architecture.md, "populate, mlock and MAP_FIXED").

Populating n missing pages starting ``off`` pages into a 2 MiB-aligned
region, over m PTE pages, with u new upper tables (L3/L2) on the way:

  native           0
  trap, ptwr, xen  n + 2m + 2u   (Linux: one immediate set_pte per order-0
                                  page; a pin and a link per new table)
  batched, naive   m + 2m + 2u   (pvemu: a PTE page's installs in one lazy
                                  section, one hypercall)

No page fault, no #PF bounce, no iret: the pages go through the fault
handler directly (GUP); the kernel's ``populated`` counter counts them.
mlock of present pages costs 0. A MAP_FIXED mmap costs the munmap of the
pieces it replaces plus the mmap (and its populate) that follows.
"""

from __future__ import annotations

import errno
import mmap
from pathlib import Path

import pytest

from pvemu.guest.kernel import Kernel, SegmentationFault, kernel_for
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.process import INIT_PID
from pvemu.guest.tlb import flush_cost
from pvemu.guest.vma import AddressSpace
from pvemu.guest.vma_tree import (
    MADV_POPULATE_READ,
    MADV_POPULATE_WRITE,
    MAP_FIXED,
    MAP_FIXED_NOREPLACE,
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_POPULATE,
    PROT_NONE,
)
from pvemu.hypervisor import Hypervisor
from pvemu.shared.x86 import PAGE_SIZE
from tests.loopback import loopback_domain
from tests.test_zap import make_kernel, traps

P = PAGE_SIZE
RW = mmap.PROT_READ | mmap.PROT_WRITE
RO = mmap.PROT_READ
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
BASE = 0x4000_0000
#: One page in the same 1 GiB as BASE, far from it: keeps the PMD page alive.
GUARD = BASE + (256 << 20)
PER_PTE = ("trap", "ptwr", "xen")
SIZES = [1, 512, 513]


def pte_pages(off: int, n: int) -> int:
    return (off + n - 1) // 512 - off // 512 + 1


def expected_populate(mode: str, n: int, off: int, upper: int) -> int:
    """The populate formula of the module docstring (all n pages missing)."""
    if mode == "native":
        return 0
    m = pte_pages(off, n)
    return (n if mode in PER_PTE else m) + 2 * m + 2 * upper


async def process(kernel: Kernel, spawned: bool) -> tuple[int, int, int]:
    """(pid, vCPU its user code runs on, new upper tables a region at BASE
    needs): process 1 has BASE's L3 from boot (only the L2 is new); a
    spawned process's tree is empty (L3 and L2 new)."""
    if not spawned:
        return INIT_PID, 1, 1
    pid = await kernel.spawn()
    await kernel.switch_to(0, pid)
    return pid, 0, 2


def counters(kernel: Kernel) -> tuple[int, int]:
    return kernel.counters.page_faults, kernel.counters.populated


#: (offset in pages, spawned process): aligned in the booted process,
#: unaligned in a spawned one (its L3 and L2 are new too).
PLACES = [(0, False), (100, True)]


@pytest.mark.parametrize("how", ["map_populate", "populate_write", "populate_read", "mlock"])
@pytest.mark.parametrize(("off", "spawned"), PLACES, ids=["aligned-booted", "unaligned-spawned"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_populate_counts(mode: str, n: int, off: int, spawned: bool, how: str) -> None:
    async for kernel in make_kernel(mode):
        pid, vcpu, upper = await process(kernel, spawned)
        addr = BASE + off * P
        flags = ANON | MAP_POPULATE if how == "map_populate" else ANON
        faults, populated = counters(kernel)
        before = await traps(kernel)
        assert await kernel.mmap(n * P, RW, flags, addr=addr, pid=pid) == addr
        if how == "populate_write":
            await kernel.madvise(addr, n * P, MADV_POPULATE_WRITE, pid=pid)
        elif how == "populate_read":
            await kernel.madvise(addr, n * P, MADV_POPULATE_READ, pid=pid)
        elif how == "mlock":
            await kernel.mlock(addr, n * P, pid=pid)
        assert await traps(kernel) - before == expected_populate(mode, n, off, upper)
        assert counters(kernel) == (faults, populated + n)
        # the pages are there: reading them takes no fault (and they are zero)
        before = await traps(kernel)
        data = await kernel.read(addr, n * P, vcpu=vcpu)
        assert data == bytes(n * P)
        assert await traps(kernel) == before
        assert counters(kernel) == (faults, populated + n)
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_write_populated_pages_take_no_fault(mode: str) -> None:
    """A write populate leaves exclusive writable pages: the stores that
    follow cost nothing. A read populate of private memory leaves read-only
    pages (pvemu has no shared zero page: each is its own zeroed frame, the
    same one set_pte as Linux's zero-page mapping); the first store then
    takes a write fault (reuse: one set_pte, then the iret)."""
    async for kernel in make_kernel(mode):
        n = 40
        await kernel.mmap(n * P, RW, ANON | MAP_POPULATE, addr=BASE)
        await kernel.mmap(n * P, RW, ANON, addr=GUARD)
        await kernel.madvise(GUARD, n * P, MADV_POPULATE_READ)
        before = await traps(kernel)
        await kernel.write(BASE, b"x" * (n * P), vcpu=1)
        assert await traps(kernel) == before
        assert kernel.counters.page_faults == 0
        await kernel.write(GUARD, b"y" * (n * P), vcpu=1)
        assert kernel.counters.page_faults == n
        assert kernel.counters.cow_reuses == n
        if mode != "native":
            assert await traps(kernel) - before == 3 * n  # #PF bounce, set_pte, iret
        assert await kernel.read(BASE, n * P, vcpu=1) == b"x" * (n * P)
        assert await kernel.read(GUARD, n * P, vcpu=1) == b"y" * (n * P)
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_write_populate_of_read_only_ptes_is_a_write_fault(mode: str) -> None:
    """MADV_POPULATE_WRITE over pages a read populate installed read-only:
    each is made writable where it is (``wp_page_reuse``: one set_pte in
    every hypervisor mode, not batched); pages already writable cost 0."""
    async for kernel in make_kernel(mode):
        n = 70
        await kernel.mmap(n * P, RW, ANON, addr=BASE)
        await kernel.madvise(BASE, n * P, MADV_POPULATE_READ)
        before = await traps(kernel)
        await kernel.madvise(BASE, n * P, MADV_POPULATE_WRITE)
        assert await traps(kernel) - before == (0 if mode == "native" else n)
        assert kernel.counters.cow_reuses == n
        before = await traps(kernel)
        await kernel.madvise(BASE, n * P, MADV_POPULATE_WRITE)
        await kernel.mlock(BASE, n * P)
        assert await traps(kernel) == before
        await kernel.write(BASE, b"z" * (n * P), vcpu=1)
        assert kernel.counters.page_faults == 0
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["xen", "batched"])
async def test_read_populate_of_a_file_maps_its_data(mode: str, tmp_path: Path) -> None:
    """A private and a shared read-only file mapping, read-populated: the
    file's bytes are there and the later reads fault nothing; a shared
    writable mapping's write populate marks the page cache dirty, so
    msync writes it although no store set a Dirty bit."""
    path = tmp_path / "data.bin"
    content = bytes((i * 7 + 3) % 256 for i in range(8 * P))
    path.write_bytes(content)
    async for kernel in make_kernel(mode):
        private = await kernel.mmap(8 * P, RO, mmap.MAP_PRIVATE | MAP_POPULATE, path=str(path))
        shared = await kernel.mmap(8 * P, RO, mmap.MAP_SHARED, path=str(path))
        await kernel.madvise(shared, 8 * P, MADV_POPULATE_READ)
        assert kernel.counters.populated == 16
        before = await traps(kernel)
        assert await kernel.read(private, 8 * P, vcpu=1) == content
        assert await kernel.read(shared, 8 * P, vcpu=1) == content
        assert await traps(kernel) == before
        assert kernel.counters.page_faults == 0
        writable = await kernel.mmap(2 * P, RW, mmap.MAP_SHARED, path=str(path))
        await kernel.madvise(writable, 2 * P, MADV_POPULATE_WRITE)
        path.write_bytes(bytes(8 * P))  # the file changes behind the page cache
        await kernel.msync(writable, 2 * P)
        assert path.read_bytes()[: 2 * P] == content[: 2 * P]  # written back
        assert await kernel.audit() == []


# --- MAP_POPULATE's variants --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_which_mmaps_populate(mode: str) -> None:
    """MAP_POPULATE and MAP_LOCKED populate; MAP_POPULATE | MAP_NONBLOCK
    and PROT_NONE do not (mm_populate skips an inaccessible VMA, no error);
    a read-only private mapping is read-populated."""
    async for kernel in make_kernel(mode):
        step = 16 * P
        await kernel.mmap(4 * P, RW, ANON | MAP_POPULATE | MAP_NONBLOCK, addr=BASE)
        await kernel.mmap(4 * P, PROT_NONE, ANON | MAP_POPULATE, addr=BASE + step)
        assert kernel.counters.populated == 0
        await kernel.mmap(4 * P, RW, ANON | MAP_LOCKED, addr=BASE + 2 * step)
        assert kernel.counters.populated == 4
        assert kernel.process().mm.find(BASE + 2 * step).locked  # type: ignore[union-attr]
        await kernel.mmap(4 * P, RO, ANON | MAP_POPULATE, addr=BASE + 3 * step)
        assert kernel.counters.populated == 8
        with pytest.raises(SegmentationFault):
            await kernel.write(BASE + 3 * step, b"x", vcpu=1)
        assert await kernel.audit() == []


# --- MAP_FIXED over existing mappings -------------------------------------------------------


async def _setup_fixed(kernel: Kernel) -> None:
    """Three written VMAs at BASE (20, 30 and 10 pages, the middle one
    read-only after the writes) and the guard page."""
    await kernel.mmap(20 * P, RW, ANON, addr=BASE)
    await kernel.mmap(30 * P, RW, ANON, addr=BASE + 20 * P)
    await kernel.mmap(10 * P, RW, ANON, addr=BASE + 600 * P)
    await kernel.mmap(P, RW, ANON, addr=GUARD)
    await kernel.write(BASE, b"a" * (50 * P), vcpu=1)
    await kernel.write(BASE + 600 * P, b"b" * (10 * P), vcpu=1)
    await kernel.mprotect(BASE + 20 * P, 30 * P, RO)


@pytest.mark.parametrize("populate", [False, True], ids=["plain", "populate"])
@pytest.mark.parametrize(
    ("start", "pages"),
    [(0, 20), (10, 30), (5, 700), (100, 550)],
    ids=["one-vma", "two-pieces", "all", "hole-and-tail"],
)
@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_map_fixed_costs_munmap_plus_mmap(
    mode: str, start: int, pages: int, populate: bool
) -> None:
    """The MAP_FIXED mmap costs what munmap of the range and a fresh mmap
    there cost on a twin kernel in the same state; old data is gone."""
    flags = ANON | MAP_FIXED | (MAP_POPULATE if populate else 0)
    addr = BASE + start * P
    costs, layouts = [], []
    for fixed in (True, False):
        async for kernel in make_kernel(mode):
            await _setup_fixed(kernel)
            before = await traps(kernel)
            if not fixed:
                await kernel.munmap(addr, pages * P)
            assert await kernel.mmap(pages * P, RW, flags, addr=addr) == addr
            costs.append(await traps(kernel) - before)
            layouts.append(kernel.vmas())
            assert await kernel.read(addr, pages * P, vcpu=1) == bytes(pages * P)
            assert await kernel.audit() == []
    assert costs[0] == costs[1]
    assert layouts[0] == layouts[1]


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_map_fixed_over_a_full_pte_page(mode: str) -> None:
    """The worked example: 512 written pages in one aligned PTE page of
    process 1 (two vCPUs in its mask: one MULTI flush), replaced by a
    MAP_FIXED | MAP_POPULATE mapping: the munmap (512 + 1 + 2 = 515 in the
    per-PTE modes, 1 + 1 + 2 = 4 batched) and the populate (512 + 2 = 514,
    1 + 2 = 3). Without populate, every old frame and the PTE page are free."""
    async for kernel in make_kernel(mode):
        await kernel.mmap(512 * P, RW, ANON, addr=BASE)
        await kernel.mmap(P, RW, ANON, addr=GUARD)
        await kernel.write(BASE, b"q" * (512 * P), vcpu=1)
        free = kernel.free_frame_count()
        before = await traps(kernel)
        await kernel.mmap(512 * P, RW, ANON | MAP_FIXED | MAP_POPULATE, addr=BASE)
        per_pte = {"native": 0, "trap": 1029, "ptwr": 1029, "xen": 1029}
        assert await traps(kernel) - before == per_pte.get(mode, 7)
        assert flush_cost(512, True) == 1
        assert kernel.free_frame_count() == free  # 513 freed, 513 taken again
        assert await kernel.read(BASE, 512 * P, vcpu=1) == bytes(512 * P)
        await kernel.mmap(512 * P, RW, ANON | MAP_FIXED, addr=BASE)
        assert kernel.free_frame_count() - free == 513
        assert kernel._lookup_l1(BASE) is None
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["xen", "batched"])
async def test_map_fixed_writes_back_a_replaced_shared_page(mode: str, tmp_path: Path) -> None:
    """A dirty shared file page under a MAP_FIXED mapping is handled as
    munmap handles it: its data reaches the page cache and msync of a new
    mapping of the file sees it."""
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(4 * P))
    async for kernel in make_kernel(mode):
        addr = await kernel.mmap(4 * P, RW, mmap.MAP_SHARED, path=str(path))
        await kernel.write(addr + P, b"dirty", vcpu=1)
        await kernel.mmap(4 * P, RW, ANON | MAP_FIXED, addr=addr)
        again = await kernel.mmap(4 * P, RW, mmap.MAP_SHARED, path=str(path))
        assert await kernel.read(again + P, 5, vcpu=1) == b"dirty"
        await kernel.msync(again, 4 * P)
        assert path.read_bytes()[P : P + 5] == b"dirty"
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", "xen"])
async def test_map_fixed_noreplace_changes_nothing(mode: str) -> None:
    async for kernel in make_kernel(mode):
        await kernel.mmap(4 * P, RW, ANON, addr=BASE)
        await kernel.write(BASE, b"keep", vcpu=1)
        vmas = kernel.vmas()
        before = await traps(kernel)
        with pytest.raises(OSError) as info:
            await kernel.mmap(2 * P, RW, ANON | MAP_FIXED_NOREPLACE, addr=BASE + P)
        assert info.value.errno == errno.EEXIST
        assert kernel.vmas() == vmas
        assert await traps(kernel) == before
        assert await kernel.read(BASE, 4, vcpu=1) == b"keep"


# --- errnos, VM_LOCKED -----------------------------------------------------------------------


def _space() -> AddressSpace:
    space = AddressSpace()
    space.mmap(4 * P, RW, ANON, addr=BASE, fixed=True)
    space.mmap(4 * P, RO, ANON, addr=BASE + 4 * P, fixed=True)
    space.mmap(4 * P, PROT_NONE, ANON, addr=BASE + 8 * P, fixed=True)
    space.mmap(4 * P, mmap.PROT_WRITE, ANON, addr=BASE + 16 * P, fixed=True)
    return space


def test_madvise_populate_errnos() -> None:
    """As Linux 6.18 answers (tests/test_populate_linux.py): EINVAL for an
    unaligned start or a wrapping length; a hole (at the start too) ENOMEM,
    a VMA the access is not allowed on EINVAL, after the pieces before."""
    space = _space()
    with pytest.raises(OSError) as info:
        space.madvise_populate(BASE + 1, P, write=True)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        space.madvise_populate(BASE, (1 << 64) - BASE, write=False)
    assert info.value.errno == errno.EINVAL
    assert space.madvise_populate(BASE, 0, write=True).ranges == []
    assert space.madvise_populate(BASE, 1, write=True).errno == 0  # length rounded up
    write = space.madvise_populate(BASE, 8 * P, write=True)
    assert (write.errno, [(v.start, v.end) for v in write.ranges]) == (
        errno.EINVAL,
        [(BASE, BASE + 4 * P)],
    )
    assert space.madvise_populate(BASE, 8 * P, write=False).errno == 0
    assert space.madvise_populate(BASE + 8 * P, P, write=False).errno == errno.EINVAL
    assert space.madvise_populate(BASE + 16 * P, P, write=False).errno == errno.EINVAL
    assert space.madvise_populate(BASE + 16 * P, P, write=True).errno == 0
    hole = space.madvise_populate(BASE + 4 * P, 12 * P, write=False)
    assert hole.errno == errno.EINVAL  # the PROT_NONE VMA comes before the hole
    hole = space.madvise_populate(BASE + 12 * P, P, write=False)
    assert (hole.errno, hole.ranges) == (errno.ENOMEM, [])
    space.mprotect(BASE + 8 * P, 4 * P, RO)
    hole = space.madvise_populate(BASE + 4 * P, 12 * P, write=False)
    assert (hole.errno, len(hole.ranges)) == (errno.ENOMEM, 1)  # the two RO VMAs merged


def test_mlock_errnos_and_flags() -> None:
    """mlock rounds ``addr`` down (no EINVAL); a hole is ENOMEM after the
    VMAs before it were locked, and then nothing is populated; PROT_NONE is
    locked but cannot be populated (ENOMEM); munlock undoes the split."""
    space = _space()
    result = space.mlock(BASE + P + 5, P)  # 5 bytes into a page: two pages
    assert (result.errno, [(v.start, v.end) for v in result.ranges]) == (
        0,
        [(BASE + P, BASE + 3 * P)],
    )
    assert [(v.start, v.end, v.locked) for v in space.intersecting(BASE, BASE + 4 * P)] == [
        (BASE, BASE + P, False),
        (BASE + P, BASE + 3 * P, True),
        (BASE + 3 * P, BASE + 4 * P, False),
    ]
    with pytest.raises(OSError) as info:
        space.mlock(BASE, (1 << 64) - BASE)
    assert info.value.errno == errno.EINVAL
    assert space.mlock(0x10000, 0).errno == 0
    assert space.mlock(0x10000, P).errno == errno.ENOMEM
    result = space.mlock(BASE + 8 * P, 12 * P)  # PROT_NONE, hole, PROT_WRITE
    assert (result.errno, result.ranges) == (errno.ENOMEM, [])
    assert space.find(BASE + 8 * P).locked  # type: ignore[union-attr]
    assert not space.find(BASE + 16 * P).locked  # type: ignore[union-attr]
    result = space.mlock(BASE + 4 * P, 8 * P)
    assert (result.errno, len(result.ranges)) == (errno.ENOMEM, 1)  # RO piece, then PROT_NONE
    assert space.mlock(BASE, 4 * P, lock=False).errno == 0
    assert len(space.intersecting(BASE, BASE + 4 * P)) == 1  # merged again
    assert space.mlock(BASE, 20 * P, lock=False).errno == errno.ENOMEM  # the hole
    assert not any(v.locked for v in space.vmas())


def test_locked_vmas_refuse_dontneed_and_free_and_fork_unlocks() -> None:
    space = _space()
    space.mlock(BASE, 2 * P)
    assert space.madvise_dontneed(BASE, 4 * P).errno == errno.EINVAL
    result = space.madvise_free(BASE + 2 * P, 2 * P)
    assert (result.errno, len(result.ranges)) == (0, 1)
    assert space.madvise_free(BASE, 4 * P).errno == errno.EINVAL
    child = space.fork()
    assert not any(v.locked for v in child.vmas())
    assert space.find(BASE).locked  # type: ignore[union-attr]


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_kernel_errnos_keep_what_was_done(mode: str) -> None:
    """Through the kernel: the pieces before an error are populated (and
    locked), nothing after it."""
    async for kernel in make_kernel(mode):
        await kernel.mmap(4 * P, RW, ANON, addr=BASE)
        await kernel.mmap(4 * P, RO, ANON, addr=BASE + 4 * P)
        with pytest.raises(OSError) as info:
            await kernel.madvise(BASE, 8 * P, MADV_POPULATE_WRITE)
        assert info.value.errno == errno.EINVAL
        assert kernel.counters.populated == 4
        with pytest.raises(OSError) as info:
            await kernel.mlock(BASE, 10 * P)
        assert info.value.errno == errno.ENOMEM
        assert kernel.counters.populated == 4  # a hole: nothing populated
        assert [v[:2] for v in kernel.vmas()] == [
            (BASE, BASE + 4 * P),
            (BASE + 4 * P, BASE + 8 * P),
        ]
        assert all(v.locked for v in kernel.process().mm.vmas())
        with pytest.raises(OSError) as info:
            await kernel.madvise(BASE, 4 * P, mmap.MADV_DONTNEED)
        assert info.value.errno == errno.EINVAL
        await kernel.munlock(BASE, 8 * P)
        await kernel.madvise(BASE, 4 * P, mmap.MADV_DONTNEED)
        with pytest.raises(OSError) as info:
            await kernel.madvise(BASE, 4 * P, 99)
        assert info.value.errno == errno.EINVAL
        assert await kernel.audit() == []


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
async def test_mprotect_write_populates_a_locked_private_vma(mode: str) -> None:
    """A locked private mapping made writable by mprotect is write-populated
    at once (Linux's ``mprotect_fixup``): pages a forked child still shares
    are copied there and then, so the parent's stores fault nothing. An
    unlocked mapping leaves them to the write faults. (Exclusive pages need
    no populate: mprotect makes them writable itself.)"""
    async for kernel in make_kernel(mode):
        n = 20
        for addr in (BASE, GUARD):
            await kernel.mmap(n * P, RW, ANON | MAP_POPULATE, addr=addr)
            await kernel.mprotect(addr, n * P, RO)
        await kernel.mlock(BASE, n * P)
        await kernel.fork()
        await kernel.mprotect(BASE, n * P, RW)
        await kernel.mprotect(GUARD, n * P, RW)
        assert (kernel.counters.populated, kernel.counters.cow_copies) == (3 * n, n)
        await kernel.write(BASE, b"w" * (n * P), vcpu=1)
        assert kernel.counters.page_faults == 0
        await kernel.write(GUARD, b"w" * (n * P), vcpu=1)
        assert (kernel.counters.page_faults, kernel.counters.cow_copies) == (n, 2 * n)
        assert await kernel.audit() == []


async def test_running_out_of_frames_mid_populate_leaves_the_kernel_usable() -> None:
    """A batched populate that runs out of frames half way still sends what
    it queued and closes its lazy section: the next call works (it used to
    fail with a nesting KernelBug) and audit() is clean."""
    hv = Hypervisor(24)
    kernel = kernel_for(await loopback_domain(hv, memory_mib=4, vcpus=2), "batched")
    flags = ANON | MAP_POPULATE
    with pytest.raises(MemoryError):
        await kernel.mmap(2048 * P, RW, flags, addr=BASE)
    await kernel.munmap(BASE, 2048 * P)
    assert await kernel.audit() == []
