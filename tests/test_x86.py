"""x86-64 paging arithmetic in ``shared.x86`` (docs/sources.md §5)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvemu.shared import x86
from pvemu.shared.x86 import (
    CANONICAL_HIGH_START,
    CANONICAL_LOW_END,
    ENTRIES_PER_TABLE,
    MAX_U64,
    PAGE_AD,
    PAGE_SIZE,
    PTE_FLAGS_MASK,
    PTE_MFN_MASK,
    PTE_SIZE,
    VaIndexes,
    entry_of_maddr,
    is_canonical,
    maddr_of_entry,
    make_pte,
    page_align_down,
    page_align_up,
    pte_flags,
    pte_mfn,
    pte_present,
    table_index,
    va_from_indexes,
    va_indexes,
)

MAX_MFN = (1 << 40) - 1

low_half = st.integers(min_value=0, max_value=CANONICAL_LOW_END - 1)
high_half = st.integers(min_value=CANONICAL_HIGH_START, max_value=MAX_U64)
canonical = st.one_of(low_half, high_half)
non_canonical = st.integers(min_value=CANONICAL_LOW_END, max_value=CANONICAL_HIGH_START - 1)
index = st.integers(min_value=0, max_value=ENTRIES_PER_TABLE - 1)
offset = st.integers(min_value=0, max_value=PAGE_SIZE - 1)
mfns = st.integers(min_value=0, max_value=MAX_MFN)
#: Any combination of bits 0..11 and 52..63: everything but the frame field.
flag_bits = st.integers(min_value=0, max_value=MAX_U64).map(lambda v: v & PTE_FLAGS_MASK)
u64 = st.integers(min_value=0, max_value=MAX_U64)


# --- constants pinned against docs/sources.md §5 ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("_PAGE_PRESENT", 0x001),
        ("_PAGE_RW", 0x002),
        ("_PAGE_USER", 0x004),
        ("_PAGE_PWT", 0x008),
        ("_PAGE_PCD", 0x010),
        ("_PAGE_ACCESSED", 0x020),
        ("_PAGE_DIRTY", 0x040),
        ("_PAGE_PAT", 0x080),
        ("_PAGE_PSE", 0x080),
        ("_PAGE_GLOBAL", 0x100),
        ("_PAGE_AVAIL", 0xE00),
        ("_PAGE_GUEST_KERNEL", 1 << 52),
        ("_PAGE_AVAIL_HIGH", sum(1 << b for b in range(52, 63))),
        ("_PAGE_NX", 1 << 63),
    ],
)
def test_pte_bit_constants(name: str, value: int) -> None:
    assert getattr(x86, name) == value


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PAGE_SHIFT", 12),
        ("PAGE_SIZE", 4096),
        ("PTE_SIZE", 8),
        ("ENTRIES_PER_TABLE", 512),
        ("PAGETABLE_ORDER", 9),
        ("PADDR_BITS", 52),
        ("VADDR_BITS", 48),
        ("L1_PAGETABLE_SHIFT", 12),
        ("L2_PAGETABLE_SHIFT", 21),
        ("L3_PAGETABLE_SHIFT", 30),
        ("L4_PAGETABLE_SHIFT", 39),
    ],
)
def test_paging_geometry_constants(name: str, value: int) -> None:
    assert getattr(x86, name) == value


def test_frame_field_is_bits_12_to_51() -> None:
    assert sum(1 << b for b in range(12, 52)) == PTE_MFN_MASK
    assert PTE_FLAGS_MASK == MAX_U64 ^ PTE_MFN_MASK
    assert PAGE_AD == 0x60


def test_canonical_boundaries() -> None:
    assert CANONICAL_LOW_END == 0x0000_8000_0000_0000
    assert CANONICAL_HIGH_START == 0xFFFF_8000_0000_0000
    assert is_canonical(0)
    assert is_canonical(0x0000_7FFF_FFFF_FFFF)
    assert not is_canonical(0x0000_8000_0000_0000)
    assert not is_canonical(0xFFFF_7FFF_FFFF_FFFF)
    assert is_canonical(0xFFFF_8000_0000_0000)
    assert is_canonical(MAX_U64)
    assert not is_canonical(-1)
    assert not is_canonical(1 << 64)


def test_pf_error_code_bits() -> None:
    assert (x86.PF_PROT, x86.PF_WRITE, x86.PF_USER, x86.PF_RSVD, x86.PF_INSTR) == (
        0x01,
        0x02,
        0x04,
        0x08,
        0x10,
    )


# --- VA <-> indexes ------------------------------------------------------------


@given(canonical)
def test_va_indexes_round_trip(va: int) -> None:
    idx = va_indexes(va)
    assert all(0 <= i < ENTRIES_PER_TABLE for i in (idx.l4, idx.l3, idx.l2, idx.l1))
    assert 0 <= idx.offset < PAGE_SIZE
    assert va_from_indexes(*idx) == va


@given(low_half)
def test_low_half_uses_l4_slots_0_to_255(va: int) -> None:
    assert va_indexes(va).l4 < 256


@given(high_half)
def test_high_half_uses_l4_slots_256_to_511(va: int) -> None:
    assert va_indexes(va).l4 >= 256


@given(index, index, index, index, offset)
def test_va_from_indexes_round_trip(l4: int, l3: int, l2: int, l1: int, off: int) -> None:
    va = va_from_indexes(l4, l3, l2, l1, off)
    assert is_canonical(va)
    assert va_indexes(va) == VaIndexes(l4, l3, l2, l1, off)


@given(non_canonical)
def test_non_canonical_rejected(va: int) -> None:
    assert not is_canonical(va)
    with pytest.raises(ValueError, match="non-canonical"):
        va_indexes(va)


def test_known_addresses() -> None:
    assert va_indexes(0) == VaIndexes(0, 0, 0, 0, 0)
    assert va_indexes(0x0000_7FFF_FFFF_FFFF) == VaIndexes(255, 511, 511, 511, 4095)
    assert va_indexes(0xFFFF_8000_0000_0000) == VaIndexes(256, 0, 0, 0, 0)
    assert va_indexes(0x0000_0000_0040_1234) == VaIndexes(0, 0, 2, 1, 0x234)
    assert va_from_indexes(271, 511, 511, 511, 4095) == 0xFFFF_87FF_FFFF_FFFF
    assert va_from_indexes(272, 0, 0, 0) == 0xFFFF_8800_0000_0000
    assert va_from_indexes(511, 511, 511, 511, 4095) == MAX_U64


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((512, 0, 0, 0, 0), "l4"),
        ((0, 512, 0, 0, 0), "l3"),
        ((0, 0, 512, 0, 0), "l2"),
        ((0, 0, 0, 512, 0), "l1"),
        ((0, 0, 0, 0, 4096), "offset"),
        ((-1, 0, 0, 0, 0), "l4"),
        ((0, 0, 0, 0, -1), "offset"),
    ],
)
def test_va_from_indexes_range_errors(args: tuple[int, int, int, int, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        va_from_indexes(*args)


@given(canonical)
def test_table_index_agrees_with_va_indexes(va: int) -> None:
    idx = va_indexes(va)
    assert [table_index(va, level) for level in (4, 3, 2, 1)] == [idx.l4, idx.l3, idx.l2, idx.l1]


@pytest.mark.parametrize("level", [0, 5, -1])
def test_table_index_rejects_bad_level(level: int) -> None:
    with pytest.raises(ValueError, match="level"):
        table_index(0, level)


# --- PTE fields ----------------------------------------------------------------


@given(mfns, flag_bits)
def test_make_pte_round_trip(mfn: int, flags: int) -> None:
    pte = make_pte(mfn, flags)
    assert 0 <= pte <= MAX_U64
    assert pte_mfn(pte) == mfn
    assert pte_flags(pte) == flags
    assert pte_present(pte) == bool(flags & x86._PAGE_PRESENT)


@given(u64)
def test_any_entry_splits_and_rebuilds(pte: int) -> None:
    assert make_pte(pte_mfn(pte), pte_flags(pte)) == pte


def test_make_pte_known_value() -> None:
    flags = x86._PAGE_PRESENT | x86._PAGE_RW | x86._PAGE_USER | x86._PAGE_NX
    assert make_pte(0x12345, flags) == 0x8000_0000_1234_5007


@pytest.mark.parametrize("mfn", [-1, 1 << 40, (1 << 40) + 5])
def test_make_pte_rejects_mfn_out_of_range(mfn: int) -> None:
    with pytest.raises(ValueError, match="mfn"):
        make_pte(mfn, x86._PAGE_PRESENT)


def test_make_pte_accepts_largest_mfn() -> None:
    assert pte_mfn(make_pte(MAX_MFN, 0)) == MAX_MFN


@given(mfns, st.integers(min_value=12, max_value=51))
def test_make_pte_rejects_flags_in_frame_field(mfn: int, bit: int) -> None:
    with pytest.raises(ValueError, match="overlap"):
        make_pte(mfn, x86._PAGE_PRESENT | (1 << bit))


# --- machine address <-> (mfn, entry) ------------------------------------------


@given(mfns, index)
def test_maddr_round_trip(mfn: int, i: int) -> None:
    maddr = maddr_of_entry(mfn, i)
    assert maddr % PTE_SIZE == 0
    assert entry_of_maddr(maddr) == (mfn, i)


@given(mfns.map(lambda m: m << 12), index)
def test_entry_of_maddr_round_trip(frame_base: int, i: int) -> None:
    maddr = frame_base + i * PTE_SIZE
    assert maddr_of_entry(*entry_of_maddr(maddr)) == maddr


def test_maddr_known_value() -> None:
    assert maddr_of_entry(0x1234, 3) == 0x1234018
    assert entry_of_maddr(0x1234FF8) == (0x1234, 511)


@pytest.mark.parametrize("i", [-1, 512])
def test_maddr_of_entry_rejects_bad_index(i: int) -> None:
    with pytest.raises(ValueError, match="index"):
        maddr_of_entry(1, i)


@given(mfns, st.integers(min_value=0, max_value=PAGE_SIZE - 1).filter(lambda o: o % 8 != 0))
def test_entry_of_maddr_rejects_misaligned(mfn: int, off: int) -> None:
    with pytest.raises(ValueError, match="aligned"):
        entry_of_maddr((mfn << 12) | off)


# --- page alignment ------------------------------------------------------------


@given(st.integers(min_value=0, max_value=1 << 63))
def test_page_align(addr: int) -> None:
    down, up = page_align_down(addr), page_align_up(addr)
    assert down % PAGE_SIZE == 0
    assert up % PAGE_SIZE == 0
    assert down <= addr <= up
    assert addr - down < PAGE_SIZE
    assert up - addr < PAGE_SIZE
    assert (down == up) == (addr % PAGE_SIZE == 0)


@pytest.mark.parametrize(
    ("addr", "down", "up"),
    [
        (0, 0, 0),
        (1, 0, 4096),
        (4095, 0, 4096),
        (4096, 4096, 4096),
        (4097, 4096, 8192),
    ],
)
def test_page_align_known(addr: int, down: int, up: int) -> None:
    assert page_align_down(addr) == down
    assert page_align_up(addr) == up
