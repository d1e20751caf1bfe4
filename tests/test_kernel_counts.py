"""Exact trap counts of the canonical workload in every mode (docs/sources.md §2, §3).

For one mprotect over N pages starting 2 MiB-aligned, the region spans PTE
pages of sizes k_1..k_m (512 each, the last one the rest). With F the TLB
flush hypercalls (0 for protect_rw, because adding permissions needs no
flush; else 1: the workload's process runs user code on vCPU 1 and the
system call on vCPU 0, so its mm_cpumask holds another vCPU and the flush
is one ``MMUEXT_TLB_FLUSH_MULTI``, or ``INVLPG_MULTI`` for one page; on one
vCPU it would be N INVLPG_LOCAL up to 33 pages, else one full flush):

  native        0
  trap, ptwr    2N + F                 (a trapped get_and_clear + a commit per PTE)
  xen           sum(ceil(k_i / 31)) + F (31 coalesced records per flush)
  batched       m                       (one hypercall per PTE page, flush folded in)

populate costs, in every hypervisor mode, per page one page fault, one PTE
install and one iret back to user mode (64-bit PV, docs/sources.md §1), plus
a pin and a link for each new table: 3N + 2m + 2 (the region's L2 is new too).
"""

from __future__ import annotations

import math
import mmap

import pytest

from pvemu.guest.kernel import Kernel, boot, kernel_for
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.workload import run_mprotect_workload
from pvemu.hypervisor import Hypervisor
from tests.loopback import loopback_domain

SIZES = [1, 33, 34, 513, 4096]


def pte_pages(n: int) -> list[int]:
    return [min(512, n - start) for start in range(0, n, 512)]


def expected_traps(mode: str, n: int, phase: str) -> int:
    if mode == "native":
        return 0
    k = pte_pages(n)
    if phase == "populate":
        return 3 * n + 2 * len(k) + 2
    flush = 1 if phase == "protect_ro" else 0  # one MULTI op: two vCPUs in the mask
    if mode in ("trap", "ptwr"):
        return 2 * n + flush
    if mode == "xen":
        return sum(math.ceil(size / 31) for size in k) + flush
    return len(k)  # batched, naive


async def local_kernel(mode: str, memory_mib: int = 48) -> tuple[Kernel, Hypervisor]:
    hv = Hypervisor(memory_mib + 8)
    domain = await loopback_domain(hv, memory_mib=memory_mib, vcpus=2)
    return kernel_for(domain, mode), hv


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_exact_trap_counts(mode: str, n: int) -> None:
    if mode == "native":
        async with boot(mode="native", memory_mib=48) as kernel:
            result = await run_mprotect_workload(kernel, n)
    else:
        kernel, _ = await local_kernel(mode)
        result = await run_mprotect_workload(kernel, n)
    for phase in ("populate", "protect_ro", "protect_rw"):
        counts = result.phases[phase].counts
        assert counts["traps"] == expected_traps(mode, n, phase), (phase, counts)
    assert result.counts_agree
    assert result.audit_clean, result.audit
    assert result.phases["populate"].counts["page_faults"] == n


@pytest.mark.parametrize("mode", ["trap", "ptwr", "xen", "batched"])
async def test_phase_breakdown_for_513_pages(mode: str) -> None:
    """Where the traps go, not just how many."""
    kernel, _ = await local_kernel(mode)
    result = await run_mprotect_workload(kernel, 513)
    ro = result.phases["protect_ro"].counts
    rw = result.phases["protect_rw"].counts
    assert ro["flush_ops"] == 1
    assert rw["flush_ops"] == 0
    if mode == "trap":
        assert (ro["ptwr"], ro["records"], ro["hypercalls"]) == (513, 513, 514)
    elif mode == "ptwr":
        assert (ro["ptwr"], ro["records"], ro["hypercalls"]) == (1026, 0, 1)
    elif mode == "xen":
        assert (ro["ptwr"], ro["records"], ro["hypercalls"]) == (0, 513, 19)
        assert kernel.backend.stats()["batching"]["records_per_flush"][31] == 32
    else:
        assert (ro["ptwr"], ro["records"], ro["hypercalls"], ro["multicall_entries"]) == (
            0,
            513,
            2,
            2,
        )


@pytest.mark.parametrize(
    ("params", "hypercalls"),
    [
        ({"max_arg_bytes": 512}, 17),  # 31 records per flush: ceil(512/31)
        ({"max_arg_bytes": 256}, 35),  # (256-1)//16 = 15 per flush: ceil(512/15)
        ({"records_per_flush": 8}, 64),
        ({"max_arg_bytes": 512 * 16 + 16}, 1),  # the whole page fits (the >= rule)
    ],
)
async def test_xen_buffer_parameters_change_the_count(
    params: dict[str, int], hypercalls: int
) -> None:
    hv = Hypervisor(64)
    domain = await loopback_domain(hv, memory_mib=16, vcpus=2)
    kernel = kernel_for(domain, "xen", **params)
    addr = await kernel.mmap(512 * 4096, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, addr=0x4000_0000)
    await kernel.run_user(1, [(addr + i * 4096, "w", b"x") for i in range(512)])
    before = (await kernel.stats())["hypervisor"]["total"]["traps"]
    await kernel.mprotect(addr, 512 * 4096, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    after = (await kernel.stats())["hypervisor"]["total"]["traps"]
    assert after - before == hypercalls
    assert await kernel.audit() == []
