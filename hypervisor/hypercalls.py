"""Hypercall semantics: mmu_update, mmuext_op, multicall, update_va_mapping
(and its _otherdomain variant), vm_assist and writable page-table emulation
(docs/sources.md §6, §8); plus pvemu's own mmu_update command
``MMU_PT_XCHG_PVEMU`` (not Xen's; docs/protocol.md §4.1).

Batched calls are generators driven through a :class:`Budget`: the entries
the running slice may still process. A call spends it as it goes (one entry
or a whole run of records at once) and, when it is used up and work remains,
``yield``s: that is Xen's preemption check. The driver (``core.PendingCall``)
refills the budget for each slice and resumes the parked generator, which is
exactly Xen's continuation: the call restarts at the first unprocessed entry
and the guest sees one hypercall.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pvemu.shared import abi, wire
from pvemu.shared.wire import u64_array_blob
from pvemu.shared.x86 import (
    _PAGE_DIRTY,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    LINEAR_MAP_BASE,
    PAGE_SHIFT,
    PAGE_SIZE,
    is_canonical,
    maddr_of_entry,
    va_indexes,
)

from . import mmu_batch
from .frametable import LINEAR_RO, VALIDATED
from .pagetypes import L1_DISALLOW_MASK, frame_of

if TYPE_CHECKING:
    from .domain import Domain, MachineState

MAX_LDT_ENTRIES: Final = 8192
GUEST_LOW_END: Final = 1 << 47
#: A slice without a bound (a call run to completion in one go).
UNLIMITED: Final = sys.maxsize


class Budget:
    """The entries a hypercall may still process in the running slice.

    ``left`` is refilled by the driver before each slice; a call takes from
    it with :meth:`spend` and parks (``yield``) when it is 0 and work remains.
    ``used`` counts every entry spent since the call started. The unit is the
    entry Xen's preemption check counts: an ``mmu_update`` record, an
    ``mmuext_op`` op, or a multicall entry that carries neither (a multicall
    entry costs its records or ops, at least one).
    """

    __slots__ = ("left", "used")

    def __init__(self, left: int = UNLIMITED) -> None:
        self.left = left
        self.used = 0

    def spend(self, entries: int) -> None:
        self.left -= entries
        self.used += entries


@dataclass(frozen=True, slots=True)
class HypercallResult:
    """What the guest gets back: rc, the done count, multicall results, and
    the old entries of an mmu_update's applied ``MMU_PT_XCHG_PVEMU``
    records (little-endian u64s, record order; pvemu's extension)."""

    rc: int
    done: int = 0
    results: tuple[int, ...] = ()
    olds: bytes = b""


def guest_addr_ok(va: int) -> bool:
    """Xen's ``__addr_ok``: lower half, or above the hypervisor hole."""
    return 0 <= va < GUEST_LOW_END or abi.HYPERVISOR_VIRT_END <= va < (1 << 64)


def _foreign_owner(m: MachineState, dom: Domain, field: int) -> int | None:
    """Resolve an FD field: the owner domid, or None when the lookup fails.

    Xen's ``get_pg_owner``: it refuses an explicit own domid (-ESRCH: use
    DOMID_SELF) and unknown domains. DOMID_IO/DOMID_XEN and other domains
    resolve, and an unprivileged caller is then refused by XSM (-EPERM).
    """
    if field == abi.DOMID_SELF:
        return dom.domid
    if field == dom.domid:
        return None
    if field in (abi.DOMID_IO, abi.DOMID_XEN):
        return field
    if field in m.domains and not m.domains[field].dead:
        return field
    return None


# --- mmu_update --------------------------------------------------------------------


def mmu_update(
    m: MachineState,
    dom: Domain,
    vcpu: int,
    reqs: Sequence[int],
    foreigndom: int,
    budget: Budget,
    *,
    exchange: bool = True,
) -> Generator[None, None, HypercallResult]:
    """Apply (ptr, val) requests in order, stopping at the first failure.

    ``reqs`` is flat: ptr0, val0, ptr1, val1, ... (Xen's struct layout).
    ``exchange``: whether ``MMU_PT_XCHG_PVEMU`` records are served; a
    multicall entry's reply is a bare rc, with no room for the old values,
    so there they are refused (-EOPNOTSUPP) rather than applied blind.
    """
    if len(reqs) % 2:
        return HypercallResult(-abi.EFAULT)
    counters = dom.counters[vcpu]
    pfd_field = (foreigndom >> 16) & 0xFFFF
    pt_owner = dom.domid
    if pfd_field:
        pt_owner = pfd_field - 1
        if pt_owner not in m.domains or m.domains[pt_owner].dead:
            return HypercallResult(-abi.ESRCH)
    pg_owner = _foreign_owner(m, dom, foreigndom & 0xFFFF)
    if pg_owner is None:
        return HypercallResult(-abi.ESRCH)
    flush_all = False
    done = 0
    rc = 0
    count = len(reqs) // 2
    batched = mmu_batch.ENABLED and pt_owner == pg_owner == dom.domid
    recs = mmu_batch.records_array(reqs) if batched else None
    olds = array("Q")
    xchg_cmd = abi.MMU_PT_XCHG_PVEMU if exchange else None
    backoff = skip = 0
    while done < count:
        while budget.left <= 0:
            yield
        if recs is not None and not skip:
            window = min(count - done, budget.left, mmu_batch.MAX_WINDOW)
            if window >= mmu_batch.MIN_RUN:
                before = len(olds)
                run = mmu_batch.apply_run(
                    m, dom, recs, done, done + window, olds if exchange else None
                )
                budget.spend(run)
                counters.mmu_update_records += run
                counters.mmu_xchg_records += len(olds) - before
                done += run
                if run:
                    backoff = 0
                    continue  # from the record that stopped the run
                # Not covered: the per-record path takes it, and a few more.
                backoff = min(max(2 * backoff, mmu_batch.BACKOFF), mmu_batch.MAX_BACKOFF)
                skip = backoff
        skip = max(skip - 1, 0)
        budget.spend(1)
        counters.mmu_update_records += 1
        ptr = reqs[2 * done]
        val = reqs[2 * done + 1]
        cmd = ptr & abi.MMU_CMD_MASK
        if cmd == abi.MMU_PT_XCHG_PVEMU:
            counters.mmu_xchg_records += 1
        if pt_owner != dom.domid or pg_owner != dom.domid:
            rc = -abi.EPERM  # XSM: an unprivileged domain acts only on itself
        elif cmd in _PT_UPDATE_CMDS:
            rc, upper = _pt_update(m, ptr - cmd, val, cmd, pt_owner, pg_owner)
            flush_all = flush_all or upper
        elif cmd == xchg_cmd:
            rc = _pt_xchg(m, dom, ptr - cmd, val, olds)
        elif cmd == abi.MMU_PT_XCHG_PVEMU:
            rc = -abi.EOPNOTSUPP  # in a multicall: nowhere to return the old entry
        elif cmd == abi.MMU_MACHPHYS_UPDATE:
            rc = _machphys_update(m, ptr >> PAGE_SHIFT, val, pg_owner)
        else:
            rc = -abi.ENOSYS
        if rc:
            break
        done += 1
    if flush_all:
        m.domains[pt_owner].hw.flush_tlb_all()
        m.domains[pt_owner].oracle.flushed_all()
    return HypercallResult(rc, done, olds=u64_array_blob(olds) if olds else b"")


_PT_UPDATE_CMDS: Final = frozenset(
    {abi.MMU_NORMAL_PT_UPDATE, abi.MMU_PT_UPDATE_PRESERVE_AD, abi.MMU_PT_UPDATE_NO_TRANSLATE}
)
_UPPER_TYPES: Final = frozenset(
    {abi.PGT_l2_page_table, abi.PGT_l3_page_table, abi.PGT_l4_page_table}
)


def _pt_update(
    m: MachineState, maddr: int, val: int, cmd: int, pt_owner: int, pg_owner: int
) -> tuple[int, bool]:
    """One page-table write request (Xen's ``do_mmu_update``): the entry's rule by the
    type of the frame it is in. Returns (rc, an upper-level entry changed)."""
    ft = m.frames
    types = m.types
    mfn = maddr >> PAGE_SHIFT
    preserve = cmd == abi.MMU_PT_UPDATE_PRESERVE_AD
    if not ft.valid(mfn) or ft.owner[mfn] != pt_owner:
        return -abi.EINVAL, False
    if ft.type_count[mfn] and ft.flags[mfn] & VALIDATED:
        page_type = ft.type[mfn]
        if page_type == abi.PGT_l1_page_table:
            return types.mod_l1_entry(maddr, val, preserve, pg_owner), False
        if page_type in _UPPER_TYPES:
            if pg_owner != pt_owner:
                return -abi.EINVAL, False
            rc = types.mod_upper_entry(maddr, val, page_type, preserve)
            return rc, rc == 0
        if page_type == abi.PGT_writable_page:
            m.memory.write_u64(maddr, val)
            return 0, False
        return -abi.EINVAL, False
    if ft.type_count[mfn]:
        return -abi.EINVAL, False  # typed but mid-validation
    # Unused frame: take a transient writable type, store as data.
    if types.get_page_type(mfn, abi.PGT_writable_page):
        return -abi.EINVAL, False
    m.memory.write_u64(maddr, val)
    types.put_page_type(mfn)
    return 0, False


def _pt_xchg(m: MachineState, dom: Domain, maddr: int, val: int, olds: array[int]) -> int:
    """``MMU_PT_XCHG_PVEMU`` (pvemu's extension): ``mod_l1_entry`` of an
    entry of one of the caller's validated L1s, handing the old entry back.

    The hardware model never runs inside a record, so the entry read here is
    the one replaced: every A/D bit set before this instant is in it. Any
    other target - an upper-level table, a data or untyped frame, a frame
    mid-validation or not the caller's - is -EINVAL: the command exchanges
    page-table entries, never plain data.
    """
    ft = m.frames
    mfn = maddr >> PAGE_SHIFT
    if (
        not ft.valid(mfn)
        or ft.owner[mfn] != dom.domid
        or ft.type[mfn] != abi.PGT_l1_page_table
        or not ft.type_count[mfn]
        or not ft.flags[mfn] & VALIDATED
    ):
        return -abi.EINVAL
    old = m.memory.read_u64(maddr)
    oracle = dom.oracle
    unseen = oracle.dirty_unseen(maddr)
    oracle.guest_saw(maddr)  # before the write, which may clear D
    rc = m.types.mod_l1_entry(maddr, val, False, dom.domid)
    if rc:
        if unseen:
            oracle.hardware_set_dirty(maddr)  # nothing was exchanged after all
        return rc
    olds.append(old)
    return 0


def _machphys_update(m: MachineState, mfn: int, val: int, pg_owner: int) -> int:
    """``MMU_MACHPHYS_UPDATE``: set the guest-visible M2P entry of ``mfn``."""
    ft = m.frames
    if not ft.valid(mfn) or ft.owner[mfn] != pg_owner:
        return -abi.EINVAL
    ft.m2p[mfn] = val
    return 0


# --- mmuext_op -----------------------------------------------------------------------

_PIN_LEVEL: Final = {
    abi.MMUEXT_PIN_L1_TABLE: 1,
    abi.MMUEXT_PIN_L2_TABLE: 2,
    abi.MMUEXT_PIN_L3_TABLE: 3,
    abi.MMUEXT_PIN_L4_TABLE: 4,
}

_FLUSH_OPS: Final = frozenset(
    {
        abi.MMUEXT_TLB_FLUSH_LOCAL,
        abi.MMUEXT_INVLPG_LOCAL,
        abi.MMUEXT_TLB_FLUSH_MULTI,
        abi.MMUEXT_INVLPG_MULTI,
        abi.MMUEXT_TLB_FLUSH_ALL,
        abi.MMUEXT_INVLPG_ALL,
    }
)


def _vcpus_in_mask(dom: Domain, mask: int) -> list[int]:
    """vCPU ids in a bitmap; bits beyond the domain's vCPUs are ignored."""
    return [v for v in range(dom.nr_vcpus) if mask >> v & 1]


def _set_base(m: MachineState, dom: Domain, vcpu: int, mfn: int, user: bool) -> int:
    """NEW_BASEPTR / NEW_USER_BASEPTR: ref the new L4, then drop the old one."""
    bases = dom.user_cr3 if user else dom.cr3
    old = bases[vcpu]
    if user and mfn == 0:
        new: int | None = None
    elif mfn == old:
        if not user:
            dom.hw.set_cr3(vcpu, mfn)  # reload: a full local flush
        return 0
    else:
        rc = m.types.get_page_and_type(mfn, dom.domid, abi.PGT_l4_page_table, -abi.EINVAL)
        if rc:
            return rc
        new = mfn
    bases[vcpu] = new
    if not user and new is not None:
        dom.hw.set_cr3(vcpu, new)
    if old is not None:
        m.types.put_page_and_type(old)
    return 0


def _mmuext_one(m: MachineState, dom: Domain, vcpu: int, op: tuple[int, int, int], fd: int) -> int:
    cmd, arg1, arg2 = op
    counters = dom.counters[vcpu]
    if fd != dom.domid:
        return -abi.EPERM  # XSM / "foreign FD on non-pin ops"
    types = m.types
    hw = dom.hw
    if cmd in _PIN_LEVEL:
        return types.pin(arg1, dom.domid, _PIN_LEVEL[cmd])
    if cmd == abi.MMUEXT_UNPIN_TABLE:
        return types.unpin(arg1, dom.domid)
    if cmd == abi.MMUEXT_NEW_BASEPTR:
        return _set_base(m, dom, vcpu, arg1, user=False)
    if cmd == abi.MMUEXT_NEW_USER_BASEPTR:
        return _set_base(m, dom, vcpu, arg1, user=True)
    if cmd in _FLUSH_OPS:
        counters.tlb_flush_ops += 1
        if cmd in (abi.MMUEXT_INVLPG_LOCAL, abi.MMUEXT_INVLPG_MULTI, abi.MMUEXT_INVLPG_ALL):
            dom.oracle.flushed_page(arg1)
        else:
            dom.oracle.flushed_all()
        if cmd == abi.MMUEXT_TLB_FLUSH_LOCAL:
            hw.flush_tlb(vcpu)
        elif cmd == abi.MMUEXT_INVLPG_LOCAL:
            if is_canonical(arg1):
                hw.invlpg(vcpu, arg1)
        elif cmd == abi.MMUEXT_TLB_FLUSH_MULTI:
            for target in _vcpus_in_mask(dom, arg2):
                hw.flush_tlb(target)
        elif cmd == abi.MMUEXT_INVLPG_MULTI:
            if guest_addr_ok(arg1):
                for target in _vcpus_in_mask(dom, arg2):
                    hw.invlpg(target, arg1)
        elif cmd == abi.MMUEXT_TLB_FLUSH_ALL:
            hw.flush_tlb_all()
        elif guest_addr_ok(arg1):  # MMUEXT_INVLPG_ALL
            hw.invlpg_all(arg1)
        return 0
    if cmd in (abi.MMUEXT_FLUSH_CACHE, abi.MMUEXT_FLUSH_CACHE_GLOBAL):
        return -abi.EACCES  # a domU has no cache-flush permission
    if cmd == abi.MMUEXT_SET_LDT:
        if arg2 > MAX_LDT_ENTRIES or arg1 % PAGE_SIZE or not guest_addr_ok(arg1):
            return -abi.EINVAL
        dom.ldt[vcpu] = (arg1, arg2)
        return 0
    if cmd == abi.MMUEXT_CLEAR_PAGE:
        rc = types.get_page_and_type(arg1, dom.domid, abi.PGT_writable_page, -abi.EINVAL)
        if rc:
            return -abi.EINVAL
        m.memory.zero_frame(arg1)
        types.put_page_and_type(arg1)
        return 0
    if cmd == abi.MMUEXT_COPY_PAGE:
        if not types.get_page(arg2, dom.domid):
            return -abi.EINVAL
        rc = types.get_page_and_type(arg1, dom.domid, abi.PGT_writable_page, -abi.EINVAL)
        if rc:
            types.put_page(arg2)
            return -abi.EINVAL
        m.memory.copy_frame(arg1, arg2)
        types.put_page_and_type(arg1)
        types.put_page(arg2)
        return 0
    if cmd in (abi.MMUEXT_MARK_SUPER, abi.MMUEXT_UNMARK_SUPER):
        return -abi.EOPNOTSUPP
    return -abi.ENOSYS


def mmuext_op(
    m: MachineState,
    dom: Domain,
    vcpu: int,
    ops: Sequence[tuple[int, int, int]],
    foreigndom: int,
    budget: Budget,
) -> Generator[None, None, HypercallResult]:
    """Extended MMU ops in order; stop at the first failure (Xen's ``do_mmuext_op``).

    ``foreigndom`` is an unsigned int, but Xen passes it to ``get_pg_owner``,
    which takes a ``domid_t``: bits 16-31 are dropped (no PFD here).
    """
    fd = _foreign_owner(m, dom, foreigndom & 0xFFFF)
    if fd is None:
        return HypercallResult(-abi.ESRCH)
    counters = dom.counters[vcpu]
    done = 0
    rc = 0
    for op in ops:
        while budget.left <= 0:
            yield
        budget.spend(1)
        counters.mmuext_ops += 1
        rc = _mmuext_one(m, dom, vcpu, op, fd)
        if rc:
            break
        done += 1
    return HypercallResult(rc, done)


# --- update_va_mapping -----------------------------------------------------------------


def locate_l1e(m: MachineState, dom: Domain, vcpu: int, va: int) -> int | None:
    """Machine address of the L1 entry mapping ``va`` in the loaded tables.

    None when Xen would refuse with -EINVAL: bad address, missing L4/L3/L2
    entry, superpage, or an L1 frame not owned, not typed L1 or not validated.
    """
    base = dom.cr3[vcpu]
    if base is None or not guest_addr_ok(va):
        return None
    idx = va_indexes(va)
    mem = m.memory
    l4e = mem.read_u64(maddr_of_entry(base, idx.l4))
    if not l4e & _PAGE_PRESENT:
        return None
    l3e = mem.read_u64(maddr_of_entry(frame_of(l4e), idx.l3))
    if not l3e & _PAGE_PRESENT:
        return None
    l2e = mem.read_u64(maddr_of_entry(frame_of(l3e), idx.l2))
    if not l2e & _PAGE_PRESENT or l2e & _PAGE_PSE:
        return None
    l1 = frame_of(l2e)
    ft = m.frames
    if (
        not ft.valid(l1)
        or ft.owner[l1] != dom.domid
        or ft.type[l1] != abi.PGT_l1_page_table
        or not ft.type_count[l1]
        or not ft.flags[l1] & VALIDATED
    ):
        return None
    return maddr_of_entry(l1, idx.l1)


def update_va_mapping(
    m: MachineState, dom: Domain, vcpu: int, va: int, val: int, flags: int
) -> int:
    """Replace the L1 entry mapping ``va``, then flush per ``flags`` (Xen's
    ``__do_update_va_mapping``)."""
    return _update_va_mapping(m, dom, vcpu, va, val, flags, dom.domid)


def update_va_mapping_otherdomain(
    m: MachineState, dom: Domain, vcpu: int, va: int, val: int, flags: int, domid: int
) -> int:
    """update_va_mapping with ``domid`` as the owner of the mapped frame (docs/sources.md §6).

    Xen's ``do_update_va_mapping_otherdomain``: ``get_pg_owner(domid)`` fails
    (unknown domain, or the caller's own numeric domid) -> -ESRCH; otherwise
    the common path runs with that owner, whose XSM check refuses an
    unprivileged caller anything but itself (-EPERM). So for a domU only
    DOMID_SELF gets through, and then it is update_va_mapping exactly. The
    ``domid_t`` parameter keeps bits 0-15 of the register.
    """
    pg_owner = _foreign_owner(m, dom, domid & 0xFFFF)
    if pg_owner is None:
        return -abi.ESRCH
    return _update_va_mapping(m, dom, vcpu, va, val, flags, pg_owner)


def _update_va_mapping(
    m: MachineState, dom: Domain, vcpu: int, va: int, val: int, flags: int, pg_owner: int
) -> int:
    """Xen's ``__do_update_va_mapping``: the L1 entry for ``va`` in the
    caller's loaded tables, mapping a frame of ``pg_owner``; in the domain's
    linear-map range, that frame's linear-map flag instead. Then the flush."""
    if pg_owner != dom.domid:
        return -abi.EPERM  # XSM: an unprivileged domain acts only on itself
    if LINEAR_MAP_BASE <= va < LINEAR_MAP_BASE + (len(dom.p2m) << PAGE_SHIFT):
        rc = _linear_map_update(m, dom, va, val)
    else:
        maddr = locate_l1e(m, dom, vcpu, va)
        if maddr is None:
            return -abi.EINVAL
        rc = m.types.mod_l1_entry(maddr, val, False, pg_owner)
    if rc:
        return rc  # no flush on error
    flush_type = flags & abi.UVMF_FLUSHTYPE_MASK
    if flush_type not in (abi.UVMF_TLB_FLUSH, abi.UVMF_INVLPG):
        return 0
    target = flags & ~abi.UVMF_FLUSHTYPE_MASK
    if target == abi.UVMF_LOCAL:
        vcpus = [vcpu]
    elif target == abi.UVMF_ALL:
        vcpus = list(range(dom.nr_vcpus))
    else:
        vcpus = _vcpus_in_mask(dom, flags >> abi.UVMF_MULTI_MASK_SHIFT)
    dom.counters[vcpu].tlb_flush_ops += 1
    if flush_type == abi.UVMF_TLB_FLUSH:
        dom.oracle.flushed_all()
    else:
        dom.oracle.flushed_page(va)
    for target_vcpu in vcpus:
        if flush_type == abi.UVMF_TLB_FLUSH:
            dom.hw.flush_tlb(target_vcpu)
        else:
            dom.hw.invlpg(target_vcpu, va)
    return 0


def _linear_map_update(m: MachineState, dom: Domain, va: int, val: int) -> int:
    """update_va_mapping of the kernel's linear map (``va`` in the domain's
    range from ``LINEAR_MAP_BASE``), modelled as one read-only flag per frame.

    pvemu's trees have no kernel half, so there is no L1 entry to write:
    what matters of that mapping is whether it is writable, which Xen
    refuses for a frame in use as a page table (``get_page_from_l1e`` takes
    a writable type reference, which a page-table type blocks). ``val`` must
    map exactly the frame of that pfn, present, without the bits an L1 entry
    may not have. Pinning a frame whose linear mapping is still writable is
    not refused: pvemu's own table-building path pins new tables directly.
    """
    mfn = dom.p2m[(va - LINEAR_MAP_BASE) >> PAGE_SHIFT]
    if not val & _PAGE_PRESENT or frame_of(val) != mfn or val & L1_DISALLOW_MASK:
        return -abi.EINVAL
    ft = m.frames
    if val & _PAGE_RW:
        if ft.table_in_use(mfn):
            return -abi.EINVAL
        ft.flags[mfn] &= ~LINEAR_RO
    else:
        ft.flags[mfn] |= LINEAR_RO
    return 0


def vm_assist(dom: Domain, cmd: int, assist: int) -> int:
    if assist not in (abi.VMASST_TYPE_writable_pagetables, abi.VMASST_TYPE_m2p_strict):
        return -abi.EINVAL
    if cmd not in (abi.VMASST_CMD_enable, abi.VMASST_CMD_disable):
        return -abi.ENOSYS
    enable = cmd == abi.VMASST_CMD_enable
    if assist == abi.VMASST_TYPE_writable_pagetables:
        dom.writable_pagetables = enable
    else:
        dom.m2p_strict = enable
    return 0


# --- multicall ----------------------------------------------------------------------------


def multicall(
    m: MachineState, dom: Domain, vcpu: int, calls: Sequence[wire.Call], budget: Budget
) -> Generator[None, None, HypercallResult]:
    """Each entry runs in order; a failing entry does not stop the batch (Xen's ``do_multicall``).

    A multicall inside a multicall is refused with -EINVAL, as Xen does. An
    entry spends the budget its records or ops take, and at least one entry.
    """
    counters = dom.counters[vcpu]
    results: list[int] = []
    for call in calls:
        while budget.left <= 0:
            yield
        used = budget.used
        counters.multicall_entries += 1
        counters.multicall_ops[call.op] += 1
        if isinstance(call.args, wire.MulticallArgs):
            results.append(-abi.EINVAL)
        else:
            result = yield from dispatch(m, dom, vcpu, call.args, budget, nested=True)
            results.append(result.rc)
        if budget.used == used:
            budget.spend(1)
    return HypercallResult(0, 0, tuple(results))


# --- writable page tables ------------------------------------------------------------------


def ptwr_write(
    m: MachineState,
    dom: Domain,
    vcpu: int,
    maddr: int,
    val: int,
    exchange: bool,
    clear_bits: int = 0,
) -> tuple[int, int]:
    """Emulate a trapped 8-byte write (or xchg) into one of the guest's L1s (docs/sources.md §8).

    With ``clear_bits`` the trapped instruction is a locked read-modify-write
    (``lock btr``/``and``, Linux's ``ptep_set_wrprotect``): the new value is
    ``old & ~clear_bits`` computed here, at apply time, so an Accessed or
    Dirty bit the hardware set after the guest last read the entry is kept,
    and ``old`` comes back as from an exchange (``val`` is unused; the wire
    makes it 0).

    Returns (rc, old): rc 0 when emulated; otherwise the #PF is reflected to
    the guest and nothing was written (rc says why: -EFAULT when the write is
    not emulable, else the L1 rule that refused the value).
    """
    dom.counters[vcpu].ptwr += 1
    ft = m.frames
    mfn = maddr >> PAGE_SHIFT
    if (
        not dom.writable_pagetables
        or maddr % 8
        or not ft.valid(mfn)
        or ft.owner[mfn] != dom.domid
        or ft.type[mfn] != abi.PGT_l1_page_table
        or not ft.type_count[mfn]
        or not ft.flags[mfn] & VALIDATED
    ):
        return -abi.EFAULT, 0
    old = m.memory.read_u64(maddr)
    if clear_bits:
        val = old & ~clear_bits
        # The old value goes back to the guest: only a D bit this op clears
        # is the guest's to keep; one it leaves stays in the PTE, unseen.
        saw = bool(clear_bits & _PAGE_DIRTY)
        returns_old = True
    else:
        saw = returns_old = exchange  # xchg hands the old value, D included, back
    if saw:
        dom.oracle.guest_saw(maddr)
    rc = m.types.mod_l1_entry(maddr, val, False, dom.domid)
    if rc and saw and old & _PAGE_DIRTY:
        dom.oracle.hardware_set_dirty(maddr)  # nothing was exchanged after all
    return rc, old if returns_old and rc == 0 else 0


# --- dispatch ---------------------------------------------------------------------------------


def dispatch(
    m: MachineState,
    dom: Domain,
    vcpu: int,
    args: wire.HypercallArgs,
    budget: Budget,
    *,
    nested: bool = False,
) -> Generator[None, None, HypercallResult]:
    """Run the hypercall ``args`` describes, within ``budget``; arguments of a
    number pvemu does not implement (``RawArgs``) give -ENOSYS, as in Xen.
    ``nested``: an entry of a multicall (whose reply carries only rc)."""
    match args:
        case wire.MmuUpdateArgs():
            records = args.records()
            fd = args.foreigndom
            return (yield from mmu_update(m, dom, vcpu, records, fd, budget, exchange=not nested))
        case wire.MmuextOpArgs():
            return (yield from mmuext_op(m, dom, vcpu, args.ops, args.foreigndom, budget))
        case wire.MulticallArgs():
            return (yield from multicall(m, dom, vcpu, args.calls, budget))
        case wire.UpdateVaMappingArgs():
            return HypercallResult(update_va_mapping(m, dom, vcpu, args.va, args.val, args.flags))
        case wire.UpdateVaMappingOtherdomainArgs():
            rc = update_va_mapping_otherdomain(
                m, dom, vcpu, args.va, args.val, args.flags, args.domid
            )
            return HypercallResult(rc)
        case wire.VmAssistArgs():
            return HypercallResult(vm_assist(dom, args.cmd, args.type))
        case wire.RawArgs():
            return HypercallResult(-abi.ENOSYS)
