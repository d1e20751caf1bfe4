"""pv-ops backends: what each page-table hook costs in each mode (DESIGN §5).

| mode | start / commit per PTE | batching |
|---|---|---|
| native | xchg / store, no hypervisor | none |
| trap | trapped xchg (get_and_clear) / mmu_update count=1 | none |
| ptwr | trapped xchg / trapped store (writable page tables) | none |
| xen | plain read / queued PRESERVE_AD record | Linux's multicall buffer |
| batched | plain read / queued PRESERVE_AD record | a PTE page per flush, TLB flush folded |
| naive | plain read / queued NORMAL record | as batched; UNSAFE: loses A/D bits |

One backend instance serves one vCPU: lazy-MMU state is per CPU in Linux.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from pvemu.shared import abi
from pvemu.shared.x86 import PAGE_SIZE, maddr_of_entry

from .lazy import McBuffer, lazy_for_mode
from .machine import Machine, NativeMachine

MODES: Final = ("native", "trap", "ptwr", "xen", "batched", "naive")
UNSAFE_MODES: Final = frozenset({"naive"})
#: Modern x86: up to this many pages one INVLPG each, else a full flush.
TLB_SINGLE_PAGE_FLUSH_CEILING: Final = 33

_PIN: Final = {
    1: abi.MMUEXT_PIN_L1_TABLE,
    2: abi.MMUEXT_PIN_L2_TABLE,
    3: abi.MMUEXT_PIN_L3_TABLE,
    4: abi.MMUEXT_PIN_L4_TABLE,
}


class HypercallFailed(Exception):
    """A hypercall the kernel relies on failed: a kernel BUG in Linux."""


def tlb_flush_ops(vas: Sequence[int]) -> list[tuple[int, int, int]]:
    """Linux's flush for a range: one INVLPG per page up to the ceiling, else
    one full flush; every vCPU of the domain (the mm's cpumask)."""
    if len(vas) <= TLB_SINGLE_PAGE_FLUSH_CEILING:
        return [(abi.MMUEXT_INVLPG_ALL, va, 0) for va in vas]
    return [(abi.MMUEXT_TLB_FLUSH_ALL, 0, 0)]


class PvOps:
    """The hooks the kernel calls; this base class is the Xen PV default:
    immediate hypercalls, no batching."""

    name = "trap"
    unsafe = False
    folds_tlb_flush = False

    def __init__(self, machine: Machine, vcpu: int = 0) -> None:
        self.machine = machine
        self.vcpu = vcpu

    async def _mmu(self, reqs: Sequence[tuple[int, int]]) -> None:
        rc, done = await self.machine.mmu_update(reqs, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"mmu_update failed: {abi.errno_name(rc)} after {done}")

    async def _ext(self, ops: Sequence[tuple[int, int, int]]) -> None:
        rc, done = await self.machine.mmuext_op(ops, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"mmuext_op failed: {abi.errno_name(rc)} after {done}")

    # --- table construction (outside lazy sections) ---------------------------

    async def set_pte(self, ptep: int, val: int) -> None:
        """Install a PTE now (the fault path): ``mmu_update`` count=1."""
        await self._mmu([(ptep, val)])

    async def set_upper(self, maddr: int, val: int) -> None:
        """Write an L2/L3/L4 entry (never emulated by Xen: always a hypercall)."""
        await self._mmu([(maddr, val)])

    async def pin_table(self, mfn: int, level: int) -> None:
        await self._ext([(_PIN[level], mfn, 0)])

    async def clear_frame(self, mfn: int) -> None:
        await self._ext([(abi.MMUEXT_CLEAR_PAGE, mfn, 0)])

    async def write_frame(self, mfn: int, data: bytes) -> None:
        """Fill a frame nothing maps yet: the guest's memory is read-only to
        it, so the copy is one mmu_update of 8-byte data words (untyped frame)."""
        words = memoryview(data).cast("Q")
        reqs = [(maddr_of_entry(mfn, i), int(w)) for i, w in enumerate(words) if w]
        if reqs:
            await self._mmu(reqs)

    # --- the mprotect transaction ------------------------------------------------

    async def ptep_get_and_clear(self, ptep: int) -> int:
        """Native xchg on a read-only page table: Xen emulates it (one trap)."""
        rc, old = await self.machine.ptwr(ptep, 0, exchange=True, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"trapped xchg at {ptep:#x} refused: {abi.errno_name(rc)}")
        return old

    async def modify_prot_start(self, ptep: int) -> int:
        return await self.ptep_get_and_clear(ptep)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        await self._mmu([(ptep, new)])

    async def lazy_enter(self) -> None:
        """No batching: nothing to do."""

    async def lazy_leave(self) -> None:
        """No batching: nothing queued."""

    def note_unlock(self, pte_page: int) -> None:
        """Checked by batching backends: nothing may stay queued past unlock."""

    async def flush_tlb(self, vas: Sequence[int]) -> None:
        """tlb_finish_mmu: each flush op is its own hypercall (non-lazy issue)."""
        for op in tlb_flush_ops(vas):
            await self._ext([op])

    def fold_tlb_flush(self, vas: Sequence[int]) -> None:
        raise NotImplementedError(f"{self.name} does not fold TLB flushes into a batch")

    def stats(self) -> dict[str, Any]:
        return {}


class TrapOps(PvOps):
    """Unbatched: trapped get_and_clear + mmu_update(count=1) per PTE."""

    name = "trap"


class PtwrOps(PvOps):
    """Writable page tables: both halves of the transaction are plain stores
    to a read-only page table, each trapped and emulated by Xen."""

    name = "ptwr"

    async def _store(self, ptep: int, val: int) -> None:
        rc, _ = await self.machine.ptwr(ptep, val, exchange=False, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"trapped store at {ptep:#x} refused: {abi.errno_name(rc)}")

    async def set_pte(self, ptep: int, val: int) -> None:
        await self._store(ptep, val)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        await self._store(ptep, new)


class BufferedOps(PvOps):
    """Linux's Xen backend: start is a plain read, commit queues a record in
    the lazy-MMU multicall buffer, lazy leave flushes (``guest.lazy``)."""

    name = "xen"

    def __init__(
        self,
        machine: Machine,
        vcpu: int = 0,
        *,
        max_entries: int | None = 32,
        max_arg_bytes: int | None = 512,
        records_per_flush: int | None = None,
    ) -> None:
        super().__init__(machine, vcpu)
        self.lazy = lazy_for_mode(
            self.name,
            max_entries=max_entries,
            max_arg_bytes=max_arg_bytes,
            records_per_flush=records_per_flush,
        )
        assert self.lazy.buffer is not None
        self.buffer: McBuffer = self.lazy.buffer

    async def _send_ready(self) -> None:
        """Send every flushed batch, in order, and hand back its results."""
        buf = self.buffer
        for batch in buf.take_ready():
            calls = batch.client_calls()
            if batch.multicall:
                results = await self.machine.multicall(calls, vcpu=self.vcpu)
            else:
                results = [await self._direct(calls[0])]
            buf.complete(batch, results)

    async def _direct(self, call: tuple[object, ...]) -> int:
        op = call[0]
        if op == abi.HYPERVISOR_mmu_update:
            rc, _ = await self.machine.mmu_update(call[1], vcpu=self.vcpu)  # type: ignore[arg-type]
            return rc
        if op == abi.HYPERVISOR_mmuext_op:
            rc, _ = await self.machine.mmuext_op(call[1], vcpu=self.vcpu)  # type: ignore[arg-type]
            return rc
        raise HypercallFailed(f"unexpected direct call {op}")

    async def set_pte(self, ptep: int, val: int) -> None:
        self.lazy.set_pte(ptep, val)
        await self._send_ready()

    async def modify_prot_start(self, ptep: int) -> int:
        self.lazy.start(ptep)
        return self.machine.read_u64(ptep)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        self.lazy.commit(ptep, new)
        await self._send_ready()

    async def lazy_enter(self) -> None:
        self.lazy.enter()

    async def lazy_leave(self) -> None:
        self.lazy.leave()
        await self._send_ready()

    def note_unlock(self, pte_page: int) -> None:
        self.lazy.check_unlock(pte_page)

    async def flush_tlb(self, vas: Sequence[int]) -> None:
        for cmd, arg1, arg2 in tlb_flush_ops(vas):
            self.buffer.queue_mmuext(cmd, arg1, arg2)
            self.lazy.issue()
            await self._send_ready()

    def stats(self) -> dict[str, Any]:
        return {"batching": self.buffer.stats.as_dict()}


class XenOps(BufferedOps):
    name = "xen"


class BatchedOps(BufferedOps):
    """A whole PTE page per hypercall, the TLB flush folded into the last one."""

    name = "batched"
    folds_tlb_flush = True

    def fold_tlb_flush(self, vas: Sequence[int]) -> None:
        """Queue the flush ops in the open section: they ride in its multicall."""
        if not self.lazy.active:
            raise HypercallFailed("a folded TLB flush needs an open lazy section")
        for cmd, arg1, arg2 in tlb_flush_ops(vas):
            self.buffer.queue_mmuext(cmd, arg1, arg2, extend=True)


class NaiveOps(BatchedOps):
    """UNSAFE: commits with MMU_NORMAL_PT_UPDATE, overwriting the A/D bits the
    hardware set since the plain-read start. Exists to show the race."""

    name = "naive"
    unsafe = True


class NativeOps(PvOps):
    """Bare metal: xchg and stores into the kernel's own page tables."""

    name = "native"

    def __init__(self, machine: Machine, vcpu: int = 0) -> None:
        super().__init__(machine, vcpu)
        assert isinstance(machine, NativeMachine)
        self.native = machine

    async def set_pte(self, ptep: int, val: int) -> None:
        self.native.write_u64(ptep, val)

    async def set_upper(self, maddr: int, val: int) -> None:
        self.native.write_u64(maddr, val)

    async def pin_table(self, mfn: int, level: int) -> None:
        """Bare metal needs no pinning."""

    async def clear_frame(self, mfn: int) -> None:
        self.native.write_bytes(mfn * PAGE_SIZE, bytes(PAGE_SIZE))

    async def write_frame(self, mfn: int, data: bytes) -> None:
        self.native.write_bytes(mfn * PAGE_SIZE, data)

    async def ptep_get_and_clear(self, ptep: int) -> int:
        return self.native.xchg_u64(ptep, 0)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        self.native.write_u64(ptep, new)

    async def flush_tlb(self, vas: Sequence[int]) -> None:
        hw = self.native.hw
        if len(vas) > TLB_SINGLE_PAGE_FLUSH_CEILING:
            hw.flush_tlb_all()
            self.native.oracle.flushed_all()
            return
        for va in vas:
            hw.invlpg_all(va)
            self.native.oracle.flushed_page(va)


_BACKENDS: Final[dict[str, type[PvOps]]] = {
    "native": NativeOps,
    "trap": TrapOps,
    "ptwr": PtwrOps,
    "xen": XenOps,
    "batched": BatchedOps,
    "naive": NaiveOps,
}


def make_backend(mode: str, machine: Machine, vcpu: int = 0, **params: int) -> PvOps:
    """The backend for ``mode``; ``params`` (buffer limits) only for xen."""
    cls = _BACKENDS.get(mode)
    if cls is None:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if params and cls is not XenOps:
        raise ValueError(f"mode {mode!r} takes no buffer parameters")
    if issubclass(cls, BufferedOps):
        return cls(machine, vcpu, **params)
    return cls(machine, vcpu)
