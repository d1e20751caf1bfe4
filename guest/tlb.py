"""TLB shootdown as Linux on x86 decides it (``flush_tlb_mm_range``), and the
``mmu_gather`` a zap collects its flush range and its frees in.

Sans I/O: this module decides *which* ``mmuext_op`` flush ops a flush is;
the pv-ops backends send them.

The rule (x86 ``flush_tlb_mm_range`` over Xen's ``xen_flush_tlb_multi``):

* the mm's CPU mask (``mm_cpumask``, stale bits included: x86 keeps the bit
  of a CPU the process ran on after it switched away) holds a CPU other
  than the one flushing: **one** op for all of them, ``MMUEXT_INVLPG_MULTI``
  when the range is one page, else ``MMUEXT_TLB_FLUSH_MULTI``, its vcpumask
  the mask with the local CPU in it (Linux since the 2021 ``flush_tlb_multi``
  rework);
* otherwise a local flush: one ``MMUEXT_INVLPG_LOCAL`` per page up to
  :data:`TLB_SINGLE_PAGE_FLUSH_CEILING` (33) pages, else one
  ``MMUEXT_TLB_FLUSH_LOCAL``. Outside a lazy section each op is its own
  hypercall.

So a flush of R pages costs F(R) = R if R ≤ 33 else 1 hypercall on one CPU,
and 1 on several.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from pvemu.shared import abi
from pvemu.shared.x86 import PAGE_SHIFT, PAGE_SIZE

#: Modern x86: up to this many pages one INVLPG each, else a full flush.
TLB_SINGLE_PAGE_FLUSH_CEILING: Final = 33

FlushOp = tuple[int, int, int]


def cpu_bit(vcpu: int) -> int:
    return 1 << vcpu


def is_multi(vcpu: int, mask: int) -> bool:
    """The mm's CPU mask ``mask`` holds a CPU other than ``vcpu``."""
    return bool(mask & ~cpu_bit(vcpu))


def tlb_flush_ops(vas: Sequence[int], vcpu: int, mask: int) -> list[FlushOp]:
    """The flush of pages ``vas`` (ascending, at most ceiling + 1 needed) of
    an mm whose CPU mask is ``mask``, issued on ``vcpu``."""
    if not vas:
        return []
    if is_multi(vcpu, mask):
        cpus = mask | cpu_bit(vcpu)
        if len(vas) == 1:
            return [(abi.MMUEXT_INVLPG_MULTI, vas[0], cpus)]
        return [(abi.MMUEXT_TLB_FLUSH_MULTI, 0, cpus)]
    if len(vas) <= TLB_SINGLE_PAGE_FLUSH_CEILING:
        return [(abi.MMUEXT_INVLPG_LOCAL, va, 0) for va in vas]
    return [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)]


def tlb_flush_all_op(vcpu: int, mask: int) -> FlushOp:
    """``flush_tlb_mm``: the whole mm, on its CPUs (one op either way)."""
    if is_multi(vcpu, mask):
        return (abi.MMUEXT_TLB_FLUSH_MULTI, 0, mask | cpu_bit(vcpu))
    return (abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)


def flush_cost(pages: int, multi: bool) -> int:
    """F(R): the hypercalls of a flush of ``pages`` pages issued outside a
    lazy section (0 for none)."""
    if not pages:
        return 0
    if multi or pages > TLB_SINGLE_PAGE_FLUSH_CEILING:
        return 1
    return pages


class MmuGather:
    """One zap's ``mmu_gather``: the union of the ranges it cleared (the
    flush covers every page from the lowest to the highest, holes
    included, as ``tlb_remove_tlb_entries`` widens ``[start, end)``), and
    what may be freed only once the TLBs are flushed: the frames of
    anonymous pages, the page-table pages ``free_pgtables`` took out, and
    the write-back of the dirty shared file pages the zap let go of.
    """

    __slots__ = ("deferred", "end", "frames", "start", "tables")

    def __init__(self) -> None:
        self.start = 0
        self.end = 0
        #: Frames of private pages whose last mapping went (``tlb_remove_page``).
        self.frames: list[int] = []
        #: Page-table frames unlinked from the tree (``pte_free_tlb`` & co).
        self.tables: list[int] = []
        #: Work that must wait for the flush: writing a dirty shared file page
        #: back (Linux's delayed rmap / ``force_flush``), so a store another
        #: CPU makes through a stale TLB entry until then is written too.
        self.deferred: list[Callable[[], None]] = []

    def __bool__(self) -> bool:
        return self.end > self.start

    def add_range(self, start: int, end: int) -> None:
        """Widen the flush range to cover ``[start, end)``."""
        if end <= start:
            return
        if self:
            self.start = min(self.start, start)
            self.end = max(self.end, end)
        else:
            self.start, self.end = start, end

    @property
    def pages(self) -> int:
        """R: the pages of the flush range."""
        return (self.end - self.start) >> PAGE_SHIFT

    def vas(self) -> list[int]:
        """The pages to flush, as the backends take them: every page of the
        range up to the ceiling, else the first ceiling + 1 (a full flush
        either way past it)."""
        count = min(self.pages, TLB_SINGLE_PAGE_FLUSH_CEILING + 1)
        return [self.start + i * PAGE_SIZE for i in range(count)]


__all__ = [
    "TLB_SINGLE_PAGE_FLUSH_CEILING",
    "FlushOp",
    "MmuGather",
    "cpu_bit",
    "flush_cost",
    "is_multi",
    "tlb_flush_all_op",
    "tlb_flush_ops",
]
