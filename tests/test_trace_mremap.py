"""A trace's mremap and madvise replayed through the kernel's own paths
(``Kernel.mremap``, ``madvise_dontneed``, ``madvise_free``): exact costs per
mode, the populated pages that follow a move, the guest's own choices the
address map then follows, and random traces made by a reference address
space (docs/traces.md, "How each syscall is reproduced").

The costs are docs/architecture.md's. Process 1 has run on both vCPUs (the
touches run on vCPU 1), so every flush is one MULTI op: F = 1. For n
present PTEs moved PTE by PTE within one extent:
``trap`` n xchg + n ``mmu_update`` + F, ``xen`` n xchg + ⌈n/31⌉ + F,
``batched`` 1 exchange + 1 multicall + F; 2 more per destination PTE page
built, 2 per source PTE page the unmap frees plus its flush (1); a whole
2 MiB-aligned PTE page moves for 4 hypercalls in every hypervisor mode.
"""

from __future__ import annotations

import errno
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pvemu.guest.kernel import Kernel
from pvemu.guest.replay import replay_trace, run_trace_workload
from pvemu.guest.replay_result import TraceResult
from pvemu.guest.vma import AddressSpace, MprotectError, MremapError
from pvemu.shared.trace import (
    MAP_ANONYMOUS,
    MAP_SHARED,
    MREMAP_DONTUNMAP,
    MREMAP_FIXED,
    MREMAP_MAYMOVE,
    PROT_READ,
    Event,
    Fork,
    Madvise,
    Mmap,
    Mprotect,
    Mremap,
    Munmap,
    Trace,
)
from tests.test_trace import (
    ANON,
    BASE,
    PAGE,
    RW,
    TRACES,
    local_kernel,
    native_kernel,
    trace_of,
    vma_at,
)

MAYMOVE = MREMAP_MAYMOVE
FIXED = MREMAP_MAYMOVE | MREMAP_FIXED
DONTUNMAP = MREMAP_MAYMOVE | MREMAP_DONTUNMAP
MB2 = 1 << 21
MODES = ("trap", "xen", "batched")


def move_traps(mode: str, n: int) -> int:
    """One extent of n present PTEs moved PTE by PTE (F = 1)."""
    return {"trap": 2 * n + 1, "xen": n + math.ceil(n / 31) + 1, "batched": 3}[mode]


def zap_traps(mode: str, n: int) -> int:
    """munmap/MADV_DONTNEED of n present PTEs in one PTE page, no table freed."""
    return {"trap": n + 1, "xen": n + 1, "batched": 2}[mode]


async def replay(mode: str, *events: Event, **policy: Any) -> tuple[Kernel, TraceResult]:
    kernel = await native_kernel() if mode == "native" else await local_kernel(mode)
    result = await replay_trace(kernel, trace_of(*events), **policy)
    assert result.audit_clean, result.audit
    assert result.counts_agree
    return kernel, result


def traps(result: TraceResult, phase: str) -> int:
    return result.phases[phase].counts.traps


# --- exact costs -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_growth_in_place_costs_nothing_and_grants_the_extension(mode: str) -> None:
    kernel, result = await replay(
        mode, Mmap(1, BASE, 4 * PAGE, RW, ANON), Mremap(1, BASE, 4 * PAGE, 8 * PAGE, 0, BASE)
    )
    assert traps(result, "mremap") == 0
    assert [v[:3] for v in kernel.vmas()] == [(BASE, BASE + 8 * PAGE, RW)]
    assert result.pages == 8  # 4 at the mmap, 4 granted by the growth
    assert result.replay_clean


@pytest.mark.parametrize("mode", MODES)
async def test_maymove_growth_moves_the_ptes_to_the_programs_address(mode: str) -> None:
    """The program's kernel moved the range within its 2 MiB: the guest
    does the same (asked with MREMAP_FIXED, the address being free), one
    extent of 4 PTEs, no table built or freed."""
    new = BASE + 64 * PAGE
    kernel, result = await replay(
        mode, Mmap(1, BASE, 4 * PAGE, RW, ANON), Mremap(1, BASE, 4 * PAGE, 8 * PAGE, MAYMOVE, new)
    )
    assert traps(result, "mremap") == move_traps(mode, 4)
    assert result.phases["mremap"].counts.page_faults == 0
    assert [v[:3] for v in kernel.vmas()] == [(new, new + 8 * PAGE, RW)]
    assert result.relocated == 0
    assert result.pages == 8
    assert result.replay_clean  # verify() read the 4 moved bytes back at the new address
    assert [await kernel.read(new + i * PAGE, 1) for i in range(4)] == [
        bytes([i + 1]) for i in range(4)
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_move_into_a_new_pte_page_builds_it_and_frees_the_old(mode: str) -> None:
    """+2 for the destination PTE page, +2 + 1 flush for the source's, which
    the unmap of the old range frees (no VMA is left in its 2 MiB)."""
    new = BASE + 2 * MB2
    kernel, result = await replay(
        mode,
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mmap(1, BASE + MB2, PAGE, RW, ANON),  # keeps the PMD page alive
        Mremap(1, BASE, 4 * PAGE, 8 * PAGE, MAYMOVE, new),
    )
    assert traps(result, "mremap") == move_traps(mode, 4) + 2 + 2 + 1
    assert vma_at(kernel, BASE) is None
    assert result.replay_clean


@pytest.mark.parametrize("mode", MODES)
async def test_fixed_onto_the_programs_own_mapping_unmaps_it_first(mode: str) -> None:
    """MREMAP_FIXED onto B: the kernel's mremap zaps B's 4 PTEs (one munmap,
    its flush), then moves A's 4 in; B's bytes are gone, A's follow."""
    a, b = BASE, BASE + 16 * PAGE
    kernel, result = await replay(
        mode,
        Mmap(1, a, 4 * PAGE, RW, ANON),
        Mmap(1, b, 4 * PAGE, RW, ANON),
        Mremap(1, a, 4 * PAGE, 4 * PAGE, FIXED, b, b),
    )
    assert traps(result, "mremap") == zap_traps(mode, 4) + move_traps(mode, 4)
    assert [v[:3] for v in kernel.vmas()] == [(b, b + 4 * PAGE, RW)]
    assert [await kernel.read(b + i * PAGE, 1) for i in range(4)] == [
        bytes([i + 1])
        for i in range(4)  # A's bytes (B's were 5..8)
    ]
    assert result.replay_clean
    assert result.relocated == 0


@pytest.mark.parametrize("mode", MODES)
async def test_an_aligned_2mib_move_relinks_the_pte_page(mode: str) -> None:
    new = BASE + 2 * MB2
    _, result = await replay(
        mode,
        Mmap(1, BASE, 512 * PAGE, RW, ANON),
        Mremap(1, BASE, 512 * PAGE, 512 * PAGE, FIXED, new, new),
    )
    assert traps(result, "mremap") == 4
    assert result.replay_clean


@pytest.mark.parametrize("mode", MODES)
async def test_a_shrink_unmaps_the_tail(mode: str) -> None:
    kernel, result = await replay(
        mode, Mmap(1, BASE, 8 * PAGE, RW, ANON), Mremap(1, BASE, 8 * PAGE, 2 * PAGE, 0, BASE)
    )
    assert traps(result, "mremap") == zap_traps(mode, 6)
    assert [v[:3] for v in kernel.vmas()] == [(BASE, BASE + 2 * PAGE, RW)]
    assert result.replay_clean


@pytest.mark.parametrize("mode", MODES)
async def test_madvise_dontneed_zaps_through_the_kernel(mode: str) -> None:
    kernel, result = await replay(
        mode, Mmap(1, BASE, 64 * PAGE, RW, ANON), Madvise(1, BASE, 64 * PAGE, "MADV_DONTNEED")
    )
    assert traps(result, "madvise") == zap_traps(mode, 64)
    assert await kernel.read(BASE, 1) == b"\0"  # gone: a zero page again
    assert result.replay_clean


@pytest.mark.parametrize("mode", MODES)
async def test_madvise_free_cleans_and_keeps_the_data(mode: str) -> None:
    """k = 8 dirty pages: trap 2k + 1, xen and batched k + 1 + 1
    (tests/test_madvise.py); the pages keep their bytes, which verify()
    reads back."""
    kernel, result = await replay(
        mode, Mmap(1, BASE, 8 * PAGE, RW, ANON), Madvise(1, BASE, 8 * PAGE, "MADV_FREE")
    )
    assert traps(result, "madvise") == {"trap": 17, "xen": 10, "batched": 10}[mode]
    assert await kernel.read(BASE, 1) == b"\1"
    assert result.replay_clean


async def test_shared_memory_is_advised_too() -> None:
    """MADV_DONTNEED on a shared mapping is the kernel's call as well (it
    used to be left out as untracked)."""
    _, result = await replay(
        "xen",
        Mmap(1, BASE, 4 * PAGE, RW, MAP_SHARED | MAP_ANONYMOUS),
        Madvise(1, BASE, 4 * PAGE, "MADV_DONTNEED"),
    )
    assert traps(result, "madvise") == zap_traps("xen", 4)
    assert result.untracked == {}
    assert result.replay_clean


# --- following the guest --------------------------------------------------------------------


async def test_dontunmap_leaves_the_old_range_mapped_and_empty() -> None:
    new = BASE + 64 * PAGE
    kernel, result = await replay(
        "native",
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mremap(1, BASE, 4 * PAGE, 4 * PAGE, DONTUNMAP, new),
        Mprotect(1, BASE, 4 * PAGE, PROT_READ),  # the old range is still the program's
    )
    assert [v[:3] for v in kernel.vmas()] == [
        (BASE, BASE + 4 * PAGE, PROT_READ),
        (new, new + 4 * PAGE, RW),
    ]
    assert await kernel.read(BASE, 1) == b"\0"
    assert await kernel.read(new, 1) == b"\1"
    assert result.pages == 4
    assert result.replay_clean


async def test_the_map_follows_where_the_guest_moved_a_range() -> None:
    """The program grew its range in place; the guest has no room there
    (something squats after it) and moves it: later calls on the program's
    range act on the guest's new address."""
    kernel = await native_kernel()
    squat = BASE + 4 * PAGE
    await kernel.mmap(PAGE, PROT_READ, ANON, addr=squat)
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mremap(1, BASE, 4 * PAGE, 8 * PAGE, MAYMOVE, BASE),  # in place in the program
        Mprotect(1, BASE, 8 * PAGE, PROT_READ),
    )
    result = await replay_trace(kernel, trace)
    assert result.relocated == 1
    assert result.replay_clean, result.error_samples
    (moved,) = [v for v in kernel.vmas() if v[0] != squat]
    assert moved[1] - moved[0] == 8 * PAGE
    assert moved[2] == PROT_READ
    assert await kernel.read(moved[0], 1) == b"\1"  # populated before the move


async def test_a_move_with_no_free_candidate_lets_the_guest_choose() -> None:
    kernel = await native_kernel()
    new = BASE + 64 * PAGE
    await kernel.mmap(8 * PAGE, PROT_READ, ANON, addr=new)  # the program's destination
    await kernel.mmap(PAGE, PROT_READ, ANON, addr=BASE + 4 * PAGE)  # no growth in place
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mremap(1, BASE, 4 * PAGE, 8 * PAGE, MAYMOVE, new),
        Munmap(1, new, 8 * PAGE),  # the guest's choice, translated
    )
    result = await replay_trace(kernel, trace)
    assert result.relocated == 1
    assert result.replay_clean, result.error_samples
    assert [v[:2] for v in kernel.vmas()] == [
        (BASE + 4 * PAGE, BASE + 5 * PAGE),
        (new, new + 8 * PAGE),
    ]


async def test_fixed_onto_a_partly_mapped_target_unmaps_the_pieces_first() -> None:
    a, b, target = BASE, BASE + 16 * PAGE, BASE + 15 * PAGE
    kernel, result = await replay(
        "native",
        Mmap(1, a, 4 * PAGE, RW, ANON),
        Mmap(1, b, 2 * PAGE, RW, ANON),  # covers part of the target only
        Mremap(1, a, 4 * PAGE, 4 * PAGE, FIXED, target, target),
    )
    assert [v[:3] for v in kernel.vmas()] == [(target, target + 4 * PAGE, RW)]
    assert await kernel.read(target + PAGE, 1) == b"\2"
    assert result.replay_clean


async def test_a_guest_refusal_is_an_error_and_the_replay_goes_on() -> None:
    kernel = await native_kernel()
    await kernel.mmap(PAGE, PROT_READ, ANON, addr=BASE + 4 * PAGE)
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mremap(1, BASE, 4 * PAGE, 8 * PAGE, 0, BASE),  # no MAYMOVE, no room in the guest
        Munmap(1, BASE, 8 * PAGE),
    )
    result = await replay_trace(kernel, trace)
    assert result.errors == 1
    assert result.error_samples[0]["errno"] == errno.errorcode[errno.ENOMEM]
    assert [v[:2] for v in kernel.vmas()] == [(BASE + 4 * PAGE, BASE + 5 * PAGE)]
    assert result.audit_clean


async def test_an_old_range_split_across_placements_is_not_replayed() -> None:
    kernel = await native_kernel()
    await kernel.mmap(PAGE, PROT_READ, ANON, addr=BASE + 2 * PAGE)  # the second half goes elsewhere
    trace = trace_of(
        Mmap(1, BASE, 2 * PAGE, RW, ANON),
        Mmap(1, BASE + 2 * PAGE, 2 * PAGE, RW, ANON),  # one VMA with the first in the program
        Mremap(1, BASE, 4 * PAGE, 8 * PAGE, MAYMOVE, BASE + 64 * PAGE),
    )
    result = await replay_trace(kernel, trace)
    assert result.errors == 1
    assert "not one guest range" in result.error_samples[0]["message"]
    assert result.audit_clean


async def test_memory_the_trace_never_mapped_is_untracked() -> None:
    _, result = await replay("native", Mremap(1, BASE, 4 * PAGE, 8 * PAGE, MAYMOVE, BASE))
    assert result.untracked == {"mremap": 1}
    assert result.replay_clean


async def test_a_forked_child_moves_its_copy() -> None:
    """The child's mremap moves PTEs that still share frames with its
    parent: each side keeps its own bytes (verify() reads both address
    spaces back), the parent's write after the move is a reuse of the page
    the child copied before it, and the frames balance (audit)."""
    new = BASE + 64 * PAGE
    trace = Trace(
        ["test"],
        "hand-written",
        [
            Mmap(1, BASE, 16 * PAGE, RW, ANON),
            Fork(1, 2),
            Mremap(2, BASE, 16 * PAGE, 16 * PAGE, FIXED, new, new),  # after its 4 writes
            Mprotect(1, BASE, 16 * PAGE, PROT_READ),  # after the parent's 4 writes
        ],
    )
    kernel = await local_kernel("xen")
    result = await replay_trace(kernel, trace, fork_touch=4)
    assert result.replay_clean, result.error_samples
    assert result.audit_clean, result.audit
    assert result.processes["cow_copies"] == 4
    assert result.processes["cow_reuses"] == 4
    parent, child = sorted(pid for pid in kernel.processes if pid != 1)
    assert [v[:3] for v in kernel.vmas(pid=parent)] == [(BASE, BASE + 16 * PAGE, PROT_READ)]
    assert [v[:3] for v in kernel.vmas(pid=child)] == [(new, new + 16 * PAGE, RW)]


@pytest.mark.parametrize(("mode", "expected"), [("trap", 1231), ("xen", 653), ("batched", 49)])
async def test_python_json_mremap_phase_is_the_documented_one(mode: str, expected: int) -> None:
    """docs/traces.md's table: 19 mremaps, 605 present PTEs moved; trap and
    xen both take each with a trapped xchg, trap writes each with an
    mmu_update, xen queues the writes (48 hypercalls in all)."""
    result = await run_trace_workload(await local_kernel(mode), TRACES / "python-json.json")
    assert isinstance(result, TraceResult)
    assert result.replay_clean
    counts = result.phases["mremap"].counts
    assert counts.traps == expected
    if mode != "batched":
        assert counts.ptwr == 605  # the trapped xchgs


# --- random traces from a reference address space ------------------------------------------

_SLOTS = 48  # pages of the window the random calls act in (crosses a PTE page)
_WINDOW = BASE + MB2 - 16 * PAGE
_n = st.integers(0, _SLOTS - 1)
_len = st.integers(1, 8)
_mmap = st.tuples(st.just("mmap"), _n, _len, st.sampled_from([0, PROT_READ, RW]))
_mremap = st.tuples(
    st.just("mremap"), _n, _n, _len, _len, st.sampled_from([0, MAYMOVE, FIXED, DONTUNMAP]), _n
)
_op = st.one_of(  # mmap and mremap weighted up: the calls under test
    _mmap,
    _mmap,
    st.tuples(st.just("munmap"), _n, _n, _len),
    st.tuples(st.just("mprotect"), _n, _n, _len, st.sampled_from([0, PROT_READ, RW])),
    st.tuples(st.just("madvise"), _n, _n, _len, st.sampled_from(["MADV_DONTNEED", "MADV_FREE"])),
    _mremap,
    _mremap,
)


def _where(mm: AddressSpace, vma: int, page: int) -> int:
    """A page inside the ``vma``-th mapping (modulo), or of the window if none."""
    vmas = mm.vmas()
    if not vmas:
        return _WINDOW + page * PAGE
    v = vmas[vma % len(vmas)]
    return v.start + page % ((v.end - v.start) // PAGE) * PAGE


def _clip(mm: AddressSpace, addr: int, size: int) -> int:
    vma = mm.find(addr)
    return size if vma is None else min(size, vma.end - addr)


def record(ops: list[tuple[Any, ...]]) -> tuple[list[Event], AddressSpace]:
    """The trace a program making ``ops`` would leave (its successful calls,
    with the results a Linux address space gives), and that address space.
    Calls after the first mmap act inside mappings (mostly), so that most
    succeed."""
    mm = AddressSpace()
    events: list[Event] = []
    for op, *args in ops:
        try:
            if op == "mmap":
                slot, length, prot = args
                addr, size = _WINDOW + slot * PAGE, length * PAGE
                got = mm.do_mmap(size, prot, ANON, addr=addr).addr
                events.append(Mmap(1, got, size, prot, ANON, addr))
                continue
            addr, size = _where(mm, args[0], args[1]), args[2] * PAGE
            if op == "munmap":
                mm.munmap(addr, size)
                events.append(Munmap(1, addr, size))
            elif op == "mprotect":
                mm.mprotect(addr, size, args[3])
                events.append(Mprotect(1, addr, size, args[3]))
            elif op == "madvise":
                size = _clip(mm, addr, size)
                advise = mm.madvise_free if args[3] == "MADV_FREE" else mm.madvise_dontneed
                advise(addr, size).raise_if_error()
                events.append(Madvise(1, addr, size, args[3]))
            else:
                size = _clip(mm, addr, size)  # inside its mapping, as a move needs
                new_len, flags, to = args[3] * PAGE, args[4], _WINDOW + args[5] * PAGE
                if flags & MREMAP_DONTUNMAP:
                    new_len = size  # it cannot resize
                fixed = flags & (MREMAP_FIXED | MREMAP_DONTUNMAP)
                got = mm.mremap(addr, size, new_len, flags, to if fixed else None).addr
                target = to if flags & MREMAP_FIXED else None
                events.append(Mremap(1, addr, size, new_len, flags, got, target))
        except (MprotectError, MremapError) as exc:
            # Failed after changing VMAs (Linux does not undo it): a trace
            # cannot show that, so such a program is not one to replay.
            assume(not getattr(exc, "changes", None) and not getattr(exc, "steps", None))
        except OSError:
            continue  # a failed call: strace's line is dropped, as the parser does
    return events, mm


@pytest.mark.parametrize("mode", ["native", "xen"])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_op, min_size=1, max_size=12))
async def test_random_traces_replay_to_the_programs_layout(
    mode: str, ops: list[tuple[Any, ...]]
) -> None:
    """Under ``preserve`` every call succeeds in the guest, the guest's VMAs
    end up exactly the program's, every populated page reads back what was
    written (verify(), including pages an mremap moved), and audit() is
    clean."""
    events, mm = record(ops)
    kernel, result = await replay(mode, *events)
    assert result.errors == 0, result.error_samples
    assert set(result.untracked) <= {"munmap"}  # Linux's munmap skips holes too
    assert [v[:3] for v in kernel.vmas()] == [(v.start, v.end, v.prot) for v in mm.vmas()]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_op, min_size=1, max_size=12))
async def test_random_traces_replay_consistently_when_compacted(ops: list[tuple[Any, ...]]) -> None:
    """Under ``compact`` the guest chooses other addresses, so a call may
    fail where the program's did not; still every populated page reads back
    what was written wherever the map followed it (verify() raises
    otherwise), audit() is clean, and with no error the guest maps as many
    bytes as the program, with the same protections."""
    events, mm = record(ops)
    kernel, result = await replay("native", *events, relocation="compact")

    def sizes(vmas: list[tuple[int, int, int]]) -> dict[int, int]:
        out: dict[int, int] = {}
        for start, end, prot in vmas:
            out[prot] = out.get(prot, 0) + end - start
        return out

    if result.errors == 0:
        assert sizes([v[:3] for v in kernel.vmas()]) == sizes(
            [(v.start, v.end, v.prot) for v in mm.vmas()]
        )
