"""Suite-wide settings: no per-example deadline for hypothesis (the 2-core CI
machine is shared; examples are bounded by their own size, not by time), and
a garbage collection after each test module."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("pvemu", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pvemu")


@pytest.fixture(autouse=True, scope="module")
def collect_garbage_after_module() -> Iterator[None]:
    """In-process hypervisors sit in reference cycles until the cyclic GC runs;
    each holds one memfd per domain, so collect them between modules rather
    than let descriptors pile up across the suite."""
    yield
    gc.collect()
