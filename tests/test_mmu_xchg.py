"""pvemu's ``MMU_PT_XCHG_PVEMU`` (mmu_update command 4, not Xen's): one rule
per test, on the hypervisor core.

An exchange is ``mod_l1_entry`` of an entry of the caller's validated L1
(the same validation and reference work as ``MMU_NORMAL_PT_UPDATE``) that
hands the replaced entry back in the result's ``olds``. Each refusal is
checked for its errno, ``done``, the olds of the records applied before it,
and an untouched target.
"""

from __future__ import annotations

from array import array

import numpy as np
import pytest

from pvemu.guest.client import Domain, HypervisorError
from pvemu.guest.machine import NativeMachine
from pvemu.hypervisor import HypercallResult, Hypervisor
from pvemu.hypervisor.service import FEATURES
from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_GUEST_KERNEL,
    _PAGE_NX,
    _PAGE_PCD,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    PTE_MFN_MASK,
    maddr_of_entry,
    make_pte,
)
from tests.loopback import loopback_domain
from tests.support import TABLE, USER_RO, USER_RW, Guest, boot, core_call, flat

XCHG = abi.MMU_PT_XCHG_PVEMU
AD = _PAGE_ACCESSED | _PAGE_DIRTY


@pytest.fixture
def guest() -> Guest:
    return boot()


def olds(result: HypercallResult) -> list[int]:
    values = array("Q")
    values.frombytes(result.olds)
    return list(values)


def xchg(
    guest: Guest, *pairs: tuple[int, int], vcpu: int = 0, fd: int = abi.DOMID_SELF
) -> tuple[int, int, list[int]]:
    """Exchange ``(pte maddr, new)`` records: (rc, done, olds)."""
    result = guest.mmu(*((maddr | XCHG, val) for maddr, val in pairs), vcpu=vcpu, fd=fd)
    return result.rc, result.done, olds(result)


def refused_after_one_good(guest: Guest, maddr: int, val: int, errno: int) -> None:
    """A good exchange, the bad one, another good one: the first applied
    and its old value returned, the bad one's target unchanged, the third
    never run."""
    good = guest.l1e(100)
    good_val = make_pte(guest.data[0], USER_RO)
    frames = guest.hv.state.frames
    before = guest.read(maddr) if frames.valid(maddr >> 12) else None
    rc, done, got = xchg(guest, (good, good_val), (maddr, val), (guest.l1e(101), good_val))
    assert (rc, done, got) == (-errno, 1, [0])
    assert guest.read(good) & PTE_MFN_MASK == guest.data[0] << 12
    assert guest.read(guest.l1e(101)) == 0, "records after the failing one must not run"
    if before is not None:
        assert guest.read(maddr) == before
    assert guest.hv.audit() == []


# --- what it does -------------------------------------------------------------------------


def test_the_feature_is_advertised() -> None:
    assert abi.XENFEAT_pvemu_mmu_pt_xchg in FEATURES
    assert abi.XENFEAT_pvemu_mmu_pt_xchg >= 32, "outside Xen's only feature submap"


def test_clearing_a_present_rw_mapping_returns_it_and_drops_the_writable_type(
    guest: Guest,
) -> None:
    ft = guest.hv.state.frames
    frame = guest.data[2]
    entry = guest.read(guest.l1e(2))
    assert entry & _PAGE_RW
    assert (ft.count[frame], ft.type_count[frame]) == (2, 1)
    assert xchg(guest, (guest.l1e(2), 0)) == (0, 1, [entry])
    assert guest.read(guest.l1e(2)) == 0
    assert (ft.count[frame], ft.type_count[frame]) == (1, 0)
    assert guest.hv.audit() == []


def test_clearing_an_empty_entry_returns_zero(guest: Guest) -> None:
    assert xchg(guest, (guest.l1e(300), 0)) == (0, 1, [0])
    assert guest.hv.audit() == []


def test_replacing_moves_references_from_the_old_frame_to_the_new(guest: Guest) -> None:
    ft = guest.hv.state.frames
    old_frame, new_frame = guest.data[2], guest.data[3]
    entry = guest.read(guest.l1e(2))
    assert (ft.count[new_frame], ft.type_count[new_frame]) == (2, 1)
    rc, done, got = xchg(guest, (guest.l1e(2), make_pte(new_frame, USER_RO)))
    assert (rc, done, got) == (0, 1, [entry])
    assert guest.read(guest.l1e(2)) & PTE_MFN_MASK == new_frame << 12
    assert (ft.count[old_frame], ft.type_count[old_frame]) == (1, 0)
    assert (ft.count[new_frame], ft.type_count[new_frame]) == (3, 1)
    assert guest.hv.audit() == []


def test_a_present_value_gets_the_64bit_pv_adjustment(guest: Guest) -> None:
    """Xen's adjust_guest_l1e: a kernel entry (no U) gets U | GUEST_KERNEL,
    a user one GLOBAL; the next exchange returns the adjusted entry."""
    kernel = make_pte(guest.data[4], _PAGE_PRESENT)
    assert xchg(guest, (guest.l1e(200), kernel))[:2] == (0, 1)
    assert xchg(guest, (guest.l1e(200), 0)) == (
        0,
        1,
        [kernel | _PAGE_USER | _PAGE_GUEST_KERNEL],
    )
    user = make_pte(guest.data[4], USER_RO)
    assert xchg(guest, (guest.l1e(200), user))[:2] == (0, 1)
    assert xchg(guest, (guest.l1e(200), 0))[2] == [user | _PAGE_GLOBAL]
    assert guest.hv.audit() == []


def test_a_fast_path_exchange_moves_no_references(guest: Guest) -> None:
    ft = guest.hv.state.frames
    frame = guest.data[2]
    before = (ft.count[frame], ft.type_count[frame])
    entry = guest.read(guest.l1e(2))
    new = entry | AD | _PAGE_NX | 0xE00  # fast-path bits only
    assert xchg(guest, (guest.l1e(2), new)) == (0, 1, [entry])
    assert guest.read(guest.l1e(2)) == new
    assert (ft.count[frame], ft.type_count[frame]) == before
    assert guest.hv.audit() == []


def test_ad_bits_set_by_the_hardware_after_the_guest_read_come_back(guest: Guest) -> None:
    """The guest reads the entry clean; the hardware (vCPU 1's user write)
    then sets A and D; the exchange returns them: nothing is lost."""
    va = 3 * 4096
    seen = guest.pte_for(va)
    assert not seen & AD
    assert guest.hv.run_user(guest.domid, 1, [(va, "w", b"x")]).fault is None
    rc, done, got = xchg(guest, (guest.l1e(3), 0))
    assert (rc, done) == (0, 1)
    assert got == [seen | AD]
    assert guest.dom.oracle.lost_dirty == 0


def test_a_normal_clear_after_the_same_race_loses_the_dirty_bit(guest: Guest) -> None:
    """The contrast that makes the previous test mean something: the same
    race with MMU_NORMAL_PT_UPDATE counts a lost dirty bit."""
    va = 3 * 4096
    guest.hv.run_user(guest.domid, 1, [(va, "w", b"x")])
    assert guest.mmu((guest.l1e(3), 0)).rc == 0
    assert guest.dom.oracle.lost_dirty == 1


def test_a_refused_exchange_leaves_an_unseen_dirty_bit_unseen(guest: Guest) -> None:
    """A D bit the guest never got back is still pending after a refusal:
    a later normal clear loses it."""
    va = 3 * 4096
    guest.hv.run_user(guest.domid, 1, [(va, "w", b"x")])
    bad = make_pte(guest.data[3], USER_RW | _PAGE_PCD)
    assert xchg(guest, (guest.l1e(3), bad)) == (-abi.EINVAL, 0, [])
    assert guest.mmu((guest.l1e(3), 0)).rc == 0
    assert guest.dom.oracle.lost_dirty == 1


def test_ad_bits_set_between_slices_of_a_preempted_batch_come_back(guest: Guest) -> None:
    """A batch preempted after each record: between the slices vCPU 1
    writes the page of a later record, whose old value then carries D."""
    call = core_call(
        abi.HYPERVISOR_mmu_update,
        (flat(*((guest.l1e(i) | XCHG, 0) for i in range(4))), abi.DOMID_SELF),
    )
    seen = [guest.read(guest.l1e(i)) for i in range(4)]
    pending = guest.hv.start_hypercall(guest.domid, 0, call)
    slices = 0
    while not pending.step(1):
        slices += 1
        guest.hv.run_user(guest.domid, 1, [(3 * 4096, "w", b"y")])
    assert slices == 3
    result = pending.result
    assert result is not None
    assert (result.rc, result.done) == (0, 4)
    assert olds(result) == [*seen[:3], seen[3] | AD]
    assert guest.dom.oracle.lost_dirty == 0
    assert guest.hv.audit() == []


def test_the_same_entry_twice_returns_what_the_first_record_wrote(guest: Guest) -> None:
    entry = guest.read(guest.l1e(1))
    ro = make_pte(guest.data[1], USER_RO)
    rc, done, got = xchg(guest, (guest.l1e(1), ro), (guest.l1e(1), 0))
    assert (rc, done) == (0, 2)
    assert got == [entry, ro | _PAGE_GLOBAL]
    assert guest.hv.audit() == []


def test_olds_hold_only_the_exchange_records_of_a_mixed_batch(guest: Guest) -> None:
    entries = [guest.read(guest.l1e(i)) for i in range(3)]
    result = guest.mmu(
        (guest.l1e(0) | XCHG, 0),
        (guest.l1e(1), 0),  # NORMAL: no old value
        (guest.l1e(2) | XCHG, 0),
    )
    assert (result.rc, result.done) == (0, 3)
    assert olds(result) == [entries[0], entries[2]]


def test_a_batch_without_exchanges_has_no_olds(guest: Guest) -> None:
    assert guest.mmu((guest.l1e(0), 0)).olds == b""


def test_one_batch_is_one_trap_and_its_records_are_counted_apart(guest: Guest) -> None:
    counters = guest.dom.counters[0]
    before = (counters.traps, counters.mmu_update_records, counters.mmu_xchg_records)
    rc, done, got = xchg(guest, *((guest.l1e(i), 0) for i in range(512)))
    assert (rc, done, len(got)) == (0, 512, 512)
    after = (counters.traps, counters.mmu_update_records, counters.mmu_xchg_records)
    assert after == (before[0] + 1, before[1] + 512, before[2] + 512)
    assert counters.as_dict()["mmu_xchg_records"] == after[2]
    assert guest.hv.audit() == []


# --- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["l2", "l3", "l4"])
def test_an_upper_level_entry_is_einval(guest: Guest, level: str) -> None:
    """Only L1 entries: an upper-level entry is refused whatever the value."""
    table = getattr(guest, level)
    refused_after_one_good(guest, maddr_of_entry(table, 0), 0, abi.EINVAL)


def test_a_writable_data_frame_is_einval(guest: Guest) -> None:
    """NORMAL would store plain data there; an exchange only takes PTEs."""
    refused_after_one_good(guest, maddr_of_entry(guest.data[0], 3), 0, abi.EINVAL)


def test_an_untyped_frame_is_einval(guest: Guest) -> None:
    refused_after_one_good(guest, maddr_of_entry(guest.take(), 3), 0, abi.EINVAL)


def test_an_entry_of_another_domains_l1_is_einval(guest: Guest) -> None:
    other = boot(guest.hv)
    entry = other.read(other.l1e(5))
    refused_after_one_good(guest, other.l1e(5), 0, abi.EINVAL)
    assert other.read(other.l1e(5)) == entry


def test_an_entry_beyond_machine_memory_is_einval(guest: Guest) -> None:
    refused_after_one_good(guest, (guest.hv.state.frames.nr_frames + 7) << 12, 0, abi.EINVAL)


def test_an_unpinned_unhooked_l1_is_einval(guest: Guest) -> None:
    """A frame holding PTEs but not in use as an L1 (no type reference)."""
    loose = guest.take()
    assert guest.mmu((maddr_of_entry(loose, 0), make_pte(guest.data[0], USER_RO))).rc == 0
    refused_after_one_good(guest, maddr_of_entry(loose, 0), 0, abi.EINVAL)


def test_disallowed_cache_bits_are_einval(guest: Guest) -> None:
    refused_after_one_good(
        guest, guest.l1e(5), make_pte(guest.data[1], USER_RO | _PAGE_PCD), abi.EINVAL
    )


def test_mapping_another_domains_frame_is_ebusy(guest: Guest) -> None:
    other = boot(guest.hv)
    refused_after_one_good(guest, guest.l1e(5), make_pte(other.data[0], USER_RO), abi.EBUSY)


def test_mapping_non_ram_is_eperm(guest: Guest) -> None:
    beyond = guest.hv.state.frames.nr_frames + 7
    refused_after_one_good(guest, guest.l1e(5), make_pte(beyond, USER_RO), abi.EPERM)


def test_a_writable_mapping_of_a_page_table_is_ebusy(guest: Guest) -> None:
    refused_after_one_good(guest, guest.l1e(5), make_pte(guest.l2, USER_RW), abi.EBUSY)


def test_a_foreign_fd_is_eperm(guest: Guest) -> None:
    other = boot(guest.hv)
    entry = guest.read(guest.l1e(5))
    assert xchg(guest, (guest.l1e(5), 0), fd=other.domid) == (-abi.EPERM, 0, [])
    assert guest.read(guest.l1e(5)) == entry


def test_a_foreign_pt_owner_is_eperm(guest: Guest) -> None:
    other = boot(guest.hv)
    fd = (other.domid + 1) << 16 | abi.DOMID_SELF
    assert xchg(guest, (other.l1e(5), 0), fd=fd) == (-abi.EPERM, 0, [])
    assert other.read(other.l1e(5)) != 0


def test_a_refusal_mid_batch_returns_the_olds_of_the_records_before_it(guest: Guest) -> None:
    entries = [guest.read(guest.l1e(i)) for i in range(3)]
    rc, done, got = xchg(
        guest,
        (guest.l1e(0), 0),
        (guest.l1e(1), 0),
        (guest.l1e(2), make_pte(guest.l1, USER_RW)),  # a page table, writable
        (guest.l1e(3), 0),
    )
    assert (rc, done, got) == (-abi.EBUSY, 2, entries[:2])
    assert guest.read(guest.l1e(2)) == entries[2]
    assert guest.read(guest.l1e(3)) != 0
    assert guest.hv.audit() == []


def test_in_a_multicall_it_is_eopnotsupp(guest: Guest) -> None:
    """A multicall entry's result is a bare rc: the old entries would be
    lost, so the exchange is refused there (the records before it apply)."""
    entry = guest.read(guest.l1e(2))
    batch = flat((guest.l1e(0), 0), (guest.l1e(2) | XCHG, 0))
    call = core_call(
        abi.HYPERVISOR_multicall,
        ([(abi.HYPERVISOR_mmu_update, batch, abi.DOMID_SELF)],),
    )
    result = guest.hv.hypercall(guest.domid, 0, call)
    assert result.results == (-abi.EOPNOTSUPP,)
    assert result.olds == b""
    assert guest.read(guest.l1e(0)) == 0
    assert guest.read(guest.l1e(2)) == entry
    assert guest.dom.counters[0].mmu_xchg_records == 1
    assert guest.hv.audit() == []


def test_tables_built_by_exchange_validate_like_normal_ones(guest: Guest) -> None:
    """An exchange never touches upper levels, so hooking a table is NORMAL's
    job; entries exchanged into the new L1 are then live for the hardware."""
    l1b = guest.take()
    assert guest.mmu((maddr_of_entry(guest.l2, 1), make_pte(l1b, TABLE))).rc == 0
    va = 512 * 4096
    assert xchg(guest, (maddr_of_entry(l1b, 0), make_pte(guest.data[5], USER_RW))) == (0, 1, [0])
    assert guest.hv.run_user(guest.domid, 0, [(va, "w", b"z")]).fault is None
    got = xchg(guest, (maddr_of_entry(l1b, 0), 0))[2][0]
    assert got & AD == AD
    assert guest.hv.audit() == []


# --- the guest's API: Domain (PV) and NativeMachine (bare metal) ----------------------------


def _first_l1(dom: Domain) -> int:
    table = dom.l4_mfn
    for _ in range(3):
        table = (dom.read_u64(maddr_of_entry(table, 0)) & PTE_MFN_MASK) >> 12
    return table


async def test_domain_mmu_xchg_returns_olds_in_one_trap() -> None:
    dom = await loopback_domain(Hypervisor(16), memory_mib=2)
    assert dom.has_feature(abi.XENFEAT_pvemu_mmu_pt_xchg)
    l1 = _first_l1(dom)
    frames = [dom.alloc_frame() for _ in range(3)]
    maps = [(maddr_of_entry(l1, i + 1), make_pte(m, USER_RW)) for i, m in enumerate(frames)]
    assert await dom.mmu_update(maps) == (0, 3)
    await dom.run_user(1, [(3 * 4096, "w", b"d")])
    seen = [dom.read_u64(maddr_of_entry(l1, i)) for i in range(4)]
    before = await dom.stats()
    rc, got = await dom.mmu_xchg([(maddr_of_entry(l1, i), 0) for i in range(4)])
    assert rc == 0
    assert got == seen
    assert got[3] & AD == AD
    assert all(dom.read_u64(maddr_of_entry(l1, i)) == 0 for i in range(4))
    after = await dom.stats()
    for side in ("guest", "hypervisor"):
        moved = {
            k: after[side]["total"][k] - before[side]["total"][k]
            for k in ("traps", "hypercalls", "mmu_update_records", "mmu_xchg_records")
        }
        assert moved == {
            "traps": 1,
            "hypercalls": 1,
            "mmu_update_records": 4,
            "mmu_xchg_records": 4,
        }, side
    assert await dom.audit() == []


async def test_domain_mmu_xchg_stops_at_the_first_error() -> None:
    dom = await loopback_domain(Hypervisor(16), memory_mib=2)
    l1 = _first_l1(dom)
    frame = dom.alloc_frame()
    assert await dom.mmu_update([(maddr_of_entry(l1, 1), make_pte(frame, USER_RW))]) == (0, 1)
    entry = dom.read_u64(maddr_of_entry(l1, 1))
    records = [
        (maddr_of_entry(l1, 1), 0),
        (maddr_of_entry(l1, 2), make_pte(l1, USER_RW)),  # a page table, writable
        (maddr_of_entry(l1, 3), 0),
    ]
    assert await dom.mmu_xchg(records) == (-abi.EBUSY, [entry])
    assert await dom.audit() == []


async def test_domain_mmu_xchg_needs_the_feature_and_aligned_addresses() -> None:
    dom = await loopback_domain(Hypervisor(16), memory_mib=2)
    l1 = _first_l1(dom)
    with pytest.raises(ValueError, match="not 8-byte aligned"):
        await dom.mmu_xchg([(maddr_of_entry(l1, 1) | 2, 0)])
    dom.features = (abi.XENFEAT_mmu_pt_update_preserve_ad,)  # an older hypervisor
    assert not dom.has_feature(abi.XENFEAT_pvemu_mmu_pt_xchg)
    with pytest.raises(HypervisorError, match="XENFEAT_pvemu_mmu_pt_xchg"):
        await dom.mmu_xchg([(maddr_of_entry(l1, 1), 0)])
    stats = await dom.stats()
    assert stats["guest"]["total"]["mmu_xchg_records"] == 0, "refused before any trap"
    assert stats["hypervisor"]["total"]["mmu_xchg_records"] == 0


async def test_native_mmu_xchg_is_a_plain_exchange_per_record() -> None:
    machine = NativeMachine(1, 2)
    assert machine.has_feature(abi.XENFEAT_pvemu_mmu_pt_xchg)
    table = machine.alloc_frame()
    frame = machine.alloc_frame()
    entry = make_pte(frame, USER_RW)
    machine.write_u64(maddr_of_entry(table, 7), entry)
    rc, got = await machine.mmu_xchg(
        [(maddr_of_entry(table, 7), 0), (maddr_of_entry(table, 8), entry)]
    )
    assert (rc, got) == (0, [entry, 0])
    assert machine.read_u64(maddr_of_entry(table, 7)) == 0
    assert machine.read_u64(maddr_of_entry(table, 8)) == entry
    with pytest.raises(ValueError, match="not 8-byte aligned"):
        await machine.mmu_xchg([(maddr_of_entry(table, 7) + 4, 0)])
    stats = await machine.stats()
    assert stats["hypervisor"]["total"]["traps"] == 0


async def test_domain_mmu_xchg_ptes_is_mmu_xchg_as_arrays() -> None:
    dom = await loopback_domain(Hypervisor(16), memory_mib=2)
    l1 = _first_l1(dom)
    frames = [dom.alloc_frame() for _ in range(3)]
    maps = [(maddr_of_entry(l1, i), make_pte(m, USER_RW)) for i, m in enumerate(frames)]
    assert await dom.mmu_update(maps) == (0, 3)
    await dom.run_user(1, [(1 * 4096, "w", b"d")])
    indexes = np.arange(4, dtype=np.intp)
    seen = [dom.read_u64(maddr_of_entry(l1, i)) for i in range(4)]
    ro = np.array([make_pte(frames[0], USER_RO)] * 4, dtype=np.uint64)
    rc, got = await dom.mmu_xchg_ptes(l1, indexes, ro)
    assert rc == 0
    assert got.dtype == np.uint64
    assert got.tolist() == seen
    rc, got = await dom.mmu_xchg_ptes(l1, indexes)  # clear
    assert rc == 0
    assert got.tolist() == [make_pte(frames[0], USER_RO) | _PAGE_GLOBAL] * 4
    bad = np.array([0, make_pte(l1, USER_RW)], dtype=np.uint64)  # a page table, writable
    rc, got = await dom.mmu_xchg_ptes(l1, np.array([5, 6], dtype=np.intp), bad)
    assert (rc, got.tolist()) == (-abi.EBUSY, [0])
    with pytest.raises(ValueError, match="appears twice"):
        await dom.mmu_xchg_ptes(l1, np.array([1, 1], dtype=np.intp))
    stats = await dom.stats()
    assert stats["guest"]["total"]["mmu_xchg_records"] == 10
    assert stats["hypervisor"]["total"]["mmu_xchg_records"] == 10
    assert await dom.audit() == []


async def test_native_mmu_xchg_ptes() -> None:
    machine = NativeMachine(1, 1)
    table = machine.alloc_frame()
    entries = [make_pte(machine.alloc_frame(), USER_RW) for _ in range(3)]
    for i, entry in enumerate(entries):
        machine.write_u64(maddr_of_entry(table, i), entry)
    indexes = np.arange(3, dtype=np.intp)
    rc, got = await machine.mmu_xchg_ptes(table, indexes, np.array(entries[::-1], dtype=np.uint64))
    assert (rc, got.tolist()) == (0, entries)
    rc, got = await machine.mmu_xchg_ptes(table, indexes)
    assert (rc, got.tolist()) == (0, entries[::-1])
    assert [machine.read_u64(maddr_of_entry(table, i)) for i in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError, match="appears twice"):
        await machine.mmu_xchg_ptes(table, np.array([2, 2], dtype=np.intp))
