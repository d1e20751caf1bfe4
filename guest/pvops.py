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

import numpy as np

from pvemu.shared import abi, wire
from pvemu.shared.x86 import _PAGE_RW, PAGE_SHIFT, PTE_SIZE

from .lazy import LazyMmu
from .machine import NativeMachine
from .multicall import FLUSH_CONTEXT_SWITCH, McBuffer
from .pagetree import Entry
from .ptes import mmu_update_records
from .tlb import TLB_SINGLE_PAGE_FLUSH_CEILING, cpu_bit, tlb_flush_all_op, tlb_flush_ops

if TYPE_CHECKING:
    from .client import Domain
    from .ptes import Indexes, Mask, Ptes


def switch_mm_ops(l4: int, user_l4: int, *, pin: bool = False) -> list[tuple[int, int, int]]:
    """A CR3 load as ``xen_write_cr3`` queues it: ``NEW_BASEPTR`` and
    ``NEW_USER_BASEPTR`` (0: none) in one ``mmuext_op``; with ``pin``, the
    L4 is pinned first in the same call (the kernel's own tree, built on
    first use)."""
    ops = [(abi.MMUEXT_PIN_L4_TABLE, l4, 0)] if pin else []
    ops += [(abi.MMUEXT_NEW_BASEPTR, l4, 0), (abi.MMUEXT_NEW_USER_BASEPTR, user_l4, 0)]
    return ops


def queue_entries(buffer: McBuffer, entries: Sequence[Entry]) -> None:
    """Queue Linux's batch entries (``guest.pagetree``) on ``buffer``."""
    for kind, a, b, c in entries:
        if kind == "uvm":
            buffer.queue_update_va_mapping(a, b, c)
        else:
            buffer.queue_mmuext(a, b, extend=bool(c))


class HypercallFailed(Exception):
    """A hypercall the kernel relies on failed: a kernel BUG in Linux."""


_RW: Final = np.uint64(_PAGE_RW)


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
    #: Installs a PTE page's populated PTEs in one lazy-MMU section (pvemu's
    #: whole-page batch); else one immediate ``set_pte`` each, as Linux.
    batches_populate = False

    def __init__(self, vcpu: int = 0) -> None:
        self.vcpu = vcpu

    # --- table construction (outside lazy sections) ---------------------------

    async def set_pte(self, ptep: int, val: int) -> None:
        """Install a PTE now (the fault path)."""
        raise NotImplementedError

    async def set_upper(self, links: Sequence[tuple[int, int]]) -> None:
        """Write L2/L3/L4 entries ``(maddr, val)`` of a pinned tree (an L4
        entry and its user-L4 mirror together, as ``xen_set_p4d`` does)."""
        raise NotImplementedError

    async def send_batch(self, entries: Sequence[Entry]) -> None:
        """Send one of Linux's explicit multicall batches (a tree's pin or
        unpin, a table added to a pinned tree): issued at once
        (``xen_mc_issue(0)``), one hypercall per 32 entries in Linux's
        buffer, one in all in a whole-page batcher."""
        raise NotImplementedError

    # --- processes -------------------------------------------------------------

    async def switch_mm(
        self, l4: int, user_l4: int, *, pin: bool = False, before: Sequence[Entry] = ()
    ) -> None:
        """Load ``l4`` as this vCPU's base pointer (``user_l4`` the user
        one, 0 for none): a context switch's CR3 write, a full local TLB
        flush. ``pin`` pins ``l4`` first; ``before`` is a batch (a new
        tree's pin) the batching modes send in the same multicall."""
        raise NotImplementedError

    # --- fork ------------------------------------------------------------------

    async def ptep_set_wrprotect(self, ptep: int) -> int:
        """Clear RW in a live (pinned) PTE atomically, keeping any A/D bit the
        hardware sets meanwhile (x86 ``lock btr``); returns the old value."""
        raise NotImplementedError

    async def set_pte_unpinned(self, ptep: int, val: int) -> None:
        """Write a PTE of a tree nothing has pinned yet (fork's child, exec's
        new mm): ``set_pte``, which Xen applies unchecked to an untyped frame."""
        raise NotImplementedError

    async def fork_copy_run(
        self,
        parent: int,
        child: int,
        indexes: Indexes,
        seen: Ptes,
        wrprotect: Mask,
        child_vals: Ptes,
    ) -> None:
        """The range form of one PTE page's fork copy: entries ``indexes`` of
        the parent's PTE page ``parent`` were read as ``seen``; clear RW in
        those ``wrprotect`` marks and install ``child_vals`` at the same
        entries of the child's PTE page ``child``."""
        raise NotImplementedError(f"{self.name} has no range form")

    # --- the mprotect transaction ------------------------------------------------

    async def ptep_get_and_clear(self, ptep: int) -> int:
        raise NotImplementedError

    async def modify_prot_start(self, ptep: int) -> int:
        return await self.ptep_get_and_clear(ptep)

    # --- the zap (munmap, MADV_DONTNEED) -----------------------------------------

    async def zap_ptes(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """Clear entries ``indexes`` (ascending, all present; ``seen`` is the
        kernel's read of them under the lock) of the PTE page in frame
        ``table``, inside the caller's lazy section; returns their old
        values, A/D as the clear found them.

        The reference, Linux's own loop (``zap_present_ptes`` over
        ``ptep_get_and_clear_full``): one native XCHG per PTE, which no
        pv-op intercepts, so on a pinned table each is one trapped write
        that Xen emulates (``trap``, ``ptwr``, ``xen``)."""
        old = np.empty(len(indexes), dtype=np.uint64)
        base = table << PAGE_SHIFT
        for i, index in enumerate(indexes.tolist()):
            old[i] = await self.ptep_get_and_clear(base | (index * PTE_SIZE))
        return old

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

    async def flush_tlb(self, vas: Sequence[int], mask: int) -> None:
        """Flush pages ``vas`` of an mm whose CPU mask is ``mask``
        (``guest.tlb``: local ops, or one MULTI op when another CPU is in it)."""
        raise NotImplementedError

    async def flush_tlb_all(self, mask: int) -> None:
        """``flush_tlb_mm``: a full flush of the mm's CPUs (one op)."""
        raise NotImplementedError

    def fold_tlb_flush(self, vas: Sequence[int], mask: int) -> None:
        raise NotImplementedError(f"{self.name} does not fold TLB flushes into a batch")

    def fold_batch(self, entries: Sequence[Entry]) -> None:
        """Queue ``entries`` in the open lazy section (batching modes only)."""
        raise NotImplementedError(f"{self.name} does not fold batches")

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

    async def set_upper(self, links: Sequence[tuple[int, int]]) -> None:
        """One ``mmu_update`` (upper entries are never emulated by Xen)."""
        await self._mmu(links)

    async def switch_mm(
        self, l4: int, user_l4: int, *, pin: bool = False, before: Sequence[Entry] = ()
    ) -> None:
        """One ``mmuext_op``: one trap (after ``before``, sent on its own)."""
        if before:
            await self.send_batch(before)
        await self._ext(switch_mm_ops(l4, user_l4, pin=pin))

    async def send_batch(self, entries: Sequence[Entry]) -> None:
        """No lazy-MMU batching here, but Linux's explicit batches stay
        batches: queued in a buffer with Linux's limits, sent at once."""
        buffer = McBuffer()
        queue_entries(buffer, entries)
        buffer.flush()
        await self._send_batches(buffer)

    async def _send_batches(self, buffer: McBuffer) -> None:
        """Send every flushed batch of ``buffer``, in order, and hand back
        its results (a failed entry raises ``KernelBug``)."""
        if not buffer.has_ready:
            return
        for batch in buffer.take_ready():
            reply = await self.domain.call(batch.hypercall(), vcpu=self.vcpu)
            if isinstance(reply, wire.MulticallResult):
                buffer.complete(batch, reply.results)
            else:
                buffer.complete(batch, [reply.rc])

    async def ptep_set_wrprotect(self, ptep: int) -> int:
        """A locked ``btr`` on a read-only page table: Xen emulates it (one trap)."""
        rc, old = await self.domain.ptwr_clear_bits(ptep, _PAGE_RW, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"trapped wrprotect at {ptep:#x} refused: {abi.errno_name(rc)}")
        return old

    async def set_pte_unpinned(self, ptep: int, val: int) -> None:
        """``mmu_update`` count=1: one trap."""
        await self._mmu([(ptep, val)])

    async def flush_tlb_all(self, mask: int) -> None:
        await self._ext([tlb_flush_all_op(self.vcpu, mask)])

    async def ptep_get_and_clear(self, ptep: int) -> int:
        """Native xchg on a read-only page table: Xen emulates it (one trap)."""
        rc, old = await self.domain.ptwr_exchange(ptep, 0, exchange=True, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"trapped xchg at {ptep:#x} refused: {abi.errno_name(rc)}")
        return old

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        await self._mmu([(ptep, new)])

    async def flush_tlb(self, vas: Sequence[int], mask: int) -> None:
        """tlb_finish_mmu: each flush op is its own hypercall (non-lazy issue)."""
        for op in tlb_flush_ops(vas, self.vcpu, mask):
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

    async def set_pte_unpinned(self, ptep: int, val: int) -> None:
        """A store into a page nothing has typed as a page table: plain memory."""
        rc = await self.domain.kernel_write(ptep, val.to_bytes(8, "little"), vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(f"store into unpinned table {ptep:#x}: {abi.errno_name(rc)}")


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
        await self._send_batches(self.buffer)

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

    async def switch_mm(
        self, l4: int, user_l4: int, *, pin: bool = False, before: Sequence[Entry] = ()
    ) -> None:
        """Linux's context switch: leave a lazy-MMU section (flushing), queue
        the base pointers as one multicall entry (``xen_write_cr3``), flush
        at the end of the switch (``xen_end_context_switch``), and re-enter
        the section if one was open. ``before`` rides in the same batch."""
        self.lazy.pause()
        buf = self.buffer
        queue_entries(buf, before)
        for i, (cmd, arg1, arg2) in enumerate(switch_mm_ops(l4, user_l4, pin=pin)):
            buf.queue_mmuext(cmd, arg1, arg2, extend=i > 0)
        buf.flush(FLUSH_CONTEXT_SWITCH)
        self.lazy.resume()
        await self._send_ready()

    async def send_batch(self, entries: Sequence[Entry]) -> None:
        """Queued in this CPU's buffer and issued at once (``xen_mc_issue(0)``)."""
        queue_entries(self.buffer, entries)
        self.buffer.issue(lazy=False)
        await self._send_ready()

    async def set_pte_unpinned(self, ptep: int, val: int) -> None:
        """``xen_set_pte``: a queued record in a lazy section (sent with the
        section), an immediate ``mmu_update`` outside one."""
        self.lazy.set_pte(ptep, val)
        await self._send_ready()

    async def flush_tlb_all(self, mask: int) -> None:
        self.buffer.queue_mmuext(*tlb_flush_all_op(self.vcpu, mask))
        self.lazy.issue()
        await self._send_ready()

    async def lazy_enter(self) -> None:
        self.lazy.enter()

    async def lazy_leave(self) -> None:
        self.lazy.leave()
        await self._send_ready()

    def note_unlock(self, pte_page: int) -> None:
        self.lazy.check_unlock(pte_page)

    async def flush_tlb(self, vas: Sequence[int], mask: int) -> None:
        for cmd, arg1, arg2 in tlb_flush_ops(vas, self.vcpu, mask):
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
    batches_populate = True

    def fold_tlb_flush(self, vas: Sequence[int], mask: int) -> None:
        """Queue the flush ops in the open section: they ride in its multicall."""
        if not self.lazy.active:
            raise HypercallFailed("a folded TLB flush needs an open lazy section")
        for cmd, arg1, arg2 in tlb_flush_ops(vas, self.vcpu, mask):
            self.buffer.queue_mmuext(cmd, arg1, arg2, extend=True)

    def fold_batch(self, entries: Sequence[Entry]) -> None:
        """Queue a pin (or any batch) in the open section: it rides in the
        section's multicall, after the PTE page's records."""
        if not self.lazy.active:
            raise HypercallFailed("a folded batch needs an open lazy section")
        queue_entries(self.buffer, entries)

    async def fork_copy_run(
        self,
        parent: int,
        child: int,
        indexes: Indexes,
        seen: Ptes,
        wrprotect: Mask,
        child_vals: Ptes,
    ) -> None:
        """One ``mmu_update`` entry for the PTE page: the parent's
        write-protects as transactions committed with the mode's command
        (``PRESERVE_AD``: a Dirty bit the hardware set since the read is
        kept; ``naive``'s ``NORMAL``: it is lost), then the child's
        installs (``NORMAL``: an untyped frame)."""
        if np.any(wrprotect):
            targets = indexes[wrprotect]
            self.lazy.start_ptes(parent, targets)
            self.lazy.commit_ptes(parent, targets, seen[wrprotect] & ~_RW)
        records = mmu_update_records(child, indexes, abi.MMU_NORMAL_PT_UPDATE, child_vals)
        self.buffer.queue_mmu_updates(records)
        await self._send_ready()

    async def zap_ptes(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """The PTE page's clears as one ``mmu_update`` of
        ``MMU_PT_XCHG_PVEMU`` records (pvemu's batched get-and-clear): one
        hypercall, the old values coming back from the exchange itself, so
        every A/D bit the hardware set up to the clear is kept. Sent at
        once: Xen refuses the command inside a multicall, and nothing else
        is queued in a zap's section."""
        rc, olds = await self.domain.mmu_xchg_ptes(table, indexes, vcpu=self.vcpu)
        if rc:
            raise HypercallFailed(
                f"batched exchange on PTE page {table:#x} failed: {abi.errno_name(rc)} "
                f"after {len(olds)}"
            )
        return olds


class NaiveOps(BatchedOps):
    """UNSAFE: commits with MMU_NORMAL_PT_UPDATE, overwriting the A/D bits the
    hardware set since the plain-read start. Exists to show the race."""

    name = "naive"

    async def zap_ptes(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """UNSAFE: the PTE page's clears as ``MMU_NORMAL_PT_UPDATE`` records
        of 0, queued in the open section and sent with it (one hypercall);
        the old values are the kernel's read (``seen``), so a Dirty bit the
        hardware sets between the read and the hypercall is lost."""
        if not self.lazy.active:
            raise HypercallFailed("a batched zap needs an open lazy section")
        self.lazy.set_ptes(table, indexes, np.zeros(len(indexes), dtype=np.uint64))
        await self._send_ready()
        return seen.copy()


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

    async def set_upper(self, links: Sequence[tuple[int, int]]) -> None:
        for maddr, val in links:
            self.native.write_u64(maddr, val)

    async def switch_mm(
        self, l4: int, user_l4: int, *, pin: bool = False, before: Sequence[Entry] = ()
    ) -> None:
        """A local CR3 load (a full local TLB flush): no trap."""
        self.native.hw.set_cr3(self.vcpu, l4)

    async def send_batch(self, entries: Sequence[Entry]) -> None:
        """Bare metal pins and remaps nothing."""

    def fold_batch(self, entries: Sequence[Entry]) -> None:
        """Bare metal pins and remaps nothing."""

    async def ptep_set_wrprotect(self, ptep: int) -> int:
        """``lock btr``: no ``await`` between the read and the write, so the
        hardware model cannot set a bit in between."""
        old = self.native.read_u64(ptep)
        self.native.write_u64(ptep, old & ~_PAGE_RW)
        return old

    async def set_pte_unpinned(self, ptep: int, val: int) -> None:
        self.native.write_u64(ptep, val)

    async def fork_copy_run(
        self,
        parent: int,
        child: int,
        indexes: Indexes,
        seen: Ptes,
        wrprotect: Mask,
        child_vals: Ptes,
    ) -> None:
        """The write-protects as one read-modify-write of the run (atomic: no
        ``await`` inside), the child's run as one write."""
        if np.any(wrprotect):
            targets = indexes[wrprotect]
            page = self.native.read_bytes(parent << PAGE_SHIFT, 1 << PAGE_SHIFT)
            now = np.frombuffer(page, dtype="<u8")[targets]
            self.native.write_ptes(parent, targets, now & ~_RW)
        self.native.write_ptes(child, indexes, child_vals)

    async def flush_tlb_all(self, mask: int) -> None:
        """A local flush, and an IPI to every other CPU of the mask."""
        hw = self.native.hw
        for cpu in _cpus(mask | cpu_bit(self.vcpu), hw.nr_vcpus):
            hw.flush_tlb(cpu)
        self.native.oracle.flushed_all()

    async def ptep_get_and_clear(self, ptep: int) -> int:
        return self.native.xchg_u64(ptep, 0)

    async def zap_ptes(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """Each clear is an xchg with 0: the run as one array operation."""
        return self.native.xchg_ptes(table, indexes)

    async def modify_prot_commit(self, ptep: int, old: int, new: int) -> None:
        self.native.write_u64(ptep, new)

    async def modify_prot_start_ptes(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """Each start is an xchg with 0: the values come back from memory."""
        return self.native.xchg_ptes(table, indexes)

    async def modify_prot_commit_ptes(
        self, table: int, indexes: Indexes, old: Ptes, new: Ptes
    ) -> None:
        self.native.write_ptes(table, indexes, new)

    async def flush_tlb(self, vas: Sequence[int], mask: int) -> None:
        """``flush_tlb_func`` on this CPU and, by IPI, on every other CPU of
        the mask: INVLPG per page up to the ceiling, else a full flush."""
        if not vas:
            return
        hw = self.native.hw
        cpus = _cpus(mask | cpu_bit(self.vcpu), hw.nr_vcpus)
        if len(vas) > TLB_SINGLE_PAGE_FLUSH_CEILING:
            for cpu in cpus:
                hw.flush_tlb(cpu)
            self.native.oracle.flushed_all()
            return
        for va in vas:
            for cpu in cpus:
                hw.invlpg(cpu, va)
            self.native.oracle.flushed_page(va)


def _cpus(mask: int, nr_vcpus: int) -> list[int]:
    return [cpu for cpu in range(nr_vcpus) if mask >> cpu & 1]


__all__ = [
    "TLB_SINGLE_PAGE_FLUSH_CEILING",
    "HypercallFailed",
    "switch_mm_ops",
    "tlb_flush_ops",
    "queue_entries",
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
