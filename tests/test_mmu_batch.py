"""The batched mmu_update path equals the per-record reference, bit for bit.

Two hypervisors are built identically; one runs every mmu_update through the
per-record path (``mmu_batch.ENABLED = False``), the other through the array
path with its thresholds lowered so that even short windows take it. The
same random batches go to both - every command, foreign-domain fields,
targets in page tables of every level and in other frames, repeated targets,
records that depend on earlier ones, A/D bits set beforehand and between
slices, random slice budgets - and everything observable must be equal:
rc/done, the old entries of pvemu's exchange records (``olds``), memory of
every domain, the frame table, counters, the race oracle, the hardware
model's counters and audit().
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvemu.hypervisor import HypercallResult, Hypervisor, mmu_batch
from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_GUEST_KERNEL,
    _PAGE_NX,
    _PAGE_PAT,
    _PAGE_PCD,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    maddr_of_entry,
    make_pte,
)
from tests.support import TABLE, USER_RO, USER_RW, Guest, boot, core_call, flat

A = _PAGE_ACCESSED
AD = _PAGE_ACCESSED | _PAGE_DIRTY
INDEXES = [0, 1, 2, 3, 5, 8, 13, 21, 255, 511]
Edit = Callable[[int], int]
FLAG_EDITS: list[Edit] = [
    lambda v: v ^ _PAGE_RW,
    lambda v: v & ~_PAGE_RW,
    lambda v: v | _PAGE_RW,
    lambda v: v | _PAGE_NX,
    lambda v: v & ~_PAGE_NX,
    lambda v: v | AD,
    lambda v: v & ~AD,
    lambda v: v & ~_PAGE_PRESENT,
    lambda v: v ^ _PAGE_USER,
    lambda v: v | _PAGE_GLOBAL,
    lambda v: v | _PAGE_GUEST_KERNEL,
    lambda v: v | _PAGE_PCD,
    lambda v: v | _PAGE_PAT,
    lambda v: v,
]
FLAGS = [
    0,
    USER_RO,
    USER_RW,
    USER_RW | AD,
    _PAGE_PRESENT,
    _PAGE_PRESENT | _PAGE_RW,
    USER_RO | _PAGE_NX,
]


@dataclass
class Scene:
    """A hypervisor with two domains. ``a`` has four L1s: its booted one
    (data mapped RW), ``l1b`` hooked at L2[1] (RO and RW mappings, an RO
    mapping of a page table), ``l1c`` pinned but not hooked, ``l1d`` hooked
    and almost empty; some frames writable-typed with no mapping left."""

    hv: Hypervisor
    a: Guest
    b: Guest
    l1s: list[int]
    uppers: list[int]
    #: Frames a mapping may name: ``a``'s data frames (typed writable or not
    #: yet typed), then its page tables, then others' and beyond RAM.
    frames: list[int]
    nr_data: int
    nr_own: int


def scene() -> Scene:
    hv = Hypervisor(8, seed=3)
    a = boot(hv, memory_mib=1, mapped=12)
    b = boot(hv, memory_mib=1, mapped=2)
    l1b, l1c, l1d, loose, was_rw = (a.take() for _ in range(5))
    rows = [(maddr_of_entry(l1b, i), make_pte(a.data[i % 12], USER_RO)) for i in range(6)]
    rows += [(maddr_of_entry(l1b, 8 + i), make_pte(a.data[i], USER_RW | AD)) for i in range(4)]
    rows += [(maddr_of_entry(l1b, 13), make_pte(a.l1, USER_RO))]
    rows += [(maddr_of_entry(l1c, i), make_pte(a.data[i], USER_RW)) for i in range(3)]
    rows += [(maddr_of_entry(l1d, 255), make_pte(loose, USER_RO))]
    rows += [(maddr_of_entry(a.l1, 21), make_pte(was_rw, USER_RW))]
    assert a.mmu(*rows).rc == 0
    assert a.mmu((maddr_of_entry(a.l1, 21), 0)).rc == 0  # was_rw: writable, count 0
    assert a.ext((abi.MMUEXT_PIN_L1_TABLE, l1c, 0)).rc == 0
    links = [(maddr_of_entry(a.l2, 1), make_pte(l1b, TABLE))]
    links += [(maddr_of_entry(a.l2, 2), make_pte(l1d, TABLE))]
    assert a.mmu(*links).rc == 0
    data = [*a.data, loose, was_rw, *a.spare[-4:]]
    tables = [a.l1, l1b, l1c, l1d, a.l2, a.l3, a.l4]
    others = [b.data[0], b.l1, hv.state.frames.nr_frames, hv.state.frames.nr_frames + 7]
    assert hv.audit() == []
    frames = data + tables + others
    return Scene(hv, a, b, tables[:4], tables[4:], frames, len(data), len(data) + len(tables))


@contextmanager
def array_path(
    enabled: bool, *, min_run: int = 1, min_segment: int = 32, backoff: int = 0
) -> Iterator[None]:
    """Run the block with the array path on (thresholds lowered) or off."""
    saved = (mmu_batch.ENABLED, mmu_batch.MIN_RUN, mmu_batch.MIN_SEGMENT, mmu_batch.BACKOFF)
    mmu_batch.ENABLED, mmu_batch.MIN_RUN = enabled, min_run
    mmu_batch.MIN_SEGMENT, mmu_batch.BACKOFF = min_segment, backoff
    try:
        yield
    finally:
        mmu_batch.ENABLED, mmu_batch.MIN_RUN, mmu_batch.MIN_SEGMENT, mmu_batch.BACKOFF = saved


def snapshot(hv: Hypervisor) -> dict[str, object]:
    """Everything the two paths must agree on, by name (memory and tick
    tables as digests, so that a failure prints something readable)."""
    ft = hv.state.frames
    arrays = {"owner": ft.owner, "slot": ft.slot, "count": ft.count, "type": ft.type}
    arrays |= {"type_count": ft.type_count, "flags": ft.flags}
    out: dict[str, object] = {name: a.tobytes() for name, a in arrays.items()}
    out |= {"m2p": dict(ft.m2p.overrides), "audit": hv.audit()}
    for domid, dom in hv.domains.items():
        o = dom.oracle
        ticks = {
            frame: hashlib.sha1(t.tobytes()).hexdigest() for frame, t in o._pte_changed.items()
        }
        out |= {
            f"dom{domid} memory": hashlib.sha1(dom.memory.map).hexdigest(),
            f"dom{domid} counters": [c.as_dict() for c in dom.counters],
            f"dom{domid} oracle": (o.lost_dirty, o.stale_after_flush, o.stale_in_flight, o._tick),
            f"dom{domid} unseen dirty": sorted(o._unseen_dirty),
            f"dom{domid} pte ticks": ticks,
            f"dom{domid} flush ticks": (o._full_flush, dict(o._page_flush)),
            f"dom{domid} hardware": dom.hw.stats,
        }
    return out


def assert_same(got: Hypervisor, expected: Hypervisor) -> None:
    """The two machines agree on everything ``snapshot`` names."""
    mine, theirs = snapshot(got), snapshot(expected)
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        assert mine[name] == value, name


Record = tuple[int, int]


TAME_EDITS = FLAG_EDITS[:8] + FLAG_EDITS[9:11] + FLAG_EDITS[-1:]
PT_CMDS = [abi.MMU_PT_UPDATE_PRESERVE_AD] * 2 + [abi.MMU_NORMAL_PT_UPDATE] * 2
PT_CMDS += [abi.MMU_PT_UPDATE_NO_TRANSLATE, abi.MMU_PT_XCHG_PVEMU, abi.MMU_PT_XCHG_PVEMU]
ALL_CMDS = [*PT_CMDS, abi.MMU_MACHPHYS_UPDATE, 5, 7]


@st.composite
def records(draw: st.DrawFn, s: Scene) -> list[Record]:
    """A batch: runs of L1 writes built from the current entries (mprotect
    sweeps, remaps, clears), with - as often as ``wild`` says - every other
    kind of record mixed in: other commands, other frames, bad values,
    repeated targets."""
    mem = s.hv.state.memory
    nr_frames = s.hv.state.frames.nr_frames
    wild = draw(st.sampled_from([0, 0, 1, 3, 10]))  # in 20

    def odd() -> bool:
        return draw(st.integers(0, 19)) < wild

    if draw(st.integers(0, 2)) == 0:
        return _sweeps(draw, s)
    out: list[Record] = []
    length = draw(st.integers(1, 48))
    runs: list[tuple[int, int, list[int], Edit]] = []
    while len(out) < length:
        if out and odd():  # the same target again, remapped
            ptr, _ = draw(st.sampled_from(out))
            out.append((ptr, make_pte(draw(st.sampled_from(s.frames[: s.nr_own])), USER_RO)))
            continue
        if runs and draw(st.integers(0, 2)) == 0:
            # The same entries again, often with the same change (computed
            # from the same old values: it depends on the first run).
            table, cmd, indexes, edit = draw(st.sampled_from(runs))
            if draw(st.booleans()):
                edit = draw(st.sampled_from(TAME_EDITS))
        else:
            table = draw(st.sampled_from(s.l1s))
            if odd():
                table = draw(st.sampled_from(s.uppers + s.frames))
            cmd = draw(st.sampled_from(ALL_CMDS if odd() else PT_CMDS))
            chosen = sorted(draw(st.sets(st.sampled_from(INDEXES), min_size=1)))
            indexes = chosen if draw(st.integers(0, 2)) == 0 else chosen[:1]
            edit = draw(st.sampled_from(FLAG_EDITS if odd() else TAME_EDITS))
            runs.append((table, cmd, indexes, edit))
        for index in indexes:
            ptr = maddr_of_entry(table, index) | cmd
            if odd() and draw(st.integers(0, 5)) == 0:
                ptr |= 1 << 63  # beyond any frame
            how = draw(st.integers(0, 9))
            if how <= 5 and table < nr_frames:
                val = edit(mem.read_u64(maddr_of_entry(table, index)))
            elif how <= 7 and not odd():  # a data frame of its own
                frame = draw(st.sampled_from(s.frames[: s.nr_data]))
                val = make_pte(frame, draw(st.sampled_from(FLAGS)))
            elif how <= 8:  # a table, another domain's frame, no RAM
                frame = draw(st.sampled_from(s.frames[s.nr_data :]))
                val = make_pte(frame % (1 << 40), draw(st.sampled_from(FLAGS)))
            else:
                val = draw(st.integers(0, (1 << 64) - 1))
            out.append((ptr, val))
    return out


def _sweeps(draw: st.DrawFn, s: Scene) -> list[Record]:
    """The mprotect shape: one change over many entries of one L1, in
    address order, sometimes twice (the second computed from the same old
    values, so it depends on the first)."""
    mem = s.hv.state.memory
    table = draw(st.sampled_from(s.l1s))
    cmd = draw(st.sampled_from(PT_CMDS))
    present = [i for i in range(512) if mem.read_u64(maddr_of_entry(table, i)) & _PAGE_PRESENT]
    if present and draw(st.integers(0, 3)):  # over present entries, as mprotect
        start = draw(st.integers(0, len(present) - 1))
        indexes = present[start : start + draw(st.integers(1, len(present)))]
    else:
        first = draw(st.integers(0, 500))
        indexes = list(range(first, min(first + draw(st.integers(1, 40)), 512)))
    out: list[Record] = []
    edit = draw(st.sampled_from(TAME_EDITS))
    for again in range(draw(st.integers(1, 2))):
        if again and draw(st.booleans()):
            edit = draw(st.sampled_from(TAME_EDITS))  # else the same change twice
        for index in indexes:
            maddr = maddr_of_entry(table, index)
            out.append((maddr | cmd, edit(mem.read_u64(maddr))))
    return out


@dataclass(frozen=True)
class Roughing:
    """A/D bits set behind the hypervisor's back (``pokes``: L1 number, entry
    index, bits), then by the hardware (write ``accesses`` on ``vcpu``)."""

    pokes: list[tuple[int, int, int]]
    accesses: list[int]
    vcpu: int

    def apply(self, s: Scene) -> None:
        _set_bits(s, [(maddr_of_entry(s.l1s[t], index), bits) for t, index, bits in self.pokes])
        if self.accesses:
            s.hv.run_user(s.a.domid, self.vcpu, [(p * 4096, "w", b"\x01") for p in self.accesses])


def _set_bits(s: Scene, pokes: list[tuple[int, int]]) -> None:
    """OR ``bits`` into the present L1 entries at the given addresses, as the
    hardware would (without telling the hypervisor)."""
    mem = s.hv.state.memory
    for maddr, bits in pokes:
        if maddr >> 12 in s.l1s:
            value = mem.read_u64(maddr)
            if value & _PAGE_PRESENT:
                mem.write_u64(maddr, value | bits)


def _touch(s: Scene, maddr: int) -> None:
    """A user write through the entry at ``maddr``, if a hooked L1 holds it
    (it faults harmlessly when the entry does not allow it)."""
    hooked = {s.l1s[0]: 0, s.l1s[1]: 512, s.l1s[3]: 1024}
    base = hooked.get(maddr >> 12)
    if base is not None:
        s.hv.run_user(s.a.domid, 1, [((base + (maddr & 0xFFF) // 8) * 4096, "w", b"\x03")])


roughings = st.builds(
    Roughing,
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from(INDEXES), st.sampled_from([A, AD])),
        max_size=6,
    ),
    st.lists(st.sampled_from([0, 1, 2, 3, 513, 521, 1023]), max_size=3),
    st.integers(0, 1),
)


def _run(
    s: Scene, reqs: list[Record], foreigndom: int, budgets: list[int | None], mc: bool
) -> tuple[HypercallResult | None, int]:
    """Run the batch (alone or split into a multicall) in slices of
    ``budgets`` (cycled), a write access by vCPU 1 between slices."""
    if mc:
        half = len(reqs) // 2
        entries = [
            (abi.HYPERVISOR_mmu_update, flat(*reqs[:half]), foreigndom),
            (abi.HYPERVISOR_mmuext_op, [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)], abi.DOMID_SELF),
            (abi.HYPERVISOR_mmu_update, flat(*reqs[half:]), foreigndom),
        ]
        call = core_call(abi.HYPERVISOR_multicall, (entries,))
    else:
        call = core_call(abi.HYPERVISOR_mmu_update, (flat(*reqs), foreigndom))
    pending = s.hv.start_hypercall(s.a.domid, 0, call)
    slices = 0
    while not pending.step(budgets[slices % len(budgets)]):
        slices += 1
        s.hv.run_user(s.a.domid, 1, [((slices % 4) * 4096, "w", b"\x02")])
    return pending.result, pending.entries


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_array_path_equals_the_per_record_path(data: st.DataObject) -> None:
    ref, arr = scene(), scene()
    knobs = {
        "min_segment": data.draw(st.sampled_from([1, 4, 32])),
        "backoff": data.draw(st.sampled_from([0, 0, 2, 16])),
    }
    for _ in range(data.draw(st.integers(1, 3))):
        seen = data.draw(roughings)  # before the guest reads its entries
        for scene_ in (ref, arr):
            seen.apply(scene_)
        reqs = data.draw(records(ref))
        # Between the guest's read and its commit the hardware sets A/D in
        # some of the very entries the batch rewrites: behind the
        # hypervisor's back, or by a write access it sees.
        raced = data.draw(st.lists(st.tuples(st.sampled_from(reqs), st.sampled_from([A, AD]))))
        touched = [data.draw(st.sampled_from(reqs)) for _ in range(data.draw(st.integers(0, 6)))]
        for scene_ in (ref, arr):
            _set_bits(scene_, [(ptr & ~7, bits) for (ptr, _), bits in raced])
            for ptr, _ in touched:
                _touch(scene_, ptr & ~7)
        foreigndom = data.draw(
            st.sampled_from(
                [abi.DOMID_SELF] * 30
                + [ref.b.domid, ref.a.domid, abi.DOMID_IO, (ref.a.domid + 1) << 16, 1 << 16]
            )
        )
        budgets = data.draw(
            st.lists(st.one_of(st.none(), st.integers(1, 50)), min_size=1, max_size=4)
        )
        mc = data.draw(st.integers(0, 4)) == 0
        with array_path(False):
            expected = _run(ref, reqs, foreigndom, budgets, mc)
        with array_path(True, **knobs):
            got = _run(arr, reqs, foreigndom, budgets, mc)
        assert got == expected
        assert_same(arr.hv, ref.hv)


# --- cases the property test must not leave to chance ----------------------------------


def _both(
    build: Callable[[Scene], list[Record]], before: Callable[[Scene], None] | None = None
) -> tuple[Scene, Scene]:
    """Run the batch ``build`` makes on two fresh scenes, per record and
    with the array path; assert they agree and return them."""
    results = []
    scenes = []
    for enabled in (False, True):
        s = scene()
        if before is not None:
            before(s)
        with array_path(enabled, min_segment=1):
            results.append(_run(s, build(s), abi.DOMID_SELF, [None], False))
        scenes.append(s)
    assert results[1] == results[0]
    assert_same(scenes[1].hv, scenes[0].hv)
    assert scenes[0].hv.audit() == []
    return scenes[0], scenes[1]


def _sweep(s: Scene, edit: Edit, cmd: int, indexes: range = range(12)) -> list[Record]:
    mem = s.hv.state.memory
    return [
        (maddr_of_entry(s.a.l1, i) | cmd, edit(mem.read_u64(maddr_of_entry(s.a.l1, i))))
        for i in indexes
    ]


def test_the_same_protection_change_twice_in_one_batch() -> None:
    """Both records of an entry are computed from the old value; the second
    is a no-op after the first (the writable type is dropped once)."""
    ref, _ = _both(lambda s: 2 * _sweep(s, lambda v: v & ~_PAGE_RW, abi.MMU_PT_UPDATE_PRESERVE_AD))
    assert not any(ref.a.read(ref.a.l1e(i)) & _PAGE_RW for i in range(12))


def test_a_normal_update_loses_a_dirty_bit_set_after_the_guest_read_it() -> None:
    def batch(s: Scene) -> list[Record]:
        records = _sweep(s, lambda v: v & ~_PAGE_RW, abi.MMU_NORMAL_PT_UPDATE, range(4))
        s.hv.run_user(s.a.domid, 1, [(2 * 4096, "w", b"\x01")])  # D after the read
        return records

    ref, arr = _both(batch)
    assert ref.a.dom.oracle.lost_dirty == arr.a.dom.oracle.lost_dirty == 1


def test_preserve_ad_keeps_bits_set_after_the_guest_read_them() -> None:
    def batch(s: Scene) -> list[Record]:
        records = _sweep(s, lambda v: v & ~_PAGE_RW, abi.MMU_PT_UPDATE_PRESERVE_AD, range(4))
        s.hv.run_user(s.a.domid, 1, [(i * 4096, "w", b"\x01") for i in range(4)])
        return records

    ref, arr = _both(batch)
    assert all(ref.a.read(ref.a.l1e(i)) & AD == AD for i in range(4))
    assert ref.a.dom.oracle.lost_dirty == arr.a.dom.oracle.lost_dirty == 0


def test_clears_and_remaps_across_frames_stop_at_a_foreign_frame() -> None:
    """The general lane: entries of two L1s cleared (A/D set after the read,
    kept by PRESERVE_AD) and remapped, then a mapping of another domain's
    frame: -EBUSY with everything before it applied."""

    def batch(s: Scene) -> list[Record]:
        mem = s.hv.state.memory
        l1b = s.l1s[1]
        records = [(maddr_of_entry(l1b, i) | abi.MMU_PT_UPDATE_PRESERVE_AD, 0) for i in (0, 8, 13)]
        records += [(s.a.l1e(i), make_pte(s.a.data[11 - i], USER_RW)) for i in range(6)]
        records += [(s.a.l1e(40), make_pte(s.a.spare[-1], USER_RO))]
        records += [(s.a.l1e(41), make_pte(s.b.data[0], USER_RO))]
        records += [(s.a.l1e(42), make_pte(s.a.data[0], USER_RO))]
        for i in (0, 8):
            maddr = maddr_of_entry(l1b, i)
            mem.write_u64(maddr, mem.read_u64(maddr) | AD)
        return records

    ref, _ = _both(batch)
    assert ref.a.read(maddr_of_entry(ref.l1s[1], 8)) == AD  # not present, A/D kept


def test_a_writable_mapping_of_an_untyped_frame_is_retyped_per_record() -> None:
    """The first RW mapping of a frame changes its type (per record); the
    next ones of the same batch find it writable (array path)."""

    def batch(s: Scene) -> list[Record]:
        frame = s.a.spare[-2]
        return [(s.a.l1e(30 + i), make_pte(frame, USER_RW)) for i in range(20)]

    ref, _ = _both(batch)
    assert ref.hv.state.frames.type_count[ref.a.spare[-2]] == 20


def _both_results(
    build: Callable[[Scene], list[Record]], before: Callable[[Scene], None] | None = None
) -> tuple[HypercallResult, Scene]:
    """:func:`_both`, with the result both paths agreed on (and the
    per-record scene)."""
    s = scene()
    if before is not None:
        before(s)
    with array_path(False):
        result, _ = _run(s, build(s), abi.DOMID_SELF, [None], False)
    _both(build, before)
    assert result is not None
    return result, s


def _olds(result: HypercallResult) -> list[int]:
    return [int.from_bytes(result.olds[i : i + 8], "little") for i in range(0, len(result.olds), 8)]


def test_a_zap_of_a_whole_pte_page_by_exchange() -> None:
    """munmap's shape with pvemu's exchange: every entry of an L1 cleared
    (present RW, empty, A/D set by the hardware), one batch; both paths
    return the same olds, D bits included, and count 512 exchanges."""

    def touch(s: Scene) -> None:
        s.hv.run_user(s.a.domid, 1, [(p * 4096, "w", b"\x01") for p in (0, 3)])

    def build(s: Scene) -> list[Record]:
        return _sweep(s, lambda v: 0, abi.MMU_PT_XCHG_PVEMU, range(512))

    result, s = _both_results(build, touch)
    assert (result.rc, result.done) == (0, 512)
    got = _olds(result)
    assert len(got) == 512
    assert got[0] & AD == AD
    assert got[3] & AD == AD
    assert not got[1] & _PAGE_DIRTY
    assert got[12:] == [0] * 500
    assert s.hv.domains[s.a.domid].counters[0].mmu_xchg_records == 512
    assert s.a.dom.oracle.lost_dirty == 0


def test_exchange_olds_are_those_of_the_per_record_path() -> None:
    """A batch mixing exchanges with other commands, with a repeated target
    and a refusal: the same olds on both paths, only the applied
    exchanges'."""

    def build(s: Scene) -> list[Record]:
        xchg = abi.MMU_PT_XCHG_PVEMU
        recs = _sweep(s, lambda v: v & ~_PAGE_RW, xchg, range(6))
        recs += _sweep(s, lambda v: v, abi.MMU_NORMAL_PT_UPDATE, range(6, 9))
        recs += [(maddr_of_entry(s.a.l1, 2) | xchg, 0)]
        recs += [(maddr_of_entry(s.a.l1, 9) | xchg, make_pte(s.a.l2, USER_RW))]  # -EBUSY
        return recs

    result, _ = _both_results(build)
    assert (result.rc, result.done) == (-abi.EBUSY, 10)
    got = _olds(result)
    assert len(got) == 7
    assert got[6] == got[2] & ~_PAGE_RW  # what the first exchange of entry 2 wrote
