"""mmuext_op, multicall, update_va_mapping, vm_assist and ptwr (docs/sources.md §6, §8)."""

from __future__ import annotations

import pytest

from pvemu.hypervisor import HypercallResult, Hypervisor
from pvemu.shared import abi, wire
from pvemu.shared.errors import LocalProtocolError
from pvemu.shared.x86 import _PAGE_DIRTY, _PAGE_PAT, _PAGE_RW, maddr_of_entry, make_pte
from tests.support import TABLE, USER_RO, USER_RW, Guest, boot, core_call, flat


@pytest.fixture
def guest() -> Guest:
    return boot()


def fresh_l1(guest: Guest, *data: int) -> int:
    """An untyped frame prepared with entries mapping ``data`` read-only."""
    frame = guest.take()
    pairs = [(maddr_of_entry(frame, i), make_pte(m, USER_RO)) for i, m in enumerate(data)]
    assert guest.mmu(*pairs).rc == 0
    return frame


# --- mmuext_op --------------------------------------------------------------------------


def test_mmuext_foreigndom_lookup(guest: Guest) -> None:
    op = (abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)
    assert guest.ext(op, fd=guest.domid).rc == -abi.ESRCH
    assert guest.ext(op, fd=777).rc == -abi.ESRCH
    other = boot(guest.hv)
    result = guest.ext(op, fd=other.domid)
    assert (result.rc, result.done) == (-abi.EPERM, 0)


def test_pin_and_unpin_l1(guest: Guest) -> None:
    ft = guest.hv.state.frames
    frame = fresh_l1(guest, guest.data[0])
    assert guest.ext((abi.MMUEXT_PIN_L1_TABLE, frame, 0)).rc == 0
    assert ft.pinned(frame)
    assert ft.validated(frame)
    assert ft.type[frame] == abi.PGT_l1_page_table
    assert (ft.count[frame], ft.type_count[frame]) == (2, 1)
    assert guest.hv.audit() == []
    assert guest.ext((abi.MMUEXT_UNPIN_TABLE, frame, 0)).rc == 0
    assert (ft.count[frame], ft.type_count[frame]) == (1, 0)
    assert not ft.validated(frame)
    assert guest.hv.audit() == []


def test_pin_twice_is_einval_and_refs_dropped(guest: Guest) -> None:
    ft = guest.hv.state.frames
    frame = fresh_l1(guest)
    result = guest.ext((abi.MMUEXT_PIN_L1_TABLE, frame, 0), (abi.MMUEXT_PIN_L1_TABLE, frame, 0))
    assert (result.rc, result.done) == (-abi.EINVAL, 1)
    assert (ft.count[frame], ft.type_count[frame]) == (2, 1)
    assert guest.hv.audit() == []


def test_pin_not_owned_is_einval(guest: Guest) -> None:
    other = boot(guest.hv)
    assert guest.ext((abi.MMUEXT_PIN_L1_TABLE, other.spare[0], 0)).rc == -abi.EINVAL
    assert guest.ext((abi.MMUEXT_PIN_L1_TABLE, 10**9, 0)).rc == -abi.EINVAL


def test_pin_as_other_type_is_einval(guest: Guest) -> None:
    # The L1 is in use as an L1: it cannot be pinned as an L2.
    assert guest.ext((abi.MMUEXT_PIN_L2_TABLE, guest.l1, 0)).rc == -abi.EINVAL
    # A data frame mapped RW is typed writable.
    assert guest.ext((abi.MMUEXT_PIN_L1_TABLE, guest.data[0], 0)).rc == -abi.EINVAL


def test_pin_validation_failure_returns_inner_error(guest: Guest) -> None:
    frame = guest.take()
    assert guest.mmu((maddr_of_entry(frame, 0), make_pte(guest.l2, USER_RW))).rc == 0
    assert guest.ext((abi.MMUEXT_PIN_L1_TABLE, frame, 0)).rc == -abi.EBUSY
    frame2 = guest.take()
    assert (
        guest.mmu((maddr_of_entry(frame2, 0), make_pte(guest.data[0], USER_RO | _PAGE_PAT))).rc == 0
    )
    assert guest.ext((abi.MMUEXT_PIN_L1_TABLE, frame2, 0)).rc == -abi.EINVAL
    assert guest.hv.audit() == []


def test_pin_l4_fills_xen_slots(guest: Guest) -> None:
    l4 = guest.take()
    assert guest.mmu((maddr_of_entry(l4, 260), 0x1234_5007)).rc == 0  # untyped: plain data
    assert guest.ext((abi.MMUEXT_PIN_L4_TABLE, l4, 0)).rc == 0
    for slot in range(256, 272):
        assert guest.read(maddr_of_entry(l4, slot)) >> 12 == guest.hv.xen_mfn
    assert guest.hv.audit() == []


def test_unpin_not_pinned_or_not_owned_is_einval(guest: Guest) -> None:
    assert guest.ext((abi.MMUEXT_UNPIN_TABLE, guest.l1, 0)).rc == -abi.EINVAL
    other = boot(guest.hv)
    assert guest.ext((abi.MMUEXT_UNPIN_TABLE, other.l4, 0)).rc == -abi.EINVAL


def test_unpinned_root_stays_alive_while_loaded(guest: Guest) -> None:
    ft = guest.hv.state.frames
    assert guest.ext((abi.MMUEXT_UNPIN_TABLE, guest.l4, 0)).rc == 0
    assert ft.validated(guest.l4)  # still every vCPU's CR3
    assert guest.hv.audit() == []


def test_new_baseptr_switches_and_releases(guest: Guest) -> None:
    ft = guest.hv.state.frames
    l4 = guest.take()
    assert guest.ext((abi.MMUEXT_UNPIN_TABLE, guest.l4, 0)).rc == 0
    for vcpu in (0, 1):
        assert guest.ext((abi.MMUEXT_NEW_BASEPTR, l4, 0), vcpu=vcpu).rc == 0
        assert guest.dom.hw.cr3(vcpu) == l4
    # the old tree had no other reference: torn down
    assert ft.type_count[guest.l4] == 0
    assert ft.type_count[guest.l1] == 0
    assert guest.hv.audit() == []


def test_new_baseptr_bad_frame_is_einval(guest: Guest) -> None:
    result = guest.ext((abi.MMUEXT_NEW_BASEPTR, guest.data[0], 0))
    assert result.rc == -abi.EINVAL
    assert guest.dom.cr3[0] == guest.l4


def test_new_user_baseptr(guest: Guest) -> None:
    assert guest.ext((abi.MMUEXT_NEW_USER_BASEPTR, guest.l4, 0)).rc == 0
    assert guest.dom.user_cr3[0] == guest.l4
    assert guest.hv.audit() == []
    assert guest.ext((abi.MMUEXT_NEW_USER_BASEPTR, 0, 0)).rc == 0
    assert guest.dom.user_cr3[0] is None
    assert guest.hv.audit() == []


def test_tlb_flush_ops(guest: Guest) -> None:
    hw = guest.dom.hw

    def warm() -> None:
        for vcpu in (0, 1):
            assert guest.hv.run_user(guest.domid, vcpu, [(0, "r", 1), (4096, "r", 1)]).fault is None

    warm()
    assert guest.ext((abi.MMUEXT_INVLPG_LOCAL, 0, 0), vcpu=1).rc == 0
    assert hw.tlb_entry(1, 0) is None
    assert hw.tlb_entry(1, 4096) is not None
    assert hw.tlb_entry(0, 0) is not None
    assert guest.ext((abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0), vcpu=0).rc == 0
    assert hw.tlb_size(0) == 0
    assert hw.tlb_entry(1, 4096) is not None
    warm()
    assert guest.ext((abi.MMUEXT_TLB_FLUSH_MULTI, 0, 0b10)).rc == 0
    assert hw.tlb_size(1) == 0
    assert hw.tlb_size(0) == 2
    warm()
    assert guest.ext((abi.MMUEXT_INVLPG_MULTI, 4096, 0b11)).rc == 0
    assert hw.tlb_entry(0, 4096) is None
    assert hw.tlb_entry(1, 4096) is None
    assert hw.tlb_entry(0, 0) is not None
    warm()
    assert guest.ext((abi.MMUEXT_INVLPG_ALL, 0, 0)).rc == 0
    assert hw.tlb_entry(0, 0) is None
    assert hw.tlb_entry(1, 0) is None
    assert guest.ext((abi.MMUEXT_TLB_FLUSH_ALL, 0, 0)).rc == 0
    assert hw.tlb_size(0) == hw.tlb_size(1) == 0
    # a non-canonical INVLPG is silently ignored
    assert guest.ext((abi.MMUEXT_INVLPG_LOCAL, 1 << 60, 0)).rc == 0
    assert guest.dom.counters[0].tlb_flush_ops == 6
    assert guest.dom.counters[1].tlb_flush_ops == 1


@pytest.mark.parametrize(
    ("op", "errno"),
    [
        ((abi.MMUEXT_FLUSH_CACHE, 0, 0), abi.EACCES),
        ((abi.MMUEXT_FLUSH_CACHE_GLOBAL, 0, 0), abi.EACCES),
        ((abi.MMUEXT_SET_LDT, 0x1001, 4), abi.EINVAL),
        ((abi.MMUEXT_SET_LDT, 0x1000, 8193), abi.EINVAL),
        ((abi.MMUEXT_SET_LDT, abi.HYPERVISOR_VIRT_START, 4), abi.EINVAL),
        ((abi.MMUEXT_MARK_SUPER, 0, 0), abi.EOPNOTSUPP),
        ((abi.MMUEXT_UNMARK_SUPER, 0, 0), abi.EOPNOTSUPP),
        ((14, 0, 0), abi.ENOSYS),
        ((99, 0, 0), abi.ENOSYS),
    ],
)
def test_mmuext_refusals(guest: Guest, op: tuple[int, int, int], errno: int) -> None:
    before = guest.dom.counters[0].mmuext_ops
    result = guest.ext((abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0), op, (abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0))
    assert (result.rc, result.done) == (-errno, 1)
    assert guest.dom.counters[0].mmuext_ops == before + 2, "the op after the failure must not run"


def test_set_ldt_accepted(guest: Guest) -> None:
    assert guest.ext((abi.MMUEXT_SET_LDT, 0x10000, 16)).rc == 0
    assert guest.dom.ldt[0] == (0x10000, 16)


def test_clear_and_copy_page(guest: Guest) -> None:
    src, dst = guest.data[0], guest.data[1]
    assert guest.mmu((maddr_of_entry(src, 3), 0xABCD)).rc == 0
    assert guest.ext((abi.MMUEXT_COPY_PAGE, dst, src)).rc == 0
    assert guest.read(maddr_of_entry(dst, 3)) == 0xABCD
    assert guest.ext((abi.MMUEXT_CLEAR_PAGE, dst, 0)).rc == 0
    assert guest.read(maddr_of_entry(dst, 3)) == 0
    assert guest.ext((abi.MMUEXT_CLEAR_PAGE, guest.l1, 0)).rc == -abi.EINVAL
    assert guest.ext((abi.MMUEXT_COPY_PAGE, guest.l1, src)).rc == -abi.EINVAL
    other = boot(guest.hv)
    assert guest.ext((abi.MMUEXT_COPY_PAGE, dst, other.data[0])).rc == -abi.EINVAL
    assert guest.hv.audit() == []


# --- multicall ----------------------------------------------------------------------------


def test_multicall_results_and_no_stop_on_failure(guest: Guest) -> None:
    good = flat((guest.l1e(50), make_pte(guest.data[0], USER_RO)))
    bad = flat((guest.l1e(51), make_pte(guest.l2, USER_RW)))
    calls = [
        (abi.HYPERVISOR_mmu_update, good, abi.DOMID_SELF),
        (abi.HYPERVISOR_mmu_update, bad, abi.DOMID_SELF),
        (abi.HYPERVISOR_multicall, []),
        (99, 1, 2),
        (abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)], abi.DOMID_SELF),
        (abi.HYPERVISOR_update_va_mapping, 52 * 4096, make_pte(guest.data[1], USER_RO), 0),
    ]
    result = guest.hv.hypercall(guest.domid, 0, core_call(abi.HYPERVISOR_multicall, (calls,)))
    assert result.rc == 0
    assert result.results == (0, -abi.EBUSY, -abi.EINVAL, -abi.ENOSYS, 0, 0)
    assert guest.read(guest.l1e(50)) != 0
    assert guest.read(guest.l1e(52)) != 0
    counters = guest.dom.counters[0]
    assert counters.hypercalls[abi.HYPERVISOR_multicall] == 1
    assert counters.multicall_entries == 6
    assert counters.multicall_ops[abi.HYPERVISOR_mmu_update] == 2
    assert guest.hv.audit() == []


def test_multicall_is_one_trap(guest: Guest) -> None:
    before = guest.dom.counters[0].traps
    calls = [(abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)], abi.DOMID_SELF)] * 32
    guest.hv.hypercall(guest.domid, 0, core_call(abi.HYPERVISOR_multicall, (calls,)))
    assert guest.dom.counters[0].traps == before + 1


# --- update_va_mapping ---------------------------------------------------------------------


def test_update_va_mapping_replaces_entry(guest: Guest) -> None:
    va = 60 * 4096
    assert guest.uvm(va, make_pte(guest.data[2], USER_RO), abi.UVMF_NONE) == 0
    assert guest.pte_for(va) >> 12 == guest.data[2]
    assert guest.hv.audit() == []


@pytest.mark.parametrize("va", [1 << 47, abi.HYPERVISOR_VIRT_START, 1 << 40])
def test_update_va_mapping_bad_address_is_einval(guest: Guest, va: int) -> None:
    # 1 << 47 is non-canonical, the Xen hole is not the guest's, 1 << 40 has no L3 entry.
    assert guest.uvm(va, make_pte(guest.data[2], USER_RO), 0) == -abi.EINVAL


def test_update_va_mapping_without_cr3_is_einval() -> None:
    hv = Hypervisor(16)
    dom = hv.create_domain(1, 1)
    rc = hv.hypercall(dom.domid, 0, core_call(abi.HYPERVISOR_update_va_mapping, (0, 0, 0))).rc
    assert rc == -abi.EINVAL


def test_update_va_mapping_propagates_l1_errors_without_flush(guest: Guest) -> None:
    assert guest.hv.run_user(guest.domid, 0, [(0, "r", 1)]).fault is None
    rc = guest.uvm(0, make_pte(guest.l2, USER_RW), abi.UVMF_TLB_FLUSH | abi.UVMF_ALL)
    assert rc == -abi.EBUSY
    assert guest.dom.hw.tlb_entry(0, 0) is not None
    assert guest.dom.counters[0].tlb_flush_ops == 0


@pytest.mark.parametrize(
    ("flags", "flushed_vcpus"),
    [
        (abi.UVMF_NONE, set()),
        (abi.UVMF_INVLPG | abi.UVMF_LOCAL, {0}),
        (abi.UVMF_TLB_FLUSH | abi.UVMF_LOCAL, {0}),
        (abi.UVMF_INVLPG | abi.UVMF_ALL, {0, 1}),
        (abi.UVMF_TLB_FLUSH | (0b10 << abi.UVMF_MULTI_MASK_SHIFT), {1}),
        (3, set()),  # flush type 3 matches neither: nothing flushed
    ],
)
def test_update_va_mapping_flush_flags(guest: Guest, flags: int, flushed_vcpus: set[int]) -> None:
    hw = guest.dom.hw
    for vcpu in (0, 1):
        assert guest.hv.run_user(guest.domid, vcpu, [(0, "r", 1), (4096, "r", 1)]).fault is None
    assert guest.uvm(0, make_pte(guest.data[0], USER_RO), flags) == 0
    for vcpu in (0, 1):
        assert (hw.tlb_entry(vcpu, 0) is None) == (vcpu in flushed_vcpus)
    full = flags & 3 == abi.UVMF_TLB_FLUSH
    for vcpu in (0, 1):
        assert (hw.tlb_entry(vcpu, 4096) is None) == (full and vcpu in flushed_vcpus)


# --- update_va_mapping_otherdomain (hypercall 22) -----------------------------------------


def uvm_other(guest: Guest, va: int, val: int, flags: int, domid: int, vcpu: int = 0) -> int:
    op = abi.HYPERVISOR_update_va_mapping_otherdomain
    return guest.hv.hypercall(guest.domid, vcpu, core_call(op, (va, val, flags, domid))).rc


def test_otherdomain_self_is_update_va_mapping(guest: Guest) -> None:
    """DOMID_SELF: get_pg_owner gives the caller, XSM allows it, and the call
    is update_va_mapping: the entry is replaced and the flush done."""
    hw = guest.dom.hw
    assert guest.hv.run_user(guest.domid, 1, [(0, "r", 1)]).fault is None
    val = make_pte(guest.data[2], USER_RO)
    assert uvm_other(guest, 0, val, abi.UVMF_INVLPG | abi.UVMF_ALL, abi.DOMID_SELF) == 0
    assert guest.pte_for(0) >> 12 == guest.data[2]
    assert hw.tlb_entry(1, 0) is None
    counters = guest.dom.counters[0]
    assert counters.tlb_flush_ops == 1
    assert counters.hypercalls[abi.HYPERVISOR_update_va_mapping_otherdomain] == 1
    # mod_l1_entry's errors come back as they are, without a flush
    assert uvm_other(guest, 0, make_pte(guest.l2, USER_RW), abi.UVMF_TLB_FLUSH, abi.DOMID_SELF) == (
        -abi.EBUSY
    )
    assert uvm_other(guest, 1 << 47, val, 0, abi.DOMID_SELF) == -abi.EINVAL
    assert counters.tlb_flush_ops == 1
    assert guest.pte_for(0) >> 12 == guest.data[2]
    assert guest.hv.audit() == []


@pytest.mark.parametrize("which", ["unknown", "own_numeric", "destroyed"])
def test_otherdomain_bad_domid_is_esrch(guest: Guest, which: str) -> None:
    """get_pg_owner fails -> -ESRCH before anything else (docs/sources.md §6),
    even with an address Xen would refuse later (-EINVAL)."""
    if which == "destroyed":
        gone = boot(guest.hv)
        domid = gone.domid
        guest.hv.destroy_domain(domid)
    else:
        domid = 777 if which == "unknown" else guest.domid
    before = guest.pte_for(5 * 4096)
    val = make_pte(guest.data[2], USER_RO)
    assert uvm_other(guest, 5 * 4096, val, abi.UVMF_TLB_FLUSH, domid) == -abi.ESRCH
    assert uvm_other(guest, 1 << 47, val, 0, domid) == -abi.ESRCH
    assert guest.pte_for(5 * 4096) == before
    assert guest.dom.counters[0].tlb_flush_ops == 0
    assert guest.hv.audit() == []


@pytest.mark.parametrize("which", ["other", "io", "xen"])
def test_otherdomain_foreign_owner_is_eperm(guest: Guest, which: str) -> None:
    """Another existing owner resolves, and XSM refuses an unprivileged
    caller anything but itself: -EPERM, checked before the address (§5
    step 1), and the owner's frame is not mapped."""
    other = boot(guest.hv)
    domid = {"other": other.domid, "io": abi.DOMID_IO, "xen": abi.DOMID_XEN}[which]
    before = guest.pte_for(5 * 4096)
    val = make_pte(other.data[0], USER_RO)
    assert uvm_other(guest, 5 * 4096, val, abi.UVMF_TLB_FLUSH, domid) == -abi.EPERM
    assert uvm_other(guest, 1 << 47, val, 0, domid) == -abi.EPERM
    assert guest.pte_for(5 * 4096) == before
    assert guest.hv.state.frames.count[other.data[0]] == 2  # allocation + its own mapping
    assert guest.dom.counters[0].tlb_flush_ops == 0
    assert guest.hv.audit() == []


def test_otherdomain_domid_is_a_domid_t(guest: Guest) -> None:
    """Xen's parameter is a domid_t: only bits 0-15 of the register count.
    The typed argument holds exactly those 16 bits (a wider value cannot be
    built, and the wire refuses it as bad_type), so what reaches the core is
    the truncated domid."""
    val = make_pte(guest.data[3], USER_RO)
    with pytest.raises(LocalProtocolError):
        wire.UpdateVaMappingOtherdomainArgs(70 * 4096, val, 0, 1 << 16 | abi.DOMID_SELF)
    assert uvm_other(guest, 70 * 4096, val, 0, (1 << 16 | abi.DOMID_SELF) & 0xFFFF) == 0
    assert guest.pte_for(70 * 4096) >> 12 == guest.data[3]
    assert uvm_other(guest, 70 * 4096, 0, 0, (1 << 16 | guest.domid) & 0xFFFF) == -abi.ESRCH


def test_otherdomain_in_a_multicall(guest: Guest) -> None:
    op = abi.HYPERVISOR_update_va_mapping_otherdomain
    val = make_pte(guest.data[1], USER_RO)
    calls = [
        (op, 80 * 4096, val, 0, abi.DOMID_SELF),
        (op, 81 * 4096, val, 0, 777),
        (op, 82 * 4096, val, 0, boot(guest.hv).domid),
        (op, 83 * 4096, val, 0, abi.DOMID_SELF),
    ]
    result = guest.hv.hypercall(guest.domid, 0, core_call(abi.HYPERVISOR_multicall, (calls,)))
    assert (result.rc, result.results) == (0, (0, -abi.ESRCH, -abi.EPERM, 0))
    assert [guest.pte_for(i * 4096) >> 12 for i in (80, 81, 82, 83)] == [
        guest.data[1],
        0,
        0,
        guest.data[1],
    ]
    assert guest.dom.counters[0].multicall_ops[op] == 4
    assert guest.hv.audit() == []


# --- vm_assist and writable page tables -------------------------------------------------------


def test_vm_assist(guest: Guest) -> None:
    def call(domid: int, vcpu: int, op: int, args: tuple[int, ...]) -> HypercallResult:
        return guest.hv.hypercall(domid, vcpu, core_call(op, args))

    assert call(guest.domid, 0, abi.HYPERVISOR_vm_assist, (1, 2)).rc == 0
    assert not guest.dom.writable_pagetables
    assert call(guest.domid, 0, abi.HYPERVISOR_vm_assist, (0, 2)).rc == 0
    assert guest.dom.writable_pagetables
    assert call(guest.domid, 0, abi.HYPERVISOR_vm_assist, (0, 7)).rc == -abi.EINVAL
    assert call(guest.domid, 0, abi.HYPERVISOR_vm_assist, (5, 2)).rc == -abi.ENOSYS


def test_unknown_hypercall_is_enosys(guest: Guest) -> None:
    assert guest.hv.hypercall(guest.domid, 0, core_call(12, ())).rc == -abi.ENOSYS
    assert guest.dom.counters[0].hypercalls[12] == 1


def test_ptwr_write_validated_and_applied(guest: Guest) -> None:
    ft = guest.hv.state.frames
    maddr = guest.l1e(2)
    old = guest.read(maddr)
    traps_before = guest.dom.counters[0].traps
    rc, seen = guest.hv.ptwr_write(guest.domid, 0, maddr, old & ~_PAGE_RW, exchange=True)
    assert (rc, seen) == (0, old)
    assert not guest.read(maddr) & _PAGE_RW
    assert ft.type_count[guest.data[2]] == 0
    assert guest.dom.counters[0].ptwr == 1
    assert guest.dom.counters[0].traps == traps_before + 1
    assert guest.hv.audit() == []


def test_ptwr_loses_hardware_bits_like_any_plain_write(guest: Guest) -> None:
    maddr = guest.l1e(2)
    start = guest.read(maddr)
    guest.hv.run_user(guest.domid, 1, [(2 * 4096, "w", b"z")])
    assert guest.hv.ptwr_write(guest.domid, 0, maddr, start)[0] == 0
    assert not guest.read(maddr) & _PAGE_DIRTY


@pytest.mark.parametrize(
    "where",
    ["misaligned", "l2", "data", "foreign", "disabled"],
)
def test_ptwr_refused_is_not_emulated(guest: Guest, where: str) -> None:
    other = boot(guest.hv)
    maddr = {
        "misaligned": guest.l1e(2) + 4,
        "l2": maddr_of_entry(guest.l2, 3),
        "data": maddr_of_entry(guest.data[0], 0),
        "foreign": other.l1e(2),
        "disabled": guest.l1e(2),
    }[where]
    if where == "disabled":
        guest.dom.writable_pagetables = False
    before = guest.read(maddr & ~7)
    assert guest.hv.ptwr_write(guest.domid, 0, maddr, 0)[0] == -abi.EFAULT
    assert guest.read(maddr & ~7) == before


def test_ptwr_invalid_value_is_refused(guest: Guest) -> None:
    maddr = guest.l1e(9)
    rc, _ = guest.hv.ptwr_write(guest.domid, 0, maddr, make_pte(guest.l3, USER_RW))
    assert rc == -abi.EBUSY
    assert guest.read(maddr) == 0
    assert guest.hv.audit() == []


def test_upper_entry_accepts_new_tree(guest: Guest) -> None:
    l1 = fresh_l1(guest, guest.data[0], guest.data[1])
    assert guest.mmu((maddr_of_entry(guest.l2, 1), make_pte(l1, TABLE))).rc == 0
    va = (1 << 21) + 4096
    assert guest.hv.run_user(guest.domid, 0, [(va, "r", 1)]).fault is None
    assert guest.hv.audit() == []
