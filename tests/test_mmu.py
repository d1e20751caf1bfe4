"""Tests for the x86-64 hardware model (shared/mmu.py) over hand-built page tables."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvemu.shared.mmu import (
    AccessKind,
    BytearrayMemory,
    HardwareModel,
    PageFault,
    RunOutcome,
    StaleTlbWrite,
)
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    PAGE_SIZE,
    PF_INSTR,
    PF_PROT,
    PF_USER,
    PF_WRITE,
    maddr_of_entry,
    make_pte,
    pte_mfn,
    va_from_indexes,
    va_indexes,
)

P, RW, U, A, D, NX = _PAGE_PRESENT, _PAGE_RW, _PAGE_USER, _PAGE_ACCESSED, _PAGE_DIRTY, _PAGE_NX
PRU = P | RW | U
R, W, X = AccessKind.READ, AccessKind.WRITE, AccessKind.EXEC

L4_MFN, L3_MFN, L2_MFN, L1_MFN = 1, 2, 3, 4
DATA_MFN, DATA2_MFN = 10, 11
VA = va_from_indexes(1, 2, 3, 4)
LEVEL_MFN = {4: L4_MFN, 3: L3_MFN, 2: L2_MFN, 1: L1_MFN}


def entry_maddr(va: int, level: int) -> int:
    """Machine address of the entry that translates ``va`` at ``level`` in our layout."""
    idx = va_indexes(va)
    index = {4: idx.l4, 3: idx.l3, 2: idx.l2, 1: idx.l1}[level]
    return maddr_of_entry(LEVEL_MFN[level], index)


def build(
    mem: BytearrayMemory,
    va: int = VA,
    mfn: int = DATA_MFN,
    *,
    flags: dict[int, int] | None = None,
) -> None:
    """Map ``va`` -> ``mfn`` through L4_MFN..L1_MFN; ``flags`` overrides per level."""
    flags = flags or {}
    nxt = {4: L3_MFN, 3: L2_MFN, 2: L1_MFN, 1: mfn}
    for level in (4, 3, 2, 1):
        mem.write_u64(entry_maddr(va, level), make_pte(nxt[level], flags.get(level, PRU)))


def set_l1(mem: BytearrayMemory, va: int, mfn: int, flags: int) -> None:
    mem.write_u64(entry_maddr(va, 1), make_pte(mfn, flags))


def pte(mem: BytearrayMemory, va: int, level: int) -> int:
    return mem.read_u64(entry_maddr(va, level))


def machine(nr_vcpus: int = 1) -> tuple[BytearrayMemory, HardwareModel, list[tuple[int, int, int]]]:
    mem = BytearrayMemory(64)
    dirtied: list[tuple[int, int, int]] = []
    hw = HardwareModel(mem, nr_vcpus, on_dirty=lambda *args: dirtied.append(args))
    for vcpu in range(nr_vcpus):
        hw.set_cr3(vcpu, L4_MFN)
    return mem, hw, dirtied


# --- memory ------------------------------------------------------------------


def test_bytearray_memory_little_endian_and_bounds() -> None:
    mem = BytearrayMemory(2)
    mem.write_u64(PAGE_SIZE + 8, 0x0102030405060708)
    assert mem.read_bytes(PAGE_SIZE + 8, 2) == b"\x08\x07"
    assert mem.read_u64(PAGE_SIZE + 8) == 0x0102030405060708
    mem.write_bytes(0, b"abc")
    assert mem.read_bytes(0, 3) == b"abc"
    with pytest.raises(IndexError, match="outside"):
        mem.read_u64(2 * PAGE_SIZE - 4)
    with pytest.raises(IndexError, match="outside"):
        mem.write_bytes(2 * PAGE_SIZE - 1, b"xy")
    with pytest.raises(IndexError, match="outside"):
        mem.read_bytes(-1, 1)
    with pytest.raises(ValueError, match="u64"):
        mem.write_u64(0, 1 << 64)


# --- A/D bits ----------------------------------------------------------------


def test_read_sets_accessed_on_every_level_and_no_dirty() -> None:
    mem, hw, dirtied = machine()
    build(mem)
    assert hw.access(0, VA, R, 4) == b"\0\0\0\0"
    for level in (4, 3, 2, 1):
        assert pte(mem, VA, level) & (A | D) == A, level
    assert hw.stats.accessed_set == 4
    assert hw.stats.dirty_set == 0
    assert dirtied == []


def test_write_sets_dirty_only_on_leaf() -> None:
    mem, hw, dirtied = machine()
    build(mem)
    assert hw.access(0, VA + 5, W, b"hi") == b""
    for level in (4, 3, 2):
        assert pte(mem, VA, level) & (A | D) == A, level
    assert pte(mem, VA, 1) & (A | D) == A | D
    assert dirtied == [(0, VA, entry_maddr(VA, 1))]
    assert hw.stats.dirty_set == 1


def test_accessed_written_only_when_clear() -> None:
    mem, hw, _ = machine()
    build(mem, flags={4: PRU | A, 3: PRU | A, 2: PRU | A, 1: PRU | A})
    assert hw.access(0, VA, R, 1) == b"\0"
    assert hw.stats.accessed_set == 0


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_no_accessed_or_dirty_on_non_present_entry(level: int) -> None:
    mem, hw, dirtied = machine()
    build(mem, flags={level: RW | U})
    before = pte(mem, VA, level)
    fault = hw.access(0, VA, W, b"x")
    assert fault == PageFault(VA, PF_USER | PF_WRITE)
    assert pte(mem, VA, level) == before
    for lower in range(1, level):
        assert pte(mem, VA, lower) & (A | D) == 0
    for upper in range(level + 1, 5):
        assert pte(mem, VA, upper) & (A | D) == A  # used to reach the missing table
    assert dirtied == []


def test_denied_leaf_gets_no_accessed_bit() -> None:
    mem, hw, _ = machine()
    build(mem, flags={1: P | U})
    assert hw.access(0, VA, W, b"x") == PageFault(VA, PF_USER | PF_WRITE | PF_PROT)
    assert pte(mem, VA, 1) & (A | D) == 0


# --- faults ------------------------------------------------------------------


@pytest.mark.parametrize("level", [4, 3, 2, 1])
@pytest.mark.parametrize(
    ("kind", "data", "code"),
    [(R, 1, PF_USER), (W, b"x", PF_USER | PF_WRITE), (X, None, PF_USER | PF_INSTR)],
)
def test_not_present_at_each_level(
    level: int, kind: AccessKind, data: bytes | int | None, code: int
) -> None:
    mem, hw, _ = machine()
    build(mem, flags={level: 0})
    assert hw.access(0, VA, kind, data) == PageFault(VA, code)
    assert hw.stats.page_faults == 1


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_user_bit_missing_at_each_level(level: int) -> None:
    mem, hw, _ = machine()
    build(mem, flags={level: P | RW})
    assert hw.access(0, VA, R, 1) == PageFault(VA, PF_USER | PF_PROT)


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_write_needs_rw_at_every_level(level: int) -> None:
    mem, hw, _ = machine()
    build(mem, flags={level: P | U})
    assert hw.access(0, VA, R, 1) == b"\0"
    assert hw.access(0, VA, W, b"x") == PageFault(VA, PF_USER | PF_WRITE | PF_PROT)
    assert hw.access(0, VA, X) == b""


@pytest.mark.parametrize("level", [2, 1])
def test_exec_with_nx(level: int) -> None:
    mem, hw, _ = machine()
    build(mem, flags={level: PRU | NX})
    assert hw.access(0, VA, X) == PageFault(VA, PF_USER | PF_INSTR | PF_PROT)
    assert hw.access(0, VA, R, 1) == b"\0"
    assert hw.access(0, VA, W, b"x") == b""


def test_not_present_wins_over_upper_protection() -> None:
    mem, hw, _ = machine()
    build(mem, flags={3: P | U, 1: 0})
    assert hw.access(0, VA, W, b"x") == PageFault(VA, PF_USER | PF_WRITE)


@pytest.mark.parametrize("va", [1 << 47, 0x0000_9000_0000_0000, (1 << 64) - (1 << 47) - 1, -4096])
def test_non_canonical_is_not_present_fault(va: int) -> None:
    mem, hw, _ = machine()
    build(mem)
    assert hw.access(0, va, R, 1) == PageFault(va, PF_USER)
    assert hw.access(0, va, W, b"x") == PageFault(va, PF_USER | PF_WRITE)


def test_no_cr3_is_not_present_fault() -> None:
    mem = BytearrayMemory(64)
    build(mem)
    hw = HardwareModel(mem, 1)
    assert hw.cr3(0) is None
    assert hw.access(0, VA, X) == PageFault(VA, PF_USER | PF_INSTR)
    hw.set_cr3(0, L4_MFN)
    assert hw.cr3(0) == L4_MFN
    assert hw.access(0, VA, X) == b""


def test_upper_half_canonical_address_walks() -> None:
    mem, hw, _ = machine()
    va = va_from_indexes(511, 510, 0, 7, 16)
    assert va >= 1 << 63
    build(mem, va)
    assert hw.access(0, va, W, b"top") == b""
    assert mem.read_bytes(DATA_MFN * PAGE_SIZE + 16, 3) == b"top"


# --- data --------------------------------------------------------------------


def test_data_written_reads_back_in_the_mapped_frame() -> None:
    mem, hw, _ = machine()
    build(mem)
    assert hw.access(0, VA + 100, W, b"hello") == b""
    assert hw.access(0, VA + 100, R, 5) == b"hello"
    assert hw.access(0, VA + 101, R, 3) == b"ell"
    assert mem.read_bytes(DATA_MFN * PAGE_SIZE + 100, 5) == b"hello"
    assert hw.access(0, VA + PAGE_SIZE - 2, W, b"ok") == b""


def test_access_crossing_a_page_is_rejected() -> None:
    _, hw, _ = machine()
    with pytest.raises(ValueError, match="crosses"):
        hw.access(0, VA + PAGE_SIZE - 1, R, 2)
    with pytest.raises(ValueError, match="crosses"):
        hw.access(0, VA + PAGE_SIZE - 1, W, b"ab")
    with pytest.raises(TypeError, match="bytes"):
        hw.access(0, VA, W, 3)
    with pytest.raises(IndexError, match="vcpu"):
        hw.access(1, VA, R, 1)


# --- TLB ---------------------------------------------------------------------


def test_tlb_hit_uses_stale_translation_until_invlpg() -> None:
    mem, hw, _ = machine()
    build(mem)
    mem.write_bytes(DATA_MFN * PAGE_SIZE, b"old")
    mem.write_bytes(DATA2_MFN * PAGE_SIZE, b"new")
    assert hw.access(0, VA, R, 3) == b"old"
    set_l1(mem, VA, DATA2_MFN, PRU | A)
    assert hw.access(0, VA, R, 3) == b"old"
    assert hw.stats.tlb_hits == 1
    assert hw.stats.walks == 1
    hw.invlpg(0, VA)
    assert hw.access(0, VA, R, 3) == b"new"
    assert hw.stats.invlpgs == 1


@pytest.mark.parametrize("flush", ["flush_tlb", "invlpg", "set_cr3"])
def test_stale_dirty_write_recorded_then_faults_after_flush(flush: str) -> None:
    mem, hw, dirtied = machine()
    build(mem)
    assert hw.access(0, VA, W, b"a") == b""
    entry = hw.tlb_entry(0, VA)
    assert entry is not None
    assert entry.dirty
    assert entry.writable
    ro = make_pte(DATA_MFN, P | U | A | D)
    mem.write_u64(entry_maddr(VA, 1), ro)
    walks = hw.stats.walks
    assert hw.access(0, VA + 1, W, b"b") == b""  # straight through the cached entry
    assert hw.stats.walks == walks
    assert mem.read_bytes(DATA_MFN * PAGE_SIZE, 2) == b"ab"
    assert hw.stale_writes == [StaleTlbWrite(0, VA + 1, DATA_MFN, entry_maddr(VA, 1), ro)]
    assert hw.stats.stale_tlb_writes == 1
    assert pte(mem, VA, 1) == ro  # the PTE was not touched
    if flush == "flush_tlb":
        hw.flush_tlb(0)
    elif flush == "invlpg":
        hw.invlpg(0, VA)
    else:
        hw.set_cr3(0, L4_MFN)
    assert hw.tlb_entry(0, VA) is None
    assert hw.access(0, VA + 2, W, b"c") == PageFault(VA + 2, PF_USER | PF_WRITE | PF_PROT)
    assert mem.read_bytes(DATA_MFN * PAGE_SIZE + 2, 1) == b"\0"
    assert hw.stats.stale_tlb_writes == 1
    assert len(dirtied) == 1


@pytest.mark.parametrize(
    "new_pte",
    [make_pte(DATA_MFN, RW | U | A | D), make_pte(DATA2_MFN, PRU | A | D)],
    ids=["not-present", "remapped"],
)
def test_stale_dirty_write_other_pte_changes(new_pte: int) -> None:
    mem, hw, _ = machine()
    build(mem)
    assert hw.access(0, VA, W, b"a") == b""
    mem.write_u64(entry_maddr(VA, 1), new_pte)
    assert hw.access(0, VA, W, b"z") == b""
    assert mem.read_bytes(DATA_MFN * PAGE_SIZE, 1) == b"z"
    assert [s.pte_in_memory for s in hw.stale_writes] == [new_pte]


def test_dirty_cached_write_with_unchanged_pte_is_not_stale() -> None:
    mem, hw, dirtied = machine()
    build(mem)
    assert hw.access(0, VA, W, b"a") == b""
    # Clearing D without a flush: hardware keeps writing through the dirty entry
    # and does not set D again (why writeback must flush after cleaning D).
    set_l1(mem, VA, DATA_MFN, PRU | A)
    assert hw.access(0, VA, W, b"b") == b""
    assert pte(mem, VA, 1) & D == 0
    assert hw.stale_writes == []
    assert len(dirtied) == 1


def test_write_hit_on_clean_entry_rewalks_and_faults_if_now_read_only() -> None:
    mem, hw, dirtied = machine()
    build(mem)
    assert hw.access(0, VA, R, 1) == b"\0"
    entry = hw.tlb_entry(0, VA)
    assert entry is not None
    assert entry.writable
    assert not entry.dirty
    set_l1(mem, VA, DATA_MFN, P | U | A)
    assert hw.access(0, VA, W, b"x") == PageFault(VA, PF_USER | PF_WRITE | PF_PROT)
    assert hw.stale_writes == []
    assert hw.tlb_entry(0, VA) is None  # the fault dropped the entry
    assert mem.read_bytes(DATA_MFN * PAGE_SIZE, 1) == b"\0"
    assert pte(mem, VA, 1) & D == 0
    assert dirtied == []


def test_write_hit_on_clean_entry_sets_dirty_and_follows_new_mapping() -> None:
    mem, hw, dirtied = machine()
    build(mem)
    assert hw.access(0, VA, R, 1) == b"\0"
    set_l1(mem, VA, DATA2_MFN, PRU | A)
    assert hw.access(0, VA, W, b"x") == b""
    assert hw.stats.walks == 2
    assert mem.read_bytes(DATA2_MFN * PAGE_SIZE, 1) == b"x"
    assert pte(mem, VA, 1) & (A | D) == A | D
    entry = hw.tlb_entry(0, VA)
    assert entry is not None
    assert (entry.mfn, entry.dirty) == (DATA2_MFN, True)
    assert dirtied == [(0, VA, entry_maddr(VA, 1))]


def test_permission_miss_on_hit_rewalks() -> None:
    mem, hw, _ = machine()
    build(mem, flags={1: P | U | NX})
    assert hw.access(0, VA, R, 1) == b"\0"
    set_l1(mem, VA, DATA_MFN, PRU | A)  # made writable and executable, no flush
    assert hw.access(0, VA, X) == b""
    assert hw.access(0, VA, W, b"w") == b""
    assert hw.stats.walks == 3
    assert hw.stale_writes == []


def test_on_dirty_once_per_transition() -> None:
    mem, hw, dirtied = machine()
    build(mem)
    for _ in range(3):
        assert hw.access(0, VA, W, b"x") == b""
    assert len(dirtied) == 1
    set_l1(mem, VA, DATA_MFN, PRU | A)  # writeback cleans D ...
    hw.invlpg(0, VA)  # ... and flushes
    assert hw.access(0, VA, W, b"y") == b""
    assert hw.access(0, VA, W, b"z") == b""
    assert dirtied == [(0, VA, entry_maddr(VA, 1))] * 2
    assert hw.stats.dirty_set == 2


def test_tlbs_are_per_vcpu() -> None:
    mem, hw, _ = machine(2)
    build(mem)
    assert hw.access(0, VA, W, b"a") == b""
    assert hw.access(1, VA, W, b"b") == b""
    set_l1(mem, VA, DATA_MFN, P | U | A | D)
    hw.flush_tlb(0)
    assert hw.access(0, VA, W, b"c") == PageFault(VA, PF_USER | PF_WRITE | PF_PROT)
    assert hw.access(1, VA, W, b"d") == b""
    assert [s.vcpu for s in hw.stale_writes] == [1]
    hw.invlpg_all(VA)
    assert hw.access(1, VA, W, b"e") == PageFault(VA, PF_USER | PF_WRITE | PF_PROT)
    assert hw.tlb_size(0) == hw.tlb_size(1) == 0
    hw.flush_tlb_all()
    assert hw.stats.tlb_flushes == 2 + 1 + 2  # two CR3 loads, one local, one all
    assert hw.stats.invlpgs == 2


def test_stats_hits_and_misses() -> None:
    mem, hw, _ = machine()
    build(mem)
    hw.access(0, VA, R, 1)
    hw.access(0, VA, R, 1)
    hw.access(0, VA, W, b"x")  # hit, clean: re-walk to set D
    hw.access(0, VA, W, b"x")
    assert (hw.stats.tlb_misses, hw.stats.tlb_hits, hw.stats.walks) == (1, 3, 2)


# --- run ---------------------------------------------------------------------


def test_run_splits_across_pages() -> None:
    mem, hw, _ = machine()
    va2 = VA + PAGE_SIZE
    build(mem)
    build(mem, va2, DATA2_MFN)
    out = hw.run(0, [(VA + PAGE_SIZE - 3, "w", b"abcdef"), (VA + PAGE_SIZE - 2, "r", 4)])
    assert out == RunOutcome(executed=2, reads=[b"bcde"], fault=None)
    assert mem.read_bytes(DATA_MFN * PAGE_SIZE + PAGE_SIZE - 3, 3) == b"abc"
    assert mem.read_bytes(DATA2_MFN * PAGE_SIZE, 3) == b"def"


def test_run_stops_at_first_fault() -> None:
    mem, hw, _ = machine()
    va2 = VA + PAGE_SIZE
    build(mem)
    build(mem, va2, DATA2_MFN, flags={1: P | U})
    out = hw.run(
        0,
        [
            (VA, "w", b"12"),
            (VA, "r", 2),
            (VA, "x", 0),
            (va2 - 1, "r", 2),  # read-only page: fine
            (va2 - 1, "w", b"ab"),  # first byte lands, second page faults
            (VA, "r", 1),
        ],
    )
    assert out.executed == 4
    assert out.reads == [b"12", b"\0\0"]
    assert out.fault == PageFault(va2, PF_USER | PF_WRITE | PF_PROT)
    assert mem.read_bytes(DATA_MFN * PAGE_SIZE + PAGE_SIZE - 1, 1) == b"a"


def test_run_fault_on_first_access() -> None:
    _, hw, _ = machine()
    assert hw.run(0, [(VA, "r", 8)]) == RunOutcome(0, [], PageFault(VA, PF_USER))
    with pytest.raises(ValueError, match="'q'"):
        hw.run(0, [(VA, "q", 1)])


# --- property: a flush always ends stale writes ------------------------------

PAGES = 2
HVA = va_from_indexes(3, 4, 5, 0)
FRAMES = (DATA_MFN, DATA2_MFN, 12)

# Leaf edits are biased towards present entries so that cached translations
# survive long enough to be used after an edit.
flags_st = st.builds(
    lambda present, rest: present | sum(rest, 0),
    st.sampled_from((P, P, P, 0)),
    st.lists(st.sampled_from((RW, U, NX, A, D)), unique=True),
)
# Upper-level edits keep P|U mostly, or every later access just faults.
l2_flags_st = st.builds(
    lambda base, rest: base | sum(rest, 0),
    st.sampled_from((P | U, P | U, P | U, P, U)),
    st.lists(st.sampled_from((RW, NX, A)), unique=True),
)
page_st = st.integers(0, PAGES - 1)
vcpu_st = st.integers(0, 1)
OP_STRATEGIES: dict[str, st.SearchStrategy[tuple[object, ...]]] = {
    "access": st.tuples(st.just("access"), vcpu_st, page_st, st.sampled_from("rwwx")),
    "edit": st.tuples(st.just("edit"), page_st, st.sampled_from(FRAMES), flags_st),
    "edit_l2": st.tuples(st.just("edit_l2"), l2_flags_st),
    "flush": st.tuples(st.just("flush"), vcpu_st),
    "flush_all": st.tuples(st.just("flush_all")),
    "invlpg": st.tuples(st.just("invlpg"), vcpu_st, page_st),
    "invlpg_all": st.tuples(st.just("invlpg_all"), page_st),
}
# Weighted so that translations get cached, edited and used again before a flush.
OP_WEIGHTS = (
    ["access"] * 8 + ["edit"] * 3 + ["flush", "invlpg", "invlpg_all", "flush_all", "edit_l2"]
)
op_st = st.sampled_from(OP_WEIGHTS).flatmap(OP_STRATEGIES.__getitem__)


def reference(mem: BytearrayMemory, va: int, kind: str) -> int | PageFault:
    """What the page tables in memory say: the frame, or the fault."""
    code = PF_USER | {"r": 0, "w": PF_WRITE, "x": PF_INSTR}[kind]
    rights, nx = U | RW, 0
    for level in (4, 3, 2, 1):
        entry = pte(mem, va, level)
        if not entry & P:
            return PageFault(va, code)
        rights &= entry
        nx |= entry & NX
    if not rights & U or (kind == "w" and not rights & RW) or (kind == "x" and nx):
        return PageFault(va, code | PF_PROT)
    return pte_mfn(pte(mem, va, 1))


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, min_size=10, max_size=80))
def test_no_stale_write_after_flush_until_next_edit(ops: list[tuple[object, ...]]) -> None:
    mem, hw, _ = machine(2)
    for page in range(PAGES):
        build(mem, HVA + page * PAGE_SIZE, FRAMES[page])
    # clean[(vcpu, page)]: flushed since the last edit of that page's translation.
    clean = {(v, p): True for v in range(2) for p in range(PAGES)}
    written = {p: pte(mem, HVA + p * PAGE_SIZE, 1) for p in range(PAGES)}
    for op in ops:
        match op:
            case ("edit", int(page), int(mfn), int(flags)):
                value = make_pte(mfn, flags)
                set_l1(mem, HVA + page * PAGE_SIZE, mfn, flags)
                written[page] = value
                for v in range(2):
                    clean[(v, page)] = False
            case ("edit_l2", int(flags)):
                mem.write_u64(entry_maddr(HVA, 2), make_pte(L1_MFN, flags))
                clean = dict.fromkeys(clean, False)
            case ("access", int(vcpu), int(page), str(kind)):
                va = HVA + page * PAGE_SIZE + 8
                expected = reference(mem, va, kind)
                before = len(hw.stale_writes)
                stamp = bytes([len(ops) % 251 + 1])
                data: bytes | int = stamp if kind == "w" else 1
                result = hw.access(vcpu, va, AccessKind(kind), data)
                new_stale = hw.stale_writes[before:]
                entry = hw.tlb_entry(vcpu, va)
                if isinstance(result, PageFault):
                    assert entry is None  # a fault drops the translation
                    assert new_stale == []
                else:
                    assert entry is not None
                if clean[(vcpu, page)]:
                    # Flushed since the last edit: behaves exactly as the tables say.
                    assert new_stale == []
                    if isinstance(expected, PageFault):
                        assert result == expected
                    else:
                        assert entry is not None
                        assert entry.mfn == expected
                if kind == "w" and entry is not None:
                    # A write is stale exactly when the leaf no longer allows it.
                    leaf = pte(mem, va, 1)
                    allowed = leaf & (P | RW) == P | RW and pte_mfn(leaf) == entry.mfn
                    assert len(new_stale) == (0 if allowed else 1)
                    assert mem.read_bytes(entry.mfn * PAGE_SIZE + 8, 1) == stamp
                    for stale in new_stale:
                        assert stale == StaleTlbWrite(vcpu, va, entry.mfn, entry_maddr(va, 1), leaf)
                else:
                    assert new_stale == []
            case ("flush", int(vcpu)):
                hw.flush_tlb(vcpu)
                for p in range(PAGES):
                    clean[(vcpu, p)] = True
            case ("flush_all",):
                hw.flush_tlb_all()
                clean = dict.fromkeys(clean, True)
            case ("invlpg", int(vcpu), int(page)):
                hw.invlpg(vcpu, HVA + page * PAGE_SIZE)
                clean[(vcpu, page)] = True
            case ("invlpg_all", int(page)):
                hw.invlpg_all(HVA + page * PAGE_SIZE)
                for v in range(2):
                    clean[(v, page)] = True
            case _:
                raise AssertionError(op)
        # A/D are never set in a non-present leaf.
        for p in range(PAGES):
            if not written[p] & P:
                assert pte(mem, HVA + p * PAGE_SIZE, 1) == written[p]
    assert hw.stats.stale_tlb_writes == len(hw.stale_writes)
