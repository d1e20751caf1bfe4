"""A trace's populating calls replayed through the kernel's own paths:
MAP_POPULATE and MAP_LOCKED on mmap (``Kernel.mmap``), MADV_POPULATE_READ
and MADV_POPULATE_WRITE (``Kernel.madvise_populate``), mlock and munlock
(``Kernel.mlock``, ``Kernel.munlock``); the populated pages are resident, so
touch-on-grant leaves them alone and a later access takes no fault
(docs/traces.md, "How each syscall is reproduced").

The costs are docs/architecture.md's ("populate, mlock and MAP_FIXED"): a
populate of n missing pages in one PTE page costs, in ``trap`` and ``xen``,
n (one ``mmu_update`` per PTE), in ``batched`` 1 (one per PTE page), plus 2
per page-table page it builds. A fresh range at ``BASE`` builds 3 (the L3,
L2 and L1 tables under it): T = 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvemu.guest.kernel import Kernel
from pvemu.guest.replay import replay_trace
from pvemu.guest.replay_result import REPLAY_PHASES, TraceResult
from pvemu.guest.vma import AddressSpace
from pvemu.scripts.strace import parse_strace
from pvemu.shared.trace import (
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_POPULATE,
    PROT_READ,
    Event,
    Exec,
    Madvise,
    Mlock,
    Mmap,
    Mprotect,
    Munlock,
    Munmap,
    Trace,
    TraceError,
    load_trace,
    save_trace,
    trace_from_json,
)
from tests.test_trace import ANON, BASE, PAGE, PROT_NONE, RW, local_kernel, trace_of

MODES = ("trap", "xen", "batched")
#: Page-table pages a first populate at BASE builds.
TABLES = 3


def populate_traps(mode: str, n: int, tables: int = 0) -> int:
    """n missing pages of one PTE page populated, ``tables`` tables built."""
    return (1 if mode == "batched" else n) + 2 * tables


async def replay(mode: str, *events: Event, **policy: Any) -> tuple[Kernel, TraceResult]:
    kernel = await local_kernel(mode)
    result = await replay_trace(kernel, trace_of(*events), **policy)
    assert result.audit_clean, result.audit
    assert result.counts_agree
    assert result.replay_clean, result.error_samples
    return kernel, result


def traps(result: TraceResult, phase: str) -> int:
    return result.phases[phase].counts.traps


# --- MAP_POPULATE and MAP_LOCKED ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", [MAP_POPULATE, MAP_LOCKED, MAP_POPULATE | MAP_LOCKED])
@pytest.mark.parametrize("n", [4, 8])
async def test_a_populating_mmap_populates_in_the_mmap_phase_and_nothing_is_touched(
    mode: str, flag: int, n: int
) -> None:
    kernel, result = await replay(mode, Mmap(1, BASE, n * PAGE, RW, ANON | flag))
    assert traps(result, "mmap") == populate_traps(mode, n, TABLES)
    assert result.phases["mmap"].counts.page_faults == 0
    assert traps(result, "touch") == 0  # every page present: touch-on-grant skips them
    assert result.pages == 0
    assert result.peak_resident == n
    assert [v[:3] for v in kernel.vmas()] == [(BASE, BASE + n * PAGE, RW)]


@pytest.mark.parametrize("mode", MODES)
async def test_map_nonblock_keeps_map_populate_from_populating(mode: str) -> None:
    _, result = await replay(mode, Mmap(1, BASE, 4 * PAGE, RW, ANON | MAP_POPULATE | MAP_NONBLOCK))
    assert traps(result, "mmap") == 0
    assert result.pages == 4  # touch-on-grant populates instead
    assert result.phases["touch"].counts.page_faults == 4


@pytest.mark.parametrize("mode", MODES)
async def test_a_populated_read_only_mapping_reads_back_zeros(mode: str) -> None:
    kernel, result = await replay(mode, Mmap(1, BASE, 2 * PAGE, PROT_READ, ANON | MAP_POPULATE))
    assert traps(result, "mmap") == populate_traps(mode, 2, TABLES)
    assert result.pages == 0
    assert await kernel.read(BASE, 1) == b"\0"


# --- MADV_POPULATE_READ / MADV_POPULATE_WRITE --------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("advice", ["MADV_POPULATE_READ", "MADV_POPULATE_WRITE"])
async def test_madvise_populate_populates_in_the_madvise_phase(mode: str, advice: str) -> None:
    """A PROT_NONE reservation (nothing granted), made RW by mprotect with
    touch-on-grant off, then populated: the madvise phase builds the tables
    and installs the 6 pages; a replay touch afterwards would fault on none."""
    kernel, result = await replay(
        mode,
        Mmap(1, BASE, 8 * PAGE, PROT_NONE, ANON),
        Mprotect(1, BASE, 8 * PAGE, RW),
        Madvise(1, BASE + PAGE, 6 * PAGE, advice),
        touch_limit=0,
    )
    assert traps(result, "madvise") == populate_traps(mode, 6, TABLES)
    assert result.phases["madvise"].counts.page_faults == 0
    assert result.pages == 0
    assert result.peak_resident == 6
    assert kernel.counters.populated == 6


@pytest.mark.parametrize("mode", MODES)
async def test_populated_pages_take_no_fault_when_touch_on_grant_reaches_them(mode: str) -> None:
    """8 pages touched, 4 dropped, 2 of those populated again; a PROT_NONE
    round trip then grants the range: touch-on-grant touches only the 2
    pages nothing populated (2 faults), the populated ones are resident."""
    _, result = await replay(
        mode,
        Mmap(1, BASE, 8 * PAGE, RW, ANON),
        Madvise(1, BASE, 4 * PAGE, "MADV_DONTNEED"),
        Madvise(1, BASE, 2 * PAGE, "MADV_POPULATE_WRITE"),
        Mprotect(1, BASE, 8 * PAGE, PROT_NONE),
        Mprotect(1, BASE, 8 * PAGE, RW),
        touch_limit=8,
    )
    assert result.pages == 8 + 2
    assert result.phases["madvise"].counts.page_faults == 0
    assert result.phases["touch"].counts.page_faults == 8 + 2
    assert result.peak_resident == 8


@pytest.mark.parametrize("mode", MODES)
async def test_madvise_populate_write_after_touches_costs_only_the_missing_pages(
    mode: str,
) -> None:
    """touch-on-grant populated 2 of 8 pages (written): MADV_POPULATE_WRITE
    installs the other 6 in the same PTE page (no table built), and the 2
    written bytes read back (verify)."""
    _, result = await replay(
        mode,
        Mmap(1, BASE, 8 * PAGE, RW, ANON),
        Madvise(1, BASE, 8 * PAGE, "MADV_POPULATE_WRITE"),
        touch_limit=2,
    )
    assert result.pages == 2
    assert traps(result, "madvise") == populate_traps(mode, 6)
    assert result.peak_resident == 8


# --- mlock and munlock ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_mlock_populates_in_the_mlock_phase_and_munlock_costs_nothing(mode: str) -> None:
    kernel, result = await replay(
        mode,
        Mmap(1, BASE, 8 * PAGE, RW, ANON),
        Mlock(1, BASE + 2 * PAGE + 5, 3 * PAGE),  # rounded down: pages 2..5
        Munlock(1, BASE, 8 * PAGE),
        touch_limit=0,
    )
    assert traps(result, "mlock") == populate_traps(mode, 4, TABLES)
    assert result.phases["mlock"].counts.page_faults == 0
    assert result.replayed["mlock"] == result.replayed["munlock"] == 1
    assert result.peak_resident == 4
    assert [v[:3] for v in kernel.vmas()] == [(BASE, BASE + 8 * PAGE, RW)]  # merged again


@pytest.mark.parametrize("mode", MODES)
async def test_mlock_of_a_populated_range_costs_nothing(mode: str) -> None:
    _, result = await replay(
        mode,
        Mmap(1, BASE, 4 * PAGE, RW, ANON | MAP_POPULATE),
        Mlock(1, BASE, 4 * PAGE),
    )
    assert traps(result, "mmap") == populate_traps(mode, 4, TABLES)
    assert traps(result, "mlock") == 0
    assert traps(result, "touch") == 0


async def test_mlock_of_memory_the_trace_never_mapped_is_untracked() -> None:
    _, result = await replay("xen", Mlock(1, BASE, PAGE), Munlock(1, BASE, PAGE))
    assert result.untracked == {"mlock": 1, "munlock": 1}
    assert traps(result, "mlock") == 0


async def test_the_mlock_phase_is_reported_before_touch() -> None:
    _, result = await replay("xen", Mmap(1, BASE, PAGE, RW, ANON))
    assert list(result.phases) == list(REPLAY_PHASES)
    assert REPLAY_PHASES.index("mlock") == REPLAY_PHASES.index("touch") - 1


# --- recording and the format -----------------------------------------------------------

STRACE = """\
execve("/usr/bin/prog", ["prog"], 0x7ffd3b1c2e80 /* 30 vars */) = 0
mmap(NULL, 65536, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_POPULATE, -1, 0) \
= 0x7f1234560000
madvise(0x7f1234560000, 8192, MADV_POPULATE_WRITE) = 0
madvise(0x7f1234562000, 8192, MADV_POPULATE_READ) = 0
madvise(0x7f1234562000, 8192, MADV_WILLNEED) = 0
mlock(0x7f1234564010, 4096)             = 0
mlock2(0x7f1234566000, 4096, 0)         = 0
mlock2(0x7f1234567000, 4096, MLOCK_ONFAULT) = 0
munlock(0x7f1234564000, 8192)           = 0
mlock(0x7f1234568000, 4096)             = -1 ENOMEM (Cannot allocate memory)
"""


def test_the_parser_keeps_populating_madvise_mlock_and_munlock() -> None:
    trace = parse_strace(STRACE)
    base = 0x7F1234560000
    assert trace.events == [
        Exec(1, "/usr/bin/prog"),
        Mmap(1, base, 65536, RW, ANON | MAP_POPULATE),
        Madvise(1, base, 8192, "MADV_POPULATE_WRITE"),
        Madvise(1, base + 0x2000, 8192, "MADV_POPULATE_READ"),
        Mlock(1, base + 0x4010, 4096),
        Mlock(1, base + 0x6000, 4096),
        Munlock(1, base + 0x4000, 8192),
    ]
    assert trace.stats["ignored_madvise"] == 1
    assert trace.stats["ignored_mlock2_onfault"] == 1
    assert trace.stats["failed"] == 1
    assert trace.counts()["mlock"] == 2
    assert trace.counts()["munlock"] == 1


def test_the_new_events_round_trip_through_a_file(tmp_path: Path) -> None:
    trace = parse_strace(STRACE, command=["prog"])
    path = tmp_path / "t.json"
    save_trace(trace, path)
    assert load_trace(path).events == trace.events
    text = path.read_text()
    assert '{"op":"mlock","pid":1,"addr":"0x7f1234564010","length":4096}' in text
    assert '"advice":"MADV_POPULATE_WRITE"' in text


@pytest.mark.parametrize("schema", [1, 2])
def test_older_traces_without_the_new_ops_still_load(schema: int) -> None:
    doc = {
        "schema": schema,
        "command": [],
        "recorded_with": "",
        "events": [
            {"op": "madvise", "pid": 1, "addr": "0x1000", "length": 4096, "advice": "MADV_DONTNEED"}
        ],
    }
    assert trace_from_json(doc).counts()["madvise"] == 1


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (
            {"op": "madvise", "pid": 1, "addr": "0x1000", "length": 1, "advice": "MADV_WILLNEED"},
            "neither a discard nor a populate",
        ),
        ({"op": "mlock", "pid": 1, "addr": "0x1000"}, "missing"),
        ({"op": "munlock", "pid": 1, "addr": "0x1000", "length": -1}, "negative"),
        ({"op": "mlock", "pid": 1, "addr": "0x1000", "length": 1, "flags": 1}, "unknown fields"),
    ],
)
def test_malformed_new_events_raise(event: dict[str, Any], message: str) -> None:
    doc = {"schema": 2, "command": [], "recorded_with": "", "events": [event]}
    with pytest.raises(TraceError, match=message):
        trace_from_json(doc)


@pytest.mark.parametrize("mode", MODES)
async def test_a_parsed_trace_replays_its_populates_through_the_kernel(mode: str) -> None:
    """The strace text above, replayed: the MAP_POPULATE mmap populates all
    16 pages (one PTE page, 3 tables), so the populate advice and the mlocks
    find every page present (no cost) and nothing is touched."""
    trace = parse_strace(STRACE, command=["prog"])
    kernel = await local_kernel(mode)
    result = await replay_trace(kernel, trace)
    assert result.replay_clean, result.error_samples
    assert result.audit_clean
    assert traps(result, "mmap") == populate_traps(mode, 16, TABLES)
    assert traps(result, "madvise") == traps(result, "mlock") == traps(result, "touch") == 0
    assert result.pages == 0
    assert result.replayed["mlock"] == 2
    assert isinstance(trace, Trace)


# --- random traces from a reference address space ------------------------------------------

_SLOTS = 48  # pages of the window the random calls act in (crosses a PTE page)
_WINDOW = BASE + (1 << 21) - 16 * PAGE
_n = st.integers(0, _SLOTS - 1)
_len = st.integers(1, 8)
_flags = st.sampled_from([0, MAP_POPULATE, MAP_LOCKED, MAP_POPULATE | MAP_NONBLOCK])
_op = st.one_of(
    st.tuples(st.just("mmap"), _n, _len, st.sampled_from([PROT_NONE, PROT_READ, RW]), _flags),
    st.tuples(st.just("munmap"), _n, _len),
    st.tuples(st.just("mprotect"), _n, _len, st.sampled_from([PROT_NONE, PROT_READ, RW])),
    st.tuples(
        st.just("madvise"),
        _n,
        _len,
        st.sampled_from(["MADV_DONTNEED", "MADV_POPULATE_READ", "MADV_POPULATE_WRITE"]),
    ),
    st.tuples(st.just("mlock"), _n, _len),
    st.tuples(st.just("munlock"), _n, _len),
)


def _covered(mm: AddressSpace, addr: int, size: int, *, accessible: bool) -> bool:
    """Whether VMAs cover ``[addr, addr + size)`` without a hole (and, if
    ``accessible``, none of them PROT_NONE)."""
    at = addr
    for v in mm.vmas():
        if v.end <= at or v.start >= addr + size:
            continue
        if v.start > at or (accessible and not v.prot):
            return False
        at = v.end
    return at >= addr + size


def record(ops: list[tuple[Any, ...]]) -> tuple[list[Event], AddressSpace]:
    """The trace a program making ``ops`` in the window would leave: only
    calls that succeed in a Linux address space without a partial effect
    (the reference ``AddressSpace``), as strace shows successful calls."""
    mm = AddressSpace()
    events: list[Event] = []
    for op, slot, length, *rest in ops:
        addr, size = _WINDOW + slot * PAGE, length * PAGE
        if op == "mmap":
            prot, flags = rest
            got = mm.do_mmap(size, prot, ANON | flags, addr=addr).addr
            events.append(Mmap(1, got, size, prot, ANON | flags, addr))
        elif op == "munmap":
            mm.munmap(addr, size)
            events.append(Munmap(1, addr, size))
        elif not _covered(mm, addr, size, accessible=op in ("mlock", "madvise")):
            continue  # it would fail (ENOMEM) after a partial effect, or skip a hole
        elif op == "mprotect":
            mm.mprotect(addr, size, rest[0])
            events.append(Mprotect(1, addr, size, rest[0]))
        elif op == "madvise":
            advice = rest[0]
            if advice == "MADV_DONTNEED":
                if any(v.locked for v in mm.vmas() if v.end > addr and v.start < addr + size):
                    continue  # EINVAL on locked memory
                mm.madvise_dontneed(addr, size).raise_if_error()
            else:
                write = advice == "MADV_POPULATE_WRITE"
                mm.madvise_populate(addr, size, write=write).raise_if_error()
            events.append(Madvise(1, addr, size, advice))
        else:
            mm.mlock(addr, size, lock=op == "mlock").raise_if_error()
            events.append((Mlock if op == "mlock" else Munlock)(1, addr, size))
    return events, mm


@pytest.mark.parametrize("mode", ["xen", "batched"])
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=st.lists(_op, min_size=1, max_size=12))
async def test_random_populating_traces_replay_cleanly(
    mode: str, ops: list[tuple[Any, ...]]
) -> None:
    """Every call succeeds in the guest as it did for the program, the
    guest's VMAs end up the program's, every page the replay counts as
    resident reads back what it holds (verify()), and audit() is clean
    (``replay`` checks the last two)."""
    events, mm = record(ops)
    kernel, result = await replay(mode, *events)
    assert result.errors == 0
    assert [v[:3] for v in kernel.vmas()] == [(v.start, v.end, v.prot) for v in mm.vmas()]
    assert result.phases["touch"].counts.page_faults == result.pages


# --- more than the guest's frames -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "populate",
    [
        [Mmap(1, BASE, 8192 * PAGE, RW, ANON | MAP_POPULATE)],
        [Mmap(1, BASE, 8192 * PAGE, RW, ANON), Mlock(1, BASE, 8192 * PAGE)],
        [Mmap(1, BASE, 8192 * PAGE, RW, ANON), Madvise(1, BASE, 8192 * PAGE, "MADV_POPULATE_READ")],
    ],
    ids=["map_populate", "mlock", "madvise"],
)
async def test_a_populate_larger_than_the_guest_is_an_error_not_a_crash(
    mode: str, populate: list[Event]
) -> None:
    """32 MiB populated in an 18 MiB guest: refused up front (ENOMEM, one
    error; the guest kernel cannot recover from running out of frames in a
    populate), the mapping made, population stopped, audit clean."""
    kernel = await local_kernel(mode)
    result = await replay_trace(kernel, trace_of(*populate))
    assert result.errors == 1
    assert result.error_samples[0]["errno"] == "ENOMEM"
    assert result.audit_clean, result.audit
    assert result.counts_agree
    assert [v[:3] for v in kernel.vmas()] == [(BASE, BASE + 8192 * PAGE, RW)]
    assert result.peak_resident <= 64  # at most the first grant (mlock, madvise)
