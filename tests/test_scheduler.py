"""The fair-share policy (sans I/O) and the trio CPU gate that applies it."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from pvemu.hypervisor.cpu import Cpu
from pvemu.hypervisor.scheduler import FairShare, FirstCome, SlicePolicy
from pvemu.hypervisor.server import ServerLimits


def test_least_runtime_runs_first_and_ties_are_first_come() -> None:
    policy = FairShare()
    policy.charge("a", 0.003)
    policy.charge("b", 0.001)
    policy.charge("c", 0.001)
    for key in ("a", "b", "c"):
        policy.enqueue(key)
    assert [policy.pop(), policy.pop(), policy.pop(), policy.pop()] == ["b", "c", "a", None]


def test_a_waking_vcpu_jumps_ahead_by_the_bonus_but_banks_no_sleep() -> None:
    policy = FairShare(wake_bonus=0.001)
    policy.charge("busy", 0.010)
    policy.enqueue("busy")
    assert policy.pop() == "busy"
    assert policy.min_vruntime == pytest.approx(0.010)
    policy.wake("sleeper")  # new: enters just ahead of the busiest waiter
    assert policy.vruntime("sleeper") == pytest.approx(0.009)
    policy.charge("heavy", 0.050)  # a new vCPU starts from min_vruntime
    policy.wake("heavy")  # already past min: keeps its own runtime
    assert policy.vruntime("heavy") == pytest.approx(0.060)


def test_enqueue_twice_is_an_error_and_remove_forget_drop_waiters() -> None:
    policy = FairShare()
    policy.enqueue("a")
    with pytest.raises(ValueError, match="already waiting"):
        policy.enqueue("a")
    policy.remove("a")
    assert policy.waiting == 0
    policy.charge("b", 1.0)
    policy.enqueue("b")
    policy.forget("b")
    assert policy.pop() is None
    assert policy.vruntime("b") == policy.min_vruntime
    with pytest.raises(ValueError, match="negative"):
        FairShare(wake_bonus=-1)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(("wake", "charge", "enqueue", "pop", "remove")),
            st.integers(0, 5),
            st.floats(0, 0.01),
        ),
        max_size=80,
    )
)
def test_pop_always_returns_a_least_runtime_waiter_and_min_never_falls(
    ops: list[tuple[str, int, float]],
) -> None:
    policy = FairShare()
    queued: dict[int, float] = {}
    last_min = policy.min_vruntime
    for op, key, seconds in ops:
        if op == "wake":
            policy.wake(key)
        elif op == "charge":
            policy.charge(key, seconds)
        elif op == "enqueue" and key not in queued:
            queued[key] = policy.vruntime(key)
            policy.enqueue(key)
        elif op == "remove":
            policy.remove(key)
            queued.pop(key, None)
        elif op == "pop":
            least = min(queued.values(), default=None)
            popped = policy.pop()
            if least is None:
                assert popped is None
            else:
                assert queued.pop(popped) == least
        assert policy.min_vruntime >= last_min
        assert policy.waiting == len(queued)
        last_min = policy.min_vruntime


class FakeClock:
    """Each slice costs exactly what the test says: deterministic charges."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def probe_wait(policy: SlicePolicy) -> tuple[int, list[str]]:
    """Four batches of 20 slices; a probe wakes during b0's fourth slice.
    Returns how many slices ran between its waking and its own, and the order."""
    clock = FakeClock()
    cpu = Cpu(policy, clock=clock)
    order: list[str] = []
    probe_wanted = trio.Event()

    async def batch(name: str, slices: int) -> None:
        async with cpu.running(name):
            for i in range(slices):
                order.append(name)
                clock.now += 0.001  # one slice of work
                if name == "b0" and i == 3:
                    probe_wanted.set()
                await cpu.preempt(name)

    async def probe() -> None:
        await probe_wanted.wait()
        async with cpu.running("probe"):
            order.append("probe")
            clock.now += 0.0001

    async with trio.open_nursery() as nursery:
        for b in range(4):
            nursery.start_soon(batch, f"b{b}", 20)
        nursery.start_soon(probe)
    assert order.count("probe") == 1
    at = order.index("probe")
    woke = [i for i, name in enumerate(order) if name == "b0"][3]
    return at - woke - 1, order


async def test_a_waking_probe_runs_right_after_the_current_slice() -> None:
    # Trio may run one more ready slice before the probe queues.
    waited, order = await probe_wait(FairShare(wake_bonus=0.001))
    assert waited <= 1
    assert len(order) == 81
    # The batches took turns, none finished all its slices first.
    first_done = {b: max(i for i, n in enumerate(order) if n == b) for b in ("b0", "b1", "b2")}
    assert all(done > 60 for done in first_done.values())


async def test_first_come_makes_the_probe_wait_for_every_batch() -> None:
    waited, _order = await probe_wait(FirstCome())
    assert waited >= 3  # b1..b3 were queued before it


def test_first_come_ignores_runtime_and_limits_name_a_policy() -> None:
    policy = FirstCome()
    policy.charge("a", 5.0)
    policy.enqueue("a")
    policy.enqueue("b")
    with pytest.raises(ValueError, match="already waiting"):
        policy.enqueue("b")
    assert [policy.pop(), policy.pop(), policy.pop()] == ["a", "b", None]
    with pytest.raises(ValueError, match="scheduler"):
        ServerLimits(scheduler="lottery")


async def test_a_cancelled_waiter_leaves_the_cpu_usable() -> None:
    cpu = Cpu(FairShare())
    entered = trio.Event()
    release = trio.Event()

    async def holder() -> None:
        async with cpu.running("holder"):
            entered.set()
            await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await entered.wait()
        with trio.move_on_after(0.05):
            async with cpu.running("impatient"):
                raise AssertionError("the CPU was held by someone else")
        release.set()
    with trio.fail_after(1):
        async with cpu.running("later"):
            pass
