"""``pvemu trace``: the strace parser, the trace format, relocation, the
population policy, and replays of the shipped traces (docs/traces.md)."""

from __future__ import annotations

import argparse
import errno
import json
import mmap as mman
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvemu.guest.kernel import Kernel, boot, kernel_for
from pvemu.guest.replay import replay_trace, run_trace_workload
from pvemu.guest.replay_result import TraceResult
from pvemu.hypervisor import Hypervisor
from pvemu.scripts import trace_cmd
from pvemu.scripts.errors import EXIT_USAGE, UserError
from pvemu.scripts.strace import parse_strace
from pvemu.shared.addrmap import AddressMap, Run
from pvemu.shared.trace import (
    MAP_ANONYMOUS,
    MAP_FIXED,
    MAP_PRIVATE,
    MAP_SHARED,
    MAP_STACK,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    Brk,
    Exec,
    Madvise,
    Mmap,
    Mprotect,
    Mremap,
    Munmap,
    Trace,
    TraceError,
    dump_trace,
    format_map_flags,
    format_prot,
    load_trace,
    parse_symbols,
    save_trace,
    trace_from_json,
)
from pvemu.shared.trace import MAP_NAMES as TRACE_MAP_NAMES
from tests.loopback import loopback_domain

TRACES = Path(__file__).resolve().parent.parent / "benchmarks" / "traces"
SHIPPED = sorted(TRACES.glob("*.json"))
PAGE = 4096
PROT_NONE = 0
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS
#: 2 MiB aligned, far from anything the guest maps by itself.
BASE = 0x5000_0000_0000


def trace_of(*events: Any) -> Trace:
    """A schema-1 trace: one address space, replayed in process 1."""
    return Trace(["test"], "hand-written", list(events), schema=1)


async def native_kernel() -> Kernel:
    async with boot(mode="native", memory_mib=18) as kernel:
        return kernel  # the native machine lives on after the context exits


async def local_kernel(mode: str, memory_mib: int = 18) -> Kernel:
    hv = Hypervisor(memory_mib + 8)
    domain = await loopback_domain(hv, memory_mib=memory_mib, vcpus=2)
    return kernel_for(domain, mode)


def vma_at(kernel: Kernel, addr: int) -> tuple[int, int, int, int] | None:
    return next((v for v in kernel.vmas() if v[0] <= addr < v[1]), None)


# --- the strace parser ------------------------------------------------------------

BASIC = """\
execve("/usr/bin/prog", ["prog"], 0x7ffd3b1c2e80 /* 30 vars */) = 0
brk(NULL)                               = 0x55d4c1a2b000
mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f1234567000
mmap(NULL, 34547, PROT_READ, MAP_PRIVATE, 3</etc/ld.so.cache>, 0) = 0x7f123455e000
mmap(0x7f1234400000, 1400832, PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_FIXED|MAP_DENYWRITE, \
3</usr/lib/libc.so.6>, 0x26000) = 0x7f1234400000
mprotect(0x7f1234567000, 4096, PROT_NONE) = 0
munmap(0x7f123455e000, 34547)           = 0
brk(0x55d4c1a4c000)                     = 0x55d4c1a4c000
mremap(0x7f1234567000, 8192, 16384, MREMAP_MAYMOVE) = 0x7f1234100000
mremap(0x7f1234100000, 16384, 8192, MREMAP_MAYMOVE|MREMAP_FIXED, 0x7f1234200000) = 0x7f1234200000
madvise(0x7f1234200000, 8192, MADV_DONTNEED) = 0
madvise(0x7f1234200000, 8192, MADV_DONTFORK) = 0
"""


def test_parse_basic_calls() -> None:
    trace = parse_strace(BASIC, command=["prog"], recorded_with="strace 6.1")
    assert trace.command == ["prog"]
    assert trace.events == [
        Exec(1, "/usr/bin/prog"),
        Brk(1, 0x55D4C1A2B000, None),
        Mmap(1, 0x7F1234567000, 8192, RW, ANON),
        Mmap(1, 0x7F123455E000, 34547, PROT_READ, MAP_PRIVATE, None, 3, "/etc/ld.so.cache", 0),
        Mmap(
            1,
            0x7F1234400000,
            1400832,
            PROT_READ | PROT_EXEC,
            MAP_PRIVATE | MAP_FIXED | 0x800,
            0x7F1234400000,
            3,
            "/usr/lib/libc.so.6",
            0x26000,
        ),
        Mprotect(1, 0x7F1234567000, 4096, 0),
        Munmap(1, 0x7F123455E000, 34547),
        Brk(1, 0x55D4C1A4C000, 0x55D4C1A4C000),
        Mremap(1, 0x7F1234567000, 8192, 16384, 1, 0x7F1234100000),
        Mremap(1, 0x7F1234100000, 16384, 8192, 3, 0x7F1234200000, 0x7F1234200000),
        Madvise(1, 0x7F1234200000, 8192, "MADV_DONTNEED"),
    ]
    assert trace.stats["ignored_madvise"] == 1
    assert trace.counts()["mmap"] == 3


def test_unfinished_and_resumed_calls_are_joined_per_pid() -> None:
    text = """\
100   mprotect(0x7f0000000000, 262144, PROT_READ|PROT_WRITE <unfinished ...>
101   mmap(NULL, 134217728, PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE, -1, 0 \
<unfinished ...>
100   <... mprotect resumed>)           = 0
101   <... mmap resumed>)               = 0x7e0000000000
102   <... munmap resumed>)             = 0
"""
    trace = parse_strace(text)
    # No process lines: every task is a thread of process 1.
    assert trace.events == [
        Mprotect(1, 0x7F0000000000, 262144, RW),
        Mmap(1, 0x7E0000000000, 134217728, 0, ANON | 0x4000),
    ]
    assert trace.stats["unfinished"] == 2
    assert trace.stats["orphan_resumed"] == 1


def test_bracket_pids_timestamps_and_durations() -> None:
    text = """\
17:09:01.123456 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = \
0x7f0000001000 <0.000012>
[pid  4242] 1700000000.123456 munmap(0x7f0000001000, 4096) = 0 <0.000003>
"""
    trace = parse_strace(text)
    assert trace.events == [
        Mmap(1, 0x7F0000001000, 4096, PROT_READ, ANON),
        Munmap(1, 0x7F0000001000, 4096),
    ]


def test_failures_and_unknown_lines_are_counted_and_skipped() -> None:
    text = """\
mmap(NULL, 1099511627776, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = -1 ENOMEM \
(Cannot allocate memory)
mprotect(0x1000, 4096, PROT_READ) = -1 EINVAL (Invalid argument)
this is not strace output
--- SIGSEGV {si_signo=SIGSEGV, si_code=SEGV_MAPERR, si_addr=NULL} ---
+++ exited with 0 +++
munmap(0x7f0000000000, 4096) = ? <unavailable>
mlockall(MCL_CURRENT) = 0
mmap(NULL, 4096, PROT_READ|0x8 /* PROT_??? */, MAP_PRIVATE|MAP_ANONYMOUS|MAP_WEIRD, -1, 0) \
= 0x7f0000000000
"""
    trace = parse_strace(text)
    assert trace.stats["failed"] == 2
    assert trace.stats["unknown_lines"] == 1
    assert trace.stats["no_result"] == 1  # '= ? <unavailable>'
    assert trace.stats["signal_or_exit_lines"] == 2
    assert trace.stats["ignored_mlockall"] == 1
    assert trace.stats["unknown_flag_names"] == 1
    assert trace.events == [Mmap(1, 0x7F0000000000, 4096, PROT_READ | 0x8, ANON)]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("PROT_NONE", 0),
        ("PROT_READ|PROT_WRITE|PROT_EXEC", 7),
        ("PROT_READ|0x10", 0x11),
        ("PROT_READ|0x8 /* PROT_??? */", 0x9),
    ],
)
def test_prot_symbols(text: str, value: int) -> None:
    from pvemu.shared.trace import PROT_NAMES

    assert parse_symbols(text, PROT_NAMES) == value


def test_unknown_symbol_is_an_error_in_a_trace_file() -> None:
    from pvemu.shared.trace import PROT_NAMES

    with pytest.raises(TraceError, match="PROT_BOGUS"):
        parse_symbols("PROT_READ|PROT_BOGUS", PROT_NAMES)


@given(
    st.sampled_from([MAP_SHARED, MAP_PRIVATE, 3]),
    st.sets(st.sampled_from(sorted(TRACE_MAP_NAMES.values()))),
    st.sampled_from([0, 16, 21, 30]),
)
def test_map_flags_round_trip(mtype: int, bits: set[int], huge: int) -> None:
    from pvemu.shared.trace import ALL_MAP_NAMES as _ALL_MAP_NAMES

    flags = mtype | sum(bits) | (huge << 26)
    assert parse_symbols(format_map_flags(flags), _ALL_MAP_NAMES) == flags


@given(st.integers(min_value=0, max_value=(1 << 26) - 1))
def test_prot_round_trip(prot: int) -> None:
    from pvemu.shared.trace import PROT_NAMES

    assert parse_symbols(format_prot(prot), PROT_NAMES) == prot


# --- the format --------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    trace = parse_strace(BASIC, command=["prog", "-x"], recorded_with="strace 6.1 -f")
    path = tmp_path / "t.json"
    save_trace(trace, path)
    loaded = load_trace(path)
    assert loaded == trace
    doc = json.loads(path.read_text())
    assert doc["schema"] == 2
    assert doc["command"] == ["prog", "-x"]
    assert doc["recorded_with"] == "strace 6.1 -f"
    first_mmap = doc["events"][2]
    assert first_mmap == {
        "op": "mmap",
        "pid": 1,
        "addr": "0x7f1234567000",
        "length": 8192,
        "prot": "PROT_READ|PROT_WRITE",
        "flags": "MAP_PRIVATE|MAP_ANONYMOUS",
    }
    assert len(path.read_text().splitlines()) == len(trace.events) + 2  # one event a line


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"schema": 3, "command": [], "recorded_with": "", "events": []}, "schema"),
        ({"schema": True, "command": [], "recorded_with": "", "events": []}, "schema"),
        ({"schema": 1, "command": "ls", "recorded_with": "", "events": []}, "command"),
        ({"schema": 1, "command": [], "recorded_with": "", "events": [{"op": "clone"}]}, "op"),
        (
            {"schema": 1, "command": [], "recorded_with": "", "events": [{"op": "munmap"}]},
            "missing",
        ),
        (
            {
                "schema": 1,
                "command": [],
                "recorded_with": "",
                "events": [{"op": "munmap", "pid": 1, "addr": "0x1001", "length": 4096}],
            },
            "not page aligned",
        ),
        (
            {
                "schema": 1,
                "command": [],
                "recorded_with": "",
                "events": [
                    {"op": "mprotect", "pid": 1, "addr": "0x1000", "length": 1, "prot": "RW"}
                ],
            },
            "unknown flag",
        ),
        (
            {
                "schema": 1,
                "command": [],
                "recorded_with": "",
                "events": [{"op": "exec", "pid": 1, "path": "/x", "extra": 1}],
            },
            "unknown fields",
        ),
    ],
)
def test_malformed_traces_raise(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(TraceError, match=message):
        trace_from_json(doc)


def test_load_rejects_non_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(TraceError, match="not JSON"):
        load_trace(path)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_traces_are_small_valid_and_say_how_they_were_recorded(path: Path) -> None:
    assert path.stat().st_size < 200_000
    trace = load_trace(path)
    assert trace.command
    assert trace.recorded_with.startswith("strace")
    assert isinstance(trace.events[0], Exec)
    counts = trace.counts()
    assert counts["mmap"] > 10
    assert counts["mprotect"] > 0
    assert dump_trace(trace) == path.read_text()  # files are canonical


def test_the_traces_are_shipped() -> None:
    assert {p.stem for p in SHIPPED} >= {
        "node-alloc",
        "python-json",
        "java-version",
        "sh-fork-vfork",
    }
    assert (TRACES / "README.md").is_file()


# --- the address map ----------------------------------------------------------------------


def test_address_map_translates_splits_and_merges() -> None:
    m = AddressMap()
    m.insert(0x10000, 0x14000, 0x900000)
    m.insert(0x14000, 0x16000, 0x904000)  # contiguous in the guest too
    m.insert(0x20000, 0x22000, 0x700000)
    assert m.translate(0x11234) == 0x901234
    assert m.translate(0x18000) is None
    runs, uncovered = m.runs(0x12000, 0x21000)
    assert runs == [Run(0x902000, 0x906000), Run(0x700000, 0x701000)]
    assert uncovered == 0xA000
    m.remove(0x11000, 0x15000)
    assert [(s.start, s.end, s.guest) for s in m.segments()] == [
        (0x10000, 0x11000, 0x900000),
        (0x15000, 0x16000, 0x905000),
        (0x20000, 0x22000, 0x700000),
    ]
    with pytest.raises(ValueError, match="overlaps"):
        m.insert(0x21000, 0x23000, 0)
    m.remove(0, 1 << 47)
    assert len(m) == 0


def test_address_map_keeps_stack_runs_apart() -> None:
    m = AddressMap()
    m.insert(0x10000, 0x12000, 0x10000)
    m.insert(0x12000, 0x14000, 0x12000, stack=True)
    runs, _ = m.runs(0x10000, 0x14000)
    assert runs == [Run(0x10000, 0x12000), Run(0x12000, 0x14000, stack=True)]


# --- relocation and population in replay (native: fast, no hypervisor) --------------------


async def test_preserve_keeps_original_addresses() -> None:
    kernel = await native_kernel()
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mprotect(1, BASE + PAGE, PAGE, PROT_READ),
    )
    result = await replay_trace(kernel, trace)
    assert result.relocated == 0
    assert [v[:3] for v in kernel.vmas()] == [
        (BASE, BASE + PAGE, RW),
        (BASE + PAGE, BASE + 2 * PAGE, PROT_READ),
        (BASE + 2 * PAGE, BASE + 4 * PAGE, RW),
    ]
    assert result.pages == 4
    assert result.audit_clean
    assert result.replay_clean


async def test_occupied_address_is_relocated_and_later_calls_translated() -> None:
    kernel = await native_kernel()
    await kernel.mmap(PAGE, PROT_READ, ANON, addr=BASE)  # squat the program's address
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mprotect(1, BASE, 2 * PAGE, PROT_READ),
        Munmap(1, BASE + 3 * PAGE, PAGE),
    )
    result = await replay_trace(kernel, trace)
    assert result.relocated == 1
    moved = [v for v in kernel.vmas() if v[0] != BASE]
    guest = moved[0][0]
    assert [v[:3] for v in moved] == [
        (guest, guest + 2 * PAGE, PROT_READ),
        (guest + 2 * PAGE, guest + 3 * PAGE, RW),
    ]
    assert vma_at(kernel, BASE) == (BASE, BASE + PAGE, PROT_READ, ANON)  # untouched
    assert result.replay_clean


async def test_range_crossing_separately_placed_regions_is_split() -> None:
    kernel = await native_kernel()
    await kernel.mmap(PAGE, PROT_READ, ANON, addr=BASE + 2 * PAGE)  # B's address is taken
    trace = trace_of(
        Mmap(1, BASE, 2 * PAGE, RW, ANON),  # A: stays
        Mmap(1, BASE + 2 * PAGE, 2 * PAGE, RW, ANON),  # B: relocated
        Mprotect(1, BASE + PAGE, 2 * PAGE, PROT_NONE),  # last page of A, first of B
    )
    result = await replay_trace(kernel, trace)
    assert result.relocated == 1
    a = vma_at(kernel, BASE + PAGE)
    assert a is not None
    assert a[2] == PROT_NONE
    b = next(v for v in kernel.vmas() if v[0] not in range(BASE, BASE + 4 * PAGE))
    assert b[2] == PROT_NONE
    assert b[1] - b[0] == PAGE
    assert result.replay_clean
    assert result.audit_clean


async def test_compact_places_neighbours_next_to_each_other() -> None:
    kernel = await native_kernel()
    trace = trace_of(
        Mmap(1, BASE, 2 * PAGE, RW, ANON),
        Mmap(1, BASE + 2 * PAGE, 2 * PAGE, RW, ANON),  # the original's right neighbour
        Mprotect(1, BASE + PAGE, 2 * PAGE, PROT_NONE),  # crosses both: one guest call
    )
    result = await replay_trace(kernel, trace, relocation="compact")
    assert result.relocated == 2
    (a, mid, b) = kernel.vmas()
    assert (mid[1] - mid[0], mid[2]) == (2 * PAGE, PROT_NONE)
    assert a[1] == mid[0]
    assert mid[1] == b[0]
    assert result.replay_clean


async def test_map_fixed_inside_a_relocated_reservation_follows_it() -> None:
    kernel = await native_kernel()
    await kernel.mmap(PAGE, PROT_READ, ANON, addr=BASE)
    trace = trace_of(
        Mmap(1, BASE, 16 * PAGE, 0, ANON | 0x4000),  # reservation, PROT_NONE
        Mmap(1, BASE + 4 * PAGE, 2 * PAGE, RW, ANON | MAP_FIXED, BASE + 4 * PAGE),
    )
    result = await replay_trace(kernel, trace)
    assert result.relocated == 1
    reservation = next(v for v in kernel.vmas() if v[0] != BASE)[0]
    assert vma_at(kernel, reservation + 4 * PAGE) == (
        reservation + 4 * PAGE,
        reservation + 6 * PAGE,
        RW,
        ANON,
    )
    assert result.pages == 2
    assert result.replay_clean


@pytest.mark.parametrize("mode", ["xen", "batched"])
async def test_map_fixed_over_own_pages_is_the_kernels_one_call(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ld.so's MAP_FIXED over its own reservation is one ``Kernel.mmap``, as
    in Linux (no separate munmap): the zap of the 4 touched PTEs (xen: a
    ptwr trap each; batched: one exchange) and one local flush are charged
    to the mmap phase, the old bytes are gone and the new pages are touched
    afresh."""
    kernel = await local_kernel(mode)
    munmaps = 0
    real_munmap = kernel.munmap

    async def counting_munmap(*args: Any, **kwargs: Any) -> Any:
        nonlocal munmaps
        munmaps += 1
        return await real_munmap(*args, **kwargs)

    monkeypatch.setattr(kernel, "munmap", counting_munmap)
    first = trace_of(Mmap(1, BASE, 8 * PAGE, RW, ANON))
    before = (await replay_trace(kernel, first)).phases["mmap"].counts
    trace = trace_of(
        Mmap(1, BASE, 8 * PAGE, RW, ANON),
        Mmap(1, BASE + 2 * PAGE, 4 * PAGE, RW, ANON | MAP_FIXED, BASE + 2 * PAGE),
    )
    kernel = await local_kernel(mode)
    real_munmap = kernel.munmap
    monkeypatch.setattr(kernel, "munmap", counting_munmap)
    result = await replay_trace(kernel, trace)
    assert munmaps == 0
    mmap = result.phases["mmap"].counts
    zap = {"xen": 4, "batched": 1}[mode]
    assert (mmap.traps - before.traps, mmap.ptwr - before.ptwr) == (
        zap + 1,
        4 if mode == "xen" else 0,
    )
    assert result.pages == 8 + 4
    assert result.replay_clean, result.error_samples
    assert result.audit_clean, result.audit


async def test_grant_from_prot_none_populates_and_stack_from_the_top() -> None:
    kernel = await native_kernel()
    trace = trace_of(
        Mmap(1, BASE, 8 * PAGE, 0, ANON | MAP_STACK),
        Mprotect(1, BASE + PAGE, 7 * PAGE, RW),  # guard page stays PROT_NONE
        Mprotect(1, BASE + PAGE, 7 * PAGE, PROT_READ),  # not a grant: no touch
    )
    result = await replay_trace(kernel, trace, touch_limit=3)
    assert result.pages == 3
    assert result.phases["touch"].counts["page_faults"] == 3
    assert await kernel.read(BASE + 7 * PAGE, 1) != b"\0"  # the top: touched
    assert await kernel.read(BASE + 2 * PAGE, 1) == b"\0"  # never touched: a zero page
    assert result.replay_clean


async def test_touch_limits() -> None:
    kernel = await native_kernel()
    trace = trace_of(
        Mmap(1, BASE, 64 * PAGE, RW, ANON), Mmap(1, BASE + (1 << 21), 64 * PAGE, RW, ANON)
    )
    result = await replay_trace(kernel, trace, touch_limit=40, max_resident=50)
    assert result.pages == 50
    assert result.peak_resident == 50
    assert result.budget_exhausted == 0
    result = await replay_trace(await native_kernel(), trace, touch_limit=0)
    assert result.pages == 0


async def test_brk_grows_and_shrinks_the_heap() -> None:
    kernel = await native_kernel()
    heap = BASE + 0x1000
    trace = trace_of(
        Brk(1, heap),
        Brk(1, heap + 0x21000, heap + 0x21000),
        Brk(1, heap + 0x42000, heap + 0x42000),
        Brk(1, heap + 0x30000, heap + 0x30000),  # shrink
        Brk(1, heap + 0x30000, heap + 0x99999000),  # failed: returns the old break
    )
    result = await replay_trace(kernel, trace)
    assert [v[:3] for v in kernel.vmas()] == [(heap, heap + 0x30000, RW)]
    assert result.pages == 2 * 0x21000 // PAGE  # both growths, touched in full
    assert result.replay_clean
    assert result.phases["brk"].wall_s > 0


async def test_mremap_move_takes_the_populated_pages_along_and_unmaps_the_old_range() -> None:
    kernel = await native_kernel()
    new = BASE + (1 << 30)
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mremap(1, BASE, 4 * PAGE, 8 * PAGE, 1, new),
        Mremap(1, new, 8 * PAGE, 2 * PAGE, 1, new),  # shrink in place
        Mremap(1, new, 2 * PAGE, 6 * PAGE, 1, new),  # grow in place
    )
    result = await replay_trace(kernel, trace)  # verify() reads the moved bytes back
    assert vma_at(kernel, BASE) is None
    assert [v[:3] for v in kernel.vmas()] == [(new, new + 6 * PAGE, RW)]
    # 4 first touches, 4 granted by the move, 4 by the in-place growth: the
    # move itself populates nothing (the PTEs move with their frames)
    assert result.pages == 12
    assert result.phases["mremap"].counts["page_faults"] == 0
    assert result.replay_clean


@pytest.mark.parametrize("prot", [PROT_READ, PROT_NONE])
async def test_mremap_move_of_memory_that_cannot_be_written(prot: int) -> None:
    kernel = await native_kernel()
    new = BASE + (1 << 30)
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Mprotect(1, BASE, 4 * PAGE, prot),
        Mremap(1, BASE, 4 * PAGE, 4 * PAGE, 3, new, new),  # MAYMOVE|FIXED
    )
    result = await replay_trace(kernel, trace)
    assert result.replay_clean, result.error_samples
    assert [v[:3] for v in kernel.vmas()] == [(new, new + 4 * PAGE, prot)]
    assert result.pages == 4  # nothing copied or read in: the PTEs moved
    if prot:
        assert await kernel.read(new, 1) != b"\0"  # the byte written before the move


async def test_madvise_dontneed_drops_pages() -> None:
    kernel = await native_kernel()
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Madvise(1, BASE, 4 * PAGE, "MADV_DONTNEED"),
        Mprotect(1, BASE, 4 * PAGE, 0),
        Mprotect(1, BASE, 4 * PAGE, RW),  # a grant again: the pages are gone
    )
    result = await replay_trace(kernel, trace)
    assert result.pages == 8
    assert result.phases["touch"].counts["page_faults"] == 8
    assert [v[:3] for v in kernel.vmas()] == [(BASE, BASE + 4 * PAGE, RW)]


async def test_exec_starts_an_empty_address_space() -> None:
    kernel = await native_kernel()
    trace = trace_of(
        Mmap(1, BASE, 4 * PAGE, RW, ANON),
        Exec(1, "/bin/next"),
        Mmap(1, BASE, 2 * PAGE, PROT_READ, ANON),
    )
    result = await replay_trace(kernel, trace)
    assert result.relocated == 0
    assert [v[:3] for v in kernel.vmas()] == [(BASE, BASE + 2 * PAGE, PROT_READ)]


async def test_shared_file_mapping_uses_a_scratch_file() -> None:
    kernel = await native_kernel()
    trace = trace_of(Mmap(1, BASE, 2 * PAGE, RW, MAP_SHARED, None, 3, "/no/such/file", 0))
    result = await replay_trace(kernel, trace)
    assert result.replay_clean
    vma = vma_at(kernel, BASE)
    assert vma is not None
    assert vma[3] == MAP_SHARED


async def test_untracked_ranges_are_counted_not_replayed() -> None:
    kernel = await native_kernel()
    trace = trace_of(Mprotect(1, 0x5555_5555_0000, PAGE, PROT_READ), Munmap(1, BASE, PAGE))
    result = await replay_trace(kernel, trace)
    assert result.untracked == {"mprotect": 1, "munmap": 1}
    assert kernel.vmas() == []
    assert result.replay_clean


async def test_syscall_errors_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = await native_kernel()

    async def refuse(addr: int, length: int, prot: int, *, pid: int | None = None) -> None:
        raise OSError(errno.EINVAL, "refused")

    monkeypatch.setattr(kernel, "mprotect", refuse)
    trace = trace_of(Mmap(1, BASE, PAGE, RW, ANON), Mprotect(1, BASE, PAGE, PROT_READ))
    result = await replay_trace(kernel, trace)
    assert result.errors == 1
    assert not result.replay_clean
    assert result.error_samples[0]["errno"] == "EINVAL"
    assert result.error_samples[0]["event"] == 1
    assert result.as_dict()["trace"]["errors"] == 1


async def test_bad_arguments() -> None:
    kernel = await native_kernel()
    with pytest.raises(ValueError, match="relocation"):
        await replay_trace(kernel, trace_of(), relocation="random")
    with pytest.raises(ValueError, match="touch_limit"):
        await replay_trace(kernel, trace_of(), touch_limit=-1)


# --- exact counts: the replay costs what docs/sources.md §2 says ------------------------------


@pytest.mark.parametrize(("mode", "expected"), [("trap", 2 * 64 + 1), ("xen", 3 + 1)])
async def test_mprotect_phase_matches_the_design_formula(mode: str, expected: int) -> None:
    trace = trace_of(Mmap(1, BASE, 64 * PAGE, RW, ANON), Mprotect(1, BASE, 64 * PAGE, PROT_READ))
    result = await replay_trace(await local_kernel(mode), trace)
    assert result.phases["mprotect"].counts["traps"] == expected
    assert result.counts_agree
    assert result.audit_clean


# --- the shipped traces ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["native", "xen", "batched"])
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
async def test_shipped_trace_replays_cleanly(path: Path, mode: str) -> None:
    kernel = await native_kernel() if mode == "native" else await local_kernel(mode)
    result = await run_trace_workload(kernel, path)
    assert isinstance(result, TraceResult)
    assert result.audit_clean, result.audit
    assert result.counts_agree
    assert result.errors == 0, result.error_samples
    trace = load_trace(path)
    assert result.replayed == trace.counts()
    # Only what execve mapped (the executable, ld.so) is unknown to a trace:
    # a few calls per program exec'd.
    assert sum(result.untracked.values()) <= 4 * max(1, trace.counts().get("exec", 0))
    assert result.pages > 500
    doc = result.as_dict()
    assert doc["workload"] == "trace"
    assert doc["trace"]["replay_clean"]
    phases = ["mmap", "mprotect", "munmap", "mremap", "brk", "madvise", "mlock", "touch"]
    if trace.has_processes:
        phases += ["fork", "cow", "context_switch", "exec", "exit"]
    assert list(doc["phases"]) == phases


def _counts(result: TraceResult) -> dict[str, dict[str, int]]:
    return {name: dict(p.counts) for name, p in result.phases.items()}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
async def test_xen_batching_beats_trap_on_real_mprotects_and_mremaps(path: Path) -> None:
    runs: dict[str, list[dict[str, dict[str, int]]]] = {"trap": [], "xen": []}
    for mode in ("trap", "xen", "xen"):  # xen twice: a replay is deterministic
        result = await run_trace_workload(await local_kernel(mode), path)
        assert isinstance(result, TraceResult)
        assert result.counts_agree
        assert result.audit_clean
        assert result.replay_clean
        runs[mode].append(_counts(result))
    assert runs["xen"][0] == runs["xen"][1], "the replay is not deterministic"
    trap, xen = runs["trap"][0], runs["xen"][0]
    assert 0 < xen["mprotect"]["traps"] < trap["mprotect"]["traps"]
    assert xen["mprotect"]["records"] == trap["mprotect"]["records"]  # same PTEs changed
    # mremap's move_ptes queues its set_ptes in a lazy section: xen batches them
    assert xen["mremap"]["traps"] <= trap["mremap"]["traps"]
    assert xen["mremap"]["records"] == trap["mremap"]["records"]
    if load_trace(path).counts().get("mremap"):
        assert xen["mremap"]["traps"] < trap["mremap"]["traps"]
    for phase in ("mmap", "munmap", "brk", "madvise", "touch"):
        assert xen[phase] == trap[phase], phase  # only mprotect and mremap differ


# --- the command line ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pvemu trace")
    trace_cmd.configure(parser)
    return parser


def test_help_explains_the_actions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for word in ("record", "show", "replay", "strace", "populated", "docs/traces.md"):
        assert word in out


def test_show(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(TRACES / "python-json.json")
    assert trace_cmd.run(_parser().parse_args(["show", path])) == 0
    out = capsys.readouterr().out
    assert "mremap" in out
    assert "pages:" in out
    assert "strace" in out
    assert trace_cmd.run(_parser().parse_args(["show", "--json", path])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["by_op"] == load_trace(path).counts()
    assert summary["pages_mapped"] > 0


def test_show_reports_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": 9}')
    assert trace_cmd.run(_parser().parse_args(["show", str(bad)])) == 1
    assert "schema" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_record_a_real_program(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "py.json"
    code = "import mmap; m = mmap.mmap(-1, 1 << 20); m[0:1] = b'x'; m.close()"
    args = _parser().parse_args(["record", "-o", str(out), "--", sys.executable, "-c", code])
    assert trace_cmd.run(args) == 0
    trace = load_trace(out)
    assert trace.command == [sys.executable, "-c", code]
    assert "-f" in trace.recorded_with
    assert any(isinstance(e, Mmap) and e.length == 1 << 20 for e in trace.events)
    assert any(isinstance(e, Munmap) and e.length == 1 << 20 for e in trace.events)
    assert "mmap" in capsys.readouterr().out


def test_record_needs_a_command() -> None:
    with pytest.raises(UserError, match="no command") as raised:
        trace_cmd.run(_parser().parse_args(["record", "-o", "x.json"]))
    assert raised.value.exit_code == EXIT_USAGE


def test_replay_native_in_a_guest_process(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(TRACES / "python-json.json")
    args = _parser().parse_args(["replay", path, "--modes", "native", "--json"])
    assert trace_cmd.run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    (result,) = doc["results"]
    assert result["mode"] == "native"
    assert result["trace"]["replay_clean"]
    assert result["phases"]["touch"]["page_faults"] == result["pages"]


async def test_replay_reports_its_progress_in_steps() -> None:
    from pvemu.guest.replay import PROGRESS_STEPS

    steps: list[str] = []
    trace = load_trace(TRACES / "python-json.json")
    await replay_trace(await native_kernel(), trace, on_step=steps.append)
    assert steps == [
        *(f"events {n * 100 // PROGRESS_STEPS}%" for n in range(1, PROGRESS_STEPS + 1)),
        "verify",
    ]


def test_replay_moves_the_bar_with_every_step_the_guest_reports() -> None:
    from pvemu.scripts.progress import Progress

    progress = Progress("pvemu trace replay", trace_cmd.replay_steps(), enabled=False)
    seen: list[str] = []
    update = progress.update

    def recording(*, advance: float = 0.0, description: str | None = None) -> None:
        if description is not None:
            seen.append(description)
        update(advance=advance, description=description)

    progress.update = recording  # type: ignore[method-assign]
    path = str(TRACES / "java-version.json")
    result = trace_cmd._replay_mode("native", path, "", 64, progress, "mode native (1/1)")
    assert result["trace"]["replay_clean"]
    assert seen[0] == "mode native (1/1): boot"
    assert seen[-1] == "mode native (1/1): verify"
    assert "mode native (1/1): events 50%" in seen
    assert progress.done == trace_cmd.replay_steps()


def test_replay_shows_progress_inside_a_mode_without_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A plain progress line names the mode and the step the guest reached."""
    monkeypatch.setenv("PVEMU_PROGRESS_INTERVAL", "0.05")
    path = str(TRACES / "java-version.json")
    args = _parser().parse_args(["replay", path, "--modes", "native", "--json"])
    assert trace_cmd.run(args) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines
    assert all(line.startswith("pvemu trace replay: ") for line in lines)
    assert any("mode native (1/1): " in line for line in lines)


def test_guest_subcommand_runs_a_trace(capsys: pytest.CaptureFixture[str]) -> None:
    from pvemu.scripts import guest_cmd

    parser = argparse.ArgumentParser()
    guest_cmd.configure(parser)
    path = TRACES / "java-version.json"
    args = parser.parse_args(["--mode", "native", "--workload", f"trace:{path}", "--json"])
    assert guest_cmd.run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["workload"] == "trace"
    assert doc["audit_clean"]


def test_mmap_constants_match_the_guest() -> None:
    assert (MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS) == (
        mman.MAP_SHARED,
        mman.MAP_PRIVATE,
        mman.MAP_ANONYMOUS,
    )
    assert (PROT_READ, PROT_WRITE, PROT_EXEC) == (mman.PROT_READ, mman.PROT_WRITE, mman.PROT_EXEC)
