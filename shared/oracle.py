"""The race oracles (docs/sources.md §3), kept by whoever owns the page tables.

* **Lost Dirty bits.** The hardware model reports every D bit it sets. pvemu's
  kernel cleans D only through a trapped ``ptep_get_and_clear`` (an xchg that
  hands the old value, D included, back to the guest), as Xen PV Linux does
  in ``page_mkclean``. So a D bit set by hardware that vanishes from a PTE by
  any other write was lost: nobody will ever write that page back.
* **Stale-TLB writes.** A write that only a stale TLB entry allowed is legal
  while the guest has not flushed yet (an mprotect in flight); once the guest
  has issued a flush covering the page since the PTE changed, a stale write
  means some vCPU was left out of the shootdown. The two are counted apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from numpy.typing import NDArray

from .arrays import distinct_sorted
from .x86 import _PAGE_DIRTY, ENTRIES_PER_TABLE, PAGE_MASK, PAGE_SHIFT

_INDEX_MASK: Final = ENTRIES_PER_TABLE - 1


@dataclass(eq=False)
class RaceOracle:
    lost_dirty: int = 0
    stale_after_flush: int = 0
    stale_in_flight: int = 0
    _tick: int = 0
    #: PTE machine addresses whose D the hardware set and the guest has not seen.
    _unseen_dirty: set[int] = field(default_factory=set)
    #: Per page-table frame (maddr >> 12), the tick of the last software write
    #: of each of its 512 entries (0: never): a batch of writes into one frame
    #: is then one array store, not 512 dict updates.
    _pte_changed: dict[int, NDArray[np.int64]] = field(default_factory=dict)
    _full_flush: int = 0
    _page_flush: dict[int, int] = field(default_factory=dict)

    def hardware_set_dirty(self, pte_maddr: int) -> None:
        self._unseen_dirty.add(pte_maddr)

    def dirty_unseen(self, pte_maddr: int) -> bool:
        """The hardware set D in this PTE and the guest has not seen it yet."""
        return pte_maddr in self._unseen_dirty

    def guest_saw(self, pte_maddr: int) -> None:
        """The old value went back to the guest (a trapped xchg)."""
        self._unseen_dirty.discard(pte_maddr)

    def pte_written(self, pte_maddr: int, value: int) -> None:
        """A software write left ``value`` in the PTE (an 8-aligned address)."""
        self._tick += 1
        self._ticks_of(pte_maddr >> PAGE_SHIFT)[(pte_maddr >> 3) & _INDEX_MASK] = self._tick
        if pte_maddr in self._unseen_dirty and not value & _PAGE_DIRTY:
            self._unseen_dirty.discard(pte_maddr)
            self.lost_dirty += 1

    def pte_written_many(self, maddrs: NDArray[np.int64], values: NDArray[np.int64]) -> None:
        """``pte_written(maddrs[i], values[i])`` for every i in order, as a few
        array operations (the hypervisor's batched mmu_update path; u64
        values as int64 bit patterns).

        The same effect for any input, repeated addresses included: ticks
        rise with i, so the largest tick an entry gets is its last write's;
        nothing re-marks a D bit between the writes, so a pending D bit is lost
        once if any write leaves D clear.
        """
        frames = maddrs >> PAGE_SHIFT
        index = (maddrs >> 3) & _INDEX_MASK
        ticks = np.arange(self._tick + 1, self._tick + 1 + len(maddrs), dtype=np.int64)
        self._tick += len(maddrs)
        for frame in distinct_sorted(frames).tolist():
            mine = frames == frame
            np.maximum.at(self._ticks_of(frame), index[mine], ticks[mine])
        self._lose_dirty(maddrs, values)

    def pte_written_in_frame(
        self, frame: int, index: NDArray[np.int64], values: NDArray[np.int64]
    ) -> None:
        """``pte_written_many`` for writes to distinct entries of one frame,
        given as their indexes in it (one array store)."""
        n = len(index)
        self._ticks_of(frame)[index] = np.arange(self._tick + 1, self._tick + 1 + n)
        self._tick += n
        if self._unseen_dirty and np.count_nonzero(values & _PAGE_DIRTY) < n:
            self._lose_dirty((frame << PAGE_SHIFT) | (index << 3), values)

    def _lose_dirty(self, maddrs: NDArray[np.int64], values: NDArray[np.int64]) -> None:
        if not self._unseen_dirty:
            return
        clean = (values & _PAGE_DIRTY) == 0
        if np.count_nonzero(clean):
            lost = self._unseen_dirty.intersection(maddrs[clean].tolist())
            self._unseen_dirty -= lost
            self.lost_dirty += len(lost)

    def changed_at(self, pte_maddr: int) -> int:
        """The tick of the last software write of the PTE (0: never)."""
        ticks = self._pte_changed.get(pte_maddr >> PAGE_SHIFT)
        return 0 if ticks is None else int(ticks[(pte_maddr >> 3) & _INDEX_MASK])

    def _ticks_of(self, frame: int) -> NDArray[np.int64]:
        ticks = self._pte_changed.get(frame)
        if ticks is None:
            ticks = self._pte_changed[frame] = np.zeros(ENTRIES_PER_TABLE, dtype=np.int64)
        return ticks

    def guest_saw_all(self, pte_maddrs: Iterable[int]) -> None:
        """:meth:`guest_saw` for each (a run's xchgs)."""
        if self._unseen_dirty:
            self._unseen_dirty.difference_update(pte_maddrs)

    def ptes_written(self, pte_maddrs: Sequence[int], values: Sequence[int]) -> None:
        """:meth:`pte_written` for each pair, in order (a run's stores in the
        guest's own page tables, native mode): :meth:`pte_written_many`."""
        if not pte_maddrs:
            return
        maddrs = np.asarray(pte_maddrs, dtype=np.int64)
        bits = np.asarray(values, dtype=np.uint64).view(np.int64)
        self.pte_written_many(maddrs, bits)

    def flushed_all(self) -> None:
        self._tick += 1
        self._full_flush = self._tick

    def flushed_page(self, va: int) -> None:
        self._tick += 1
        self._page_flush[va & PAGE_MASK] = self._tick

    def stale_write(self, va: int, pte_maddr: int) -> None:
        changed = self.changed_at(pte_maddr)
        flushed = max(self._full_flush, self._page_flush.get(va & PAGE_MASK, 0))
        if flushed > changed:
            self.stale_after_flush += 1
        else:
            self.stale_in_flight += 1

    def as_dict(self) -> dict[str, int]:
        return {
            "lost_dirty": self.lost_dirty,
            "stale_tlb_writes": self.stale_after_flush,
            "stale_tlb_writes_in_flight": self.stale_in_flight,
        }
