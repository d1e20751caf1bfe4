"""Trap counters, per vCPU, split by kind (docs/sources.md §1).

A trap is every guest -> hypervisor transition: each top-level hypercall (a
multicall is one, whatever it carries; the iret back to user mode after a page
fault is one too), each emulated page-table write and each page fault reflected
to the guest (``shared.counts.trap_count``, the formula the
guest's own count uses too). What only drives the emulation (user
accesses, the kernel's stores through its linear map, stats, audit) is
counted apart and is not a trap.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from pvemu.shared.abi import COUNTED_HYPERCALL_NAMES
from pvemu.shared.counts import trap_count


@dataclass(slots=True)
class VcpuCounters:
    hypercalls: Counter[int] = field(default_factory=Counter)
    multicall_entries: int = 0
    multicall_ops: Counter[int] = field(default_factory=Counter)
    mmu_update_records: int = 0
    #: of which ``MMU_PT_XCHG_PVEMU`` (pvemu's exchange extension)
    mmu_xchg_records: int = 0
    mmuext_ops: int = 0
    ptwr: int = 0
    page_faults: int = 0
    tlb_flush_ops: int = 0
    # not traps: requests that only drive the emulation
    user_runs: int = 0
    user_accesses: int = 0
    #: plain stores of the guest kernel through its linear map (requests,
    #: and the bytes that were written: a faulting store writes none)
    kernel_writes: int = 0
    kernel_write_bytes: int = 0
    queries: int = 0

    @property
    def traps(self) -> int:
        return trap_count(sum(self.hypercalls.values()), self.ptwr, self.page_faults)

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        return {
            "traps": self.traps,
            "hypercalls": sum(self.hypercalls.values()),
            "hypercalls_by_op": by_op(self.hypercalls),
            "multicall_entries": self.multicall_entries,
            "multicall_ops": by_op(self.multicall_ops),
            "mmu_update_records": self.mmu_update_records,
            "mmu_xchg_records": self.mmu_xchg_records,
            "mmuext_ops": self.mmuext_ops,
            "ptwr": self.ptwr,
            "page_faults": self.page_faults,
            "tlb_flush_ops": self.tlb_flush_ops,
            "user_runs": self.user_runs,
            "user_accesses": self.user_accesses,
            "kernel_writes": self.kernel_writes,
            "kernel_write_bytes": self.kernel_write_bytes,
            "queries": self.queries,
        }


def by_op(counts: Counter[int]) -> dict[str, int]:
    """Counts keyed by hypercall number (the ones pvemu serves, and ``"23"``,
    the iret it counts on a resuming ``run_user``); any other number is
    summed under ``"other"``, so a guest cannot grow the map (and its stats
    reply) without bound by calling made-up hypercalls."""
    out: dict[str, int] = {}
    for op, n in sorted(counts.items()):
        key = str(op) if op in COUNTED_HYPERCALL_NAMES else "other"
        out[key] = out.get(key, 0) + n
    return out


def total(counters: list[VcpuCounters]) -> VcpuCounters:
    """Sum of several vCPUs' counters."""
    out = VcpuCounters()
    for c in counters:
        out.hypercalls.update(c.hypercalls)
        out.multicall_ops.update(c.multicall_ops)
        out.multicall_entries += c.multicall_entries
        out.mmu_update_records += c.mmu_update_records
        out.mmu_xchg_records += c.mmu_xchg_records
        out.mmuext_ops += c.mmuext_ops
        out.ptwr += c.ptwr
        out.page_faults += c.page_faults
        out.tlb_flush_ops += c.tlb_flush_ops
        out.user_runs += c.user_runs
        out.user_accesses += c.user_accesses
        out.kernel_writes += c.kernel_writes
        out.kernel_write_bytes += c.kernel_write_bytes
        out.queries += c.queries
    return out
