"""x86-64 4-level paging arithmetic: PTE bits, frame fields, VA indexes.

Pure functions on ints, shared by the hypervisor (which validates entries), the
hardware model (which walks them) and the guest (which builds them). Bit
positions follow docs/sources.md §5.
"""

from __future__ import annotations

from typing import Final, NamedTuple

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PAGE_MASK: Final = ~(PAGE_SIZE - 1)
PTE_SIZE: Final = 8
ENTRIES_PER_TABLE: Final = 512
PAGETABLE_ORDER: Final = 9
PADDR_BITS: Final = 52
VADDR_BITS: Final = 48

L1_PAGETABLE_SHIFT: Final = 12
L2_PAGETABLE_SHIFT: Final = 21
L3_PAGETABLE_SHIFT: Final = 30
L4_PAGETABLE_SHIFT: Final = 39

# --- PTE flag bits -------------------------------------------------------------
_PAGE_PRESENT: Final = 0x001
_PAGE_RW: Final = 0x002
_PAGE_USER: Final = 0x004
_PAGE_PWT: Final = 0x008
_PAGE_PCD: Final = 0x010
_PAGE_ACCESSED: Final = 0x020
_PAGE_DIRTY: Final = 0x040
_PAGE_PAT: Final = 0x080
_PAGE_PSE: Final = 0x080
_PAGE_GLOBAL: Final = 0x100
_PAGE_AVAIL: Final = 0xE00
_PAGE_GUEST_KERNEL: Final = 1 << 52
_PAGE_AVAIL_HIGH: Final = 0x7FF << 52
_PAGE_NX: Final = 1 << 63

#: The A/D bits that hardware sets and PRESERVE_AD keeps.
PAGE_AD: Final = _PAGE_ACCESSED | _PAGE_DIRTY

#: Bits 12..51: the machine frame number.
PTE_MFN_MASK: Final = ((1 << PADDR_BITS) - 1) & PAGE_MASK
#: Everything that is not the frame field.
PTE_FLAGS_MASK: Final = ~PTE_MFN_MASK & ((1 << 64) - 1)

MAX_U64: Final = (1 << 64) - 1
CANONICAL_LOW_END: Final = 1 << (VADDR_BITS - 1)
CANONICAL_HIGH_START: Final = MAX_U64 + 1 - CANONICAL_LOW_END

#: Linux's ``PAGE_OFFSET`` (``page_offset_base`` with 4-level paging, no
#: KASLR): where the kernel's linear map of all guest memory starts, just
#: above Xen's reserved hole and the PTI LDT remap. A Xen PV kernel remaps a
#: page read-only there before pinning it as a page table (Xen refuses a
#: writable mapping of a page table), so the hypervisor must know this range:
#: pfn = (va - LINEAR_MAP_BASE) >> PAGE_SHIFT.
LINEAR_MAP_BASE: Final = 0xFFFF_8880_0000_0000


class VaIndexes(NamedTuple):
    """The four table indexes and byte offset of a virtual address."""

    l4: int
    l3: int
    l2: int
    l1: int
    offset: int


def pte_mfn(pte: int) -> int:
    """The frame number held in bits 12..51 of an entry."""
    return (pte & PTE_MFN_MASK) >> PAGE_SHIFT


def pte_flags(pte: int) -> int:
    """Every bit of an entry except the frame field."""
    return pte & PTE_FLAGS_MASK


def make_pte(mfn: int, flags: int) -> int:
    """Build an entry from a frame number and flag bits."""
    if not 0 <= mfn < (1 << (PADDR_BITS - PAGE_SHIFT)):
        raise ValueError(f"mfn {mfn:#x} does not fit the 40-bit frame field")
    if flags & PTE_MFN_MASK:
        raise ValueError(f"flags {flags:#x} overlap the frame field")
    return (mfn << PAGE_SHIFT) | flags


def pte_present(pte: int) -> bool:
    return bool(pte & _PAGE_PRESENT)


def is_canonical(va: int) -> bool:
    """Bits 63..48 equal bit 47 (Xen's ``is_canonical_address``)."""
    return 0 <= va < CANONICAL_LOW_END or CANONICAL_HIGH_START <= va <= MAX_U64


def va_indexes(va: int) -> VaIndexes:
    """Split a canonical VA into (L4, L3, L2, L1, offset)."""
    if not is_canonical(va):
        raise ValueError(f"non-canonical virtual address {va:#x}")
    return VaIndexes(
        (va >> L4_PAGETABLE_SHIFT) & 0x1FF,
        (va >> L3_PAGETABLE_SHIFT) & 0x1FF,
        (va >> L2_PAGETABLE_SHIFT) & 0x1FF,
        (va >> L1_PAGETABLE_SHIFT) & 0x1FF,
        va & (PAGE_SIZE - 1),
    )


def va_from_indexes(l4: int, l3: int, l2: int, l1: int, offset: int = 0) -> int:
    """Inverse of :func:`va_indexes`: sign-extends bit 47 to a canonical VA."""
    for name, value, limit in (
        ("l4", l4, 512),
        ("l3", l3, 512),
        ("l2", l2, 512),
        ("l1", l1, 512),
        ("offset", offset, PAGE_SIZE),
    ):
        if not 0 <= value < limit:
            raise ValueError(f"{name} index {value} out of range")
    va = (
        (l4 << L4_PAGETABLE_SHIFT)
        | (l3 << L3_PAGETABLE_SHIFT)
        | (l2 << L2_PAGETABLE_SHIFT)
        | (l1 << L1_PAGETABLE_SHIFT)
        | offset
    )
    if va & CANONICAL_LOW_END:
        va |= CANONICAL_HIGH_START
    return va


def table_index(va: int, level: int) -> int:
    """Index of ``va`` in a table of ``level`` (1..4)."""
    if level not in (1, 2, 3, 4):
        raise ValueError(f"level {level} is not 1..4")
    return (va >> (PAGE_SHIFT + PAGETABLE_ORDER * (level - 1))) & 0x1FF


def maddr_of_entry(mfn: int, index: int) -> int:
    """Machine address of entry ``index`` of the table in frame ``mfn``."""
    if not 0 <= index < ENTRIES_PER_TABLE:
        raise ValueError(f"entry index {index} out of range")
    return (mfn << PAGE_SHIFT) | (index * PTE_SIZE)


def entry_of_maddr(maddr: int) -> tuple[int, int]:
    """(mfn, entry index) of an 8-byte-aligned machine address."""
    if maddr % PTE_SIZE:
        raise ValueError(f"machine address {maddr:#x} is not 8-byte aligned")
    return maddr >> PAGE_SHIFT, (maddr & (PAGE_SIZE - 1)) // PTE_SIZE


def page_align_down(addr: int) -> int:
    return addr & PAGE_MASK


def page_align_up(addr: int) -> int:
    return (addr + PAGE_SIZE - 1) & PAGE_MASK


# --- page-fault error code bits (x86 #PF) ------------------------------------
PF_PROT: Final = 0x01  # 0: not present, 1: protection violation
PF_WRITE: Final = 0x02
PF_USER: Final = 0x04
PF_RSVD: Final = 0x08
PF_INSTR: Final = 0x10
