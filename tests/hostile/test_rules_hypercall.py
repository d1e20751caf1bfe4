"""Hostile guests: hypercall numbers and multicall (§1.1, §4).

An unknown or unsupported hypercall number is -ENOSYS, directly and inside
a multicall; a multicall nested in a multicall is refused and its entries
never run.
"""

from __future__ import annotations

from typing import Final

import pytest

from pvemu.shared import abi
from tests.hostile.rejection import (
    CALL,
    Offence,
    Rule,
    check_rejection,
    prefix_ro,
    rule_cases,
    rules,
)
from tests.hvproc import HypervisorProcess

RULES: Final[tuple[Rule, ...]] = (
    # --- hypercall numbers and multicall (§1.1, §4)
    *rules(
        abi.ENOSYS,
        "§1.1 an unknown or unsupported hypercall number",
        CALL,
        ("unknown_hypercall", lambda s: Offence(call=(abi.HYPERVISOR_memory_op, 1, 2))),
        ("unknown_hypercall_max", lambda s: Offence(call=(2**32 - 1,))),
    ),
    *rules(
        abi.EINVAL,
        "§4.1 / §6.7 multicall: a nested multicall, whose entries never run",
        ("multicall.call",),
        (
            "nested_multicall",
            lambda s: Offence(
                call=(
                    abi.HYPERVISOR_multicall,
                    [(abi.HYPERVISOR_mmu_update, [(s.a.l1be(5), prefix_ro(s))])],
                )
            ),
        ),
    ),
)


@pytest.mark.parametrize(("rule", "path"), rule_cases(RULES))
async def test_rejection_rule(hvp: HypervisorProcess, rule: Rule, path: str) -> None:
    """The rule's errno and ``done``; nothing else moved; no leaked ref or type."""
    await check_rejection(hvp, rule, path)
