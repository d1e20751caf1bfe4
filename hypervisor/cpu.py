"""The hypervisor's one CPU, shared by every connection's requests (trio).

A slice of hypervisor work (a whole short request, or ``quantum`` entries of a
long hypercall) runs only while its connection holds the CPU; when it lets
go, the policy (:class:`~hypervisor.scheduler.FairShare` by default) picks
the next holder among the waiting vCPUs. Without this, trio runs ready tasks
first come, first served, and a one-PTE trap waits behind one slice of every
busy guest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import trio

from .scheduler import SlicePolicy


class Cpu:
    """The one hypervisor CPU: a slice of work runs only while holding it, and
    ``policy`` picks the next holder among the waiting vCPUs."""

    def __init__(self, policy: SlicePolicy, clock: Callable[[], float] = time.perf_counter) -> None:
        self.policy = policy
        self._clock = clock
        self._holder: object | None = None
        self._since = 0.0
        self._events: dict[object, trio.Event] = {}

    @contextlib.asynccontextmanager
    async def running(self, key: object) -> AsyncIterator[None]:
        """Hold the CPU for one request (a waking vCPU: see FairShare.wake)."""
        if not self.try_acquire(key):
            await self.acquire_queued(key)
        try:
            yield
        finally:
            self.release(key)

    def try_acquire(self, key: object) -> bool:
        """A waking vCPU takes the CPU at once if it is free and nobody
        waits: the common case (one runnable vCPU) costs no task switch and
        no allocation beyond the policy's bookkeeping. False: call
        :meth:`acquire_queued`."""
        policy = self.policy
        policy.wake(key)
        if self._holder is None and not policy.waiting:
            self._holder, self._since = key, self._clock()
            return True
        return False

    async def acquire_queued(self, key: object) -> None:
        """Wait for the CPU after :meth:`try_acquire` said no."""
        event = self._queue(key)
        if self._holder is None:
            self._hand_over()
        await self._wait(event, key)

    async def preempt(self, key: object) -> None:
        """Between two slices of a long hypercall: let new requests arrive,
        and give the CPU to any waiter that has had less of it."""
        self._charge(key)
        await trio.lowlevel.checkpoint()
        if not self.policy.waiting:
            return
        event = self._queue(key)
        self._holder = None
        self._hand_over()
        await self._wait(event, key)

    def _queue(self, key: object) -> trio.Event:
        event = self._events[key] = trio.Event()
        self.policy.enqueue(key)
        return event

    def _take(self, key: object) -> None:
        self._holder, self._since = key, self._clock()

    def _charge(self, key: object) -> None:
        now = self._clock()
        self.policy.charge(key, now - self._since)
        self._since = now

    def release(self, key: object) -> None:
        """The slice is done: charge it and hand the CPU to the next waiter."""
        if self._holder != key:
            return
        now = self._clock()
        self.policy.charge(key, now - self._since)
        self._since = now
        self._holder = None
        if self.policy.waiting:
            self._hand_over()

    def _hand_over(self) -> None:
        nxt = self.policy.pop()
        if nxt is not None:
            self._take(nxt)
            self._events.pop(nxt).set()

    async def _wait(self, event: trio.Event, key: object) -> None:
        if event.is_set():
            return
        try:
            await event.wait()
        except BaseException:
            if self._holder == key:  # handed to us as we were cancelled: pass it on
                self.release(key)
            else:
                self.policy.remove(key)
                self._events.pop(key, None)
            raise

    def forget(self, key: object) -> None:
        self.policy.forget(key)


__all__ = ["Cpu"]
