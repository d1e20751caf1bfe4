"""When a trio program may block in ``poll`` instead of in trio's scheduler.

A trap is a blocking exchange: the guest sends, the hypervisor answers. When
one vCPU is all a process is serving, waiting for the other side through
trio (an epoll registration, ``epoll_wait``, a reschedule) is a scheduler
pass nobody else can use. Both ends ask :func:`lone_wait_ms` first and
block in ``poll`` for that long when it is positive.
"""

from __future__ import annotations

import math
from typing import Any, Final

import trio

#: The longest a lone wait blocks before waiting in trio instead, so timers,
#: signals and new connections are delayed by no more than this.
ALONE_WAIT_S: Final = 0.05


def lone_wait_ms(readers: int) -> int:
    """Milliseconds this task may block in ``poll``; 0 means wait in trio.

    ``readers`` is how many tasks may be waiting to read without anything
    else being able to run (trio's own wakeup reader, plus a listener). Any
    runnable task, queued callback, writer or deadline before the wait would
    end means trio must do the waiting. A task woken in this same scheduler
    batch is invisible here: callers that can have one (another vCPU, another
    connection) must not ask.
    """
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
