"""Page references, page types and entry validation (docs/sources.md §7).

This is Xen's reference-counting model for a 64-bit PV domU: a frame's general
count counts every use, its type count every use in its current type, a type
can change only at type count 0, and a frame becomes a page table only after
all 512 entries pass validation. Every rule returns Xen's negated errno.

Promotion recurses at most three levels (L4 -> L3 -> L2 -> L1). Teardown
(demotion) can release whole trees and is iterative, with an explicit stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_AVAIL,
    _PAGE_AVAIL_HIGH,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_GUEST_KERNEL,
    _PAGE_NX,
    _PAGE_PAT,
    _PAGE_PCD,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_PWT,
    _PAGE_RW,
    _PAGE_USER,
    ENTRIES_PER_TABLE,
    PAGE_AD,
    PAGE_SHIFT,
    PTE_MFN_MASK,
)

from .frametable import PAGE_TABLE_TYPES, PINNED, VALIDATED, FrameTable

if TYPE_CHECKING:
    from .memory import MachineMemory

#: L1 entries of an unprivileged domU may not set cache-attribute bits (docs/sources.md §7).
L1_DISALLOW_MASK: Final = _PAGE_PWT | _PAGE_PCD | _PAGE_PAT
#: Upper-level entries may not set cache bits, superpages or global (docs/sources.md §7).
L2_DISALLOW_MASK: Final = _PAGE_PWT | _PAGE_PCD | _PAGE_PSE | _PAGE_GLOBAL
#: Bits whose change keeps the same frame and needs no reference work (§2.4).
FASTPATH_WHITELIST: Final = (
    _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_GLOBAL | _PAGE_AVAIL | _PAGE_AVAIL_HIGH
) | _PAGE_NX

FIRST_XEN_SLOT: Final = abi.ROOT_PAGETABLE_FIRST_XEN_SLOT
LAST_XEN_SLOT: Final = abi.ROOT_PAGETABLE_LAST_XEN_SLOT
XEN_SLOTS: Final = range(FIRST_XEN_SLOT, LAST_XEN_SLOT + 1)

TypeChangeHook = Callable[[int], None]
#: Called with (machine address, value now in memory) after every entry write.
EntryWriteHook = Callable[[int, int], None]


def adjust_guest_l1e(pte: int) -> int:
    """Flags Xen forces on a present 64-bit PV L1 entry (Xen's ``adjust_guest_l1e``)."""
    if not pte & _PAGE_USER:
        pte |= _PAGE_USER | _PAGE_GUEST_KERNEL
    if not pte & _PAGE_GUEST_KERNEL:
        pte |= _PAGE_GLOBAL | _PAGE_USER
    return pte


def adjust_guest_upper(pte: int, level: int) -> int:
    """L2/L3 entries get U; L4 entries get A and U (Xen's ``adjust_guest_l*e``)."""
    if level == 4:
        return pte | _PAGE_ACCESSED | _PAGE_USER
    return pte | _PAGE_USER


def frame_of(pte: int) -> int:
    return (pte & PTE_MFN_MASK) >> PAGE_SHIFT


class PageTypes:
    """Reference and type counting over a frame table and machine memory.

    ``on_retype(owner)`` is called when a frame becomes a page table after
    having had another type: Xen then flushes the owner's stale TLBs so that no
    vCPU keeps a writable translation of a new page table (docs/sources.md §7).
    """

    def __init__(
        self,
        frames: FrameTable,
        memory: MachineMemory,
        xen_l4_entries: list[int],
        on_retype: TypeChangeHook | None = None,
        on_write: EntryWriteHook | None = None,
    ) -> None:
        if len(xen_l4_entries) != len(XEN_SLOTS):
            raise ValueError("one Xen entry per reserved L4 slot")
        self.ft = frames
        self.mem = memory
        self.xen_l4_entries = xen_l4_entries
        self.on_retype = on_retype
        self.on_write = on_write

    # --- general references ---------------------------------------------------

    def get_page(self, mfn: int, owner: int) -> bool:
        ft = self.ft
        if not 0 <= mfn < ft.nr_frames or ft.owner[mfn] != owner or ft.count[mfn] == 0:
            return False
        ft.count[mfn] += 1
        return True

    def put_page(self, mfn: int) -> None:
        ft = self.ft
        if ft.count[mfn] == 0:
            raise AssertionError(f"put_page underflow: {ft.describe(mfn)}")
        ft.count[mfn] -= 1

    # --- type references ------------------------------------------------------

    def get_page_type(self, mfn: int, page_type: int) -> int:
        """Take a type reference, validating the frame on first typed use."""
        ft = self.ft
        if ft.type_count[mfn] == 0:
            if ft.type[mfn] != page_type:
                previous = ft.type[mfn]
                ft.type[mfn] = page_type
                ft.flags[mfn] &= ~VALIDATED
                retyped = page_type in PAGE_TABLE_TYPES and previous != abi.PGT_none
                if retyped and self.on_retype is not None:
                    self.on_retype(ft.owner[mfn])
        elif ft.type[mfn] != page_type:
            return -abi.EINVAL
        elif not ft.flags[mfn] & VALIDATED:
            # Typed but still being validated: only reachable through a cycle.
            return -abi.EINVAL
        ft.type_count[mfn] += 1
        if ft.flags[mfn] & VALIDATED:
            return 0
        if page_type not in PAGE_TABLE_TYPES:
            ft.flags[mfn] |= VALIDATED
            return 0
        rc = self._promote(mfn, page_type)
        if rc:
            ft.type_count[mfn] -= 1
            ft.type[mfn] = abi.PGT_none
            ft.flags[mfn] &= ~VALIDATED
            return rc
        ft.flags[mfn] |= VALIDATED
        return 0

    def get_page_and_type(self, mfn: int, owner: int, page_type: int, error: int) -> int:
        """get_page + get_page_type; ``error`` is returned when get_page fails."""
        if not self.get_page(mfn, owner):
            return error
        rc = self.get_page_type(mfn, page_type)
        if rc:
            self.put_page(mfn)
        return rc

    def put_page_type(self, mfn: int) -> None:
        self._release([(mfn, False)])

    def put_page_and_type(self, mfn: int) -> None:
        self._release([(mfn, True)])

    def _release(self, stack: list[tuple[int, bool]]) -> None:
        """Drop type references; a page table reaching zero is torn down.

        Iterative: each entry is (mfn, also drop a general reference).
        """
        ft = self.ft
        while stack:
            mfn, with_page = stack.pop()
            if ft.type_count[mfn] == 0:
                raise AssertionError(f"put_page_type underflow: {ft.describe(mfn)}")
            ft.type_count[mfn] -= 1
            page_type = ft.type[mfn]
            if (
                ft.type_count[mfn] == 0
                and page_type in PAGE_TABLE_TYPES
                and ft.flags[mfn] & VALIDATED
            ):
                ft.flags[mfn] &= ~VALIDATED
                self._demote(mfn, page_type, stack)
            if with_page:
                self.put_page(mfn)

    def _demote(self, mfn: int, page_type: int, stack: list[tuple[int, bool]]) -> None:
        table = self.mem.table(mfn)
        if page_type == abi.PGT_l1_page_table:
            for index in range(ENTRIES_PER_TABLE):
                entry = table[index]
                if entry & _PAGE_PRESENT:
                    self.put_page_from_l1e(entry)
            return
        for index in range(ENTRIES_PER_TABLE):
            if page_type == abi.PGT_l4_page_table and FIRST_XEN_SLOT <= index <= LAST_XEN_SLOT:
                continue
            entry = table[index]
            if entry & _PAGE_PRESENT:
                stack.append((frame_of(entry), True))

    # --- entry rules ----------------------------------------------------------

    def get_page_from_l1e(self, pte: int, fd: int) -> int:
        """References for a present L1 entry (Xen's ``get_page_from_l1e``), in Xen's order."""
        if pte & L1_DISALLOW_MASK:
            return -abi.EINVAL
        mfn = frame_of(pte)
        ft = self.ft
        if mfn >= ft.nr_frames:
            # Not RAM: MMIO, which needs I/O permission a domU does not have.
            return -abi.EINVAL if pte & PTE_MFN_MASK == PTE_MFN_MASK else -abi.EPERM
        if not self.get_page(mfn, fd):
            return -abi.EBUSY
        if pte & _PAGE_RW:
            rc = self.get_page_type(mfn, abi.PGT_writable_page)
            if rc:
                self.put_page(mfn)
                return -abi.EBUSY
        return 0

    def put_page_from_l1e(self, pte: int) -> None:
        mfn = frame_of(pte)
        if mfn >= self.ft.nr_frames:
            return
        if pte & _PAGE_RW:
            self.put_page_type(mfn)
        self.put_page(mfn)

    def get_page_from_upper(self, pte: int, level: int, owner: int) -> int:
        """References for a present L2/L3/L4 entry: its child becomes level-1."""
        return self.get_page_and_type(frame_of(pte), owner, level - 1, -abi.EINVAL)

    # --- promotion --------------------------------------------------------------

    def _promote(self, mfn: int, page_type: int) -> int:
        owner = self.ft.owner[mfn]
        table = self.mem.table(mfn)
        if page_type == abi.PGT_l1_page_table:
            for index in range(ENTRIES_PER_TABLE):
                entry = table[index]
                if not entry & _PAGE_PRESENT:
                    continue
                rc = self.get_page_from_l1e(entry, owner)
                if rc:
                    for undo in range(index):
                        if table[undo] & _PAGE_PRESENT:
                            self.put_page_from_l1e(table[undo])
                    return rc
                table[index] = adjust_guest_l1e(entry)
            return 0
        level = page_type  # PGT_lN_page_table == N
        for index in range(ENTRIES_PER_TABLE):
            if level == 4 and FIRST_XEN_SLOT <= index <= LAST_XEN_SLOT:
                continue
            entry = table[index]
            if not entry & _PAGE_PRESENT:
                continue
            rc = -abi.EINVAL if entry & L2_DISALLOW_MASK else 0
            if not rc:
                rc = self.get_page_from_upper(entry, level, owner)
            if rc:
                undo_stack = [
                    (frame_of(table[undo]), True)
                    for undo in range(index)
                    if table[undo] & _PAGE_PRESENT
                    and not (level == 4 and FIRST_XEN_SLOT <= undo <= LAST_XEN_SLOT)
                ]
                self._release(undo_stack)
                return rc
            table[index] = adjust_guest_upper(entry, level)
        if level == 4:
            for slot, value in zip(XEN_SLOTS, self.xen_l4_entries, strict=True):
                table[slot] = value
        return 0

    # --- entry updates ------------------------------------------------------------

    def mod_l1_entry(self, maddr: int, new: int, preserve_ad: bool, fd: int) -> int:
        """Checked write of one L1 entry (Xen's ``mod_l1_entry``); never flushes a TLB."""
        old = self.mem.read_u64(maddr)
        if new & _PAGE_PRESENT:
            if new & L1_DISALLOW_MASK:
                return -abi.EINVAL
            new = adjust_guest_l1e(new)
            if not (old ^ new) & ~FASTPATH_WHITELIST:
                self._write(maddr, old, new, preserve_ad)
                return 0
            rc = self.get_page_from_l1e(new, fd)
            if rc:
                return rc
        self._write(maddr, old, new, preserve_ad)
        if old & _PAGE_PRESENT:
            self.put_page_from_l1e(old)
        return 0

    def mod_upper_entry(self, maddr: int, new: int, level: int, preserve_ad: bool) -> int:
        """Checked write of one L2/L3/L4 entry (Xen's ``mod_l2_entry`` to ``mod_l4_entry``)."""
        mfn = maddr >> PAGE_SHIFT
        if level == 4 and FIRST_XEN_SLOT <= (maddr & 0xFFF) >> 3 <= LAST_XEN_SLOT:
            return -abi.EINVAL
        old = self.mem.read_u64(maddr)
        if new & _PAGE_PRESENT:
            if new & L2_DISALLOW_MASK:
                return -abi.EINVAL
            new = adjust_guest_upper(new, level)
            if not (old ^ new) & ~FASTPATH_WHITELIST:
                self._write(maddr, old, new, preserve_ad)
                return 0
            rc = self.get_page_from_upper(new, level, self.ft.owner[mfn])
            if rc:
                return rc
        self._write(maddr, old, new, preserve_ad)
        if old & _PAGE_PRESENT:
            self.put_page_and_type(frame_of(old))
        return 0

    def _write(self, maddr: int, old: int, new: int, preserve_ad: bool) -> None:
        """Store an entry; PRESERVE_AD ORs in the A/D bits memory holds now
        (Xen's ``update_intpte``).

        The hypervisor is single-threaded and the hardware model runs between
        entries, never inside one, so memory still holds ``old`` here.
        """
        if preserve_ad:
            new |= old & PAGE_AD
        self.mem.write_u64(maddr, new)
        if self.on_write is not None:
            self.on_write(maddr, new)

    # --- pinning ------------------------------------------------------------------

    def pin(self, mfn: int, owner: int, level: int) -> int:
        ft = self.ft
        if not ft.valid(mfn) or ft.owner[mfn] != owner:
            return -abi.EINVAL
        rc = self.get_page_and_type(mfn, owner, level, -abi.EINVAL)
        if rc:
            return rc
        if ft.flags[mfn] & PINNED:
            self.put_page_and_type(mfn)
            return -abi.EINVAL
        ft.flags[mfn] |= PINNED
        return 0

    def unpin(self, mfn: int, owner: int) -> int:
        ft = self.ft
        if not ft.valid(mfn) or ft.owner[mfn] != owner or not ft.flags[mfn] & PINNED:
            return -abi.EINVAL
        ft.flags[mfn] &= ~PINNED
        self.put_page_and_type(mfn)
        return 0
