"""The hypervisor primitives behind a guest kernel's fork and exit on Xen PV:
an atomic clear of PTE bits by ptwr emulation (``ptep_set_wrprotect``), the
kernel's linear map as one read-only flag per frame (remapped by
``update_va_mapping`` around pinning), and the kernel's plain stores through
that map (``kernel_write``, no trap).

The tests drive a booted domain through the client's ``Domain`` served
in-process (``tests/loopback.py``: the hypervisor service, as the socket
server runs it) and check the hypervisor's own tables where the rule is
about them; the last one runs all three over a real hypervisor process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from pvemu.guest.client import Domain, connect
from pvemu.guest.machine import NativeMachine
from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.domain import Domain as HvDomain
from pvemu.hypervisor.frametable import NO_OWNER
from pvemu.shared import abi, wire
from pvemu.shared.errors import LocalProtocolError, RemoteProtocolError, WireErrorCode
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_NX,
    _PAGE_PAT,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    LINEAR_MAP_BASE,
    PAGE_SIZE,
    maddr_of_entry,
    make_pte,
    pte_mfn,
)
from tests.hvproc import hypervisor_process
from tests.loopback import loopback_domain

USER_RW = _PAGE_PRESENT | _PAGE_RW | _PAGE_USER
USER_RO = _PAGE_PRESENT | _PAGE_USER
#: The page the tests map at VA ``PAGE_SIZE`` (entry 1 of the booted L1).
VA = PAGE_SIZE
#: Linux's PAGE_KERNEL and PAGE_KERNEL_RO, the linear map's protections.
KERNEL_RW = _PAGE_PRESENT | _PAGE_RW | _PAGE_ACCESSED | _PAGE_DIRTY | _PAGE_GLOBAL | _PAGE_NX
KERNEL_RO = KERNEL_RW & ~_PAGE_RW


@dataclass
class Booted:
    """A booted domain over loopback, its hypervisor, and its tree."""

    hv: Hypervisor
    dom: Domain
    l4: int
    l3: int
    l2: int
    l1: int

    @property
    def hv_dom(self) -> HvDomain:
        return self.hv.domain(self.dom.domid)

    def l1e(self, index: int) -> int:
        return maddr_of_entry(self.l1, index)

    async def map_rw(self, index: int = 1) -> tuple[int, int]:
        """A fresh data frame mapped read-write at VA ``index`` pages: (ptep, mfn)."""
        frame = self.dom.alloc_frame()
        ptep = self.l1e(index)
        assert await self.dom.mmu_update([(ptep, make_pte(frame, USER_RW))]) == (0, 1)
        return ptep, frame

    def linear_va(self, mfn: int) -> int:
        """The frame's address in the kernel's linear map."""
        return LINEAR_MAP_BASE + (self.dom.pfn_of(mfn) << 12)

    async def remap(self, mfn: int, flags: int, uvmf: int = abi.UVMF_INVLPG) -> int:
        """update_va_mapping of the frame's linear address to ``flags``."""
        return await self.dom.update_va_mapping(self.linear_va(mfn), make_pte(mfn, flags), uvmf)

    def linear_ro(self, mfn: int) -> bool:
        return self.hv.state.frames.linear_ro(mfn)

    async def stats(self) -> dict[str, Any]:
        """The hypervisor's counters for vCPU 0."""
        stats = await self.dom.stats()
        counters: dict[str, Any] = stats["hypervisor"]["vcpus"]["0"]
        return counters

    async def lost_dirty(self) -> int:
        return int((await self.dom.stats())["hypervisor"]["hardware"]["lost_dirty"])


def _child(dom: Domain, table: int, index: int = 0) -> int:
    return pte_mfn(dom.read_u64(maddr_of_entry(table, index)))


async def _booted(hv: Hypervisor) -> Booted:
    dom = await loopback_domain(hv, memory_mib=2, vcpus=2)
    l3 = _child(dom, dom.l4_mfn)
    l2 = _child(dom, l3)
    return Booted(hv, dom, dom.l4_mfn, l3, l2, _child(dom, l2))


@pytest.fixture
async def b() -> AsyncIterator[Booted]:
    booted = await _booted(Hypervisor(16))
    yield booted
    assert booted.hv.audit() == []
    await booted.dom.close()


# --- ptwr clear_bits: ptep_set_wrprotect as one trapped lock btr ------------------------------


async def test_clear_bits_keeps_a_dirty_bit_the_hardware_set_after_the_guest_read(
    b: Booted,
) -> None:
    """The guest reads the PTE (clean), the hardware then sets A and D on a
    user write: clearing RW keeps them, where a store of the value the guest
    read loses D (the race the atomic op exists for)."""
    ptep, frame = await b.map_rw()
    seen = b.dom.read_u64(ptep)
    assert not seen & _PAGE_DIRTY
    assert (await b.dom.run_user(1, [(VA, "w", b"x")]))["fault"] is None
    dirty = b.dom.read_u64(ptep)
    assert dirty & _PAGE_DIRTY
    assert dirty & _PAGE_ACCESSED
    before = await b.stats()
    rc, old = await b.dom.ptwr_clear_bits(ptep, _PAGE_RW)
    assert (rc, old) == (0, dirty)
    assert b.dom.read_u64(ptep) == dirty & ~_PAGE_RW
    assert await b.lost_dirty() == 0
    after = await b.stats()
    assert after["ptwr"] - before["ptwr"] == 1
    assert after["traps"] - before["traps"] == 1
    assert b.dom.vcpu_counters(0).ptwr == after["ptwr"]
    # The frame lost its writable type reference with its last RW mapping.
    assert b.hv.state.frames.type_count[frame] == 0
    # The same step done as a store of the stale read loses the D bit.
    ptep2, _ = await b.map_rw(2)
    stale = b.dom.read_u64(ptep2)
    assert (await b.dom.run_user(1, [(2 * VA, "w", b"y")]))["fault"] is None
    assert await b.dom.ptwr_write(ptep2, stale & ~_PAGE_RW) == 0
    assert await b.lost_dirty() == 1


async def test_clear_bits_of_dirty_hands_it_to_the_guest(b: Booted) -> None:
    """Clearing D itself returns it in ``old``: the guest saw it, nothing is lost."""
    ptep, _ = await b.map_rw()
    assert (await b.dom.run_user(0, [(VA, "w", b"x")]))["fault"] is None
    dirty = b.dom.read_u64(ptep)
    assert await b.dom.ptwr_clear_bits(ptep, _PAGE_DIRTY | _PAGE_RW) == (0, dirty)
    assert b.dom.read_u64(ptep) == dirty & ~(_PAGE_DIRTY | _PAGE_RW)
    assert await b.lost_dirty() == 0


async def test_clear_bits_follows_the_l1_rules(b: Booted) -> None:
    """The cleared value goes through mod_l1_entry: clearing PRESENT unmaps
    the frame (its references dropped), so the frame can then become a page
    table."""
    ptep, frame = await b.map_rw()
    ft = b.hv.state.frames
    assert (ft.count[frame], ft.type_count[frame]) == (2, 1)
    mapped = b.dom.read_u64(ptep)
    assert await b.dom.ptwr_clear_bits(ptep, _PAGE_PRESENT) == (0, mapped)
    assert b.dom.read_u64(ptep) == mapped & ~_PAGE_PRESENT
    assert (ft.count[frame], ft.type_count[frame]) == (1, 0)
    assert await b.dom.mmuext_op([(abi.MMUEXT_PIN_L1_TABLE, frame, 0)]) == (0, 1)
    # Set again RO (a new mapping by ptwr), then clear RW of an RO entry: no change.
    assert await b.dom.ptwr_write(ptep, make_pte(frame, USER_RO)) == 0
    entry = b.dom.read_u64(ptep)
    assert await b.dom.ptwr_clear_bits(ptep, _PAGE_RW) == (0, entry)
    assert b.dom.read_u64(ptep) == entry


@pytest.mark.parametrize(
    "where", ["l2", "data", "untyped", "unpinned", "foreign", "misaligned", "disabled"]
)
async def test_clear_bits_is_not_emulated_where_a_ptwr_is_not(b: Booted, where: str) -> None:
    """A non-L1 frame, one no longer (or never) a page table, another domain's
    L1, a misaligned address, or no writable-pagetables assist: -EFAULT (the
    #PF is reflected), nothing written, still one ptwr trap."""
    other = await _booted(b.hv)
    ptep, frame = await b.map_rw()
    untyped = b.dom.alloc_frame()
    # An L1 that was pinned and is not any more: type count 0.
    unpinned = b.dom.alloc_frame()
    entry = make_pte(frame, USER_RO)
    assert await b.dom.mmu_update([(maddr_of_entry(untyped, 0), entry)]) == (0, 1)
    assert await b.dom.mmu_update([(maddr_of_entry(unpinned, 0), entry)]) == (0, 1)
    pin = [(abi.MMUEXT_PIN_L1_TABLE, unpinned, 0), (abi.MMUEXT_UNPIN_TABLE, unpinned, 0)]
    assert await b.dom.mmuext_op(pin) == (0, 2)
    await other.map_rw()
    target = {
        "l2": maddr_of_entry(b.l2, 0),
        "data": maddr_of_entry(frame, 0),
        "untyped": maddr_of_entry(untyped, 0),
        "unpinned": maddr_of_entry(unpinned, 0),
        "foreign": other.l1e(1),
        "misaligned": ptep + 2,
        "disabled": ptep,
    }[where]
    if where == "disabled":
        assist = abi.VMASST_TYPE_writable_pagetables
        assert await b.dom.vm_assist(abi.VMASST_CMD_disable, assist) == 0
    owner = other if where == "foreign" else b
    word = target & ~7
    before_word = owner.hv.state.memory.read_u64(word)
    before = await b.stats()
    assert await b.dom.ptwr_clear_bits(target, _PAGE_RW | _PAGE_PRESENT) == (-abi.EFAULT, 0)
    assert owner.hv.state.memory.read_u64(word) == before_word
    after = await b.stats()
    assert (after["ptwr"] - before["ptwr"], after["traps"] - before["traps"]) == (1, 1)
    await other.dom.close()


async def test_clear_bits_with_a_value_is_a_bad_request(b: Booted) -> None:
    """``val`` must be 0 with clear_bits: the message cannot be built, a map
    that says so is refused by the decoder (non-fatal out_of_range), and
    the core will not take it either."""
    ptep, _ = await b.map_rw()
    with pytest.raises(LocalProtocolError) as info:
        wire.Ptwr(1, ptep, 0x67, clear_bits=_PAGE_RW)
    assert info.value.code == WireErrorCode.OUT_OF_RANGE
    client, server = wire.Connection("client"), wire.Connection("server")
    hello = wire.Hello(0, wire.PROTOCOL_VERSION, 1, 1)
    server.receive_data(client.send(hello))
    assert server.next_event() == hello
    server.send(wire.Welcome(0, 1, 0, 1, bytes(16), {}, ()))
    bad = {"t": "ptwr", "id": 5, "maddr": ptep, "val": 0x67, "exchange": False, "clear_bits": 2}
    server.receive_data(msgpack.packb(bad))
    with pytest.raises(RemoteProtocolError) as refused:
        server.next_event()
    assert (refused.value.code, refused.value.fatal) == (WireErrorCode.OUT_OF_RANGE, False)
    with pytest.raises(ValueError):
        b.hv.ptwr_write(b.dom.domid, 0, ptep, 0x67, clear_bits=_PAGE_RW)
    with pytest.raises(ValueError):
        await b.dom.ptwr_clear_bits(ptep, 0)
    assert b.dom.read_u64(ptep) & _PAGE_RW


# --- the kernel's linear map: one read-only flag per frame -------------------------------------


async def test_linear_map_read_only_then_writable(b: Booted) -> None:
    """RO then RW round trip: the flag follows, one hypercall each, the
    flush flags honoured as for any update_va_mapping."""
    frame = b.dom.alloc_frame()
    assert not b.linear_ro(frame)
    before = await b.stats()
    assert await b.remap(frame, KERNEL_RO) == 0
    assert b.linear_ro(frame)
    assert await b.remap(frame, KERNEL_RW, abi.UVMF_NONE) == 0
    assert not b.linear_ro(frame)
    after = await b.stats()
    assert after["traps"] - before["traps"] == 2
    uvm = str(abi.HYPERVISOR_update_va_mapping)
    assert after["hypercalls_by_op"][uvm] - before["hypercalls_by_op"].get(uvm, 0) == 2
    assert after["tlb_flush_ops"] - before["tlb_flush_ops"] == 1  # INVLPG, then none
    # Only the flag moved: no reference or type was taken.
    ft = b.hv.state.frames
    assert (ft.count[frame], ft.type_count[frame], ft.type[frame]) == (1, 0, abi.PGT_none)


async def test_linear_map_flushes_as_any_update_va_mapping(b: Booted) -> None:
    frame = b.dom.alloc_frame()
    hw = b.hv_dom.hw.stats
    flushes = hw.tlb_flushes
    assert await b.remap(frame, KERNEL_RO, abi.UVMF_TLB_FLUSH | abi.UVMF_ALL) == 0
    assert hw.tlb_flushes == flushes + b.dom.nr_vcpus
    invlpgs = hw.invlpgs
    assert await b.remap(frame, KERNEL_RW, abi.UVMF_INVLPG | abi.UVMF_LOCAL) == 0
    assert hw.invlpgs == invlpgs + 1
    # A refused remap flushes nothing.
    assert await b.remap(frame, KERNEL_RO & ~_PAGE_PRESENT, abi.UVMF_TLB_FLUSH) == -abi.EINVAL
    assert hw.tlb_flushes == flushes + b.dom.nr_vcpus


async def test_linear_map_writable_refused_while_pinned(b: Booted) -> None:
    """Linux's pin: remap RO, pin; Xen refuses the RW remap while the frame
    is a page table; after the unpin it is allowed."""
    frame = b.dom.alloc_frame()
    assert await b.remap(frame, KERNEL_RO) == 0
    assert await b.dom.mmuext_op([(abi.MMUEXT_PIN_L1_TABLE, frame, 0)]) == (0, 1)
    assert await b.remap(frame, KERNEL_RW) == -abi.EINVAL
    assert b.linear_ro(frame)
    assert await b.remap(frame, KERNEL_RO) == 0  # RO again is fine
    assert await b.dom.mmuext_op([(abi.MMUEXT_UNPIN_TABLE, frame, 0)]) == (0, 1)
    assert await b.remap(frame, KERNEL_RW) == 0
    assert not b.linear_ro(frame)


@pytest.mark.parametrize("level", ["l1", "l2", "l3", "l4"])
async def test_linear_map_writable_refused_for_a_table_in_use(b: Booted, level: str) -> None:
    """Any page-table type with references blocks RW: the booted tree's
    tables are in use (the L4 pinned and loaded, the others referenced)."""
    frame = getattr(b, level)
    assert await b.remap(frame, KERNEL_RW) == -abi.EINVAL
    assert await b.remap(frame, KERNEL_RO) == 0
    assert await b.remap(frame, KERNEL_RW) == -abi.EINVAL


async def test_pinning_a_frame_with_a_writable_linear_mapping_is_not_refused(b: Booted) -> None:
    """pvemu does not check the linear map at pin time (its own table
    building pins new tables directly)."""
    frame = b.dom.alloc_frame()
    assert not b.linear_ro(frame)
    assert await b.dom.mmuext_op([(abi.MMUEXT_PIN_L1_TABLE, frame, 0)]) == (0, 1)
    assert await b.dom.mmuext_op([(abi.MMUEXT_UNPIN_TABLE, frame, 0)]) == (0, 1)


async def test_linear_map_in_a_multicall_around_pin_and_unpin(b: Booted) -> None:
    """Linux's pin and unpin batches: update_va_mapping and the mmuext_op in
    one multicall, one trap each."""
    frame = b.dom.alloc_frame()
    va = b.linear_va(frame)
    pin = [
        (abi.HYPERVISOR_update_va_mapping, va, make_pte(frame, KERNEL_RO), abi.UVMF_NONE),
        (abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_PIN_L1_TABLE, frame, 0)], abi.DOMID_SELF),
        (abi.HYPERVISOR_update_va_mapping, va, make_pte(frame, KERNEL_RW), abi.UVMF_NONE),
    ]
    assert await b.dom.multicall(pin) == [0, 0, -abi.EINVAL]
    assert b.linear_ro(frame)
    assert b.hv.state.frames.pinned(frame)
    unpin = [
        (abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_UNPIN_TABLE, frame, 0)], abi.DOMID_SELF),
        (abi.HYPERVISOR_update_va_mapping, va, make_pte(frame, KERNEL_RW), abi.UVMF_TLB_FLUSH),
    ]
    assert await b.dom.multicall(unpin) == [0, 0]
    assert not b.linear_ro(frame)


@pytest.mark.parametrize("bad", ["wrong_mfn", "not_present", "pat", "other_domain_mfn"])
async def test_linear_map_value_must_map_that_frame(b: Booted, bad: str) -> None:
    """``val`` must be present and map exactly the frame of the pfn the
    address names, with no bit an L1 entry may not hold: else -EINVAL."""
    frame, other = b.dom.alloc_frame(), b.dom.alloc_frame()
    foreign = await _booted(b.hv)
    val = {
        "wrong_mfn": make_pte(other, KERNEL_RO),
        "not_present": make_pte(frame, KERNEL_RO & ~_PAGE_PRESENT),
        "pat": make_pte(frame, KERNEL_RO | _PAGE_PAT),
        "other_domain_mfn": make_pte(foreign.dom.alloc_frame(), KERNEL_RO),
    }[bad]
    assert await b.dom.update_va_mapping(b.linear_va(frame), val, abi.UVMF_INVLPG) == -abi.EINVAL
    assert not b.linear_ro(frame)
    assert not b.linear_ro(other)
    await foreign.dom.close()


async def test_linear_map_ends_with_the_domain(b: Booted) -> None:
    """Past the domain's last pfn nothing is mapped (pvemu's trees have no
    kernel half): -EINVAL; just below it is the last frame."""
    nr = len(b.dom.p2m)
    last = b.dom.p2m[nr - 1]
    end = LINEAR_MAP_BASE + (nr << 12)
    assert await b.dom.update_va_mapping(end, make_pte(last, KERNEL_RO), 0) == -abi.EINVAL
    assert await b.dom.update_va_mapping(end - PAGE_SIZE, make_pte(last, KERNEL_RO), 0) == 0
    assert b.linear_ro(last)
    below = LINEAR_MAP_BASE - PAGE_SIZE
    first = b.dom.p2m[0]
    assert await b.dom.update_va_mapping(below, make_pte(first, KERNEL_RO), 0) == -abi.EINVAL


async def test_linear_map_otherdomain_self_is_the_same_call(b: Booted) -> None:
    frame = b.dom.alloc_frame()
    pte = make_pte(frame, KERNEL_RO)
    va = b.linear_va(frame)
    rc = await b.dom.update_va_mapping_otherdomain(va, pte, 0, abi.DOMID_SELF)
    assert rc == 0
    assert b.linear_ro(frame)
    other = await _booted(b.hv)
    rc = await b.dom.update_va_mapping_otherdomain(va, pte, 0, other.dom.domid)
    assert rc == -abi.EPERM
    await other.dom.close()


async def test_a_freed_frame_comes_back_writable() -> None:
    """The flag lives in the frame table's flags: a domain's death zeroes
    them, so the audit's 'free frames hold no state' holds and the next
    owner starts with a writable linear mapping."""
    hv = Hypervisor(16)
    first = await _booted(hv)
    frames = [first.dom.alloc_frame() for _ in range(3)]
    for frame in frames:
        assert await first.remap(frame, KERNEL_RO) == 0
    await first.dom.close()
    assert hv.audit() == []
    assert not any(hv.state.frames.linear_ro(frame) for frame in frames)
    assert "linear_ro" not in hv.state.frames.describe(frames[0])


# --- kernel_write: the kernel's plain stores through its linear map ----------------------------


async def test_kernel_write_lands_on_a_fresh_frame_without_a_trap(b: Booted) -> None:
    frame = b.dom.alloc_frame()
    before, guest_before = await b.stats(), b.dom.counters.traps
    assert await b.dom.kernel_write((frame << 12) + 0x10, b"hello") == 0
    assert await b.dom.kernel_write((frame << 12) + 0xFF8, bytes(range(8)), vcpu=1) == 0
    assert b.dom.read_bytes((frame << 12) + 0x10, 5) == b"hello"
    assert b.dom.read_bytes((frame << 12) + 0xFF8, 8) == bytes(range(8))
    after = await b.stats()
    assert after["kernel_writes"] - before["kernel_writes"] == 1
    assert after["kernel_write_bytes"] - before["kernel_write_bytes"] == 5
    total = (await b.dom.stats())["hypervisor"]["total"]
    assert (total["kernel_writes"], total["kernel_write_bytes"]) == (2, 13)
    assert after["traps"] == before["traps"]
    assert b.dom.counters.traps == guest_before
    # Writing a whole frame is one store.
    assert await b.dom.kernel_write(frame << 12, b"\xaa" * PAGE_SIZE) == 0
    assert b.dom.read_bytes(frame << 12, PAGE_SIZE) == b"\xaa" * PAGE_SIZE


async def test_kernel_write_reaches_a_page_user_code_maps(b: Booted) -> None:
    """A data frame mapped writable by a user PTE (typed writable) takes the
    kernel's store, and user code reads it back."""
    _, frame = await b.map_rw()
    assert await b.dom.kernel_write((frame << 12) + 8, b"kernel") == 0
    result = await b.dom.run_user(0, [(VA + 8, "r", 6)])
    assert result["reads"] == [b"kernel"]


async def _refused(b: Booted, maddr: int, data: bytes = b"xyz") -> None:
    """-EFAULT, not one byte written (where there is memory to write), counted
    as a kernel write of 0 bytes, no trap."""
    ft, memory = b.hv.state.frames, b.hv.state.memory
    mfn = maddr >> 12
    backed = ft.valid(mfn) and ft.owner[mfn] != NO_OWNER
    content = memory.read_bytes(maddr, len(data)) if backed else b""
    before = await b.stats()
    assert await b.dom.kernel_write(maddr, data) == -abi.EFAULT
    if backed:
        assert memory.read_bytes(maddr, len(data)) == content
    after = await b.stats()
    assert after["kernel_writes"] - before["kernel_writes"] == 1
    assert after["kernel_write_bytes"] == before["kernel_write_bytes"]
    assert after["traps"] == before["traps"]


async def test_kernel_write_refused_on_a_pinned_table(b: Booted) -> None:
    """Pinned with its linear mapping still writable (pvemu does not refuse
    that pin): the store faults all the same, as Xen would never have
    left the mapping writable. After the unpin it lands again."""
    frame = b.dom.alloc_frame()
    assert await b.dom.mmuext_op([(abi.MMUEXT_PIN_L1_TABLE, frame, 0)]) == (0, 1)
    await _refused(b, frame << 12)
    assert await b.dom.mmuext_op([(abi.MMUEXT_UNPIN_TABLE, frame, 0)]) == (0, 1)
    assert await b.dom.kernel_write(frame << 12, b"xyz") == 0


@pytest.mark.parametrize("level", ["l1", "l2", "l3", "l4"])
async def test_kernel_write_refused_on_every_table_in_use(b: Booted, level: str) -> None:
    await _refused(b, (getattr(b, level) << 12) + 16)


async def test_kernel_write_refused_through_a_read_only_linear_mapping(b: Booted) -> None:
    """Linux's pin sequence: remap RO, pin, unpin, remap RW. Between the
    first remap and the last, every store faults."""
    frame = b.dom.alloc_frame()
    assert await b.remap(frame, KERNEL_RO) == 0
    await _refused(b, (frame << 12) + 100)
    assert await b.dom.mmuext_op([(abi.MMUEXT_PIN_L1_TABLE, frame, 0)]) == (0, 1)
    await _refused(b, (frame << 12) + 100)
    assert await b.dom.mmuext_op([(abi.MMUEXT_UNPIN_TABLE, frame, 0)]) == (0, 1)
    await _refused(b, (frame << 12) + 100)  # still read-only: the flag, not the type
    assert await b.remap(frame, KERNEL_RW) == 0
    assert await b.dom.kernel_write((frame << 12) + 100, b"xyz") == 0
    assert b.dom.read_bytes((frame << 12) + 100, 3) == b"xyz"


async def test_kernel_write_refused_outside_the_domain(b: Booted) -> None:
    """Another domain's frame, Xen's frame, a free frame, beyond RAM."""
    other = await _booted(b.hv)
    victim = other.dom.alloc_frame()
    owned = {*b.dom.p2m, *other.dom.p2m, b.hv.xen_mfn}
    free = next(m for m in range(b.hv.state.frames.nr_frames) if m not in owned)
    for mfn in (victim, other.l1, b.hv.xen_mfn, free):
        await _refused(b, (mfn << 12) + 8)
    await _refused(b, b.hv.state.frames.nr_frames << 12)
    assert other.dom.read_bytes(victim << 12, 16) == bytes(16)
    await other.dom.close()


async def test_kernel_write_may_not_cross_a_frame(b: Booted) -> None:
    """Both machines refuse it as the caller's bug (ValueError) before
    anything is sent; the message cannot be built either (the decoder
    refuses such a map); the core, called directly, faults it without
    writing."""
    frame = b.dom.alloc_frame()
    native = NativeMachine(1, 1)
    native_frame = native.alloc_frame()
    for offset, data in ((0xFFF, b"ab"), (0, b""), (0, bytes(4097))):
        with pytest.raises(ValueError, match=r"1\.\.4096 bytes in one frame"):
            await b.dom.kernel_write((frame << 12) + offset, data)
        with pytest.raises(ValueError, match=r"1\.\.4096 bytes in one frame"):
            await native.kernel_write((native_frame << 12) + offset, data)
        with pytest.raises(LocalProtocolError):
            wire.KernelWrite(1, (frame << 12) + offset, data)
    assert b.hv.kernel_write(b.dom.domid, 0, (frame << 12) + 0xFFF, b"ab") == -abi.EFAULT
    assert b.hv.kernel_write(b.dom.domid, 0, frame << 12, b"") == -abi.EFAULT
    assert b.dom.read_bytes((frame << 12) + 0xFFF, 1) == b"\0"


async def test_native_kernel_write_is_a_plain_store() -> None:
    machine = NativeMachine(1, 1)
    frame = machine.alloc_frame()
    assert await machine.kernel_write((frame << 12) + 4, b"abc") == 0
    assert machine.read_bytes((frame << 12) + 4, 3) == b"abc"
    with pytest.raises(ValueError):
        await machine.kernel_write((frame << 12) + 0xFFF, b"ab")


# --- all three over a real hypervisor process ---------------------------------------------------


async def test_primitives_over_the_socket() -> None:
    """The server decodes and serves each one (the fast ptwr decoder
    included): fork's write-protect keeps D, the pin dance on the linear
    map, kernel stores refused then allowed; counts agree on both sides."""
    with hypervisor_process(memory_mib=16, tag="prim") as hvp:
        async with connect(hvp.socket_path, memory_mib=1, vcpus=2) as dom:
            l3 = _child(dom, dom.l4_mfn)
            l1 = _child(dom, _child(dom, l3))
            data, table = dom.alloc_frame(), dom.alloc_frame()
            ptep = maddr_of_entry(l1, 1)
            assert await dom.mmu_update([(ptep, make_pte(data, USER_RW))]) == (0, 1)
            assert (await dom.run_user(1, [(VA, "w", b"x")]))["fault"] is None
            dirty = dom.read_u64(ptep)
            assert await dom.ptwr_clear_bits(ptep, _PAGE_RW) == (0, dirty)
            assert dom.read_u64(ptep) == dirty & ~_PAGE_RW
            va = LINEAR_MAP_BASE + (dom.pfn_of(table) << 12)
            # Byte 1 of entry 0: never a present entry, so the frame still pins.
            assert await dom.kernel_write((table << 12) + 1, b"\1") == 0
            pin = [
                (abi.HYPERVISOR_update_va_mapping, va, make_pte(table, KERNEL_RO), 0),
                (abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_PIN_L1_TABLE, table, 0)], abi.DOMID_SELF),
            ]
            assert await dom.multicall(pin) == [0, 0]
            assert await dom.kernel_write((table << 12) + 1, b"\2") == -abi.EFAULT
            assert await dom.update_va_mapping(va, make_pte(table, KERNEL_RW), 0) == -abi.EINVAL
            assert await dom.mmuext_op([(abi.MMUEXT_UNPIN_TABLE, table, 0)]) == (0, 1)
            assert await dom.update_va_mapping(va, make_pte(table, KERNEL_RW), 0) == 0
            assert await dom.kernel_write((table << 12) + 1, b"\3") == 0
            assert dom.read_bytes(table << 12, 2) == b"\0\3"
            stats = await dom.stats()
            total = stats["hypervisor"]["total"]
            assert stats["guest"]["total"]["traps"] == total["traps"]
            assert (total["kernel_writes"], total["kernel_write_bytes"]) == (3, 2)
            assert stats["hypervisor"]["hardware"]["lost_dirty"] == 0
            assert await dom.audit() == []
