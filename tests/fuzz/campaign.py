"""The long runner behind ``make fuzz``: :func:`run_campaign` runs one
fuzzer of :data:`FUZZERS` with fresh seeds until it has processed enough
inputs, and records distinct crashes (by signature) and known-bug hits."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from hypothesis import Phase, settings

from tests.fuzz.bookkeeping import (
    COUNTS,
    HYPERCALL,
    KNOWN_BUGS,
    KNOWN_HITS,
    LONG_PROFILE,
    STATS,
    WIRE,
)
from tests.fuzz.entropy import FuzzFailure, origin
from tests.fuzz.hypercall_fuzzer import hypercall_fuzzer
from tests.fuzz.wire_fuzzer import wire_fuzzer

FUZZERS: Final[dict[str, tuple[Callable[..., Callable[[], None]], str]]] = {
    WIRE: (wire_fuzzer, "messages"),
    HYPERCALL: (hypercall_fuzzer, "requests"),
}


@dataclass
class Campaign:
    """What one fuzzer did under the runner."""

    name: str
    unit: str
    processed: int = 0
    examples: int = 0
    runs: int = 0
    seconds: float = 0.0
    #: signature -> runs that failed with it (hypothesis-reported failures)
    crashes: dict[str, int] = field(default_factory=dict)
    #: KNOWN_BUGS signature -> times it fired (recorded, the run went on)
    known: dict[str, int] = field(default_factory=dict)

    @property
    def distinct_crashes(self) -> int:
        return len(self.crashes) + len(self.known)


def leaf_failures(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaf_failures(sub)]
    return [exc]


def signature_of(exc: BaseException) -> str:
    if isinstance(exc, FuzzFailure):
        return exc.signature
    return f"{type(exc).__name__} at {origin(exc)}"


def run_campaign(
    name: str,
    min_count: int,
    *,
    seed: int,
    shrink: bool = True,
    max_seconds: float = math.inf,
    report: Callable[[str], None] = print,
) -> Campaign:
    """Run fuzzer ``name`` with fresh seeds until ``min_count`` inputs.

    Each hypothesis run is sized from the inputs per example seen so far. A
    failing run is recorded (its falsifying example printed once per distinct
    signature); later runs skip shrinking once a crash has been shrunk. Hits
    of KNOWN_BUGS count as crashes too, reported once with their first context.
    """
    factory, unit = FUZZERS[name]
    campaign = Campaign(name, unit)
    start_count, start_examples = COUNTS[name], STATS[name]["examples"]
    known_before = {sig: hits for sig, (hits, _) in KNOWN_HITS.items()}
    started = time.perf_counter()
    while COUNTS[name] - start_count < min_count and time.perf_counter() - started < max_seconds:
        done = COUNTS[name] - start_count
        examples = STATS[name]["examples"] - start_examples
        per_example = done / examples if examples else 100.0
        wanted = math.ceil((min_count - done) / max(per_example, 1.0))
        batch = max(5, min(wanted + 1, 2000 if examples else 20))
        phases = [Phase.explicit, Phase.generate]
        if shrink and not campaign.crashes:
            phases.append(Phase.shrink)
        profile = settings(settings.get_profile(LONG_PROFILE), max_examples=batch, phases=phases)
        test = factory(profile, seed=seed + campaign.runs)
        campaign.runs += 1
        try:
            test()
        except Exception as exc:
            for failure in leaf_failures(exc):
                sig = signature_of(failure)
                if sig not in campaign.crashes:
                    notes = "\n".join(getattr(failure, "__notes__", []))
                    report(
                        f"[{name}] crash {len(campaign.crashes) + 1}: {sig}\n"
                        f"{type(failure).__name__}: {failure}\n{notes}"
                    )
                campaign.crashes[sig] = campaign.crashes.get(sig, 0) + 1
        for sig, (hits, first) in KNOWN_HITS.items():
            new = hits - known_before.get(sig, 0)
            if sig.startswith(f"{name}:") and new > 0:
                if sig not in campaign.known:
                    context = first if len(first) < 4000 else first[:4000] + " ..."
                    report(f"[{name}] known bug: {sig}\n{KNOWN_BUGS[sig]}\nfirst hit: {context}")
                campaign.known[sig] = new
    campaign.processed = COUNTS[name] - start_count
    campaign.examples = STATS[name]["examples"] - start_examples
    campaign.seconds = time.perf_counter() - started
    return campaign
