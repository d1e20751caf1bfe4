"""Counters, hypothesis profiles and known bugs shared by both fuzzers.

``COUNTS`` and ``STATS`` are what the suite and the runner read back;
``COUNTING`` and ``PROGRESS_HOOK`` are switched at run time, so other modules
read and set them through this module (``bookkeeping.PROGRESS_HOOK = ...``),
never through a ``from`` import.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Final

from hypothesis import HealthCheck, Phase, settings

WIRE: Final = "wire"
HYPERCALL: Final = "hypercall"

#: Messages (wire) and requests (hypercall) processed so far, per fuzzer.
COUNTS: Counter[str] = Counter()
#: What the processed inputs did (accepted, rejected, fatal, rc != 0, ...).
STATS: dict[str, Counter[str]] = {WIRE: Counter(), HYPERCALL: Counter()}
#: Called after every example (the runner's progress bar); None in the suite.
PROGRESS_HOOK: Callable[[], None] | None = None
#: Cleared once an example of a run has failed, so that hypothesis shrinking
#: and replaying are not counted as generated inputs; set again per run.
COUNTING: bool = True

SUITE_PROFILE: Final = "pvemu-fuzz-suite"
LONG_PROFILE: Final = "pvemu-fuzz-long"
_QUIET_HEALTH: Final = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
    HealthCheck.filter_too_much,
]
settings.register_profile(
    SUITE_PROFILE,
    deadline=None,
    max_examples=40,
    derandomize=True,
    database=None,
    suppress_health_check=_QUIET_HEALTH,
)
settings.register_profile(
    LONG_PROFILE,
    deadline=None,
    max_examples=1000,
    database=None,
    suppress_health_check=_QUIET_HEALTH,
    print_blob=True,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
)


def count_input(fuzzer: str, n: int = 1) -> None:
    if COUNTING:
        COUNTS[fuzzer] += n


def count_example(fuzzer: str) -> None:
    """One example of ``fuzzer`` ran to its end."""
    if COUNTING:
        STATS[fuzzer]["examples"] += 1


#: Bugs the fuzzers found that are not fixed yet (signature -> where). When
#: one fires it is recorded in KNOWN_HITS and the example goes on, so it
#: cannot hide other bugs; the runner still reports each as a crash, and
#: tests/test_fuzz.py pins each with a strict xfail. Remove an entry once the
#: bug is fixed.
KNOWN_BUGS: Final[dict[str, str]] = {}
#: signature -> (times hit, the first hit's context), while COUNTING.
KNOWN_HITS: dict[str, tuple[int, str]] = {}


def known_bug_hit(signature: str, context: str) -> None:
    """A known bug fired: record it and carry on (see KNOWN_BUGS)."""
    assert signature in KNOWN_BUGS, signature
    if COUNTING:
        times, first = KNOWN_HITS.get(signature, (0, context))
        KNOWN_HITS[signature] = (times + 1, first)


def profile_settings(profile: str | settings) -> settings:
    return settings.get_profile(profile) if isinstance(profile, str) else profile


@contextlib.contextmanager
def example_scope() -> Iterator[None]:
    """Around one example: after a failure stop counting (what follows is
    hypothesis shrinking and replaying, not new inputs); tick the progress."""
    global COUNTING
    try:
        yield
    except BaseException:
        COUNTING = False
        raise
    finally:
        if PROGRESS_HOOK is not None:
            PROGRESS_HOOK()


def counted_run(test: Callable[[], None]) -> Callable[[], None]:
    """A hypothesis run that counts its inputs from the start."""

    @functools.wraps(test)
    def run() -> None:
        global COUNTING
        COUNTING = True
        try:
            test()
        finally:
            COUNTING = True

    return run
