"""Exact trap counts of fork, copy-on-write, exec, exit and context switch.

For N pages at the 2 MiB-aligned region, the parent's tree under the
region has P1 = ⌈N/512⌉ PTE pages of sizes k_i, one PMD page and one PUD
page, so a copy of it pins E_pin = 2·P1 + 6 entries and unpins
E_unpin = 2·P1 + 5 (docs/architecture.md, "fork, exec and exit"):

  fork      native 0 · trap 2N + ⌈E_pin/32⌉ + 1 · ptwr N + ⌈E_pin/32⌉ + 1
            xen N + Σ⌈k_i/31⌉ + ⌈E_pin/32⌉ + 1 · batched, naive P1
  exit      1 (the CPU leaves the tree) + ⌈E_unpin/32⌉; batched 1 + 1
  exec      A + ⌈8/32⌉ + 1 + ⌈E_unpin(old)/32⌉ (A = 1 argument page;
            ptwr writes it with a plain store; batched sends the pin with
            the switch: A + 1 + 1)
  switch    1
  COW       copy 5 (fault, trapped xchg, INVLPG, mmu_update, iret),
            reuse 3 (fault, mmu_update, iret)

The xen column is the reference formula for Linux on Xen PV.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import pytest

from pvemu.guest.kernel import Kernel, boot, kernel_for
from pvemu.guest.modes import MODE_NAMES
from pvemu.guest.proc_workloads import (
    DEFAULT_LOOPS,
    run_exec_workload,
    run_fork_workload,
    run_forkexec_workload,
)
from pvemu.guest.workload import WorkloadResult
from pvemu.hypervisor import Hypervisor
from tests.loopback import loopback_domain

SIZES = [1, 32, 513, 1100]
Workload = Callable[..., Awaitable[WorkloadResult]]
HYPERVISOR_MODES = [m for m in MODE_NAMES if m != "native"]
#: A first-touch fault in a pinned tree: the fault, the PTE install, the iret.
FAULT = 3
COW_COPY = 5
COW_REUSE = 3


def pte_pages(n: int) -> list[int]:
    return [min(512, n - start) for start in range(0, n, 512)]


def batches(entries: int) -> int:
    return math.ceil(entries / 32)


def fork_traps(mode: str, n: int, per_flush: int = 31) -> int:
    """``per_flush``: records per lazy mmu_update in xen (Linux's 31, less
    under the bench's --mc-bytes/--mc-records limits)."""
    k = pte_pages(n)
    pin = batches(2 * len(k) + 6)
    return {
        "native": 0,
        "trap": 2 * n + pin + 1,
        "ptwr": n + pin + 1,
        "xen": n + sum(math.ceil(size / per_flush) for size in k) + pin + 1,
        "batched": len(k),
        "naive": len(k),
    }[mode]


def unpin_traps(mode: str, p1: int) -> int:
    return 1 if mode in ("batched", "naive") else batches(2 * p1 + 5)


def exec_traps(mode: str, n: int) -> int:
    if mode == "native":
        return 0
    old = unpin_traps(mode, len(pte_pages(n)))
    if mode in ("batched", "naive"):
        return 1 + 1 + old
    argument = 0 if mode == "ptwr" else 1
    return argument + batches(8) + 1 + old


def exit_traps(mode: str, p1: int) -> int:
    return 0 if mode == "native" else 1 + unpin_traps(mode, p1)


def per_fault(mode: str, cost: int) -> int:
    return 0 if mode == "native" else cost


def populate_traps(mode: str, n: int, *, spawned: bool = False) -> int:
    """First touches of ``n`` pages: a fault each, and each new table's
    alloc batch and link (the booted process has the region's L3 already; a
    spawned one builds it too)."""
    if mode == "native":
        return 0
    tables = len(pte_pages(n)) + 1 + (1 if spawned else 0)
    return FAULT * n + 2 * tables


def expected_phase_traps(
    workload: str, mode: str, n: int, *, per_flush: int = 31, loops: int = DEFAULT_LOOPS
) -> dict[str, int]:
    """Every phase's traps of ``pvemu run --workload`` fork, exec or forkexec."""
    p1 = len(pte_pages(n))
    if workload == "fork":
        return {
            "populate": populate_traps(mode, n),
            "fork": fork_traps(mode, n, per_flush),
            "context_switch": per_fault(mode, 1),
            "cow_copy": per_fault(mode, COW_COPY) * len(range(0, n, 2)),
            "exit": exit_traps(mode, p1),
            "cow_reuse": per_fault(mode, COW_REUSE) * len(range(1, n, 2)),
        }
    if workload == "exec":
        return {
            "context_switch": per_fault(mode, 1),
            "populate": populate_traps(mode, n, spawned=True),
            "exec": exec_traps(mode, n),
            "exit": exit_traps(mode, 1),  # the new image: one PTE page
        }
    assert workload == "forkexec", workload
    return {
        "populate": populate_traps(mode, n),
        "fork": loops * fork_traps(mode, n, per_flush),
        "context_switch": loops * per_fault(mode, 1),
        "exec": loops * exec_traps(mode, n),
        "exit": loops * exit_traps(mode, 1),
        "cow_reuse": loops * per_fault(mode, COW_REUSE) * n,
    }


async def make_kernel(mode: str, memory_mib: int = 48) -> Kernel:
    hv = Hypervisor(memory_mib + 8)
    domain = await loopback_domain(hv, memory_mib=memory_mib, vcpus=2)
    return kernel_for(domain, mode)


async def run(mode: str, workload: Workload, n: int, **params: int) -> WorkloadResult:
    """``workload`` over ``n`` pages in ``mode`` (native: no hypervisor)."""
    if mode == "native":
        async with boot(mode="native", memory_mib=48) as kernel:
            return await workload(kernel, n, **params)
    return await workload(await make_kernel(mode), n, **params)


def traps(result: WorkloadResult) -> dict[str, int]:
    return {name: phase.counts["traps"] for name, phase in result.phases.items()}


def assert_valid(result: WorkloadResult) -> None:
    assert result.counts_agree, {
        n: (p.counts.traps, p.guest_traps) for n, p in result.phases.items()
    }
    assert result.audit_clean, result.audit


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_fork_workload_counts(mode: str, n: int) -> None:
    result = await run(mode, run_fork_workload, n)
    assert traps(result) == expected_phase_traps("fork", mode, n)
    assert result.phases["cow_copy"].counts["page_faults"] == len(range(0, n, 2))
    assert result.phases["cow_reuse"].counts["page_faults"] == len(range(1, n, 2))
    assert_valid(result)


@pytest.mark.parametrize("n", [1, 513])
@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_exec_workload_counts(mode: str, n: int) -> None:
    result = await run(mode, run_exec_workload, n)
    assert traps(result) == expected_phase_traps("exec", mode, n)
    assert_valid(result)


@pytest.mark.parametrize("mode", MODE_NAMES)
async def test_forkexec_loop_counts(mode: str) -> None:
    n, loops = 600, 3
    result = await run(mode, run_forkexec_workload, n, loops=loops)
    assert traps(result) == expected_phase_traps("forkexec", mode, n, loops=loops)
    assert_valid(result)


@pytest.mark.parametrize("mode", ["xen", "batched"])
async def test_pin_batch_crosses_32_entries(mode: str) -> None:
    """7000 pages: P1 = 14, so the child's pin is 34 entries: two batches in
    Linux's buffer, one multicall in batched."""
    n = 7000
    result = await run_fork_workload(await make_kernel(mode, memory_mib=96), n)
    assert traps(result)["fork"] == fork_traps(mode, n)
    assert traps(result)["exit"] == exit_traps(mode, 14)
    assert batches(2 * 14 + 6) == 2
    assert_valid(result)


async def test_xen_fork_matches_the_reference_worked_example_shape() -> None:
    """The multicall entries of the pin and unpin, not just their traps."""
    n = 1100  # P1 = 3
    result = await run_fork_workload(await make_kernel("xen"), n)
    fork = result.phases["fork"].counts
    # pin: 2·3 + 6 = 12 entries in one multicall; the child's records ride
    # in mmu_update calls of their own (not multicall entries).
    assert fork["multicall_entries"] == 12
    assert fork["ptwr"] == n
    exit_ = result.phases["exit"].counts
    assert exit_["multicall_entries"] == 2 * 3 + 5
