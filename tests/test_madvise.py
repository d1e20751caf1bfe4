"""madvise(MADV_FREE): a private anonymous page is cleaned but stays writable,
so the Dirty bit the hardware sets at the next store is the only record that
it was written again (the state ``pvemu race --workload fork`` needs).

What it costs per mode for k young or dirty pages in one PTE page (each
taken with a trapped xchg and reinstalled with ``set_pte``, then the TLB
flush f(k): process 1 has run on both vCPUs, so its mm_cpumask holds the
other one and the flush is one MULTI op, f = 1; on one vCPU it would be
one INVLPG per page up to 33 pages, else one full flush):

  native 0 · trap, ptwr 2k + f(k) · xen k + ⌈k/31⌉ + f(k) ·
  batched, naive k + 1 + f(k)
"""

from __future__ import annotations

import errno
import math
import mmap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pvemu.guest.kernel import Kernel, boot, kernel_for
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.tlb import flush_cost
from pvemu.hypervisor import Hypervisor
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_RW,
    maddr_of_entry,
    va_indexes,
)
from tests.loopback import loopback_domain

RW = mmap.PROT_READ | mmap.PROT_WRITE
ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
PAGE = 4096
VA = 0x4000_0000


async def make_kernel(mode: str) -> AsyncIterator[Kernel]:
    if mode == "native":
        async with boot(mode="native", memory_mib=16) as kernel:
            yield kernel
        return
    hv = Hypervisor(32)
    yield kernel_for(await loopback_domain(hv, memory_mib=16, vcpus=2), mode)


@pytest.fixture(params=MODE_NAMES)
async def kernel(request: pytest.FixtureRequest) -> AsyncIterator[Kernel]:
    async for k in make_kernel(request.param):
        yield k


def madvise_traps(mode: str, k: int) -> int:
    flush = flush_cost(k, multi=True)
    return {
        "native": 0,
        "trap": 2 * k + flush,
        "ptwr": 2 * k + flush,
        "xen": k + math.ceil(k / 31) + flush,
        "batched": k + 1 + flush,
        "naive": k + 1 + flush,
    }[mode]


async def traps(kernel: Kernel) -> int:
    stats = await kernel.stats()
    counted = int(stats["hypervisor"]["total"]["traps"])
    assert counted == stats["guest"]["total"]["traps"]
    return counted


def pte_of(kernel: Kernel, va: int, pid: int | None = None) -> int:
    l1 = kernel._lookup_l1(va, kernel.process(pid))
    assert l1 is not None
    return kernel.machine.read_u64(maddr_of_entry(l1, va_indexes(va).l1))


async def lost_dirty(kernel: Kernel) -> int:
    return int((await kernel.stats())["hypervisor"]["hardware"]["lost_dirty"])


@pytest.mark.parametrize("k", [5, 40])
async def test_pages_stay_writable_and_their_data_but_lose_young_and_dirty(
    kernel: Kernel, k: int
) -> None:
    await kernel.mmap(k * PAGE, RW, ANON, addr=VA)
    payload = [bytes([i + 1]) * 8 for i in range(k)]
    for i in range(k):
        await kernel.write(VA + i * PAGE, payload[i])
    assert all(pte_of(kernel, VA + i * PAGE) & _PAGE_DIRTY for i in range(k))
    before = await traps(kernel)
    await kernel.madvise_free(VA, k * PAGE)
    assert await traps(kernel) - before == madvise_traps(kernel.mode, k)
    for i in range(k):
        pte = pte_of(kernel, VA + i * PAGE)
        assert pte & (_PAGE_PRESENT | _PAGE_RW) == _PAGE_PRESENT | _PAGE_RW
        assert not pte & (_PAGE_ACCESSED | _PAGE_DIRTY)
    faults = kernel.counters.page_faults
    assert [await kernel.read(VA + i * PAGE, 8) for i in range(k)] == payload  # nothing freed
    await kernel.write(VA, b"again")  # no fault: the hardware sets D
    assert kernel.counters.page_faults == faults
    assert pte_of(kernel, VA) & _PAGE_DIRTY
    assert not pte_of(kernel, VA + PAGE) & _PAGE_DIRTY
    assert await lost_dirty(kernel) == 0  # the xchg handed every D bit back
    before = await traps(kernel)
    await kernel.madvise_free(VA + PAGE, (k - 1) * PAGE)  # the reads made them young again
    assert await traps(kernel) - before == madvise_traps(kernel.mode, k - 1)
    assert await kernel.audit() == []


async def test_pages_another_process_maps_are_left_alone(kernel: Kernel) -> None:
    await kernel.mmap(4 * PAGE, RW, ANON, addr=VA)
    await kernel.write(VA, bytes(4 * PAGE))
    child = await kernel.fork()
    before = await traps(kernel)
    await kernel.madvise_free(VA, 4 * PAGE)
    assert await traps(kernel) - before == 0
    assert pte_of(kernel, VA) & _PAGE_DIRTY
    assert pte_of(kernel, VA, child) & _PAGE_DIRTY
    await kernel.exit_process(child)
    await kernel.madvise_free(VA, 4 * PAGE)  # the parent's own again
    assert not pte_of(kernel, VA) & (_PAGE_DIRTY | _PAGE_RW)  # still read-only from the fork
    await kernel.write(VA, b"x")  # wp_page_reuse: writable and dirty again
    assert pte_of(kernel, VA) & (_PAGE_DIRTY | _PAGE_RW) == _PAGE_DIRTY | _PAGE_RW
    assert await kernel.audit() == []


async def test_errors_come_after_the_mapped_part_is_cleaned(tmp_path: Path) -> None:
    async for kernel in make_kernel("xen"):
        await kernel.mmap(PAGE, RW, ANON, addr=VA)
        await kernel.write(VA, b"x")
        with pytest.raises(OSError) as hole:
            await kernel.madvise_free(VA, 2 * PAGE)
        assert hole.value.errno == errno.ENOMEM
        assert not pte_of(kernel, VA) & _PAGE_DIRTY
        path = tmp_path / "f.bin"
        path.write_bytes(bytes(PAGE))
        shared = await kernel.mmap(PAGE, RW, mmap.MAP_SHARED, path=str(path))
        with pytest.raises(OSError) as refused:
            await kernel.madvise_free(shared, PAGE)
        assert refused.value.errno == errno.EINVAL
        assert await kernel.audit() == []
