"""The hypervisor core: domains, hypercall entry, preemption, user accesses.

Plain synchronous code over arrays (sans-I/O): the trio server feeds it
requests and sends back what it returns, and tests drive it directly.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Final

from pvemu.shared import abi, wire
from pvemu.shared.mmu import HardwareModel, RunOutcome
from pvemu.shared.oracle import RaceOracle
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_PRESENT,
    _PAGE_RW,
    PAGE_SHIFT,
    PAGE_SIZE,
    make_pte,
)

from .audit import audit_machine
from .counters import VcpuCounters, total
from .domain import Domain, MachineState
from .frametable import FrameTable
from .hypercalls import UNLIMITED, Budget, HypercallResult, dispatch, ptwr_write
from .memory import MachineMemory
from .pagetypes import XEN_SLOTS, PageTypes

if TYPE_CHECKING:
    from collections.abc import Generator, Iterable

FRAMES_PER_MIB: Final = (1 << 20) // PAGE_SIZE
MAX_VCPUS: Final = 64
#: First domid handed out; Xen's dom0 is 0, pvemu's guests are all domUs.
FIRST_DOMID: Final = 1


class DomainError(Exception):
    """A domain cannot be created or found (bad size, no memory, no domain)."""


class NoFaultToResume(DomainError):
    """A run with ``resume`` on a vCPU that has no page fault to return from:
    its last run did not fault, or it already returned (the guest's error;
    refused like any other request the vCPU's state does not allow)."""


class PendingCall:
    """A hypercall in progress, runnable in slices (Xen's continuation).

    ``step(budget)`` processes at most ``budget`` entries (at least one; all
    when None) and returns True when the call has finished; ``result`` is
    then set. The call spends the slice's :class:`Budget` in runs of entries
    and parks (yields) when it is used up, so one step may cover many entries
    with a single resumption. Stepping a call to the end in any slice sizes
    gives the same result as one uninterrupted run.
    """

    __slots__ = ("_budget", "_steps", "op", "result")

    def __init__(
        self, op: int, steps: Generator[None, None, HypercallResult], budget: Budget
    ) -> None:
        self.op = op
        self._steps = steps
        self._budget = budget
        self.result: HypercallResult | None = None

    @property
    def entries(self) -> int:
        """Entries processed so far, over every slice."""
        return self._budget.used

    def step(self, budget: int | None = None) -> bool:
        if self.result is not None:
            return True
        self._budget.left = UNLIMITED if budget is None else max(budget, 1)
        try:
            next(self._steps)
        except StopIteration as stop:
            self.result = stop.value
            return True
        return False

    def abandon(self) -> None:
        """Drop an unfinished call (its domain died): applied entries stay."""
        self._steps.close()


class Hypervisor:
    """Owns machine memory, the frame table and every domain."""

    def __init__(self, memory_mib: int = 256, *, seed: int = 0) -> None:
        if memory_mib <= 0:
            raise ValueError("memory_mib must be positive")
        frames = FrameTable(memory_mib * FRAMES_PER_MIB)
        memory = MachineMemory(frames, seed=seed)
        # Xen's own frame backs the reserved L4 slots; no guest may map it.
        _, (xen_mfn,) = memory.allocate(abi.DOMID_XEN, 1, "xen")
        xen_entry = make_pte(xen_mfn, _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED)
        types = PageTypes(
            frames,
            memory,
            [xen_entry] * len(XEN_SLOTS),
            on_retype=self._flush_owner,
            on_write=self._entry_written,
        )
        self.state = MachineState(frames, memory, types)
        self.xen_mfn = xen_mfn
        self._next_domid = FIRST_DOMID

    # --- domains ------------------------------------------------------------------------

    @property
    def domains(self) -> dict[int, Domain]:
        return self.state.domains

    def create_domain(self, memory_mib: int, vcpus: int, name: str = "") -> Domain:
        if not 1 <= vcpus <= MAX_VCPUS:
            raise DomainError(f"vcpus must be 1..{MAX_VCPUS}, got {vcpus}")
        if memory_mib <= 0:
            raise DomainError("memory_mib must be positive")
        nr_frames = memory_mib * FRAMES_PER_MIB
        if nr_frames > self.state.memory.free_frames:
            raise DomainError(
                f"not enough machine memory: {memory_mib} MiB asked, "
                f"{self.state.memory.free_frames // FRAMES_PER_MIB} MiB free"
            )
        domid = self._free_domid()
        memory, p2m = self.state.memory.allocate(domid, nr_frames, name or f"dom{domid}")
        # Mapped read-write here already; from now on nobody may map it writable.
        memory.seal()
        oracle = RaceOracle()
        domain = Domain(
            domid=domid,
            name=name or f"dom{domid}",
            p2m=p2m,
            memory=memory,
            hw=HardwareModel(
                self.state.memory,
                vcpus,
                on_dirty=lambda _vcpu, _va, pte_maddr: oracle.hardware_set_dirty(pte_maddr),
            ),
            counters=[VcpuCounters() for _ in range(vcpus)],
            cr3=[None] * vcpus,
            user_cr3=[None] * vcpus,
            ldt=[(0, 0)] * vcpus,
            secret=secrets.token_bytes(16),
            oracle=oracle,
        )
        self.state.domains[domid] = domain
        return domain

    def _free_domid(self) -> int:
        """Xen's rover: the first unused id from the one after the last handed
        out, wrapping below the reserved ids (so every domid fits the frame
        table's int16 owner field)."""
        span = abi.DOMID_FIRST_RESERVED - FIRST_DOMID
        for step in range(span):
            domid = FIRST_DOMID + (self._next_domid - FIRST_DOMID + step) % span
            if domid not in self.state.domains:
                self._next_domid = domid + 1
                return domid
        raise DomainError("every domain id is in use")

    def domain(self, domid: int) -> Domain:
        try:
            return self.state.domains[domid]
        except KeyError:
            raise DomainError(f"no domain {domid}") from None

    def destroy_domain(self, domid: int) -> None:
        """Tear a domain down and return every frame it owned to the pool.

        Drops base pointers and pins; page-table trees are then released
        iteratively by the type-count teardown, so the counts stay exact.
        """
        domain = self.domain(domid)
        domain.dead = True
        types = self.state.types
        for bases in (domain.cr3, domain.user_cr3):
            for vcpu, base in enumerate(bases):
                if base is not None:
                    bases[vcpu] = None
                    types.put_page_and_type(base)
        for mfn in self.state.memory.pinned_frames(domain.p2m):
            types.unpin(mfn, domid)
        del self.state.domains[domid]
        self.state.memory.release(domid, domain.p2m)

    def _flush_owner(self, owner: int) -> None:
        domain = self.state.domains.get(owner)
        if domain is not None:
            domain.hw.flush_tlb_all()
            domain.oracle.flushed_all()

    def _entry_written(self, maddr: int, value: int) -> None:
        domain = self.state.domains.get(self.state.frames.owner[maddr >> 12])
        if domain is not None:
            domain.oracle.pte_written(maddr, value)

    # --- hypercalls -----------------------------------------------------------------------

    def start_hypercall(self, domid: int, vcpu: int, call: wire.Call) -> PendingCall:
        """Count the trap and return the call, ready to be stepped."""
        domain = self._vcpu_domain(domid, vcpu)
        domain.counters[vcpu].hypercalls[call.op] += 1
        budget = Budget()
        return PendingCall(call.op, dispatch(self.state, domain, vcpu, call.args, budget), budget)

    def hypercall(self, domid: int, vcpu: int, call: wire.Call) -> HypercallResult:
        """Run a hypercall to completion."""
        pending = self.start_hypercall(domid, vcpu, call)
        pending.step()
        assert pending.result is not None
        return pending.result

    def ptwr_write(
        self,
        domid: int,
        vcpu: int,
        maddr: int,
        val: int,
        *,
        exchange: bool = False,
        clear_bits: int = 0,
    ) -> tuple[int, int]:
        """A trapped write into a page table (``clear_bits``: an atomic clear
        of those bits instead, ``val`` 0, as ``wire.Ptwr`` says)."""
        if clear_bits and val:
            raise ValueError("a ptwr with clear_bits carries no value (val must be 0)")
        domain = self._vcpu_domain(domid, vcpu)
        return ptwr_write(self.state, domain, vcpu, maddr, val, exchange, clear_bits)

    # --- the hardware -------------------------------------------------------------------------

    def run_user(
        self,
        domid: int,
        vcpu: int,
        accesses: Iterable[tuple[int, str, bytes | int]],
        *,
        resume: bool = False,
    ) -> RunOutcome:
        """Run user accesses on a vCPU; a page fault is a trap to the guest.

        ``resume``: the guest kernel returns to user mode after handling the
        vCPU's pending fault with ``HYPERVISOR_iret``, a trap of its own
        (64-bit PV: docs/sources.md §1), counted before the accesses run.
        Raises NoFaultToResume, counting nothing, when no fault is pending.
        """
        domain = self._vcpu_domain(domid, vcpu)
        counters = domain.counters[vcpu]
        if resume:
            if not domain.fault_pending[vcpu]:
                raise NoFaultToResume(f"vCPU {vcpu} has no page fault to return from")
            counters.hypercalls[abi.HYPERVISOR_iret] += 1
        counters.user_runs += 1
        stale_before = len(domain.hw.stale_writes)
        outcome = domain.hw.run(vcpu, accesses)
        for stale in domain.hw.stale_writes[stale_before:]:
            domain.oracle.stale_write(stale.va, stale.pte_maddr)
        counters.user_accesses += outcome.executed
        faulted = outcome.fault is not None
        if faulted:
            counters.page_faults += 1
        domain.fault_pending[vcpu] = faulted
        return outcome

    def kernel_write(self, domid: int, vcpu: int, maddr: int, data: bytes) -> int:
        """A plain store of the guest kernel through its linear map: 0, or
        -EFAULT (nothing written) where that store would fault.

        Not a trap: the hypervisor only plays the MMU. The store lands iff
        the frame is the caller's, its linear mapping is writable and it is
        not a page table in use (Xen never lets a page table be mapped
        writable, so such a store faults even where the guest forgot to
        remap it read-only). It must stay within one frame.
        """
        domain = self._vcpu_domain(domid, vcpu)
        counters = domain.counters[vcpu]
        counters.kernel_writes += 1
        ft = self.state.frames
        mfn = maddr >> PAGE_SHIFT
        if (
            not data
            or (maddr & (PAGE_SIZE - 1)) + len(data) > PAGE_SIZE
            or not ft.valid(mfn)
            or ft.owner[mfn] != domid
            or ft.linear_ro(mfn)
            or ft.table_in_use(mfn)
        ):
            return -abi.EFAULT
        self.state.memory.write_bytes(maddr, data)
        counters.kernel_write_bytes += len(data)
        return 0

    # --- queries ---------------------------------------------------------------------------------

    def stats(self, domid: int) -> dict[str, object]:
        domain = self.domain(domid)
        hw = domain.hw.stats
        return {
            "domid": domid,
            "vcpus": {str(v): c.as_dict() for v, c in enumerate(domain.counters)},
            "total": total(domain.counters).as_dict(),
            "hardware": {
                "tlb_hits": hw.tlb_hits,
                "tlb_misses": hw.tlb_misses,
                "walks": hw.walks,
                "page_faults": hw.page_faults,
                "accessed_set": hw.accessed_set,
                "dirty_set": hw.dirty_set,
                "tlb_flushes": hw.tlb_flushes,
                "invlpgs": hw.invlpgs,
                **domain.oracle.as_dict(),
            },
            "free_frames": self.state.memory.free_frames,
        }

    def audit(self) -> list[str]:
        """Every invariant of docs/sources.md §7, recomputed from the tables."""
        return audit_machine(self.state, self.xen_mfn)

    def _vcpu_domain(self, domid: int, vcpu: int) -> Domain:
        domain = self.domain(domid)
        if not 0 <= vcpu < domain.nr_vcpus:
            raise DomainError(f"domain {domid} has no vCPU {vcpu}")
        return domain
