"""Hostile guests: writable page tables (§7).

A trapped write, exchange or atomic clear of bits that the emulation does not
accept (into an upper-level table, a data or untyped frame, another domain's
or Xen's frame, beyond RAM, misaligned) is refused with -EFAULT; without
VMASST_TYPE_writable_pagetables nothing is emulated at all.
"""

from __future__ import annotations

from typing import Final

import pytest

from pvemu.shared import abi
from pvemu.shared.x86 import make_pte as pte
from pvemu.shared.x86 import pte_mfn
from tests.hostile.rejection import (
    PTWR,
    Rule,
    at,
    check_rejection,
    const,
    rec,
    ro_data1,
    rule_cases,
    rules,
    unmap,
    upper,
)
from tests.hostile.scene import BEYOND, USER_RO, assert_unchanged, probe, scene, snapshot
from tests.hvproc import HypervisorProcess

NOT_EMULATED = "§7 ptwr: not emulated (pvemu's rc -EFAULT, docs/architecture.md)"

RULES: Final[tuple[Rule, ...]] = (
    # --- writable page tables (§7)
    *rules(
        abi.EFAULT,
        NOT_EMULATED,
        PTWR,
        ("ptwr_into_l2", upper("l2", 2, lambda s: s.a.l1)),
        ("ptwr_into_l3", upper("l3", 1, lambda s: s.a.l2)),
        ("ptwr_into_l4", upper("l4", 1, lambda s: s.a.l3)),
        ("ptwr_into_rw_data", rec(at(lambda s: s.a.data[0]), const(0x41))),
        ("ptwr_into_untyped", rec(at(lambda s: s.a.spare()), const(0x41))),
        ("ptwr_into_victim_l1", rec(lambda s: s.v.l1e(0), unmap)),
        ("ptwr_into_xen_frame", rec(at(lambda s: s.a.xen, 1), unmap)),
        ("ptwr_beyond_ram", rec(const(BEYOND << 12), unmap)),
        ("ptwr_misaligned", rec(lambda s: s.a.l1e(5) + 4, ro_data1)),
    ),
)


@pytest.mark.parametrize(("rule", "path"), rule_cases(RULES))
async def test_rejection_rule(hvp: HypervisorProcess, rule: Rule, path: str) -> None:
    """The rule's errno and ``done``; nothing else moved; no leaked ref or type."""
    await check_rejection(hvp, rule, path)


async def test_ptwr_without_the_assist_is_not_emulated(hvp: HypervisorProcess) -> None:
    """§7: emulation needs VMASST_TYPE_writable_pagetables; without it the
    same write that is emulated with it is refused (#PF, rc -EFAULT)."""
    async with scene(hvp) as s:
        dom = s.a.dom
        disable, assist = abi.VMASST_CMD_disable, abi.VMASST_TYPE_writable_pagetables
        assert await dom.vm_assist(disable, assist) == 0
        before = await snapshot(s)
        write = (s.a.l1e(5), pte(s.a.data[1], USER_RO))
        assert await dom.ptwr_write(*write) == -abi.EFAULT
        assert_unchanged(s, before, await snapshot(s), deltas={"traps": 1, "ptwr": 1})
        assert await dom.vm_assist(abi.VMASST_CMD_enable, assist) == 0
        assert await dom.ptwr_write(*write) == 0
        assert pte_mfn(dom.read_u64(write[0])) == s.a.data[1]
        await probe(s)
