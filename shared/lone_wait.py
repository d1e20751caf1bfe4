"""When a trio program may block in ``poll`` instead of in trio's scheduler.

A trap is a blocking exchange: the guest sends, the hypervisor answers. When
one vCPU is all a process is serving, waiting for the other side through
trio (an epoll registration, ``epoll_wait``, a reschedule) is a scheduler
pass nobody else can use. Both ends ask :func:`lone_wait_ms` first and
block in ``poll`` for that long when it is positive, through
:func:`poll_lone`, which first spins for up to :data:`SPIN_S`.

Why spin: on a virtual machine an idle vCPU halts, and waking it for the
other side's reply costs far more than the trap being measured (seen on the
2-core machine pvemu is benchmarked on: a socket ping-pong between two
processes took 68 µs a round with both blocking, 11 µs with both spinning,
12 µs pinned to one core). A real hypercall never pays that: it is a switch
on the same CPU. With two or more CPUs each end polls without blocking for a
short while first, so neither CPU halts between a request and its reply;
it yields the CPU at each turn, so on a loaded machine it costs little
more than blocking (seen: 39 µs a round against 18 µs blocking, with both
cores busy; a spin that did not yield took 2 ms).
``PVEMU_SPIN_US`` overrides the budget (0 turns spinning off).
"""

from __future__ import annotations

import math
import os
import select
import time
from typing import Any, Final

import trio

#: The longest a lone wait blocks before waiting in trio instead, so timers,
#: signals and new connections are delayed by no more than this.
ALONE_WAIT_S: Final = 0.05


def _spin_budget() -> float:
    """Seconds to spin before blocking: 0 on one CPU, where a spinning end
    would only keep the other from running."""
    override = os.environ.get("PVEMU_SPIN_US")
    if override is not None:
        try:
            return max(0, int(override)) / 1e6
        except ValueError:
            return 0.0
    return 500e-6 if len(os.sched_getaffinity(0)) >= 2 else 0.0


#: How long a lone wait polls without blocking before it blocks.
SPIN_S: Final = _spin_budget()


def poll_lone(poller: select.poll, wait_ms: int) -> list[tuple[int, int]]:
    """``poller.poll(wait_ms)``, spinning for up to :data:`SPIN_S` first.

    Only for a wait :func:`lone_wait_ms` allowed: nothing else in this
    process could run meanwhile, so the spin takes no one's turn.
    """
    if SPIN_S > 0:
        ready = poller.poll(0)
        if ready:
            return ready
        until = time.perf_counter() + min(SPIN_S, wait_ms / 1000)
        while time.perf_counter() < until:
            # Give the CPU to anything else runnable on it: on a loaded
            # machine the peer may be queued behind this very spin.
            os.sched_yield()
            ready = poller.poll(0)
            if ready:
                return ready
    return poller.poll(wait_ms)


#: Lone waits in a row before one wait goes through trio whatever the
#: statistics say (see :func:`lone_wait_ms`).
MAX_STREAK: Final = 64
_streak = 0


def lone_wait_ms(readers: int) -> int:
    """Milliseconds this task may block in ``poll``; 0 means wait in trio.

    ``readers`` is how many tasks may be waiting to read without anything
    else being able to run (trio's own wakeup reader, plus a listener, plus
    other parked connections). Any runnable task, queued callback, writer or
    deadline before the wait would end means trio must do the waiting.

    A task woken in this same scheduler batch is invisible here (trio took
    it off the run queue when the batch began), and it runs only once this
    task yields. A task that waits alone every time never yields while its
    peer keeps sending, so every :data:`MAX_STREAK`-th wait goes through
    trio: such a task waits for at most that many requests (a new
    connection's handler did wait forever before this bound).
    """
    global _streak
    if _streak >= MAX_STREAK:
        _streak = 0
        return 0
    _streak += 1
    stats = trio.lowlevel.current_statistics()
    if stats.tasks_runnable or stats.run_sync_soon_queue_size:
        return 0
    io: Any = stats.io_statistics  # epoll's statistics; other backends: trio
    if getattr(io, "tasks_waiting_read", readers + 1) > readers:
        return 0
    if getattr(io, "tasks_waiting_write", 1):
        return 0
    timeout = min(stats.seconds_to_next_deadline, ALONE_WAIT_S)
    return math.ceil(timeout * 1000) if timeout > 0 else 0
