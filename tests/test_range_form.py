"""The range form of ``change_pte_range`` equals the per-PTE reference.

``batched``, ``naive`` and ``native`` change a PTE page's run of present PTEs
as arrays (``guest/ptes.py``, ``LazyMmu.start_ptes``/``commit_ptes``,
``McBuffer.queue_mmu_updates``); ``Kernel(per_pte=True)`` keeps the simple
per-PTE loop. Proven equal at three levels: each array rule against its
scalar rule, the bulk record queue against one record at a time, and the
whole kernel (random PTE pages, flags, A/D bits, VMA ranges crossing PTE
pages, every protection change) against itself on the reference path: the
same bytes on the wire, page tables, counters and audit.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap as mman
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from pvemu.guest.boot import boot_domain
from pvemu.guest.client import Domain, attach
from pvemu.guest.kernel import Kernel, SegmentationFault, kernel_for
from pvemu.guest.lazy import LazyMmu
from pvemu.guest.machine import NativeMachine
from pvemu.guest.modes import make_native_backend
from pvemu.guest.multicall import (
    FLUSH_LAZY_LEAVE,
    FLUSH_NON_LAZY,
    Batch,
    KernelBug,
    WholePageBatcher,
)
from pvemu.guest.ptes import (
    can_change_writable,
    flush_offsets,
    mmu_update_records,
    present_run,
    pte_modify,
    pte_needs_flush,
    pte_present,
    ptes_can_change_writable,
    ptes_modify,
    ptes_need_flush,
    ptes_present,
)
from pvemu.guest.pvops import TLB_SINGLE_PAGE_FLUSH_CEILING, TlbGather
from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.service import HypervisorService
from pvemu.shared import abi, wire
from pvemu.shared.x86 import (
    _PAGE_ACCESSED,
    _PAGE_AVAIL,
    _PAGE_AVAIL_HIGH,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_NX,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_USER,
    PAGE_SHIFT,
    PAGE_SIZE,
    PTE_MFN_MASK,
)
from tests.loopback import LoopbackChannel, LoopbackTransport

PRESERVE_AD = abi.MMU_PT_UPDATE_PRESERVE_AD
#: A guest's memory: room for the largest region (700 pages) and its tables.
MEMORY_MIB = 16
#: Each example boots two guests; shrinking one takes hundreds of examples
#: (tens of minutes), so a failure is reported as generated: the assertion's
#: diff names what differs.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target)
#: 1 GiB, 2 MiB aligned: a region here starts at entry 0 of a PTE page.
BASE = 0x4000_0000
PROTS = (
    0,  # PROT_NONE
    mman.PROT_READ,
    mman.PROT_READ | mman.PROT_WRITE,
    mman.PROT_READ | mman.PROT_EXEC,
    mman.PROT_READ | mman.PROT_WRITE | mman.PROT_EXEC,
)
#: Flag bits a guest may set in a present L1 entry (not PWT/PCD/PAT: -EINVAL).
FLAG_BITS = (
    _PAGE_RW,
    _PAGE_USER,
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_GLOBAL,
    _PAGE_AVAIL,
    1 << 9,
    _PAGE_AVAIL_HIGH,
    1 << 55,
    _PAGE_NX,
)


# --- the array rules are the scalar rules -----------------------------------------------

#: PTE-like values: the bits the rules look at, each often on and often off.
pte_values = st.builds(
    lambda mfn, bits: (mfn << PAGE_SHIFT & PTE_MFN_MASK) | bits,
    st.one_of(st.just(0), st.integers(1, (1 << 40) - 1)),
    st.integers(0, (1 << 12) - 1).map(lambda low: low)
    | st.sampled_from([0, _PAGE_NX, _PAGE_AVAIL_HIGH, _PAGE_NX | (1 << 52)]).flatmap(
        lambda high: st.integers(0, (1 << 12) - 1).map(lambda low: high | low)
    ),
)
pte_arrays = st.lists(pte_values, min_size=0, max_size=64)


def u64(values: Sequence[int]) -> np.ndarray[Any, np.dtype[np.uint64]]:
    return np.array(values, dtype=np.uint64)


@given(pte_arrays, pte_values, st.booleans())
def test_array_rules_equal_scalar_rules(olds: list[int], newprot: int, private: bool) -> None:
    old = u64(olds)
    assert ptes_present(old).tolist() == [pte_present(p) for p in olds]
    new = ptes_modify(old, newprot)
    assert new.tolist() == [pte_modify(p, newprot) for p in olds]
    assert ptes_can_change_writable(private, old).tolist() == [
        can_change_writable(private, p) for p in olds
    ]


@given(st.lists(st.tuples(pte_values, pte_values), max_size=64), st.integers(0, 70))
def test_flush_rule_equals_scalar_rule(pairs: list[tuple[int, int]], limit: int) -> None:
    old = u64([o for o, _ in pairs])
    new = u64([n for _, n in pairs])
    expected = [pte_needs_flush(o, n) for o, n in pairs]
    assert ptes_need_flush(old, new).tolist() == expected
    assert (
        flush_offsets(old, new, limit).tolist() == [i for i, f in enumerate(expected) if f][:limit]
    )


@given(
    st.lists(pte_values, max_size=64),
    st.integers(0, 511),
    st.integers(1, (1 << 40) - 1),
    st.sampled_from([abi.MMU_NORMAL_PT_UPDATE, PRESERVE_AD]),
)
def test_present_run_and_records(olds: list[int], first: int, table: int, cmd: int) -> None:
    window = u64(olds[: 512 - first])
    offsets, indexes, seen = present_run(window, first)
    expected = [i for i, p in enumerate(window.tolist()) if pte_present(p)]
    assert offsets.tolist() == expected
    assert indexes.tolist() == [first + i for i in expected]
    assert seen.tolist() == [window.tolist()[i] for i in expected]
    records = mmu_update_records(table, indexes, cmd, seen)
    pairs = [((table << PAGE_SHIFT) | (i * 8) | cmd, v) for i, v in zip(indexes, seen, strict=True)]
    assert records.tolist() == [x for pair in pairs for x in pair]


def test_present_run_all_present_is_views() -> None:
    window = u64([(5 << PAGE_SHIFT) | _PAGE_PRESENT] * 7)
    offsets, indexes, seen = present_run(window, 505)
    assert (offsets.tolist(), indexes.tolist()) == (list(range(7)), list(range(505, 512)))
    assert seen is window


def test_tlb_gather_keeps_only_what_decides_the_flush() -> None:
    one, run = TlbGather(), TlbGather()
    for page in range(100):
        one.add(BASE + page * PAGE_SIZE)
    run.add_run(BASE, np.arange(40, dtype=np.intp))
    run.add_run(BASE, np.arange(60, dtype=np.intp))
    assert one.vas == run.vas == [BASE + p * PAGE_SIZE for p in range(34)]
    assert len(one.vas) == TLB_SINGLE_PAGE_FLUSH_CEILING + 1  # more than the ceiling: full
    assert one.room == 0


def batches_of(recorded: list[Batch]) -> list[tuple[object, ...]]:
    return [
        (b.seq, b.reason, b.multicall, b.records, b.mmuext_ops, b.arg_bytes, b.hypercall())
        for b in recorded
    ]


# --- the lazy-MMU rules hold for runs --------------------------------------------------


def lazy_with_sink() -> tuple[LazyMmu, list[Batch]]:
    seen: list[Batch] = []

    def sink(batch: Batch) -> list[int]:
        seen.append(batch)
        return [0] * len(batch.calls)

    return LazyMmu(WholePageBatcher(sink)), seen


def idx(*values: int) -> np.ndarray[Any, np.dtype[np.intp]]:
    return np.array(values, dtype=np.intp)


def test_run_commit_is_the_per_pte_commits() -> None:
    by_run, runs = lazy_with_sink()
    by_pte, ptes = lazy_with_sink()
    indexes = idx(3, 4, 9, 511)
    vals = u64([0x1005, 0x2005, 0x3005, 0x4005])
    by_run.enter()
    by_run.start_ptes(7, indexes)
    by_run.commit_ptes(7, indexes, vals)
    by_run.leave()
    by_run.check_unlock(7)
    by_pte.enter()
    for i, v in zip(indexes.tolist(), vals.tolist(), strict=True):
        by_pte.start(7 * PAGE_SIZE + 8 * i)
        by_pte.commit(7 * PAGE_SIZE + 8 * i, v)
    by_pte.leave()
    assert batches_of(runs) == batches_of(ptes)
    assert runs[0].reason == FLUSH_LAZY_LEAVE


def test_run_commit_outside_a_section_issues_each_record() -> None:
    lazy, seen = lazy_with_sink()
    lazy.start_ptes(7, idx(1, 2))
    lazy.commit_ptes(7, idx(1, 2), u64([0x1005, 0x2005]))
    assert [(b.reason, b.records) for b in seen] == [(FLUSH_NON_LAZY, 1)] * 2


def test_empty_run_queues_nothing() -> None:
    lazy, seen = lazy_with_sink()
    lazy.enter()
    lazy.start_ptes(7, idx())
    lazy.commit_ptes(7, idx(), u64([]))
    lazy.leave()
    lazy.check_unlock(7)
    assert seen == []


@pytest.mark.parametrize(
    ("misuse", "message"),
    [
        (lambda lazy: lazy.start_ptes(7, idx(1)), "not committed"),  # a second open run
        (lambda lazy: lazy.start(7 * PAGE_SIZE + 8), "again before its commit"),
        (lambda lazy: lazy.set_pte(7 * PAGE_SIZE + 16, 1), "inside its start/commit"),
        (lambda lazy: lazy.note_read(7 * PAGE_SIZE + 8), "read hazard"),
        (lambda lazy: lazy.commit_ptes(7, idx(1), u64([1])), "without a matching"),
        (lambda lazy: lazy.commit_ptes(8, idx(1, 2), u64([1, 2])), "without a matching"),
        (lambda lazy: lazy.leave(), "without commit"),
        (lambda lazy: lazy.check_unlock(7), "not committed"),
    ],
)
def test_open_run_rules(misuse: Callable[[LazyMmu], None], message: str) -> None:
    lazy, _ = lazy_with_sink()
    lazy.enter()
    lazy.start_ptes(7, idx(1, 2))
    with pytest.raises(KernelBug, match=message):
        misuse(lazy)


def test_a_committed_run_may_not_be_read_again_in_its_section() -> None:
    lazy, _ = lazy_with_sink()
    lazy.enter()
    lazy.start_ptes(7, idx(1, 2))
    lazy.commit_ptes(7, idx(1, 2), u64([1, 2]))
    lazy.note_read(7 * PAGE_SIZE + 24)  # an entry the run did not touch
    for misuse in (
        lambda: lazy.note_read(7 * PAGE_SIZE + 16),
        lambda: lazy.start(7 * PAGE_SIZE + 8),
        lambda: lazy.start_ptes(7, idx(0, 1)),
    ):
        with pytest.raises(KernelBug, match="read hazard"):
            misuse()
    lazy.flush()  # what was sent may be read again
    lazy.note_read(7 * PAGE_SIZE + 16)
    lazy.leave()


def test_a_run_may_not_restart_a_pte_started_alone() -> None:
    lazy, _ = lazy_with_sink()
    lazy.enter()
    lazy.start(7 * PAGE_SIZE + 16)
    with pytest.raises(KernelBug, match="again before its commit"):
        lazy.start_ptes(7, idx(1, 2))


def test_flush_keeps_the_open_run() -> None:
    lazy, seen = lazy_with_sink()
    lazy.enter()
    lazy.start_ptes(7, idx(1, 2))
    lazy.flush()
    assert lazy.open_transactions == 2
    lazy.commit_ptes(7, idx(1, 2), u64([1, 2]))
    lazy.leave()
    lazy.check_unlock(7)
    assert [b.records for b in seen] == [2]


# --- the whole kernel: range form == per-PTE reference ------------------------------------


@dataclass
class Scenario:
    """A region, how it was populated and tampered with, then mprotects."""

    mode: str
    first: int  # the region's first entry in its PTE page
    pages: int
    shared_file: bool
    seed: int
    ops: list[tuple[int, int, int]] = field(default_factory=list)  # (page, pages, prot)
    #: Pages written at populate (default: a random share, read or written).
    written: Sequence[int] | None = None
    #: Make every PTE not present after populate (zero or swap-like).
    wipe: bool = False
    #: Random flags and non-present values written into up to 40 PTEs.
    tampered: bool = True
    #: User accesses between the mprotects (they fault pages in, too).
    touch_between: bool = True


@st.composite
def scenarios(draw: st.DrawFn, modes: Sequence[str]) -> Scenario:
    pages = draw(st.integers(1, 700))
    ops = draw(
        st.lists(
            st.integers(0, pages - 1).flatmap(
                lambda page: st.tuples(
                    st.just(page), st.integers(1, pages - page), st.sampled_from(PROTS)
                )
            ),
            min_size=1,
            max_size=3,
        )
    )
    return Scenario(
        mode=draw(st.sampled_from(modes)),
        first=draw(st.integers(0, 511)),
        pages=pages,
        shared_file=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
        ops=ops,
    )


class RecordingTransport(LoopbackTransport):
    """The loopback transport, keeping every request's wire form once asked to."""

    def __init__(self, service: HypervisorService) -> None:
        super().__init__(service)
        self.wire: list[bytes] | None = None

    async def open_channel(self) -> LoopbackChannel:
        channel = await super().open_channel()
        served = channel.request

        async def request(message: wire.Request) -> wire.Reply:
            if self.wire is not None:
                self.wire.append(msgpack.packb(message.to_wire()))
            return await served(message)

        channel.request = request  # type: ignore[method-assign]
        return channel


def tamper(rng: random.Random, pte: int) -> int:
    """A PTE value a kernel might find: the page's own with random flags,
    a non-present (swap-like) value, or nothing. A present user PTE always
    has _PAGE_USER (Linux never makes one without it, and Xen adds it to a
    PV guest's): without it a native user store would fault forever on a
    PTE the kernel sees nothing wrong with."""
    roll = rng.random()
    if roll < 0.15:
        return 0
    if roll < 0.3:
        return swap_like(rng)
    if not pte & _PAGE_PRESENT:
        return pte
    flags = _PAGE_PRESENT | _PAGE_USER
    for bits in FLAG_BITS:
        if rng.random() < 0.5:
            flags |= bits
    return (pte & PTE_MFN_MASK) | flags


async def play(
    kernel: Kernel, sc: Scenario, path: str | None, before_ops: Callable[[], None]
) -> int:
    """Populate, tamper with, touch and mprotect the region; returns its address."""
    rng = random.Random(sc.seed)
    addr = BASE + sc.first * PAGE_SIZE
    rw = mman.PROT_READ | mman.PROT_WRITE
    if path is None:
        flags = mman.MAP_PRIVATE | mman.MAP_ANONYMOUS
        assert await kernel.mmap(sc.pages * PAGE_SIZE, rw, flags, addr=addr) == addr
    else:
        assert (
            await kernel.mmap(sc.pages * PAGE_SIZE, rw, mman.MAP_SHARED, addr=addr, path=path)
            == addr
        )
    # Half the regions fully populated: a run with every entry present is
    # the common case (and the range form's shortcut).
    p_touch, p_write = rng.choice((1.0, rng.random())), rng.random()
    touches = [
        (addr + page * PAGE_SIZE, "w" if rng.random() < p_write else "r")
        for page in range(sc.pages)
        if rng.random() < p_touch
    ]
    if sc.written is not None:
        touches = [(addr + page * PAGE_SIZE, "w") for page in sc.written]
    await kernel.run_user(1, [(va, kind, b"x" if kind == "w" else 1) for va, kind in touches])
    tampered = rng.sample(range(sc.pages), k=min(sc.pages, rng.randrange(0, 40)))
    for page in range(sc.pages) if sc.wipe else tampered if sc.tampered else ():
        ptep = kernel_ptep(kernel, addr + page * PAGE_SIZE)
        if ptep is not None:
            pte = kernel.machine.read_u64(ptep)
            value = rng.choice((0, swap_like(rng))) if sc.wipe else tamper(rng, pte)
            await kernel.backend.set_pte(ptep, value)
    before_ops()
    for page, count, prot in sc.ops:
        await kernel.mprotect(addr + page * PAGE_SIZE, count * PAGE_SIZE, prot)
        for _ in range(rng.randrange(0, 4) if sc.touch_between else 0):  # A and D set
            va = addr + rng.randrange(sc.pages) * PAGE_SIZE
            access = (va, "w", b"y") if rng.random() < 0.5 else (va, "r", 1)
            with contextlib.suppress(SegmentationFault):
                await kernel.run_user(1, [access])
    return addr


def swap_like(rng: random.Random) -> int:
    """Not present, and not a PROT_NONE page either (no G, or no frame): a
    swap entry, say. The kernel skips it."""
    if rng.random() < 0.5:
        return rng.getrandbits(64) & ~(_PAGE_PRESENT | PTE_MFN_MASK)
    return rng.getrandbits(64) & ~(_PAGE_PRESENT | _PAGE_GLOBAL)


def kernel_ptep(kernel: Kernel, va: int) -> int | None:
    l1 = kernel._lookup_l1(va)
    return None if l1 is None else (l1 << PAGE_SHIFT) | (((va >> PAGE_SHIFT) & 511) * 8)


def page_tables(kernel: Kernel, addr: int, pages: int) -> list[bytes]:
    """Every PTE page the region touches, as the guest reads it."""
    out = []
    for va in range(addr & ~((1 << 21) - 1), addr + pages * PAGE_SIZE, 1 << 21):
        l1 = kernel._lookup_l1(va)
        out.append(b"" if l1 is None else kernel.machine.read_bytes(l1 << PAGE_SHIFT, PAGE_SIZE))
    return out


async def observe_pv(sc: Scenario, path: str | None, *, per_pte: bool) -> dict[str, object]:
    transport = RecordingTransport(HypervisorService(Hypervisor(MEMORY_MIB + 8)))
    domain: Domain = await attach(transport, memory_mib=MEMORY_MIB, vcpus=2, name="local")
    await boot_domain(domain)
    kernel = kernel_for(domain, sc.mode)
    kernel.per_pte = per_pte
    recorded: list[bytes] = []

    def start_recording() -> None:
        transport.wire = recorded

    addr = await play(kernel, sc, path, start_recording)
    transport.wire = None
    return {
        "wire": recorded,
        "tables": page_tables(kernel, addr, sc.pages),
        "stats": await kernel.stats(),
        "audit": await kernel.audit(),
        "vmas": kernel.vmas(),
    }


async def observe_native(sc: Scenario, path: str | None, *, per_pte: bool) -> dict[str, object]:
    machine = NativeMachine(MEMORY_MIB, 2)
    kernel = Kernel(machine, [make_native_backend(machine, v) for v in range(2)], per_pte=per_pte)
    addr = await play(kernel, sc, path, lambda: None)
    return {
        "tables": page_tables(kernel, addr, sc.pages),
        "memory": hashlib.blake2b(machine.memory.buffer()).hexdigest(),
        "stats": await kernel.stats(),
        "unseen_dirty": sorted(machine.oracle._unseen_dirty),
        "vmas": kernel.vmas(),
    }


async def observe_both(sc: Scenario) -> tuple[dict[str, object], dict[str, object]]:
    observe = observe_native if sc.mode == "native" else observe_pv
    path = None
    if sc.shared_file:
        fd, path = tempfile.mkstemp(prefix="pvemu-range-")
        os.ftruncate(fd, sc.pages * PAGE_SIZE)
        os.close(fd)
    try:
        fast = await observe(sc, path, per_pte=False)
        if path is not None:  # the same (zeroed) file for the reference run
            os.truncate(path, 0)
            os.truncate(path, sc.pages * PAGE_SIZE)
        reference = await observe(sc, path, per_pte=True)
    finally:
        if path is not None:
            os.unlink(path)
    return fast, reference


@pytest.mark.slow
@settings(max_examples=40, phases=NO_SHRINK)
@given(scenarios(["batched", "naive"]))
async def test_range_form_equals_per_pte_reference(sc: Scenario) -> None:
    fast, reference = await observe_both(sc)
    assert fast == reference


@settings(max_examples=25, phases=NO_SHRINK)
@given(scenarios(["native"]))
async def test_native_range_form_equals_per_pte_reference(sc: Scenario) -> None:
    fast, reference = await observe_both(sc)
    assert fast == reference


# --- edge cases, through the same comparison --------------------------------------------


def mprotect_records(observed: dict[str, object]) -> list[tuple[int, int]]:
    """The (ptr, val) records of every mmu_update the mprotects sent."""
    out: list[tuple[int, int]] = []
    raws: list[bytes] = observed["wire"]  # type: ignore[assignment]
    for raw in raws:
        message = msgpack.unpackb(raw, use_list=False)
        if message["t"] != "hypercall":
            continue
        args = wire.args_from_wire(message["op"], message["args"])
        calls = (
            args.calls
            if isinstance(args, wire.MulticallArgs)
            else (wire.Call(message["op"], args),)
        )
        for call in calls:
            if isinstance(call.args, wire.MmuUpdateArgs):
                words = list(call.args.records())
                out += list(zip(words[0::2], words[1::2], strict=True))
    return out


def entries_of(records: list[tuple[int, int]]) -> list[int]:
    return [(ptr & (PAGE_SIZE - 1)) >> 3 for ptr, _ in records]


@pytest.mark.parametrize("mode", ["batched", "naive"])
async def test_a_pte_page_with_nothing_present_sends_nothing(mode: str) -> None:
    """Entries 1..511 of the first PTE page have nothing present (its table
    exists for entry 0, outside the range): that run is empty."""
    written = [0, *range(512, 1024)]
    ops = [(1, 1023, mman.PROT_READ)]
    sc = Scenario(
        mode, 0, 1024, False, 1, ops, written=written, tampered=False, touch_between=False
    )
    fast, reference = await observe_both(sc)
    assert fast == reference
    assert entries_of(mprotect_records(fast)) == list(range(512))
    assert fast["stats"]["kernel"]["batching"]["empty_flushes"] >= 1  # type: ignore[index]


@pytest.mark.parametrize("mode", ["batched", "naive", "native"])
async def test_all_entries_not_present(mode: str) -> None:
    sc = Scenario(
        mode, 17, 600, False, 2, [(0, 600, mman.PROT_READ)], wipe=True, touch_between=False
    )
    fast, reference = await observe_both(sc)
    assert fast == reference
    if mode != "native":
        assert mprotect_records(fast) == []


@pytest.mark.parametrize("mode", ["batched", "naive", "native"])
async def test_a_run_ending_at_the_page_boundary(mode: str) -> None:
    """Entries 500..511 of one PTE page and 0..3 of the next: two runs, the
    first ending on entry 511."""
    ops = [(0, 16, mman.PROT_READ), (0, 12, mman.PROT_READ | mman.PROT_WRITE)]
    sc = Scenario(
        mode, 500, 16, False, 3, ops, written=range(16), tampered=False, touch_between=False
    )
    fast, reference = await observe_both(sc)
    assert fast == reference
    if mode != "native":
        entries = entries_of(mprotect_records(fast))
        assert entries == [*range(500, 512), *range(4), *range(500, 512)]


@pytest.mark.parametrize("mode", ["batched", "naive", "native"])
async def test_a_range_starting_mid_page(mode: str) -> None:
    """A populated region from entry 0; mprotect from entry 300 into the next page."""
    sc = Scenario(
        mode,
        0,
        1024,
        True,
        4,
        [(300, 400, mman.PROT_READ)],
        written=range(1024),
        tampered=False,
        touch_between=False,
    )
    fast, reference = await observe_both(sc)
    assert fast == reference
    if mode != "native":
        assert entries_of(mprotect_records(fast)) == [*range(300, 512), *range(188)]
