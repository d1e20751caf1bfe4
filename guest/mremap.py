"""mremap's page-table half: Linux's ``move_page_tables`` over pv-ops.

The VMA half (:meth:`pvemu.guest.vma.AddressSpace.mremap`) decides what
moves where and returns the steps in Linux's order: unmaps (each the pieces one
``do_munmap`` removed: the ``MREMAP_FIXED`` destination, a shrunk tail, the
source after a move), applied as one munmap each, and
:class:`~pvemu.guest.vma_tree.PageMove` s. :class:`PageTableMover` applies
them to one process's tree.

A move walks the source in *extents*: up to the next 2 MiB boundary of both
the source and the destination (``get_extent``). For each extent, in
Linux's order:

* no PTE page at the source: nothing to move;
* a whole, 2 MiB-aligned extent on both sides whose destination PMD entry is
  empty: the PTE page itself moves (``move_normal_pmd``): the source PMD
  entry cleared (``pmd_clear``, one ``mmu_update``), the page re-linked at
  the destination (``pmd_populate``: ``xen_alloc_ptpage`` remaps it
  read-only in one batch, no pin since it is pinned already; then the
  ``set_pmd``, one ``mmu_update``), one flush of the 2 MiB (a full flush);
* else ``move_ptes``: the destination PTE page built if missing (as a fault
  builds tables: two hypercalls per new table), then under both PTE locks
  in one lazy-MMU section the source entries are taken with the zap's
  backend call (:meth:`PageTableMover.clear_sources`: a trapped
  get-and-clear each on Xen PV, one ``MMU_PT_XCHG_PVEMU`` exchange in
  ``batched``) and written at the destination with ``set_pte`` (queued in
  the section); after the section, if a present entry moved, the extent's
  pages are flushed (:meth:`PageTableMover.flush_extent`, ``guest.tlb``'s
  local-or-MULTI rule).

Simpler than Linux: no folio batching (x86 never batches mremap:
``pte_batch_hint`` is 1), no soft-dirty marking of moved PTEs, no
``try_realign_addr``, no PUD-level moves.

Not ordered against user accesses on other vCPUs: Linux holds the mmap
lock for writing through an mremap, so a fault on either range waits for
the whole move; pvemu has no mmap lock and changes the VMAs before the page
tables, so a fault on the destination taken mid-move would install a fresh
page that the move then overwrites. Whole-PMD moves hold
``page_table_lock`` throughout, so no fault can be past its table walk with
the moving PTE page in hand. Run mremap while no other vCPU touches the two
ranges (every caller in pvemu does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from pvemu.shared.x86 import (
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    ENTRIES_PER_TABLE,
    L2_PAGETABLE_SHIFT,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_MFN_MASK,
    PTE_SIZE,
    maddr_of_entry,
    make_pte,
)

from .pagetree import alloc_table_entries
from .process import Process
from .ptes import present_run, read_ptes
from .pvops import PvOps
from .tlb import TLB_SINGLE_PAGE_FLUSH_CEILING
from .vma_tree import MremapStep, PageMove, Vma

if TYPE_CHECKING:
    from .kernel import Kernel
    from .ptes import Indexes, Ptes

#: Bytes one PMD entry maps (one PTE page).
PMD_SIZE: Final = 1 << L2_PAGETABLE_SHIFT
_INDEX_MASK: Final = ENTRIES_PER_TABLE - 1
#: How the kernel links a table into its parent (``kernel.TABLE_FLAGS``).
_TABLE_FLAGS: Final = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER


def extent_of(src: int, dst: int, end: int) -> int:
    """``get_extent``: bytes from ``src`` up to ``end`` and to the next PMD
    boundary of both ``src`` and ``dst``."""
    return min(end - src, PMD_SIZE - (src & (PMD_SIZE - 1)), PMD_SIZE - (dst & (PMD_SIZE - 1)))


class PageTableMover:
    """Applies an mremap's steps to process ``proc``'s page tables, with the
    system-call vCPU's backend (vCPU 0, as every system call in pvemu)."""

    def __init__(self, kernel: Kernel, proc: Process) -> None:
        self.kernel = kernel
        self.proc = proc
        self.machine = kernel.machine
        self.backend: PvOps = kernel.backend

    async def apply(self, steps: Sequence[MremapStep]) -> None:
        """Every step in order: each unmap as one munmap, each move."""
        for step in steps:
            if isinstance(step, PageMove):
                await self.move_page_tables(step)
            else:
                await self.unmap(step.pieces)

    async def unmap(self, removed: Sequence[Vma]) -> None:
        """What munmap does for ``removed``: zapped, emptied tables freed,
        one gather flushed (:meth:`Kernel.unmap_pieces`)."""
        await self.kernel.unmap_pieces(removed, self.backend, self.proc)

    async def move_page_tables(self, move: PageMove) -> None:
        """``move_page_tables``: extent by extent, a whole PTE page when it
        can, else PTE by PTE."""
        src, dst = move.src, move.dst
        end = move.src + move.length
        while src < end:
            extent = extent_of(src, dst, end)
            src_l2 = self.kernel._lookup_table(src, self.proc, down_to=2)
            if src_l2 is not None:
                src_pmd = maddr_of_entry(src_l2, (src >> L2_PAGETABLE_SHIFT) & _INDEX_MASK)
                l1 = self._table_at(src_pmd)
                if l1 is not None:
                    whole = extent == PMD_SIZE and not dst & (PMD_SIZE - 1)
                    if not (whole and await self.move_normal_pmd(src_pmd, l1, src, dst)):
                        await self.move_ptes(l1, src, dst, extent)
            src += extent
            dst += extent

    async def move_normal_pmd(self, src_pmd: int, l1: int, src: int, dst: int) -> bool:
        """Move the PTE page ``l1`` (mapped by the PMD entry at ``src_pmd``)
        to ``dst``'s PMD entry if that one is empty; False to fall back."""
        proc, backend = self.proc, self.backend
        async with proc.table_lock:
            dst_l2 = await self.kernel._ensure_tables(dst, backend, proc, down_to=2)
            dst_pmd = maddr_of_entry(dst_l2, (dst >> L2_PAGETABLE_SHIFT) & _INDEX_MASK)
            if self.machine.read_u64(dst_pmd) & _PAGE_PRESENT:
                return False
            async with proc.lock(l1):
                await backend.set_upper([(src_pmd, 0)])  # pmd_clear
                alloc = alloc_table_entries(l1, 1, self.machine.pfn_of, pinned=True)
                await backend.send_batch(alloc)  # pmd_populate: xen_alloc_ptpage
                await backend.set_upper([(dst_pmd, make_pte(l1, _TABLE_FLAGS))])
                await self.flush_extent(src, PMD_SIZE)
                backend.note_unlock(l1)
        return True

    async def move_ptes(self, src_l1: int, src: int, dst: int, extent: int) -> None:
        """``move_ptes`` for one extent: under both PTE locks, one lazy-MMU
        section; each non-none source entry cleared and set at ``dst``;
        the extent flushed after the section if a present entry moved."""
        proc, backend = self.proc, self.backend
        async with proc.table_lock:
            dst_l1 = await self.kernel._ensure_tables(dst, backend, proc)
        count = extent >> PAGE_SHIFT
        src_first = (src >> PAGE_SHIFT) & _INDEX_MASK
        dst_first = (dst >> PAGE_SHIFT) & _INDEX_MASK
        dst_base = dst_l1 << PAGE_SHIFT
        async with proc.lock(src_l1):
            async with proc.lock(dst_l1) if dst_l1 != src_l1 else _Nothing():
                await backend.lazy_enter()
                window = read_ptes(self.machine, src_l1, src_first, count)
                offsets, indexes, seen = present_run(window, src_first)
                moved_present = bool(len(indexes))
                if moved_present:
                    olds = await self.clear_sources(src_l1, indexes, seen)
                    for offset, old in zip(offsets.tolist(), olds.tolist(), strict=True):
                        await backend.set_pte(dst_base | ((dst_first + offset) * PTE_SIZE), old)
                await backend.lazy_leave()
                if moved_present:
                    await self.flush_extent(src, extent)
                backend.note_unlock(dst_l1)
            backend.note_unlock(src_l1)

    async def clear_sources(self, table: int, indexes: Indexes, seen: Ptes) -> Ptes:
        """Take the source PTEs ``indexes`` of PTE page ``table``, old values
        back, inside the section: the zap's backend call (``zap_ptes``:
        Linux's ``ptep_get_and_clear`` per PTE, a native xchg, one trapped
        emulated write each on Xen PV; ``batched`` one ``MMU_PT_XCHG_PVEMU``
        exchange for the page; ``naive`` its unsafe queued clears)."""
        if self.kernel.per_pte:
            return await PvOps.zap_ptes(self.backend, table, indexes, seen)
        return await self.backend.zap_ptes(table, indexes, seen)

    async def flush_extent(self, start: int, length: int) -> None:
        """``flush_tlb_range`` over the extent's pages (one INVLPG each up to
        the ceiling, else one full flush): the one place the mremap flush
        rule lives."""
        pages = range(start, start + length, PAGE_SIZE)
        await self.backend.flush_tlb(pages[: TLB_SINGLE_PAGE_FLUSH_CEILING + 1], self.proc.cpumask)

    # --- tables ----------------------------------------------------------------------

    def _table_at(self, entry_maddr: int) -> int | None:
        entry = self.machine.read_u64(entry_maddr)
        if not entry & _PAGE_PRESENT:
            return None
        return (entry & PTE_MFN_MASK) >> PAGE_SHIFT


class _Nothing:
    """An async context manager that does nothing (the second PTE lock when
    source and destination share a PTE page)."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


__all__ = ["PMD_SIZE", "PageTableMover", "extent_of"]
