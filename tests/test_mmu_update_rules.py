"""One test per mmu_update rule of docs/sources.md §6-§7, with Xen's errno.

Each refusal is checked three ways: the errno, that the target entry is
bit-identical afterwards, and that ``done`` equals the failing index (requests
before it stay applied).
"""

from __future__ import annotations

import pytest

from pvemu.hypervisor import Hypervisor
from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_NX,
    _PAGE_PAT,
    _PAGE_PCD,
    _PAGE_PSE,
    _PAGE_PWT,
    _PAGE_RW,
    PTE_MFN_MASK,
    maddr_of_entry,
    make_pte,
)
from tests.support import TABLE, USER_RO, USER_RW, Guest, boot


@pytest.fixture
def guest() -> Guest:
    return boot()


def refused_after_one_good(guest: Guest, ptr: int, val: int, errno: int) -> None:
    """A good request then the bad one: rc, done == 1, target unchanged."""
    good_ptr = guest.l1e(100)
    good_val = make_pte(guest.data[0], USER_RO)
    target = ptr & ~7
    before = guest.read(target) if guest.hv.state.frames.valid(target >> 12) else None
    result = guest.mmu((good_ptr, good_val), (ptr, val), (guest.l1e(101), good_val))
    assert result.rc == -errno
    assert result.done == 1
    assert guest.read(good_ptr) & PTE_MFN_MASK == guest.data[0] << 12
    assert guest.read(guest.l1e(101)) == 0, "requests after the failing one must not run"
    if before is not None:
        assert guest.read(target) == before
    assert guest.hv.audit() == []


# --- whole-call failures: nothing applied --------------------------------------------


def test_unknown_pt_owner_is_esrch(guest: Guest) -> None:
    result = guest.mmu((guest.l1e(9), 0), fd=(999 + 1) << 16 | abi.DOMID_SELF)
    assert (result.rc, result.done) == (-abi.ESRCH, 0)


def test_pt_owner_naming_the_caller_is_the_caller(guest: Guest) -> None:
    """PFD + 1 in bits 16-31 naming the caller itself is not foreign (Xen:
    ``pt_owner == d``), unlike FD, where the own numeric domid is -ESRCH."""
    val = make_pte(guest.data[1], USER_RO)
    result = guest.mmu((guest.l1e(9), val), fd=(guest.domid + 1) << 16 | abi.DOMID_SELF)
    assert (result.rc, result.done) == (0, 1)
    assert guest.read(guest.l1e(9)) & PTE_MFN_MASK == guest.data[1] << 12
    result = guest.mmu((guest.l1e(9), 0), fd=(guest.domid + 1) << 16 | guest.domid)
    assert (result.rc, result.done) == (-abi.ESRCH, 0)
    assert guest.hv.audit() == []


def test_own_numeric_domid_as_fd_is_esrch(guest: Guest) -> None:
    result = guest.mmu((guest.l1e(9), 0), fd=guest.domid)
    assert (result.rc, result.done) == (-abi.ESRCH, 0)


def test_unknown_fd_is_esrch(guest: Guest) -> None:
    result = guest.mmu((guest.l1e(9), 0), fd=4242)
    assert (result.rc, result.done) == (-abi.ESRCH, 0)


def test_empty_batch_is_a_successful_noop(guest: Guest) -> None:
    result = guest.mmu()
    assert (result.rc, result.done) == (0, 0)


# --- per-request failures ----------------------------------------------------------------


@pytest.mark.parametrize("cmd", [5, 6, 7])
def test_unknown_subcommand_is_enosys(guest: Guest, cmd: int) -> None:
    """Xen's 4..7 are -ENOSYS; pvemu serves 4 as its exchange extension
    (tests/test_mmu_xchg.py)."""
    refused_after_one_good(guest, guest.l1e(5) | cmd, 0, abi.ENOSYS)


def test_foreign_fd_is_eperm(guest: Guest) -> None:
    other = boot(guest.hv)
    result = guest.mmu((guest.l1e(5), 0), fd=other.domid)
    assert (result.rc, result.done) == (-abi.EPERM, 0)
    assert guest.pte_for(5 * 4096) != 0


def test_foreign_pt_owner_is_eperm(guest: Guest) -> None:
    other = boot(guest.hv)
    result = guest.mmu((other.l1e(5), 0), fd=(other.domid + 1) << 16 | abi.DOMID_SELF)
    assert (result.rc, result.done) == (-abi.EPERM, 0)
    assert other.read(other.l1e(5)) != 0


def test_entry_in_another_domains_frame_is_einval(guest: Guest) -> None:
    other = boot(guest.hv)
    refused_after_one_good(guest, other.l1e(5), 0, abi.EINVAL)
    assert other.read(other.l1e(5)) != 0


def test_entry_beyond_machine_memory_is_einval(guest: Guest) -> None:
    refused_after_one_good(guest, (guest.hv.state.frames.nr_frames + 7) << 12, 0, abi.EINVAL)


def test_xen_l4_slot_is_einval(guest: Guest) -> None:
    for slot in (256, 263, 271):
        refused_after_one_good(guest, maddr_of_entry(guest.l4, slot), 0, abi.EINVAL)


def test_l4_slots_outside_xen_range_are_the_guests(guest: Guest) -> None:
    l3 = guest.take()
    for slot in (255, 272):
        result = guest.mmu((maddr_of_entry(guest.l4, slot), make_pte(l3, TABLE)))
        assert result.rc == 0
        assert guest.mmu((maddr_of_entry(guest.l4, slot), 0)).rc == 0
    assert guest.hv.audit() == []


@pytest.mark.parametrize("bit", [_PAGE_PWT, _PAGE_PCD, _PAGE_PAT])
def test_l1_cache_attribute_bits_are_einval(guest: Guest, bit: int) -> None:
    refused_after_one_good(guest, guest.l1e(3), make_pte(guest.data[3], USER_RW | bit), abi.EINVAL)


@pytest.mark.parametrize("bit", [_PAGE_PWT, _PAGE_PCD, _PAGE_PSE, _PAGE_GLOBAL])
def test_upper_level_disallowed_bits_are_einval(guest: Guest, bit: int) -> None:
    refused_after_one_good(
        guest, maddr_of_entry(guest.l2, 0), make_pte(guest.l1, TABLE | bit), abi.EINVAL
    )


def test_l1_global_and_nx_are_allowed(guest: Guest) -> None:
    result = guest.mmu((guest.l1e(3), make_pte(guest.data[3], USER_RW | _PAGE_GLOBAL | _PAGE_NX)))
    assert result.rc == 0


def test_l1_mapping_non_ram_is_eperm(guest: Guest) -> None:
    beyond = guest.hv.state.frames.nr_frames + 1
    refused_after_one_good(guest, guest.l1e(3), make_pte(beyond, USER_RO), abi.EPERM)


def test_l1_mapping_all_ones_frame_is_einval(guest: Guest) -> None:
    refused_after_one_good(guest, guest.l1e(3), PTE_MFN_MASK | USER_RO, abi.EINVAL)


def test_l1_mapping_another_domains_frame_is_ebusy(guest: Guest) -> None:
    other = boot(guest.hv)
    refused_after_one_good(guest, guest.l1e(3), make_pte(other.data[0], USER_RO), abi.EBUSY)


def test_l1_mapping_a_free_frame_is_ebusy() -> None:
    hv = Hypervisor(16)
    guest = boot(hv)
    owned = set(guest.dom.p2m) | {hv.xen_mfn}
    free = next(m for m in range(hv.state.frames.nr_frames) if m not in owned)
    refused_after_one_good(guest, guest.l1e(3), make_pte(free, USER_RO), abi.EBUSY)


def test_l1_mapping_xens_frame_is_ebusy(guest: Guest) -> None:
    refused_after_one_good(guest, guest.l1e(3), make_pte(guest.hv.xen_mfn, USER_RO), abi.EBUSY)


@pytest.mark.parametrize("level", ["l1", "l2", "l3", "l4"])
def test_writable_mapping_of_a_page_table_is_ebusy(guest: Guest, level: str) -> None:
    table = getattr(guest, level)
    refused_after_one_good(guest, guest.l1e(3), make_pte(table, USER_RW), abi.EBUSY)


def test_read_only_mapping_of_a_page_table_is_allowed(guest: Guest) -> None:
    assert guest.mmu((guest.l1e(20), make_pte(guest.l2, USER_RO))).rc == 0
    assert guest.hv.audit() == []


def test_upper_entry_to_unowned_frame_is_einval(guest: Guest) -> None:
    other = boot(guest.hv)
    refused_after_one_good(
        guest, maddr_of_entry(guest.l2, 1), make_pte(other.l1, TABLE), abi.EINVAL
    )


def test_upper_entry_to_writable_mapped_frame_is_einval(guest: Guest) -> None:
    # data[0] is mapped RW by the L1, so it cannot become an L1 table.
    refused_after_one_good(
        guest, maddr_of_entry(guest.l2, 1), make_pte(guest.data[0], TABLE), abi.EINVAL
    )


def test_l1_used_as_l3_target_is_einval(guest: Guest) -> None:
    refused_after_one_good(
        guest, maddr_of_entry(guest.l4, 1), make_pte(guest.l1, TABLE), abi.EINVAL
    )


def test_linear_page_table_is_einval(guest: Guest) -> None:
    refused_after_one_good(
        guest, maddr_of_entry(guest.l2, 1), make_pte(guest.l2, USER_RO), abi.EINVAL
    )
    refused_after_one_good(
        guest, maddr_of_entry(guest.l4, 1), make_pte(guest.l4, USER_RO), abi.EINVAL
    )


def test_new_table_failing_validation_returns_the_inner_error(guest: Guest) -> None:
    bad_flags = guest.take()
    assert (
        guest.mmu((maddr_of_entry(bad_flags, 7), make_pte(guest.data[0], USER_RO | _PAGE_PAT))).rc
        == 0
    )
    refused_after_one_good(
        guest, maddr_of_entry(guest.l2, 1), make_pte(bad_flags, TABLE), abi.EINVAL
    )
    writable_pt = guest.take()
    assert guest.mmu((maddr_of_entry(writable_pt, 0), make_pte(guest.l3, USER_RW))).rc == 0
    refused_after_one_good(
        guest, maddr_of_entry(guest.l2, 2), make_pte(writable_pt, TABLE), abi.EBUSY
    )
    # Validation rolled back: both frames are untyped and unreferenced again.
    ft = guest.hv.state.frames
    for mfn in (bad_flags, writable_pt):
        assert ft.type_count[mfn] == 0
        assert ft.count[mfn] == 1


def test_machphys_update(guest: Guest) -> None:
    mfn = guest.data[2]
    assert guest.mmu(((mfn << 12) | abi.MMU_MACHPHYS_UPDATE, 0x1234)).rc == 0
    assert guest.hv.state.frames.m2p[mfn] == 0x1234
    other = boot(guest.hv)
    result = guest.mmu(((other.data[0] << 12) | abi.MMU_MACHPHYS_UPDATE, 1))
    assert (result.rc, result.done) == (-abi.EINVAL, 0)


# --- semantics of accepted requests ------------------------------------------------------------


def test_untyped_frame_is_written_as_plain_data(guest: Guest) -> None:
    frame = guest.take()
    bogus = 0xDEAD_BEEF_0000_0FFF  # not a valid entry: untyped frames are data
    assert guest.mmu((maddr_of_entry(frame, 9), bogus)).rc == 0
    assert guest.read(maddr_of_entry(frame, 9)) == bogus
    assert guest.hv.state.frames.type_count[frame] == 0


def test_writable_data_frame_is_written_as_plain_data(guest: Guest) -> None:
    maddr = maddr_of_entry(guest.data[1], 3)
    assert guest.mmu((maddr, 0xFFFF_FFFF_FFFF_FFFF)).rc == 0
    assert guest.read(maddr) == 0xFFFF_FFFF_FFFF_FFFF


def test_no_translate_behaves_like_normal(guest: Guest) -> None:
    val = make_pte(guest.data[4], USER_RO)
    assert guest.mmu((guest.l1e(30) | abi.MMU_PT_UPDATE_NO_TRANSLATE, val)).rc == 0
    assert guest.mmu((guest.l1e(31), val)).rc == 0
    assert guest.read(guest.l1e(30)) == guest.read(guest.l1e(31))


def test_64bit_pv_adjustment_of_l1_entries(guest: Guest) -> None:
    user = make_pte(guest.data[4], USER_RO)
    kernel = make_pte(guest.data[4], USER_RO & ~4)
    assert guest.mmu((guest.l1e(40), user), (guest.l1e(41), kernel)).rc == 0
    assert guest.read(guest.l1e(40)) == user | _PAGE_GLOBAL
    assert guest.read(guest.l1e(41)) == kernel | 4 | (1 << 52)


def test_l4_entries_get_accessed_forced(guest: Guest) -> None:
    assert guest.read(maddr_of_entry(guest.l4, 0)) & _PAGE_ACCESSED


def test_fast_path_changes_no_references(guest: Guest) -> None:
    ft = guest.hv.state.frames
    frame = guest.data[2]
    before = (ft.count[frame], ft.type_count[frame])
    pte = guest.read(guest.l1e(2))
    # Only whitelisted bits change (A, D, NX, available bits): fast path.
    new = pte | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_NX | 0xE00
    assert guest.mmu((guest.l1e(2), new)).rc == 0
    assert guest.read(guest.l1e(2)) == new
    assert (ft.count[frame], ft.type_count[frame]) == before


def test_slow_path_moves_references(guest: Guest) -> None:
    ft = guest.hv.state.frames
    frame = guest.data[2]
    assert (ft.count[frame], ft.type_count[frame]) == (2, 1)
    assert guest.mmu((guest.l1e(2), make_pte(frame, USER_RO))).rc == 0
    assert (ft.count[frame], ft.type_count[frame]) == (2, 0)
    assert guest.mmu((guest.l1e(2), 0)).rc == 0
    assert (ft.count[frame], ft.type_count[frame]) == (1, 0)
    assert guest.hv.audit() == []


def test_clearing_an_upper_entry_tears_down_the_subtree(guest: Guest) -> None:
    ft = guest.hv.state.frames
    assert guest.mmu((maddr_of_entry(guest.l4, 0), 0)).rc == 0
    for table in (guest.l3, guest.l2, guest.l1):
        assert ft.type_count[table] == 0
        assert not ft.validated(table)
    for frame in guest.data:
        assert (ft.count[frame], ft.type_count[frame]) == (1, 0)
    assert guest.hv.audit() == []


def test_preserve_ad_keeps_hardware_bits(guest: Guest) -> None:
    va = 2 * 4096
    start = guest.pte_for(va)  # the guest's ptep_modify_prot_start: a plain read
    assert not start & _PAGE_DIRTY
    outcome = guest.hv.run_user(guest.domid, 1, [(va, "w", b"x")])  # hardware sets A|D
    assert outcome.fault is None
    assert guest.pte_for(va) & _PAGE_DIRTY
    commit = start & ~_PAGE_RW
    result = guest.mmu((guest.l1e(2) | abi.MMU_PT_UPDATE_PRESERVE_AD, commit))
    assert result.rc == 0
    after = guest.pte_for(va)
    assert after & _PAGE_DIRTY
    assert after & _PAGE_ACCESSED
    assert not after & _PAGE_RW


def test_normal_update_overwrites_hardware_bits(guest: Guest) -> None:
    va = 2 * 4096
    start = guest.pte_for(va)
    guest.hv.run_user(guest.domid, 1, [(va, "w", b"x")])
    assert guest.pte_for(va) & _PAGE_DIRTY
    assert guest.mmu((guest.l1e(2), start & ~_PAGE_RW)).rc == 0
    assert not guest.pte_for(va) & _PAGE_DIRTY, "NORMAL loses the dirty bit: the race"


def test_preserve_ad_never_clears_ad(guest: Guest) -> None:
    va = 3 * 4096
    guest.hv.run_user(guest.domid, 1, [(va, "w", b"x")])
    clean = guest.pte_for(va) & ~(_PAGE_ACCESSED | _PAGE_DIRTY)
    assert guest.mmu((guest.l1e(3) | abi.MMU_PT_UPDATE_PRESERVE_AD, clean)).rc == 0
    assert guest.pte_for(va) & _PAGE_DIRTY


def test_upper_level_update_flushes_the_domains_tlbs(guest: Guest) -> None:
    va = 0
    assert guest.hv.run_user(guest.domid, 1, [(va, "r", 1)]).fault is None
    assert guest.dom.hw.tlb_entry(1, va) is not None
    # An L1 update alone leaves the TLB alone ...
    assert guest.mmu((guest.l1e(0), make_pte(guest.data[0], USER_RO))).rc == 0
    assert guest.dom.hw.tlb_entry(1, va) is not None
    # ... an L2+ update flushes every vCPU of the domain, even if a later request fails.
    result = guest.mmu((maddr_of_entry(guest.l3, 5), 0), (guest.l1e(0) | 5, 0))
    assert (result.rc, result.done) == (-abi.ENOSYS, 1)
    assert guest.dom.hw.tlb_entry(1, va) is None
