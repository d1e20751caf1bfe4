"""Property tests: random hypercall sequences keep ``audit()`` clean; preempted
batches equal uninterrupted ones; domains come and go without leaking frames."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pvemu.hypervisor import DomainError, Hypervisor, PendingCall
from pvemu.hypervisor.core import FRAMES_PER_MIB
from pvemu.hypervisor.frametable import FrameTable
from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_NX,
    _PAGE_PAT,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_RW,
    _PAGE_USER,
    maddr_of_entry,
    make_pte,
)
from tests.support import boot, core_call, flat

FLAG_CHOICES = [
    0,
    _PAGE_PRESENT,
    _PAGE_PRESENT | _PAGE_USER,
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER,
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY,
    _PAGE_PRESENT | _PAGE_RW,
    _PAGE_PRESENT | _PAGE_USER | _PAGE_NX,
    _PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_GLOBAL,
    _PAGE_PRESENT | _PAGE_USER | _PAGE_PAT,
    _PAGE_PRESENT | _PAGE_RW | _PAGE_PSE,
]

# A small, dense address space: few frames, few slots, so collisions happen.
SLOTS = [0, 1, 2, 3, 256, 511]


class HypervisorMachine(RuleBasedStateMachine):
    """Two small domains; every rule is a hypercall or hardware access."""

    def __init__(self) -> None:
        super().__init__()
        self.hv = Hypervisor(4, seed=7)
        self.domids: list[int] = []
        #: The booted L1 of each domain (where exchanges mostly aim).
        self.l1s: dict[int, int] = {}

    def _boot(self) -> None:
        guest = boot(self.hv, memory_mib=1, mapped=4)
        self.domids.append(guest.domid)
        self.l1s[guest.domid] = guest.l1

    @initialize()
    def start(self) -> None:
        for _ in range(2):
            self._boot()

    def _frames(self, data: st.DataObject, domid: int) -> int:
        dom = self.hv.domains[domid]
        other = [d for d in self.domids if d != domid]
        pool = dom.p2m[:24]
        if other and data.draw(st.integers(0, 9)) == 0:
            pool = self.hv.domains[other[0]].p2m[:8]
        return data.draw(st.sampled_from(pool))

    def _entry(self, data: st.DataObject, domid: int) -> tuple[int, int]:
        mfn = self._frames(data, domid)
        ptr = maddr_of_entry(mfn, data.draw(st.sampled_from(SLOTS)))
        cmd = data.draw(st.sampled_from([0, 0, 0, 2, 3, 1, 5, abi.MMU_PT_XCHG_PVEMU]))
        val = make_pte(self._frames(data, domid), data.draw(st.sampled_from(FLAG_CHOICES)))
        return ptr | cmd, val

    @rule(data=st.data(), n=st.integers(1, 6), budget=st.integers(1, 4))
    def mmu_update(self, data: st.DataObject, n: int, budget: int) -> None:
        domid = data.draw(st.sampled_from(self.domids))
        reqs = flat(*(self._entry(data, domid) for _ in range(n)))
        vcpu = data.draw(st.integers(0, 1))
        call = self.hv.start_hypercall(
            domid, vcpu, core_call(abi.HYPERVISOR_mmu_update, (reqs, abi.DOMID_SELF))
        )
        while not call.step(budget):
            pass
        assert call.result is not None
        assert 0 <= call.result.done <= n

    @rule(data=st.data(), n=st.integers(1, 24))
    def mmu_xchg(self, data: st.DataObject, n: int) -> None:
        """pvemu's exchange over distinct entries of the booted L1 (clears,
        remaps, bad values): the olds are exactly the entries replaced, in
        order, and no dirty bit is lost by it."""
        domid = data.draw(st.sampled_from(self.domids))
        l1 = self.l1s[domid]
        mem = self.hv.state.memory
        indexes = data.draw(st.lists(st.integers(0, 15), min_size=1, max_size=n, unique=True))
        pairs = []
        for index in indexes:
            clear = data.draw(st.booleans())
            val = 0 if clear else self._entry(data, domid)[1]
            pairs.append((maddr_of_entry(l1, index), val))
        before = [mem.read_u64(maddr) for maddr, _ in pairs]
        oracle = self.hv.domains[domid].oracle
        lost = oracle.lost_dirty
        reqs = flat(*((maddr | abi.MMU_PT_XCHG_PVEMU, val) for maddr, val in pairs))
        result = self.hv.hypercall(
            domid, 0, core_call(abi.HYPERVISOR_mmu_update, (reqs, abi.DOMID_SELF))
        )
        olds = [
            int.from_bytes(result.olds[i : i + 8], "little") for i in range(0, len(result.olds), 8)
        ]
        assert olds == before[: result.done]
        assert oracle.lost_dirty == lost

    @rule(data=st.data())
    def mmuext(self, data: st.DataObject) -> None:
        domid = data.draw(st.sampled_from(self.domids))
        cmd = data.draw(
            st.sampled_from(
                [
                    abi.MMUEXT_PIN_L1_TABLE,
                    abi.MMUEXT_PIN_L2_TABLE,
                    abi.MMUEXT_PIN_L3_TABLE,
                    abi.MMUEXT_PIN_L4_TABLE,
                    abi.MMUEXT_UNPIN_TABLE,
                    abi.MMUEXT_NEW_BASEPTR,
                    abi.MMUEXT_NEW_USER_BASEPTR,
                    abi.MMUEXT_TLB_FLUSH_ALL,
                    abi.MMUEXT_CLEAR_PAGE,
                ]
            )
        )
        mfn = self._frames(data, domid)
        vcpu = data.draw(st.integers(0, 1))
        self.hv.hypercall(
            domid, vcpu, core_call(abi.HYPERVISOR_mmuext_op, ([(cmd, mfn, 0)], abi.DOMID_SELF))
        )

    @rule(data=st.data())
    def update_va_mapping(self, data: st.DataObject) -> None:
        domid = data.draw(st.sampled_from(self.domids))
        va = data.draw(st.integers(0, 15)) * 4096
        val = make_pte(self._frames(data, domid), data.draw(st.sampled_from(FLAG_CHOICES)))
        flags = data.draw(st.sampled_from([0, 1, 2, 5, 6]))
        self.hv.hypercall(domid, 0, core_call(abi.HYPERVISOR_update_va_mapping, (va, val, flags)))

    @rule(data=st.data())
    def ptwr(self, data: st.DataObject) -> None:
        domid = data.draw(st.sampled_from(self.domids))
        ptr, val = self._entry(data, domid)
        self.hv.ptwr_write(domid, 1, ptr & ~7, val, exchange=data.draw(st.booleans()))

    @rule(data=st.data())
    def multicall(self, data: st.DataObject) -> None:
        domid = data.draw(st.sampled_from(self.domids))
        calls: list[tuple[object, ...]] = []
        for _ in range(data.draw(st.integers(1, 4))):
            reqs = flat(*(self._entry(data, domid) for _ in range(data.draw(st.integers(1, 3)))))
            calls.append((abi.HYPERVISOR_mmu_update, reqs, abi.DOMID_SELF))
        calls.append(
            (abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)], abi.DOMID_SELF)
        )
        call = self.hv.start_hypercall(domid, 0, core_call(abi.HYPERVISOR_multicall, (calls,)))
        while not call.step(data.draw(st.integers(1, 3))):
            pass
        assert call.result is not None
        assert len(call.result.results) == len(calls)

    @rule(data=st.data())
    def user_access(self, data: st.DataObject) -> None:
        domid = data.draw(st.sampled_from(self.domids))
        accesses = [
            (
                data.draw(st.integers(0, 15)) * 4096 + data.draw(st.integers(0, 4095)),
                data.draw(st.sampled_from(["r", "w", "x"])),
                b"\x5a" if data.draw(st.booleans()) else 1,
            )
            for _ in range(data.draw(st.integers(1, 4)))
        ]
        accesses = [(va, kind, b"\x5a" if kind == "w" else 1) for va, kind, _ in accesses]
        self.hv.run_user(domid, data.draw(st.integers(0, 1)), accesses)

    @precondition(lambda self: len(self.domids) == 2)
    @rule(data=st.data())
    def replace_domain(self, data: st.DataObject) -> None:
        victim = data.draw(st.sampled_from(self.domids))
        self.hv.destroy_domain(victim)
        self.domids.remove(victim)
        del self.l1s[victim]
        self._boot()

    @invariant()
    def audit_clean(self) -> None:
        assert self.hv.audit() == []


HypervisorMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHypervisorMachine = HypervisorMachine.TestCase


# --- preemption ------------------------------------------------------------------------------


def _snapshot(hv: Hypervisor) -> tuple[bytes, ...]:
    ft = hv.state.frames
    tables = tuple(bytes(hv.state.memory.table(m)) for m in range(ft.nr_frames) if ft.owner[m] >= 0)
    arrays = tuple(a.tobytes() for a in (ft.owner, ft.count, ft.type, ft.type_count, ft.flags))
    return tables + arrays


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 40),
    budget=st.integers(1, 7),
)
def test_preempted_batch_equals_uninterrupted(seed: int, n: int, budget: int) -> None:
    """Slices of any size reach the same state and result as one run."""
    runs = []
    for slice_size in (None, budget):
        hv = Hypervisor(4, seed=seed)
        guest = boot(hv, memory_mib=1, mapped=4)
        frames = guest.dom.p2m[:12]
        rng = random.Random(seed)  # the same requests for both runs
        reqs: list[int] = []
        for _ in range(n):
            ptr = maddr_of_entry(rng.choice(frames), rng.choice(SLOTS)) | rng.choice([0, 0, 2])
            reqs += [ptr, make_pte(rng.choice(frames), rng.choice(FLAG_CHOICES))]
        calls = [
            (abi.HYPERVISOR_mmu_update, reqs[: n // 2 * 2], abi.DOMID_SELF),
            (abi.HYPERVISOR_mmu_update, reqs[n // 2 * 2 :], abi.DOMID_SELF),
        ]
        call: PendingCall = hv.start_hypercall(
            guest.domid, 0, core_call(abi.HYPERVISOR_multicall, (calls,))
        )
        slices = 1
        while not call.step(slice_size):
            slices += 1
        runs.append((call.result, _snapshot(hv), slices))
        assert hv.audit() == []
    (whole, whole_state, one), (sliced, sliced_state, _) = runs
    assert one == 1
    assert whole == sliced
    assert whole_state == sliced_state


def test_slice_boundaries_are_exact() -> None:
    """With budget K each slice processes exactly K records."""
    guest = boot(mapped=0)
    pairs = [(guest.l1e(i), make_pte(guest.spare[i], 5)) for i in range(10)]
    call = guest.hv.start_hypercall(
        guest.domid, 0, core_call(abi.HYPERVISOR_mmu_update, (flat(*pairs), abi.DOMID_SELF))
    )
    applied = []
    while not call.step(3):
        applied.append(sum(1 for i in range(10) if guest.read(guest.l1e(i))))
    assert applied == [3, 6, 9]
    assert call.result is not None
    assert (call.result.rc, call.result.done) == (0, 10)


def test_abandoned_call_keeps_applied_entries() -> None:
    guest = boot(mapped=0)
    pairs = [(guest.l1e(i), make_pte(guest.spare[i], 5)) for i in range(10)]
    call = guest.hv.start_hypercall(
        guest.domid, 0, core_call(abi.HYPERVISOR_mmu_update, (flat(*pairs), abi.DOMID_SELF))
    )
    assert not call.step(4)
    call.abandon()
    guest.hv.destroy_domain(guest.domid)
    assert guest.hv.audit() == []


# --- domains and machine memory ---------------------------------------------------------------


def test_domain_frames_are_scattered_zeroed_and_returned() -> None:
    hv = Hypervisor(16)
    free = hv.state.memory.free_frames
    guest = boot(hv, memory_mib=2)
    p2m = guest.dom.p2m
    assert len(p2m) == 2 * FRAMES_PER_MIB
    assert p2m != sorted(p2m)
    assert p2m != list(range(p2m[0], p2m[0] + len(p2m)))
    assert all(hv.state.memory.read_bytes(m << 12, 4096) == bytes(4096) for m in guest.spare)
    hv.destroy_domain(guest.domid)
    assert hv.state.memory.free_frames == free
    assert hv.audit() == []
    again = boot(hv, memory_mib=2)
    assert all(hv.state.memory.read_bytes(m << 12, 4096) == bytes(4096) for m in again.spare)


def test_destroy_with_deep_tree_and_pins_releases_everything() -> None:
    hv = Hypervisor(16)
    guest = boot(hv, memory_mib=4, mapped=64)
    for level, table in ((1, guest.l1), (2, guest.l2), (3, guest.l3)):
        assert guest.ext((level - 1, table, 0)).rc == 0  # PIN_Ln == n - 1
    hv.destroy_domain(guest.domid)
    ft = hv.state.frames
    assert all(ft.owner[m] == -1 and ft.count[m] == 0 for m in guest.dom.p2m)
    assert hv.audit() == []


def test_domain_ids_and_memory_limits() -> None:
    hv = Hypervisor(4)
    a = hv.create_domain(1, 1)
    b = hv.create_domain(1, 1)
    assert a.domid != b.domid
    with pytest.raises(DomainError, match="not enough machine memory"):
        hv.create_domain(8, 1)
    with pytest.raises(DomainError, match="vcpus"):
        hv.create_domain(1, 0)
    with pytest.raises(DomainError, match="no domain"):
        hv.destroy_domain(999)


def test_frame_table_for_one_gib_costs_a_few_mib() -> None:
    ft = FrameTable(1024 * FRAMES_PER_MIB)
    assert ft.table_bytes() < 8 * 1024 * 1024


@pytest.mark.parametrize("nr_frames", [1, 4096, 1024 * FRAMES_PER_MIB])
def test_frame_table_costs_at_most_16_bytes_per_frame(nr_frames: int) -> None:
    assert FrameTable(nr_frames).table_bytes() <= 16 * nr_frames


def test_m2p_defaults_to_the_pfn_and_keeps_only_overrides() -> None:
    """The guest-visible M2P reads each frame's PFN until MACHPHYS stores
    another value; overrides are charged to table_bytes and go with the frame."""
    hv = Hypervisor(4)
    guest = boot(hv, memory_mib=1)
    ft = hv.state.frames
    base = ft.table_bytes()
    assert [ft.m2p[mfn] for mfn in guest.dom.p2m] == list(range(len(guest.dom.p2m)))
    mfn = guest.dom.p2m[9]
    assert guest.mmu(((mfn << 12) | abi.MMU_MACHPHYS_UPDATE, 0xABCDE)).rc == 0
    assert ft.m2p[mfn] == 0xABCDE
    assert ft.table_bytes() > base
    assert guest.mmu(((mfn << 12) | abi.MMU_MACHPHYS_UPDATE, 9)).rc == 0
    assert (ft.m2p[mfn], ft.m2p.overrides) == (9, {})
    assert guest.mmu(((mfn << 12) | abi.MMU_MACHPHYS_UPDATE, 1)).rc == 0
    hv.destroy_domain(guest.domid)
    assert (ft.m2p[mfn], ft.m2p.overrides) == (0, {})


def test_domids_wrap_below_the_reserved_ids_and_skip_live_ones() -> None:
    """The owner field is an int16: ids stay below DOMID_FIRST_RESERVED."""
    hv = Hypervisor(8)
    first = hv.create_domain(1, 1)
    hv._next_domid = abi.DOMID_FIRST_RESERVED - 1
    last = hv.create_domain(1, 1)
    wrapped = hv.create_domain(1, 1)
    assert last.domid == abi.DOMID_FIRST_RESERVED - 1
    assert wrapped.domid == first.domid + 1
    assert hv.state.frames.owner[wrapped.p2m[0]] == wrapped.domid
    assert hv.audit() == []
