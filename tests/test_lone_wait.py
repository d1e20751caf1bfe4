"""When a trio end may wait for its peer in a blocking ``poll``, and that
such a wait never starves anyone (``shared/lone_wait.py``)."""

from __future__ import annotations

import select
import socket

import trio
import trio.testing

from pvemu.guest.client import connect
from pvemu.shared import lone_wait
from pvemu.shared.x86 import maddr_of_entry, make_pte
from tests.hvproc import hypervisor_process

USER_RW = 0x7
USER_RO = 0x5


def test_every_max_streak_th_lone_wait_goes_through_trio() -> None:
    async def main() -> list[int]:
        lone_wait._streak = 0
        return [lone_wait.lone_wait_ms(readers=1) for _ in range(lone_wait.MAX_STREAK * 2 + 2)]

    waits = trio.run(main)
    through_trio = [i for i, ms in enumerate(waits) if ms == 0]
    assert through_trio == [lone_wait.MAX_STREAK, 2 * lone_wait.MAX_STREAK + 1]
    assert all(0 < ms <= lone_wait.ALONE_WAIT_S * 1000 for i, ms in enumerate(waits) if ms)


def test_lone_wait_yields_to_a_runnable_task_and_a_second_reader() -> None:
    async def main() -> tuple[int, int]:
        lone_wait._streak = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)
            runnable = lone_wait.lone_wait_ms(readers=1)
        a, b = trio.socket.socketpair()
        with a, b:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.recv, 1)
                await trio.testing.wait_all_tasks_blocked()
                reader = lone_wait.lone_wait_ms(readers=1)
                nursery.cancel_scope.cancel()
        return runnable, reader

    assert trio.run(main) == (0, 0)


def test_poll_lone_returns_what_is_ready() -> None:
    a, b = socket.socketpair()
    with a, b:
        poller = select.poll()
        poller.register(a.fileno(), select.POLLIN)
        assert lone_wait.poll_lone(poller, 1) == []
        b.send(b"x")
        assert lone_wait.poll_lone(poller, 1000) == [(a.fileno(), select.POLLIN)]


async def test_a_guest_that_never_pauses_cannot_starve_a_new_connection() -> None:
    """One guest sends its next hypercall as soon as the last one returns;
    ten other domains connect meanwhile, each within seconds. Before the
    streak bound, a handler spawned in the same scheduler batch as the busy
    connection's task could wait forever: the busy task waited alone every
    time and never yielded."""
    with hypervisor_process(tag="lone") as hvp:
        async with connect(hvp.socket_path, memory_mib=4) as dom:
            l1, frame = dom.alloc_frame(), dom.alloc_frame()
            batches = [[(maddr_of_entry(l1, 0), make_pte(frame, f))] for f in (USER_RW, USER_RO)]
            rounds = 0

            async def hammer() -> None:
                nonlocal rounds
                while True:
                    assert await dom.mmu_update(batches[rounds % 2]) == (0, 1)
                    rounds += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hammer)
                for _ in range(10):
                    with trio.fail_after(10):
                        async with connect(hvp.socket_path, memory_mib=1):
                            pass
                nursery.cancel_scope.cancel()
            assert rounds > 0
        assert hvp.stop() == 0
