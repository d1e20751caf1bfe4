"""Suite-wide settings: no per-example deadline for hypothesis (the 2-core CI
machine is shared; examples are bounded by their own size, not by time)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile("pvemu", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("pvemu")
