"""The timeline (``--timeline``): Chrome trace-event JSON with one span per
trap the hypervisor counted, one track per domain and vCPU."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from pvemu.guest.client import connect
from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.server import HypervisorServer, ServerLimits
from pvemu.hypervisor.service import HypervisorService, Session
from pvemu.shared import abi, wire
from pvemu.shared.timeline import DOMAIN_TID, GUEST_TID, Timeline, merge, now_ns
from pvemu.shared.x86 import maddr_of_entry, make_pte

METADATA_ARGS = {
    "process_name": ("name", str),
    "thread_name": ("name", str),
    "process_sort_index": ("sort_index", int),
    "thread_sort_index": ("sort_index", int),
}


def trace_format_problems(document: Any) -> list[str]:
    """What keeps ``document`` from being trace-event JSON that chrome://tracing
    and Perfetto's importer take as it is: required keys and their types,
    ``ts`` in order on each track, spans on a track nested or disjoint, and
    a name for every process and thread a span is on."""
    problems: list[str] = []
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        return ["not an object with a traceEvents list"]
    named: set[tuple[str, int, int]] = set()
    # In whole nanoseconds, as the viewers read microseconds: ts + dur in
    # floating point may round differently for two spans that end together.
    open_spans: dict[tuple[int, int], list[int]] = {}  # track -> ends of enclosing spans
    last_ts: dict[tuple[int, int], int] = {}
    for n, event in enumerate(document["traceEvents"]):
        where = f"event {n} ({event.get('name')!r})"
        if not isinstance(event.get("name"), str) or event.get("ph") not in ("X", "M"):
            problems.append(f"{where}: needs a string name and ph X or M")
            continue
        if not all(type(event.get(k)) is int for k in ("pid", "tid")):
            problems.append(f"{where}: pid and tid must be integers")
            continue
        pid, tid = event["pid"], event["tid"]
        if event["ph"] == "M":
            key, kind = METADATA_ARGS.get(event["name"], ("", object))
            if not isinstance(event.get("args"), dict) or type(event["args"].get(key)) is not kind:
                problems.append(f"{where}: metadata without args.{key or '?'}")
            named.add((event["name"], pid, 0 if event["name"].startswith("process") else tid))
            continue
        ts, dur = event.get("ts"), event.get("dur")
        if not all(type(v) in (int, float) and v >= 0 for v in (ts, dur)):
            problems.append(f"{where}: ts and dur must be numbers >= 0")
            continue
        if not isinstance(event.get("cat"), str) or not isinstance(event.get("args", {}), dict):
            problems.append(f"{where}: cat must be a string and args an object")
        track, start = (pid, tid), round(ts * 1000)
        end = start + round(dur * 1000)
        if start < last_ts.get(track, 0):
            problems.append(f"{where}: ts goes back on track {track}")
        last_ts[track] = start
        stack = open_spans.setdefault(track, [])
        while stack and stack[-1] <= start:
            stack.pop()
        if stack and end > stack[-1]:
            problems.append(f"{where}: overlaps a span on track {track} without nesting in it")
        stack.append(end)
        for kind, key in (("process_name", (pid, 0)), ("thread_name", track)):
            if (kind, *key) not in named:
                problems.append(f"{where}: no {kind} for {key} before it")
    try:
        json.dumps(document, allow_nan=False)
    except ValueError as exc:
        problems.append(f"not strict JSON: {exc}")
    return problems


def spans(document: dict[str, Any], cat: str, pid: int | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in document["traceEvents"]
        if e["ph"] == "X" and e["cat"] == cat and (pid is None or e["pid"] == pid)
    ]


def test_the_validator_finds_what_viewers_refuse() -> None:
    timeline = Timeline()
    timeline.name_process(1, "dom1")
    timeline.name_thread(1, 0, "vCPU 0")
    timeline.complete("outer", "trap", 1, 0, 1000, 9000)
    timeline.complete("inner", "slice", 1, 0, 2000, 3000)
    good = timeline.document()
    assert trace_format_problems(good) == []
    assert [e["name"] for e in good["traceEvents"] if e["ph"] == "X"] == ["outer", "inner"]
    crossing = Timeline()
    crossing.name_process(1, "dom1")
    crossing.name_thread(1, 0, "vCPU 0")
    crossing.complete("a", "trap", 1, 0, 1000, 3000)
    crossing.complete("b", "trap", 1, 0, 2000, 4000)
    assert any("without nesting" in p for p in trace_format_problems(crossing.document()))
    unnamed = Timeline()
    unnamed.complete("a", "trap", 5, 2, 0, 1)
    assert any("no process_name" in p for p in trace_format_problems(unnamed.document()))
    backwards = {"traceEvents": [*good["traceEvents"], {**good["traceEvents"][-1], "ts": 0}]}
    assert any("ts goes back" in p for p in trace_format_problems(backwards))


def test_merge_keeps_one_name_per_track_and_time_order() -> None:
    hv, guest = Timeline(), Timeline()
    for timeline in (hv, guest):
        timeline.name_process(1, "dom1 batched")
        timeline.name_thread(1, 0, "vCPU 0")
    hv.complete("mmu_update", "trap", 1, 0, 2000, 3000)
    guest.complete("mmu_update", "guest", 1, 0, 1000, 4000)
    merged = merge([hv.document(), guest.document()])
    assert trace_format_problems(merged) == []
    metadata = [e for e in merged["traceEvents"] if e["ph"] == "M"]
    assert len(metadata) == 2
    assert [e["cat"] for e in merged["traceEvents"] if e["ph"] == "X"] == ["guest", "trap"]


async def test_every_counted_trap_is_one_span_with_what_it_did() -> None:
    """Over the real server with a quantum of 2: a sliced mmu_update, a
    flush, an emulated write and a page fault, each one trap span; the
    guest's round trip of each encloses the hypervisor's span."""
    hv, recorded, seen = Hypervisor(64), Timeline(), Timeline()
    server = HypervisorServer(hv, ServerLimits(quantum=2), recorded)
    with tempfile.TemporaryDirectory(prefix="pvemu-tl-", dir="/tmp") as tmp:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, f"{tmp}/hv.sock")
            async with connect(f"{tmp}/hv.sock", memory_mib=2, vcpus=2, name="t") as dom:
                dom.timeline = seen
                mark = now_ns() / 1000  # after the boot's three hypercalls
                frame, table = dom.alloc_frame(), dom.alloc_frame()
                reqs = [(maddr_of_entry(table, i), make_pte(frame, 5)) for i in range(5)]
                assert await dom.mmu_update(reqs) == (0, 5)
                flush = [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0)]
                assert await dom.mmuext_op(flush, vcpu=1) == (0, 1)
                assert await dom.ptwr_write(maddr_of_entry(table, 0), 0) == -abi.EFAULT
                outcome = await dom.run_user(1, [(0x4000_0000, "w", b"x")])
                assert outcome["fault"] is not None
                domid, counted = dom.domid, hv.domain(dom.domid).counters
                traps = [c.traps for c in counted]
            nursery.cancel_scope.cancel()
    document = recorded.document()
    assert trace_format_problems(document) == []
    assert len(spans(document, "trap", domid)) == sum(traps) == 3 + 4
    trap_spans = [e for e in spans(document, "trap", domid) if e["ts"] >= mark]
    assert len(trap_spans) == 4
    by_name = {e["name"]: e for e in trap_spans}
    update = by_name["mmu_update"]["args"]
    assert (update["records"], update["rc"], update["done"], update["slices"]) == (5, 0, 5, 3)
    slices = [e for e in spans(document, "slice", domid) if e["ts"] >= mark]
    assert [s["args"]["entries"] for s in slices] == [2, 2, 1]
    assert by_name["mmuext_op"]["tid"] == 1
    assert by_name["mmuext_op"]["args"]["flush_ops"] == 1
    assert by_name["ptwr"]["args"]["rc"] == -abi.EFAULT
    assert by_name["page_fault"]["args"]["va"] == 0x4000_0000
    (life,) = spans(document, "domain", domid)
    assert (life["tid"], life["args"]["traps"], life["args"]["traps_by_vcpu"]) == (
        DOMAIN_TID,
        7,
        traps,
    )
    # The guest's view: every trap's round trip around the hypervisor's span.
    guest = seen.document()["traceEvents"]
    for trap in trap_spans:
        around = [
            g
            for g in guest
            if g["tid"] == trap["tid"]
            and g["ts"] <= trap["ts"]
            and trap["ts"] + trap["dur"] <= g["ts"] + g["dur"]
        ]
        assert len(around) == 1, trap


def test_an_abandoned_hypercall_is_still_one_trap() -> None:
    """A guest that hangs up mid-batch was counted a trap: it keeps its span."""
    hv, timeline = Hypervisor(64), Timeline()
    service = HypervisorService(hv, ServerLimits(), timeline)
    session = Session()
    hello = wire.Hello(1, wire.PROTOCOL_VERSION, memory_mib=2, vcpus=1, name="gone")
    assert type(service.serve(session, hello)[0]) is wire.Welcome
    assert session.domid is not None
    p2m = hv.domain(session.domid).p2m
    reqs = [(maddr_of_entry(p2m[1], i), make_pte(p2m[2], 5)) for i in range(6)]
    call = wire.make_call(abi.HYPERVISOR_mmu_update, reqs, abi.DOMID_SELF)
    work = service.begin(session, wire.Hypercall.for_call(2, call))
    assert not work.step(2)
    work.abandon()
    service.leave(session)
    document = timeline.document()
    assert trace_format_problems(document) == []
    (trap,) = spans(document, "trap")
    assert trap["args"]["abandoned"] is True
    assert trap["args"]["rc"] is None
    (life,) = spans(document, "domain")
    assert life["args"]["traps"] == 1


def test_run_timeline_has_one_span_per_counted_trap(tmp_path: Path) -> None:
    """``pvemu run --pages 100 --modes trap,batched --timeline``: valid
    trace-event JSON; per domain, as many trap spans as its counters hold,
    and in each phase's window as many as the run's own table reports."""
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "pvemu.scripts", "run", "--pages", "100"]
    cmd += ["--modes", "trap,batched", "--json", "--timeline", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr
    results = {r["mode"]: r for r in json.loads(done.stdout)["results"]}
    document = json.loads(out.read_text())
    assert trace_format_problems(document) == []
    lives = {e["args"]["name"]: e for e in spans(document, "domain")}
    assert set(lives) == {"trap", "batched"}
    for mode, life in lives.items():
        traps = spans(document, "trap", life["pid"])
        assert len(traps) == life["args"]["traps"]
        phases = {p["name"]: p for p in spans(document, "phase", life["pid"])}
        assert set(phases) == set(results[mode]["phases"])
        for name, phase in phases.items():
            assert phase["tid"] == GUEST_TID
            start, end = phase["ts"], phase["ts"] + phase["dur"]
            inside = [t for t in traps if start <= t["ts"] and t["ts"] + t["dur"] <= end]
            assert len(inside) == results[mode]["phases"][name]["traps"], (mode, name)
    # Unbatched, mprotect is a trap per PTE; batched, one mmu_update of them all.
    ro = lives["batched"]["pid"], lives["trap"]["pid"]
    kinds = [
        Counter(
            t["name"]
            for t in spans(document, "trap", pid)
            if _within(t, _phase(document, pid, "protect_ro"))
        )
        for pid in ro
    ]
    assert kinds[0]["mmu_update"] <= 2
    assert sum(kinds[1].values()) >= 200  # a get-and-clear and a set per PTE


def _phase(document: dict[str, Any], pid: int, name: str) -> dict[str, Any]:
    (phase,) = [p for p in spans(document, "phase", pid) if p["name"] == name]
    return phase


def _within(span: dict[str, Any], outer: dict[str, Any]) -> bool:
    return outer["ts"] <= span["ts"] and span["ts"] + span["dur"] <= outer["ts"] + outer["dur"]


def test_the_docs_picture_draws_each_domains_phase_and_a_close_up(tmp_path: Path) -> None:
    """scripts/timeline_png (docs/timeline.png): a panel per domain that ran
    the phase, and a close-up only where the traps are too many to see."""
    from pvemu.scripts import timeline_png

    timeline = Timeline()
    for pid, traps in ((1, 40), (2, 2)):
        timeline.name_process(pid, f"dom{pid}")
        timeline.complete("protect_ro", "phase", pid, GUEST_TID, 0, 1_000_000)
        for n in range(traps):
            start = 1000 + n * 20_000
            timeline.complete("mmu_update", "guest", pid, 0, start, start + 15_000)
            timeline.complete("mmu_update", "trap", pid, 0, start + 5000, start + 9000)
    document = timeline.document()
    titles = [p.title for p in timeline_png.panels(document, "protect_ro")]
    assert titles[:2] == [
        "dom1: protect_ro, 40 traps in 1.0 ms",
        "dom2: protect_ro, 2 traps in 1.0 ms",
    ]
    assert len(titles) == 3
    assert titles[2].startswith(f"dom1: close-up of its first {timeline_png.CLOSE_UP} traps")
    out = tmp_path / "t.png"
    assert timeline_png.draw(document, "protect_ro", str(out)) == 3
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert timeline_png.draw(document, "populate", str(tmp_path / "none.png")) == 0
