"""Guest mm semantics: syscalls and their errnos, VMA split/merge, protection
enforcement by the hardware model, data surviving protection changes, shared
file mappings with dirty accounting and msync, and the lazy-MMU rules."""

from __future__ import annotations

import errno
import mmap
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pvemu.guest.kernel import Kernel, SegmentationFault, boot, kernel_for
from pvemu.guest.lazy import KernelBug
from pvemu.guest.modes import MODE_NAMES
from pvemu.hypervisor import Hypervisor
from pvemu.shared.x86 import _PAGE_DIRTY, _PAGE_RW
from tests.loopback import loopback_domain

RW = mmap.PROT_READ | mmap.PROT_WRITE
Access = tuple[int, str, bytes | int]
PROT_NONE = 0
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
PAGE = 4096


async def make_kernel(mode: str) -> AsyncIterator[Kernel]:
    if mode == "native":
        async with boot(mode="native", memory_mib=16) as kernel:
            yield kernel
        return
    hv = Hypervisor(32)
    domain = await loopback_domain(hv, memory_mib=16, vcpus=2)
    yield kernel_for(domain, mode)


@pytest.fixture(params=MODE_NAMES)
async def kernel(request: pytest.FixtureRequest) -> AsyncIterator[Kernel]:
    async for k in make_kernel(request.param):
        yield k


@pytest.fixture
async def xen() -> AsyncIterator[Kernel]:
    async for k in make_kernel("xen"):
        yield k


# --- errnos ----------------------------------------------------------------------------


async def test_syscall_errnos(xen: Kernel) -> None:
    addr = await xen.mmap(4 * PAGE, RW, ANON)
    cases = [
        (xen.mprotect(addr + 1, PAGE, mmap.PROT_READ), errno.EINVAL),
        (xen.mprotect(addr, PAGE, 0x100), errno.EINVAL),
        (xen.mprotect(addr, 8 * PAGE, mmap.PROT_READ), errno.ENOMEM),
        (xen.mprotect(0x7000_0000, PAGE, mmap.PROT_READ), errno.ENOMEM),
        (xen.munmap(addr + 3, PAGE), errno.EINVAL),
    ]
    for coro, expected in cases:
        with pytest.raises(OSError) as excinfo:
            await coro
        assert excinfo.value.errno == expected
    with pytest.raises(OSError) as excinfo:
        await xen.mmap(0, RW, ANON)
    assert excinfo.value.errno == errno.EINVAL
    assert await xen.audit() == []


async def test_shared_write_on_read_only_file_is_eacces(xen: Kernel, tmp_path: Path) -> None:
    path = tmp_path / "ro.bin"
    path.write_bytes(bytes(PAGE))
    with pytest.raises(OSError) as excinfo:
        await xen.mmap(PAGE, RW, mmap.MAP_SHARED, path=str(path), writable=False)
    assert excinfo.value.errno == errno.EACCES
    addr = await xen.mmap(PAGE, mmap.PROT_READ, mmap.MAP_SHARED, path=str(path), writable=False)
    with pytest.raises(OSError) as excinfo:
        await xen.mprotect(addr, PAGE, RW)
    assert excinfo.value.errno == errno.EACCES


# --- VMAs ------------------------------------------------------------------------------------


async def test_split_and_merge(kernel: Kernel) -> None:
    addr = await kernel.mmap(8 * PAGE, RW, ANON, addr=0x4000_0000)
    await kernel.write(addr, b"a" * (8 * PAGE))
    await kernel.mprotect(addr + 2 * PAGE, 2 * PAGE, mmap.PROT_READ)
    assert [(s - addr, e - addr, p) for s, e, p, _ in kernel.vmas()] == [
        (0, 2 * PAGE, RW),
        (2 * PAGE, 4 * PAGE, mmap.PROT_READ),
        (4 * PAGE, 8 * PAGE, RW),
    ]
    await kernel.mprotect(addr + 2 * PAGE, 2 * PAGE, RW)
    assert [(s - addr, e - addr, p) for s, e, p, _ in kernel.vmas()] == [(0, 8 * PAGE, RW)]
    assert await kernel.read(addr, 8 * PAGE) == b"a" * (8 * PAGE)
    assert await kernel.audit() == []


# --- protection enforced by the hardware model -------------------------------------------


async def test_protections_are_enforced(kernel: Kernel) -> None:
    addr = await kernel.mmap(4 * PAGE, RW, ANON, addr=0x4000_0000)
    await kernel.write(addr, b"data" * 2048 * 2)
    await kernel.mprotect(addr, PAGE, mmap.PROT_READ)
    await kernel.mprotect(addr + PAGE, PAGE, PROT_NONE)
    await kernel.mprotect(addr + 2 * PAGE, PAGE, mmap.PROT_READ | mmap.PROT_EXEC)
    assert await kernel.read(addr, 4) == b"data"
    with pytest.raises(SegmentationFault) as excinfo:
        await kernel.write(addr, b"x")
    assert excinfo.value.addr == addr
    with pytest.raises(SegmentationFault):
        await kernel.read(addr + PAGE, 1)
    with pytest.raises(SegmentationFault):
        await kernel.execute(addr)  # read-only, not executable
    await kernel.execute(addr + 2 * PAGE)
    with pytest.raises(SegmentationFault):
        await kernel.read(0x10_0000_0000, 1)  # nothing mapped
    # PROT_NONE keeps the page: making it readable again shows the old data
    await kernel.mprotect(addr + PAGE, PAGE, mmap.PROT_READ)
    assert await kernel.read(addr + PAGE, 4) == b"data"
    assert await kernel.audit() == []


async def test_munmap_then_access_segfaults(kernel: Kernel) -> None:
    addr = await kernel.mmap(2 * PAGE, RW, ANON, addr=0x4000_0000)
    await kernel.write(addr, b"x" * (2 * PAGE))
    await kernel.munmap(addr, PAGE)
    with pytest.raises(SegmentationFault):
        await kernel.read(addr, 1)
    assert await kernel.read(addr + PAGE, 1) == b"x"
    # the freed frame is reused, cleared, for a new mapping
    again = await kernel.mmap(PAGE, RW, ANON, addr=addr)
    assert await kernel.read(again, 4) == bytes(4)
    assert await kernel.audit() == []


async def test_data_survives_protection_changes(kernel: Kernel) -> None:
    addr = await kernel.mmap(40 * PAGE, RW, ANON, addr=0x4000_0000)
    payload = bytes(range(256)) * (40 * PAGE // 256)
    await kernel.write(addr, payload)
    for prot in (mmap.PROT_READ, PROT_NONE, RW, mmap.PROT_READ, RW):
        await kernel.mprotect(addr, 40 * PAGE, prot)
    assert await kernel.read(addr, 40 * PAGE) == payload
    await kernel.write(addr, b"again")
    assert await kernel.read(addr, 5) == b"again"
    assert await kernel.audit() == []


# --- shared file mappings --------------------------------------------------------------


async def test_shared_file_mapping_dirty_accounting_and_msync(
    kernel: Kernel, tmp_path: Path
) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(b"\x11" * (4 * PAGE))
    addr = await kernel.mmap(4 * PAGE, RW, mmap.MAP_SHARED, path=str(path))
    assert await kernel.read(addr + 2 * PAGE, 2) == b"\x11\x11"  # clean page, mapped RO
    await kernel.write(addr, b"hello")  # write-notify: dirty, writable
    await kernel.write(addr + PAGE, b"world")
    assert path.read_bytes()[:5] == b"\x11" * 5  # not written back yet
    await kernel.msync(addr, 4 * PAGE)
    data = path.read_bytes()
    assert data[:5] == b"hello"
    assert data[PAGE : PAGE + 5] == b"world"
    assert data[2 * PAGE : 2 * PAGE + 2] == b"\x11\x11"
    # writeback cleaned the pages: the next write faults again and is kept too
    await kernel.write(addr + 5, b"!")
    await kernel.msync(addr, PAGE)
    assert path.read_bytes()[:6] == b"hello!"
    assert await kernel.audit() == []


async def test_mprotect_rw_makes_only_dirty_shared_pages_writable(
    xen: Kernel, tmp_path: Path
) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(2 * PAGE))
    addr = await xen.mmap(2 * PAGE, RW, mmap.MAP_SHARED, path=str(path))
    await xen.write(addr, b"d")  # page 0 dirty
    await xen.read(addr + PAGE, 1)  # page 1 clean
    await xen.mprotect(addr, 2 * PAGE, mmap.PROT_READ)
    await xen.mprotect(addr, 2 * PAGE, RW)
    l1 = xen._lookup_l1(addr)
    assert l1 is not None
    dirty = xen.machine.read_u64((l1 << 12) | ((addr >> 12) & 511) * 8)
    clean = xen.machine.read_u64((l1 << 12) | (((addr >> 12) + 1) & 511) * 8)
    assert dirty & _PAGE_RW
    assert dirty & _PAGE_DIRTY
    assert not clean & _PAGE_RW


# --- the lazy-MMU rules are enforced -----------------------------------------------------


async def test_lazy_rules_are_enforced(xen: Kernel) -> None:
    addr = await xen.mmap(PAGE, RW, ANON, addr=0x4000_0000)
    await xen.write(addr, b"x")
    l1 = xen._lookup_l1(addr)
    assert l1 is not None
    ptep = (l1 << 12) | ((addr >> 12) & 511) * 8
    backend = xen.backend
    await backend.lazy_enter()
    old = await backend.modify_prot_start(ptep)
    with pytest.raises(KernelBug, match="not committed"):
        backend.note_unlock(l1)  # unlock with a start not committed
    with pytest.raises(KernelBug, match="again before its commit"):
        await backend.modify_prot_start(ptep)
    await backend.modify_prot_commit(ptep, old, old & ~_PAGE_RW)
    with pytest.raises(KernelBug, match="still queued"):
        backend.note_unlock(l1)  # the commit has not reached the hypervisor
    with pytest.raises(KernelBug, match="read hazard"):
        await backend.modify_prot_start(ptep)
    await backend.lazy_leave()
    backend.note_unlock(l1)  # now everything has been sent


async def test_fault_rechecks_the_vma_under_the_pte_lock(xen: Kernel) -> None:
    """A write fault that waited on the PTE-page lock while an mprotect made
    the VMA read-only must not make the page writable (no mmap_lock here)."""
    import trio
    import trio.testing

    addr = await xen.mmap(PAGE, RW, ANON, addr=0x4000_0000)
    assert await xen.read(addr, 1) == b"\0"  # present, read-only (no write yet)
    l1 = xen._lookup_l1(addr)
    assert l1 is not None
    outcome: list[BaseException] = []

    async def fault() -> None:
        try:
            await xen.handle_fault(addr, 0x7, vcpu=1)  # user write to a present page
        except SegmentationFault as exc:
            outcome.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery, xen.process().lock(l1):
            nursery.start_soon(fault)
            await trio.testing.wait_all_tasks_blocked()
            xen.mm.mprotect(addr, PAGE, mmap.PROT_READ)  # the VMA changes meanwhile
            # the lock is free: the fault runs now, and the nursery waits for it
    assert len(outcome) == 1
    ptep = (l1 << 12) | ((addr >> 12) & 511) * 8
    assert not xen.machine.read_u64(ptep) & _PAGE_RW


async def test_first_touch_sends_small_run_user_batches() -> None:
    """Populating a region faults on every access; after a fault the kernel
    sends a batch about twice what got through, not 256 accesses the next
    fault throws away (that resend made populate quadratic in request bytes).
    Every access still runs exactly once, in order."""
    async with boot(mode="native", memory_mib=16) as kernel:
        sent: list[int] = []
        run_user = kernel.machine.run_user

        async def counting(
            vcpu: int, batch: Sequence[tuple[int, str, bytes | int]], *, resume: bool = False
        ) -> dict[str, Any]:
            sent.append(len(batch))
            return await run_user(vcpu, batch, resume=resume)

        kernel.machine.run_user = counting  # type: ignore[method-assign]
        pages = 300
        addr = await kernel.mmap(pages * 4096, RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        await kernel.run_user(1, [(addr + i * 4096, "w", bytes([i & 0xFF])) for i in range(pages)])
        assert kernel.counters.page_faults == pages
        assert max(sent[1:]) <= 4  # one executed, one faulted, and slack
        assert sum(sent) <= 256 + 4 * pages  # it was 256 per page
        reads = await kernel.run_user(1, [(addr + i * 4096, "r", 1) for i in range(pages)])
        assert reads == [bytes([i & 0xFF]) for i in range(pages)]
        assert sent[-2:] == [256, pages - 256]  # no faults: whole batches again
