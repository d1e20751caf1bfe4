"""The race oracles (DESIGN §7.2-§7.3), kept by whoever owns the page tables.

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

from .x86 import _PAGE_DIRTY, PAGE_MASK


@dataclass
class RaceOracle:
    lost_dirty: int = 0
    stale_after_flush: int = 0
    stale_in_flight: int = 0
    _tick: int = 0
    #: PTE machine addresses whose D the hardware set and the guest has not seen.
    _unseen_dirty: set[int] = field(default_factory=set)
    _pte_changed: dict[int, int] = field(default_factory=dict)
    _full_flush: int = 0
    _page_flush: dict[int, int] = field(default_factory=dict)

    def hardware_set_dirty(self, pte_maddr: int) -> None:
        self._unseen_dirty.add(pte_maddr)

    def guest_saw(self, pte_maddr: int) -> None:
        """The old value went back to the guest (a trapped xchg)."""
        self._unseen_dirty.discard(pte_maddr)

    def pte_written(self, pte_maddr: int, value: int) -> None:
        """A software write left ``value`` in the PTE."""
        self._tick += 1
        self._pte_changed[pte_maddr] = self._tick
        if pte_maddr in self._unseen_dirty and not value & _PAGE_DIRTY:
            self._unseen_dirty.discard(pte_maddr)
            self.lost_dirty += 1

    def guest_saw_all(self, pte_maddrs: Iterable[int]) -> None:
        """:meth:`guest_saw` for each (a run's xchgs)."""
        if self._unseen_dirty:
            self._unseen_dirty.difference_update(pte_maddrs)

    def ptes_written(self, pte_maddrs: Sequence[int], values: Sequence[int]) -> None:
        """:meth:`pte_written` for each pair, in order (a run's stores): the
        same ticks and losses, bookkept per run rather than per call."""
        start = self._tick
        self._tick += len(pte_maddrs)
        self._pte_changed.update(zip(pte_maddrs, range(start + 1, self._tick + 1), strict=True))
        unseen = self._unseen_dirty
        if unseen and not unseen.isdisjoint(pte_maddrs):
            for maddr, value in zip(pte_maddrs, values, strict=True):
                if maddr in unseen and not value & _PAGE_DIRTY:
                    unseen.discard(maddr)
                    self.lost_dirty += 1

    def flushed_all(self) -> None:
        self._tick += 1
        self._full_flush = self._tick

    def flushed_page(self, va: int) -> None:
        self._tick += 1
        self._page_flush[va & PAGE_MASK] = self._tick

    def stale_write(self, va: int, pte_maddr: int) -> None:
        changed = self._pte_changed.get(pte_maddr, 0)
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
