"""The preemption protocol: a call spends a slice's budget in runs of
entries and parks only when it is used up and work remains."""

from __future__ import annotations

import pytest

from pvemu.hypervisor import PendingCall
from pvemu.hypervisor.hypercalls import Budget
from pvemu.shared import abi
from pvemu.shared.x86 import make_pte
from tests.support import Guest, boot, core_call, flat


def _records(guest: Guest, n: int, start: int = 0) -> list[int]:
    """``n`` new mappings of spare frames (each a per-record reference write)."""
    return flat(*((guest.l1e(start + i), make_pte(guest.spare[start + i], 5)) for i in range(n)))


def _mmu(guest: Guest, n: int) -> PendingCall:
    call = core_call(abi.HYPERVISOR_mmu_update, (_records(guest, n), abi.DOMID_SELF))
    return guest.hv.start_hypercall(guest.domid, 0, call)


def _slices(call: PendingCall, budget: int | None) -> list[int]:
    """Entries processed after each step, until the call ends."""
    seen = []
    while True:
        done = call.step(budget)
        seen.append(call.entries)
        if done:
            return seen


@pytest.mark.parametrize(
    ("n", "budget", "expected"),
    [
        (10, 4, [4, 8, 10]),
        (10, 5, [5, 10]),  # exactly used up at the end: no extra park
        (10, None, [10]),
        (10, 100, [10]),
        (3, 0, [1, 2, 3]),  # a step always makes progress
        (1, 1, [1]),
    ],
)
def test_a_step_processes_its_budget_of_records(
    n: int, budget: int | None, expected: list[int]
) -> None:
    guest = boot(mapped=0)
    records_before = guest.dom.counters[0].mmu_update_records
    call = _mmu(guest, n)
    assert _slices(call, budget) == expected
    assert call.result is not None
    assert (call.result.rc, call.result.done) == (0, n)
    assert guest.dom.counters[0].mmu_update_records - records_before == n


def test_a_parked_call_resumes_at_its_next_record() -> None:
    guest = boot(mapped=0)
    call = _mmu(guest, 7)
    applied = []
    while not call.step(3):
        applied.append([bool(guest.read(guest.l1e(i))) for i in range(7)])
    assert applied == [[True] * 3 + [False] * 4, [True] * 6 + [False]]
    assert guest.hv.audit() == []


def test_a_finished_call_steps_as_done_without_running() -> None:
    guest = boot(mapped=0)
    call = _mmu(guest, 2)
    assert call.step()
    result = call.result
    assert call.step(1)
    assert call.result is result
    assert call.entries == 2


def test_multicall_entries_cost_their_records_and_at_least_one() -> None:
    """[mmu_update x3, update_va_mapping, empty mmu_update, mmuext_op x2]
    costs 3 + 1 + 1 + 2 entries; slices cut inside the nested batches."""
    guest = boot(mapped=0)
    calls = [
        (abi.HYPERVISOR_mmu_update, _records(guest, 3), abi.DOMID_SELF),
        (abi.HYPERVISOR_update_va_mapping, 3 * 4096, make_pte(guest.spare[3], 5), 0),
        (abi.HYPERVISOR_mmu_update, [], abi.DOMID_SELF),
        (
            abi.HYPERVISOR_mmuext_op,
            [(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0), (abi.MMUEXT_INVLPG_LOCAL, 0, 0)],
            abi.DOMID_SELF,
        ),
    ]
    for budget, expected in (
        (2, [2, 4, 6, 7]),
        (3, [3, 6, 7]),
        (None, [7]),
        (1, list(range(1, 8))),
    ):
        guest = boot(mapped=0)
        before = guest.dom.counters[0]
        records_before, ops_before = before.mmu_update_records, before.mmuext_ops
        call = guest.hv.start_hypercall(
            guest.domid, 0, core_call(abi.HYPERVISOR_multicall, (calls,))
        )
        assert _slices(call, budget) == expected
        assert call.result is not None
        assert call.result.results == (0, 0, 0, 0)
        counters = guest.dom.counters[0]
        records = counters.mmu_update_records - records_before
        assert (counters.multicall_entries, records) == (4, 3)
        assert counters.mmuext_ops - ops_before == 2


def test_a_failing_mmu_update_spends_the_records_it_looked_at() -> None:
    guest = boot(mapped=0)
    reqs = _records(guest, 2) + flat((guest.l1e(9) | 7, 0)) + _records(guest, 2, start=3)
    call = guest.hv.start_hypercall(
        guest.domid, 0, core_call(abi.HYPERVISOR_mmu_update, (reqs, abi.DOMID_SELF))
    )
    assert _slices(call, 2) == [2, 3]
    assert call.result is not None
    assert (call.result.rc, call.result.done) == (-abi.ENOSYS, 2)


def test_budget_spend_counts_left_and_used() -> None:
    budget = Budget(5)
    budget.spend(3)
    budget.spend(2)
    assert (budget.left, budget.used) == (0, 5)
