"""The fuzzers of ``tests/fuzz/`` run small here (``make fuzz`` runs them
long); they can fail (each property is broken on purpose once and must be
reported); and the bugs they found stay as regression tests."""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgpack
import pytest
from hypothesis import Phase, settings

from pvemu.hypervisor import Hypervisor
from pvemu.hypervisor.pagetypes import PageTypes
from pvemu.shared import abi, wire
from pvemu.shared.errors import RemoteProtocolError, WireErrorCode
from tests import fuzz
from tests.fuzz import FUZZERS, HYPERCALL, KNOWN_BUGS, KNOWN_HITS, STATS, WIRE, FuzzFailure
from tests.support import boot, core_call


def quick(max_examples: int) -> settings:
    """A fixed-seed run without shrinking: these runs are meant to fail fast."""
    return settings(
        settings.get_profile(fuzz.SUITE_PROFILE),
        max_examples=max_examples,
        phases=[Phase.generate],
        report_multiple_bugs=False,
    )


def stats_delta(name: str, run: Any) -> tuple[int, Counter[str]]:
    """Inputs processed and outcomes counted while ``run()`` ran."""
    count, before = fuzz.COUNTS[name], Counter(STATS[name])
    run()
    return fuzz.COUNTS[name] - count, STATS[name] - before


# --- small runs ----------------------------------------------------------------------


def test_wire_fuzzer_small() -> None:
    processed, seen = stats_delta(WIRE, FUZZERS[WIRE][0](fuzz.SUITE_PROFILE))
    assert processed >= 1000
    # It reached every kind of outcome, not just one easy path.
    for outcome in ("accepted", "rejected", "fatal", "code bad_type", "code too_large"):
        assert seen[outcome] > 0, outcome
    assert set(KNOWN_HITS) <= set(KNOWN_BUGS)


def test_hypercall_fuzzer_small() -> None:
    processed, seen = stats_delta(HYPERCALL, FUZZERS[HYPERCALL][0](fuzz.SUITE_PROFILE))
    assert processed >= 1000
    for outcome in ("rc=0", "rc=-EINVAL", "preempted slices", "refused at construction"):
        assert seen[outcome] > 0, outcome
    assert set(KNOWN_HITS) <= set(KNOWN_BUGS)


def test_entropy_runs_past_its_blob_and_maps_zero_to_the_plainest_choice() -> None:
    e = fuzz.Entropy(b"\x00\x00")
    assert e.pick("abc") == "a"
    assert e.u64() == 0
    assert len({fuzz.Entropy(b"").bits(64) for _ in range(3)}) == 1  # deterministic
    assert len({e.bits(64) for _ in range(8)}) > 1  # not stuck on zeros


# --- the fuzzers can fail ------------------------------------------------------------------


def test_wire_fuzzer_reports_an_exception_escaping_next_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accept = wire.Connection._accept_request

    def broken(self: wire.Connection, request: wire.Request) -> None:
        if isinstance(request, wire.Stats):
            raise KeyError("planted")
        accept(self, request)

    monkeypatch.setattr(wire.Connection, "_accept_request", broken)
    with pytest.raises(FuzzFailure, match="next_event raised KeyError"):
        FUZZERS[WIRE][0](quick(30))()


def test_wire_fuzzer_reports_a_malformed_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    encode = wire.Connection._encode

    def truncating(self: wire.Connection, message: wire.Message) -> bytes:
        data = encode(self, message)
        return data[:-1] if self.role == "server" and isinstance(message, wire.ErrorReply) else data

    monkeypatch.setattr(wire.Connection, "_encode", truncating)
    with pytest.raises(FuzzFailure, match=r"sent ErrorReply\(.*\nclient decoded NEED_DATA"):
        FUZZERS[WIRE][0](quick(30))()


def test_hypercall_fuzzer_reports_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> int:
        raise RuntimeError("planted")

    monkeypatch.setattr(PageTypes, "mod_l1_entry", broken)
    with pytest.raises(FuzzFailure, match=r"INTERNAL: \w+ raised RuntimeError: planted"):
        FUZZERS[HYPERCALL][0](quick(10))()


def test_hypercall_fuzzer_reports_a_leaked_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    mod_l1_entry = PageTypes.mod_l1_entry

    def leaky(self: PageTypes, maddr: int, new: int, preserve_ad: bool, fd: int) -> int:
        rc = mod_l1_entry(self, maddr, new, preserve_ad, fd)
        mfn = (new & 0x000F_FFFF_FFFF_F000) >> 12
        if rc == 0 and new & 1 and mfn < self.ft.nr_frames:
            self.ft.count[mfn] += 1  # one get_page too many
        return rc

    monkeypatch.setattr(PageTypes, "mod_l1_entry", leaky)
    with pytest.raises(FuzzFailure, match=r"audit after the requests: \['general count"):
        FUZZERS[HYPERCALL][0](quick(10))()


def test_runner_counts_distinct_crashes(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> int:
        raise RuntimeError("planted")

    monkeypatch.setattr(PageTypes, "mod_l1_entry", broken)
    reports: list[str] = []
    campaign = fuzz.run_campaign(
        HYPERCALL, 30, seed=1, shrink=False, max_seconds=120, report=reports.append
    )
    assert campaign.processed >= 30
    assert any("RuntimeError" in sig for sig in campaign.crashes)
    assert campaign.distinct_crashes == len(campaign.crashes) + len(campaign.known)
    assert any("Falsifying example" in r or "fuzz_hypercalls(" in r for r in reports)


def test_runner_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        fuzz.main(["--help"])
    assert done.value.code == 0
    assert "--min-count" in capsys.readouterr().out
    status = fuzz.main(["--min-count", "300", "--fuzzers", WIRE, "--seed", "3", "--no-shrink"])
    out = capsys.readouterr().out
    assert "pvemu fuzzing (seed 3)" in out
    assert "messages" in out
    assert status in (0, 1)  # 1 while a known bug is still being hit


# --- bugs the fuzzers found (fixed; kept as regression tests) ---------------------------


def test_message_over_max_message_size_is_fatal_in_any_chunking() -> None:
    hello = wire.Hello(1, wire.PROTOCOL_VERSION, 16, 2, "x" * wire.MAX_NAME_LEN)
    data = msgpack.packb(hello.to_wire(), use_bin_type=True)
    assert len(data) > 64
    server = wire.Connection("server", max_message_size=64)
    server.receive_data(data[:60])
    assert server.next_event() is wire.NEED_DATA
    server.receive_data(data[60:])
    with pytest.raises(RemoteProtocolError) as info:
        server.next_event()
    assert info.value.fatal
    assert info.value.code == WireErrorCode.TOO_LARGE


@pytest.mark.parametrize("where", ["multicall", "top level"])
def test_stats_fit_the_wire_after_many_hypercall_numbers(where: str) -> None:
    hv = Hypervisor(16)
    guest = boot(hv)
    ops = range(1000, 1000 + wire.MAX_MAP_LEN + 1)
    if where == "multicall":
        calls = tuple((op,) for op in ops)
        hv.hypercall(guest.domid, 0, core_call(abi.HYPERVISOR_multicall, (calls,)))
    else:
        for op in ops:
            hv.hypercall(guest.domid, 0, core_call(op, ()))
    wire.StatsResult(1, hv.stats(guest.domid))
