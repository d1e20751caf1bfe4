"""Who runs the next slice of hypervisor work: a fair-share policy, sans I/O.

The server runs one slice at a time (a whole short request, or ``quantum``
entries of a long hypercall). With plain first-come order, a guest's one-PTE
trap waits behind one slice of every busy guest, so its latency grows with
the number of guests. Xen's credit scheduler avoids that by boosting a vCPU
that wakes from blocking; this policy does the same in the manner of Linux's
CFS: every vCPU accrues *virtual runtime* (hypervisor seconds spent for it),
the waiting vCPU with the least runs next, and a vCPU that comes back from
idle re-enters at ``min_vruntime - wake_bonus``, ahead of the busy ones but
without banking the time it slept. Long batches still progress: their
runtime stops growing while others run, so they get their fair share.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from typing import Final, Protocol

#: How far ahead of the busiest a waking vCPU may jump (seconds).
DEFAULT_WAKE_BONUS: Final = 0.001


class SlicePolicy(Protocol):
    """What the server's CPU gate asks of a scheduling policy."""

    @property
    def waiting(self) -> int: ...
    def wake(self, key: Hashable) -> None: ...
    def charge(self, key: Hashable, seconds: float) -> None: ...
    def enqueue(self, key: Hashable) -> None: ...
    def remove(self, key: Hashable) -> None: ...
    def pop(self) -> Hashable | None: ...
    def forget(self, key: Hashable) -> None: ...


class FairShare:
    """Least-virtual-runtime-first, with a bounded bonus for waking vCPUs."""

    def __init__(self, wake_bonus: float = DEFAULT_WAKE_BONUS) -> None:
        if wake_bonus < 0:
            raise ValueError("wake_bonus must not be negative")
        self.wake_bonus = wake_bonus
        self.min_vruntime = 0.0
        self._vruntime: dict[Hashable, float] = {}
        self._waiting: dict[Hashable, tuple[float, int]] = {}
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        """vCPUs queued for a slice."""
        return len(self._waiting)

    def vruntime(self, key: Hashable) -> float:
        return self._vruntime.get(key, self.min_vruntime)

    def wake(self, key: Hashable) -> None:
        """A new request after idle: no credit for the time slept beyond the bonus."""
        floor = self.min_vruntime - self.wake_bonus
        current = self._vruntime.get(key)
        if current is None or current < floor:
            self._vruntime[key] = floor

    def charge(self, key: Hashable, seconds: float) -> None:
        """``seconds`` of hypervisor work were done for ``key``."""
        runtime = self._vruntime.get(key, self.min_vruntime)
        self._vruntime[key] = runtime + seconds if seconds > 0.0 else runtime

    def enqueue(self, key: Hashable) -> None:
        if key in self._waiting:
            raise ValueError(f"{key!r} is already waiting")
        self._waiting[key] = (self.vruntime(key), next(self._order))

    def remove(self, key: Hashable) -> None:
        """Drop a waiter (its request was cancelled)."""
        self._waiting.pop(key, None)

    def pop(self) -> Hashable | None:
        """The waiter to run next (least runtime, then first come), or None."""
        if not self._waiting:
            return None
        key = min(self._waiting, key=self._waiting.__getitem__)
        vruntime, _ = self._waiting.pop(key)
        self.min_vruntime = max(self.min_vruntime, vruntime)
        return key

    def forget(self, key: Hashable) -> None:
        """The vCPU's connection closed."""
        self._waiting.pop(key, None)
        self._vruntime.pop(key, None)


class FirstCome:
    """Waiters run in arrival order, whatever they have used: the baseline
    that FairShare is measured against (``pvemu hypervisor --scheduler fifo``)."""

    def __init__(self) -> None:
        self._waiting: dict[Hashable, None] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def wake(self, key: Hashable) -> None:
        pass

    def charge(self, key: Hashable, seconds: float) -> None:
        pass

    def enqueue(self, key: Hashable) -> None:
        if key in self._waiting:
            raise ValueError(f"{key!r} is already waiting")
        self._waiting[key] = None

    def remove(self, key: Hashable) -> None:
        self._waiting.pop(key, None)

    def pop(self) -> Hashable | None:
        if not self._waiting:
            return None
        key = next(iter(self._waiting))
        del self._waiting[key]
        return key

    def forget(self, key: Hashable) -> None:
        self._waiting.pop(key, None)


#: ``--scheduler`` names.
POLICIES: Final = {"fair": FairShare, "fifo": FirstCome}


__all__ = ["DEFAULT_WAKE_BONUS", "POLICIES", "FairShare", "FirstCome", "SlicePolicy"]
