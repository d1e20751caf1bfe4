"""pv-ops backends: what each page-table hook costs (docs/sources.md §2).

:class:`PvOps` is the set of hooks the kernel calls. :class:`TrapOps` and
its subclasses run on a PV domain and reach the hypervisor through the
client's :class:`~pvemu.guest.client.Domain`, every hypercall a typed
:class:`~pvemu.shared.wire.Call`; :class:`NativeOps` runs on bare metal
(:class:`~pvemu.guest.machine.NativeMachine`) and never traps. Which
backend, buffer and commit command each mode uses is declared once, in
:mod:`pvemu.guest.modes`.

One backend instance serves one vCPU: lazy-MMU state is per CPU in Linux.

The mprotect transaction has two forms: one PTE at a time
(``modify_prot_start`` / ``modify_prot_commit``, Linux's loop, which ``trap``,
``ptwr`` and ``xen`` keep because reproducing it is their point) and, where
a backend has :attr:`PvOps.range_form`, a run of one PTE page at once
(``modify_prot_start_ptes`` / ``modify_prot_commit_ptes``) over numpy
arrays: the same records, flushes and page tables without a Python call
per PTE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from pvemu.shared import abi, wire
from pvemu.shared.x86 import PAGE_SHIFT, PAGE_SIZE, maddr_of_entry

from .lazy import LazyMmu
from .machine import NativeMachine
from .multicall import FLUSH_CONTEXT_SWITCH, McBuffer

if TYPE_CHECKING:
    from .client import Domain
    from .ptes import Indexes, Ptes

#: Modern x86: up to this many pages one INVLPG each, else a full flush.
TLB_SINGLE_PAGE_FLUSH_CEILING: Final = 33

_PIN: Final = {
    1: abi.MMUEXT_PIN_L1_TABLE,
    2: abi.MMUEXT_PIN_L2_TABLE,
    3: abi.MMUEXT_PIN_L3_TABLE,
    4: abi.MMUEXT_PIN_L4_TABLE,
}


def switch_mm_ops(l4: int, user_l4: int, *, pin: bool = False) -> list[tuple[int, int, int]]:
    """A CR3 load as ``xen_write_cr3`` queues it: ``NEW_BASEPTR`` and
    ``NEW_USER_BASEPTR`` (0: none) in one ``mmuext_op``; with ``pin``, the
    L4 is pinned first in the same call (the kernel's own tree, built on
    first use)."""
    ops = [(abi.MMUEXT_PIN_L4_TABLE, l4, 0)] if pin else []
    ops += [(abi.MMUEXT_NEW_BASEPTR, l4, 0), (abi.MMUEXT_NEW_USER_BASEPTR, user_l4, 0)]
    return ops


def unpin_ops(l4: int, tables: Sequence[int]) -> list[tuple[int, int, int]]:
    """Unpin a tree: its L4 first (Xen drops the tree's type references),
    then each table pinned on its own, parents before children."""
    return [(abi.MMUEXT_UNPIN_TABLE, mfn, 0) for mfn in (l4, *tables)]


class HypercallFailed(Exception):
    """A hypercall the kernel relies on failed: a kernel BUG in Linux."""


def tlb_flush_ops(vas: Sequence[int]) -> list[tuple[int, int, int]]:
    """Linux's flush for a range: one INVLPG per page up to the ceiling, else
    one full flush; every vCPU of the domain (the mm's cpumask)."""
    if len(vas) <= TLB_SINGLE_PAGE_FLUSH_CEILING:
        return [(abi.MMUEXT_INVLPG_ALL, va, 0) for va in vas]
    return [(abi.MMUEXT_TLB_FLUSH_ALL, 0, 0)]


class TlbGather:
    """The pages an mprotect must flush (Linux's ``mmu_gather`` range).

    Past the single-page ceiling the flush is a full one whatever the pages
    were, so only the first ``ceiling + 1`` addresses are kept: the range form
    adds a PTE page's pages at once and no list grows by one per PTE.
    """

    __slots__ = ("vas",)

    def __init__(self) -> None:
        #: The pages to flush, at most ``TLB_SINGLE_PAGE_FLUSH_CEILING + 1``.
        self.vas: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.vas)

    def add(self, va: int) -> None:
        if len(self.vas) <= TLB_SINGLE_PAGE_FLUSH_CEILING:
            self.vas.append(va)

    @property
    def room(self) -> int:
        """How many more pages change the flush (none once it is a full one)."""
        return TLB_SINGLE_PAGE_FLUSH_CEILING + 1 - len(self.vas)

    def add_run(self, start: int, pages: Indexes) -> None:
        """Add ``start + page * PAGE_SIZE`` for each of ``pages`` (ascending)."""
        self.vas.extend(start + (p << PAGE_SHIFT) for p in pages[: self.room].tolist())


class PvOps:
    """The hooks the kernel calls, per vCPU. Defaults fit a backend with no
    batching; the hooks every backend must provide raise here."""

    name = "?"
    folds_tlb_flush = False
    #: Has ``modify_prot_start_ptes`` / ``modify_prot_commit_ptes``: the kernel
    #: changes a PTE page's run at once instead of calling the per-PTE hooks.
    range_form = False

    def __init__(self, vcpu: int = 0) -> None:
        self.vcpu = vcpu

    # --- table construction (outside lazy sections) ---------------------------

    async def set_pte(self, ptep: int, val: int) -> None:
        """Install a PTE now (the fault path)."""
        raise NotImplementedError

    async def set_upper(self, maddr: int, val: int) -> None:
        """Write an L2/L3/L4 entry."""
        raise NotImplementedError

    async def pin_table(self, mfn: int, level: int) -> None:
        raise NotImplementedError

    async def clear_frame(self, mfn: int) -> None:
        raise NotImplementedError

    # --- processes -------------------------------------------------------------

    async def switch_mm(self, l4: int, user_l4: int, *, pin: bool = False) -> None:
        """Load ``l4`` as this vCPU's base pointer (``user_l4`` the user
        one, 0 for none): a context switch's CR3 write, a full local TLB
        flush. ``pin`` pins ``l4`` first."""
        raise NotImplementedError

    async def unpin_tree(self, l4: int, tables: Sequence[int]) -> None:
        """Unpin the tree rooted at ``l4`` and the ``tables`` pinned on their
        own (exit): after it the tree is plain memory."""
        raise NotImplementedError

    async def write_frame(self, mfn: int, data: bytes) -> None:
        """Fill a frame nothing maps yet."""
        raise NotImplementedError

    # --- the mprotect transaction ------------------------------------------------

    async def ptep_get_and_clear(self, ptep: int) -> int:
        raise NotImplementedError

    async def modify_prot_start(self, ptep: int) -> int:
        return await self.ptep_get_and_clear(ptep)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        raise NotImplementedError

    async def modify_prot_start_ptes(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """Start the transactions on entries ``indexes`` of the PTE page in
        frame ``table``; ``seen`` is what the kernel just read of them under
        the lock. Returns their values (what ``modify_prot_start`` returns)."""
        raise NotImplementedError(f"{self.name} has no range form")

    async def modify_prot_commit_ptes(
        self, table: int, indexes: Indexes, old: Ptes, new: Ptes
    ) -> None:
        """Commit ``new`` to the run :meth:`modify_prot_start_ptes` started."""
        raise NotImplementedError(f"{self.name} has no range form")

    async def lazy_enter(self) -> None:
        """No batching: nothing to do."""

    async def lazy_leave(self) -> None:
        """No batching: nothing queued."""

    def note_unlock(self, pte_page: int) -> None:
        """Checked by batching backends: nothing may stay queued past unlock."""

    async def flush_tlb(self, vas: Sequence[int]) -> None:
        raise NotImplementedError

    def fold_tlb_flush(self, vas: Sequence[int]) -> None:
        raise NotImplementedError(f"{self.name} does not fold TLB flushes into a batch")

    def stats(self) -> dict[str, Any]:
        return {}


class TrapOps(PvOps):
    """The Xen PV default: every hook an immediate hypercall, no batching;
    the mprotect start is a trapped get_and_clear, the commit an
    ``mmu_update`` of one record."""

    name = "trap"

    def __init__(self, domain: Domain, vcpu: int = 0) -> None:
        super().__init__(vcpu)
        self.domain = domain

    async def _call(self, call: wire.Call) -> int:
        """One hypercall; its rc (a multicall's is 0 and its entries' are
        checked by the buffer)."""
        reply = await self.domain.call(call, vcpu=self.vcpu)
        if isinstance(reply, wire.Result) and reply.rc:
            raise HypercallFailed(
                f"{abi.HYPERCALL_NAMES.get(call.op, call.op)} failed: "
                f"{abi.errno_name(reply.rc)} after {reply.done}"
            )
        return reply.rc

    async def _mmu(self, reqs: Sequence[tuple[int, int]]) -> None:
        await self._call(
            wire.Call(abi.HYPERVISOR_mmu_update, wire.MmuUpdateArgs(wire.pack_mmu_updates(reqs)))
        )

    async def _ext(self, ops: Sequence[tuple[int, int, int]]) -> None:
        await self._call(wire.Call(abi.HYPERVISOR_mmuext_op, wire.MmuextOpArgs(tuple(ops))))

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

    async def switch_mm(self, l4: int, user_l4: int, *, pin: bool = False) -> None:
        """One ``mmuext_op``: one trap."""
        await self._ext(switch_mm_ops(l4, user_l4, pin=pin))

    async def unpin_tree(self, l4: int, tables: Sequence[int]) -> None:
        """One ``mmuext_op`` carrying every unpin: one trap."""
        await self._ext(unpin_ops(l4, tables))

    async def write_frame(self, mfn: int, data: bytes) -> None:
        """Fill a frame nothing maps yet: the guest's memory is read-only to
        it, so the copy is one mmu_update of 8-byte data words (untyped frame)."""
        words = memoryview(data).cast("Q")
        reqs = [(maddr_of_entry(mfn, i), int(w)) for i, w in enumerate(words) if w]
        if reqs:
            await self._mmu(reqs)

    async def ptep_get_and_clear(self, ptep: int) -> int:
        """Native xchg on a read-only page table: Xen emulates it (one trap)."""
        rc, old = await self.domain.ptwr_exchange(ptep, 0, exchange=True, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"trapped xchg at {ptep:#x} refused: {abi.errno_name(rc)}")
        return old

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        await self._mmu([(ptep, new)])

    async def flush_tlb(self, vas: Sequence[int]) -> None:
        """tlb_finish_mmu: each flush op is its own hypercall (non-lazy issue)."""
        for op in tlb_flush_ops(vas):
            await self._ext([op])


class PtwrOps(TrapOps):
    """Writable page tables: both halves of the transaction are plain stores
    to a read-only page table, each trapped and emulated by Xen."""

    name = "ptwr"

    async def _store(self, ptep: int, val: int) -> None:
        rc, _ = await self.domain.ptwr_exchange(ptep, val, exchange=False, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"trapped store at {ptep:#x} refused: {abi.errno_name(rc)}")

    async def set_pte(self, ptep: int, val: int) -> None:
        await self._store(ptep, val)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        await self._store(ptep, new)


class BufferedOps(TrapOps):
    """Linux's Xen backend: start is a plain read, commit queues a record in
    the lazy-MMU multicall buffer, lazy leave flushes (``guest.lazy``,
    ``guest.multicall``). The buffer and its policy come from the mode."""

    name = "xen"

    def __init__(self, domain: Domain, vcpu: int, lazy: LazyMmu) -> None:
        super().__init__(domain, vcpu)
        assert lazy.buffer is not None
        self.lazy = lazy
        self.buffer: McBuffer = lazy.buffer

    async def _send_ready(self) -> None:
        """Send every flushed batch, in order, and hand back its results."""
        buf = self.buffer
        if not buf.has_ready:
            return
        for batch in buf.take_ready():
            reply = await self.domain.call(batch.hypercall(), vcpu=self.vcpu)
            if isinstance(reply, wire.MulticallResult):
                buf.complete(batch, reply.results)
            else:
                buf.complete(batch, [reply.rc])

    async def set_pte(self, ptep: int, val: int) -> None:
        self.lazy.set_pte(ptep, val)
        await self._send_ready()

    async def modify_prot_start(self, ptep: int) -> int:
        self.lazy.start(ptep)
        return self.domain.read_u64(ptep)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        self.lazy.commit(ptep, new)
        if self.buffer.has_ready:  # the buffer filled up and flushed: send it now
            await self._send_ready()

    async def modify_prot_start_ptes(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """Xen's start is a plain read: the kernel's read of the run is it."""
        self.lazy.start_ptes(table, indexes)
        return seen

    async def modify_prot_commit_ptes(
        self, table: int, indexes: Indexes, old: Ptes, new: Ptes
    ) -> None:
        self.lazy.commit_ptes(table, indexes, new)
        await self._send_ready()

    async def switch_mm(self, l4: int, user_l4: int, *, pin: bool = False) -> None:
        """Linux's context switch: leave a lazy-MMU section (flushing), queue
        the base pointers as one multicall entry (``xen_write_cr3``), flush
        at the end of the switch (``xen_end_context_switch``), and re-enter
        the section if one was open."""
        self.lazy.pause()
        buf = self.buffer
        for i, (cmd, arg1, arg2) in enumerate(switch_mm_ops(l4, user_l4, pin=pin)):
            buf.queue_mmuext(cmd, arg1, arg2, extend=i > 0)
        buf.flush(FLUSH_CONTEXT_SWITCH)
        self.lazy.resume()
        await self._send_ready()

    async def unpin_tree(self, l4: int, tables: Sequence[int]) -> None:
        """The unpins extend one ``mmuext_op`` entry (``xen_extend_mmuext_op``),
        issued at once (``xen_mc_issue(0)``)."""
        buf = self.buffer
        for cmd, arg1, arg2 in unpin_ops(l4, tables):
            buf.queue_mmuext(cmd, arg1, arg2, extend=True)
        buf.issue(lazy=False)
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
    """Linux on Xen: the per-PTE loop, each record queued as it is committed
    (a flush of the 512-byte buffer may come between two PTEs)."""

    name = "xen"


class BatchedOps(BufferedOps):
    """A whole PTE page per hypercall, the TLB flush folded into the last one;
    the page's run is read, changed and queued as arrays."""

    name = "batched"
    folds_tlb_flush = True
    range_form = True

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


class NativeOps(PvOps):
    """Bare metal: xchg and stores into the kernel's own page tables (a run
    of a PTE page at once in the range form)."""

    name = "native"
    range_form = True

    def __init__(self, machine: NativeMachine, vcpu: int = 0) -> None:
        super().__init__(vcpu)
        self.native = machine

    async def set_pte(self, ptep: int, val: int) -> None:
        self.native.write_u64(ptep, val)

    async def set_upper(self, maddr: int, val: int) -> None:
        self.native.write_u64(maddr, val)

    async def pin_table(self, mfn: int, level: int) -> None:
        """Bare metal needs no pinning."""

    async def clear_frame(self, mfn: int) -> None:
        self.native.write_bytes(mfn * PAGE_SIZE, bytes(PAGE_SIZE))

    async def switch_mm(self, l4: int, user_l4: int, *, pin: bool = False) -> None:
        """A local CR3 load (a full local TLB flush): no trap."""
        self.native.hw.set_cr3(self.vcpu, l4)

    async def unpin_tree(self, l4: int, tables: Sequence[int]) -> None:
        """Bare metal pins nothing."""

    async def write_frame(self, mfn: int, data: bytes) -> None:
        self.native.write_bytes(mfn * PAGE_SIZE, data)

    async def ptep_get_and_clear(self, ptep: int) -> int:
        return self.native.xchg_u64(ptep, 0)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        self.native.write_u64(ptep, new)

    async def modify_prot_start_ptes(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """Each start is an xchg with 0: the values come back from memory."""
        return self.native.xchg_ptes(table, indexes)

    async def modify_prot_commit_ptes(
        self, table: int, indexes: Indexes, old: Ptes, new: Ptes
    ) -> None:
        self.native.write_ptes(table, indexes, new)

    async def flush_tlb(self, vas: Sequence[int]) -> None:
        hw = self.native.hw
        if len(vas) > TLB_SINGLE_PAGE_FLUSH_CEILING:
            hw.flush_tlb_all()
            self.native.oracle.flushed_all()
            return
        for va in vas:
            hw.invlpg_all(va)
            self.native.oracle.flushed_page(va)


__all__ = [
    "TLB_SINGLE_PAGE_FLUSH_CEILING",
    "HypercallFailed",
    "switch_mm_ops",
    "tlb_flush_ops",
    "unpin_ops",
    "TlbGather",
    "PvOps",
    "TrapOps",
    "PtwrOps",
    "BufferedOps",
    "XenOps",
    "BatchedOps",
    "NaiveOps",
    "NativeOps",
]
