"""The lazy-MMU section rules (docs/sources.md §10), enforced.

One :class:`LazyMmu` per vCPU: no nested enter, start/commit exactly paired,
no re-read of a PTE inside a section once its transaction started, no queued
update left when the PTE-page lock is released. A violation raises
:class:`~pvemu.guest.multicall.KernelBug`. With a multicall buffer
(:mod:`pvemu.guest.multicall`), commits and ``set_pte`` queue their
``mmu_update`` record there: batched inside a section, issued at once
outside it.

Transactions come one PTE at a time (:meth:`LazyMmu.start`,
:meth:`LazyMmu.commit`) or as a run of one PTE page (:meth:`LazyMmu.start_ptes`,
:meth:`LazyMmu.commit_ptes`, Linux's ``modify_prot_start_ptes`` /
``modify_prot_commit_ptes``): the same rules, the same records, but a run's
bookkeeping is one array per PTE page, not one dictionary entry per PTE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from pvemu.shared import abi
from pvemu.shared.x86 import PAGE_SHIFT, PTE_SIZE

from .multicall import FLUSH_CONTEXT_SWITCH, FLUSH_LAZY_FLUSH, FLUSH_LAZY_LEAVE, KernelBug, McBuffer
from .ptes import mmu_update_records, pte_maddrs

if TYPE_CHECKING:
    from .ptes import Indexes, Mask, Ptes


def pte_page_of(ptep: int) -> int:
    """The PTE page (its machine frame) holding the PTE at machine address ``ptep``."""
    return ptep >> PAGE_SHIFT


class LazyMmu:
    """One vCPU's lazy-MMU state with the rules of docs/sources.md §10 enforced.

    With a ``buffer``, :meth:`commit` and :meth:`set_pte` queue their
    ``mmu_update`` record there and issue it (batched inside a section,
    immediate outside); :meth:`leave` flushes. Without one, only the rules are
    tracked (modes whose kernel writes PTEs itself).

    Args:
        buffer: the multicall buffer (Linux's limits, or none for whole pages).
        page_of: maps a PTE's machine address to its PTE page, the unit
            :meth:`check_unlock` is called with (default: the machine frame).
        commit_cmd: the ``mmu_update`` command :meth:`commit` uses
            (``MMU_PT_UPDATE_PRESERVE_AD``; ``MMU_NORMAL_PT_UPDATE`` for the
            unsafe ``naive`` mode).
    """

    def __init__(
        self,
        buffer: McBuffer | None = None,
        *,
        page_of: Callable[[int], int] = pte_page_of,
        commit_cmd: int = abi.MMU_PT_UPDATE_PRESERVE_AD,
    ) -> None:
        self.buffer = buffer
        self.page_of = page_of
        self.commit_cmd = commit_cmd
        self.sections = 0
        self._active = False
        self._paused = False
        # ptep -> True while started and not committed; False once written in
        # this section (a later read of it is a hazard). Cleared at leave.
        self._ptes: dict[int, bool] = {}
        self._open = 0
        # The open range transaction: (PTE page frame, entry indexes).
        self._run: tuple[int, Indexes] | None = None
        # PTE page frame -> index arrays of the PTEs a range commit wrote in
        # this section (a later read of them is a hazard). Cleared with _ptes.
        self._written_runs: dict[int, list[Indexes]] = {}
        # PTE page -> seq of the batch carrying its last queued update.
        self._queued: dict[int, int] = {}

    @property
    def active(self) -> bool:
        """In a lazy-MMU section (updates are batched)."""
        return self._active

    @property
    def open_transactions(self) -> int:
        """Starts not yet committed."""
        return self._open

    # --- sections -------------------------------------------------------------------------

    def enter(self) -> None:
        """``arch_enter_lazy_mmu_mode``: nesting is a BUG."""
        if self._active:
            raise KernelBug("lazy MMU enter while already in lazy MMU mode (nesting)")
        if self._paused:
            raise KernelBug("lazy MMU enter while a paused section awaits resume")
        self._active = True
        self.sections += 1

    def leave(self) -> None:
        """``arch_leave_lazy_mmu_mode``: every start committed, then flush."""
        if not self._active:
            raise KernelBug("lazy MMU leave outside lazy MMU mode")
        self._require_no_open("lazy MMU leave")
        self._active = False
        self._ptes.clear()
        self._written_runs.clear()
        self._flush(FLUSH_LAZY_LEAVE)

    def flush(self) -> None:
        """``arch_flush_lazy_mmu_mode``: in a section, send what is queued (leave +
        re-enter); open transactions stay open."""
        if not self._active:
            return
        if self._open:
            self._ptes = {p: s for p, s in self._ptes.items() if s}
        else:
            self._ptes.clear()
        self._written_runs.clear()
        self._flush(FLUSH_LAZY_FLUSH)

    def pause(self) -> None:
        """Context switch away (``start_context_switch``): leave a section,
        flushing, and remember to re-enter it on :meth:`resume`."""
        if not self._active:
            return
        self._require_no_open("context switch")
        self._active = False
        self._paused = True
        self._ptes.clear()
        self._written_runs.clear()
        self._flush(FLUSH_CONTEXT_SWITCH)

    def resume(self) -> None:
        """Context switch back (``end_context_switch``)."""
        if self._paused:
            self._paused = False
            self._active = True

    def _flush(self, reason: str) -> None:
        buf = self.buffer
        if buf is None:
            return
        buf.flush(reason)
        if self._queued and buf.completed == buf.generation:
            self._queued.clear()

    def _require_no_open(self, what: str) -> None:
        if self._open:
            started = [p for p, s in self._ptes.items() if s]
            if self._run is not None:
                started += pte_maddrs(*self._run)
            open_ptes = ", ".join(f"{p:#x}" for p in started)
            raise KernelBug(
                f"{what} with {self._open} ptep_modify_prot_start without commit: {open_ptes}"
            )

    # --- PTE transactions -----------------------------------------------------------------

    def start(self, ptep: int) -> None:
        """``ptep_modify_prot_start`` on the PTE at machine address ``ptep``."""
        state = self._ptes.get(ptep)
        if state is None and (self._run is not None or self._written_runs):
            state = self._run_state(ptep)
        if state is True:
            raise KernelBug(f"ptep_modify_prot_start({ptep:#x}) again before its commit")
        if state is False:
            raise KernelBug(
                f"read hazard: ptep_modify_prot_start({ptep:#x}) re-reads a PTE already "
                "updated in this lazy MMU section"
            )
        self._ptes[ptep] = True
        self._open += 1

    def commit(self, ptep: int, val: int) -> None:
        """``ptep_modify_prot_commit``: closes the transaction :meth:`start`
        opened on ``ptep``; queues ``ptep | commit_cmd := val`` and issues it."""
        if self._ptes.get(ptep) is not True:
            raise KernelBug(f"ptep_modify_prot_commit({ptep:#x}) without a matching start")
        self._open -= 1
        if self._active:
            self._ptes[ptep] = False
        else:
            del self._ptes[ptep]
        if self.buffer is not None:
            self._queue(ptep, self.commit_cmd, val)

    def start_ptes(self, table: int, indexes: Indexes) -> None:
        """``modify_prot_start_ptes`` on entries ``indexes`` (ascending) of the
        PTE page in frame ``table``: opens one transaction per entry, with
        the rules of :meth:`start`. One run is open at a time."""
        if self._run is not None:
            raise KernelBug(
                f"modify_prot_start_ptes on PTE page {table:#x} while a run on "
                f"{self._run[0]:#x} is not committed"
            )
        if self._ptes or self._written_runs:
            for ptep in pte_maddrs(table, indexes[self._touched(table, indexes)]):
                self.start(ptep)  # raises: started or updated already
        self._run = (table, indexes)
        self._open += len(indexes)

    def commit_ptes(self, table: int, indexes: Indexes, vals: Ptes) -> None:
        """``modify_prot_commit_ptes``: closes the run :meth:`start_ptes`
        opened; queues ``ptep | commit_cmd := val`` for each entry, in order,
        as :meth:`commit` would one by one (the same entries and flushes),
        but as one array of records."""
        run = self._run
        if (
            run is None
            or run[0] != table
            or (run[1] is not indexes and not np.array_equal(run[1], indexes))
        ):
            raise KernelBug(
                f"modify_prot_commit_ptes on PTE page {table:#x} without a matching "
                "modify_prot_start_ptes"
            )
        self._run = None
        self._open -= len(indexes)
        if self._active:
            self._written_runs.setdefault(table, []).append(indexes)
        if self.buffer is None or not len(indexes):
            return
        if not self._active:  # each record is issued at once: no batch to build
            for ptep, val in zip(pte_maddrs(table, indexes), vals.tolist(), strict=True):
                self._queue(ptep, self.commit_cmd, val)
            return
        buf = self.buffer
        buf.queue_mmu_updates(mmu_update_records(table, indexes, self.commit_cmd, vals))
        self._queued[self.page_of(table << PAGE_SHIFT)] = buf.generation  # as _queue

    def _touched(self, table: int, indexes: Indexes) -> Mask:
        """Which of ``indexes`` already have a transaction in this section
        (started, or written one by one or by a range)."""
        mask = (1 << PAGE_SHIFT) - 1
        seen = [(p & mask) // PTE_SIZE for p in self._ptes if p >> PAGE_SHIFT == table]
        arrays = [np.asarray(seen, dtype=np.intp), *self._written_runs.get(table, ())]
        touched: Mask = np.isin(indexes, np.concatenate(arrays))
        return touched

    def _run_state(self, ptep: int) -> bool | None:
        """True if ``ptep`` is in the open run, False if a range commit wrote it
        in this section, None otherwise."""
        table, index = ptep >> PAGE_SHIFT, (ptep & ((1 << PAGE_SHIFT) - 1)) // PTE_SIZE
        run = self._run
        if run is not None and run[0] == table and bool(np.any(run[1] == index)):
            return True
        if any(bool(np.any(w == index)) for w in self._written_runs.get(table, ())):
            return False
        return None

    def set_pte(self, ptep: int, val: int, cmd: int = abi.MMU_NORMAL_PT_UPDATE) -> None:
        """``set_pte``: queues ``ptep | cmd := val`` (batched inside a section)."""
        started = self._ptes.get(ptep) is True
        if not started and self._run is not None:
            started = self._run_state(ptep) is True
        if started:
            raise KernelBug(f"set_pte({ptep:#x}) inside its start/commit transaction")
        if self._active:
            self._ptes[ptep] = False
        if self.buffer is not None:
            self._queue(ptep, cmd, val)

    def set_ptes(
        self, table: int, indexes: Indexes, vals: Ptes, cmd: int = abi.MMU_NORMAL_PT_UPDATE
    ) -> None:
        """:meth:`set_pte` on entries ``indexes`` of the PTE page in frame
        ``table`` (a zapped run's clears): the same rules and records, as
        one array of records inside a section."""
        run = self._run
        if run is not None and run[0] == table and bool(np.any(np.isin(indexes, run[1]))):
            raise KernelBug(f"set_ptes on PTE page {table:#x} inside a start/commit run")
        if not self._active:
            for ptep, val in zip(pte_maddrs(table, indexes), vals.tolist(), strict=True):
                self.set_pte(ptep, val, cmd)
            return
        if self._ptes:
            for ptep in pte_maddrs(table, indexes):
                if self._ptes.get(ptep) is True:
                    raise KernelBug(f"set_pte({ptep:#x}) inside its start/commit transaction")
        self._written_runs.setdefault(table, []).append(indexes)
        if self.buffer is None or not len(indexes):
            return
        buf = self.buffer
        buf.queue_mmu_updates(mmu_update_records(table, indexes, cmd, vals))
        self._queued[self.page_of(table << PAGE_SHIFT)] = buf.generation

    def _queue(self, ptep: int, cmd: int, val: int) -> None:
        if ptep & abi.MMU_CMD_MASK:
            raise KernelBug(f"PTE pointer {ptep:#x} is not 8-byte aligned")
        buf = self.buffer
        assert buf is not None
        buf.queue_mmu_update(ptep | cmd, val)
        if self._active:  # batched: the record rides in the batch flushed next
            self._queued[self.page_of(ptep)] = buf.generation
            return
        buf.issue(lazy=False)
        seq = buf.generation - 1  # the batch just flushed
        if buf.completed <= seq:
            self._queued[self.page_of(ptep)] = seq

    def issue(self) -> None:
        """``xen_mc_issue(XEN_LAZY_MMU)`` for something the kernel queued on the
        buffer itself (e.g. a TLB-flush ``mmuext_op``): immediate outside a
        section, batched inside."""
        if self.buffer is not None:
            self.buffer.issue(lazy=self._active)

    # --- rule checks the kernel calls -----------------------------------------------------

    def note_read(self, ptep: int) -> None:
        """The kernel is about to read ``*ptep``: inside a section that is a
        read hazard once the PTE's transaction started."""
        if self._active and (
            ptep in self._ptes
            or ((self._run is not None or self._written_runs) and self._run_state(ptep) is not None)
        ):
            raise KernelBug(
                f"read hazard: PTE {ptep:#x} re-read inside a lazy MMU section after its start"
            )

    def check_unlock(self, pte_page: int) -> None:
        """The kernel is about to release ``pte_page``'s lock: every transaction
        on it must be committed and every queued update sent."""
        if self._open:
            page_of = self.page_of
            run = self._run
            if run is not None and page_of(run[0] << PAGE_SHIFT) == pte_page:
                raise KernelBug(
                    f"PTE-page lock {pte_page:#x} released with "
                    f"modify_prot_start_ptes on {len(run[1])} PTEs not committed"
                )
            for p, started in self._ptes.items():
                if started and page_of(p) == pte_page:
                    raise KernelBug(
                        f"PTE-page lock {pte_page:#x} released with "
                        f"ptep_modify_prot_start({p:#x}) not committed"
                    )
        if self._queued:
            seq = self._queued.pop(pte_page, None)
            buf = self.buffer
            if seq is not None and buf is not None and buf.completed <= seq:
                raise KernelBug(
                    f"PTE-page lock {pte_page:#x} released with its update still queued "
                    "(commit must reach the hypervisor before unlock)"
                )


__all__ = ["KernelBug", "LazyMmu", "pte_page_of"]
