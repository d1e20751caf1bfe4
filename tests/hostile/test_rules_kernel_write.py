"""Hostile guests: the kernel's plain stores through its linear map.

A ``kernel_write`` is no trap, but it is the one request that writes guest
memory with plain bytes, so each way it must fault is an attack: into a
page table in use (each level of the attacker's own tree), another
domain's frame, Xen's frame, a free frame, beyond RAM, or through a linear
mapping made read-only. A fault writes nothing anywhere.
"""

from __future__ import annotations

from typing import Final

import pytest

from pvemu.shared import abi
from pvemu.shared.x86 import _PAGE_NX, _PAGE_PRESENT, _PAGE_RW, LINEAR_MAP_BASE
from pvemu.shared.x86 import make_pte as pte
from tests.hostile.rejection import (
    KERNEL_WRITE,
    Rule,
    at,
    check_rejection,
    const,
    rec,
    rule_cases,
    rules,
)
from tests.hostile.scene import BEYOND, assert_unchanged, probe, scene, snapshot
from tests.hvproc import HypervisorProcess

NEEDLE: Final = 0x4141_4141_4141_4141
FAULTS = "pvemu's linear map: a store to a page table in use or a frame not the domain's faults"

RULES: Final[tuple[Rule, ...]] = (
    *rules(
        abi.EFAULT,
        FAULTS,
        KERNEL_WRITE,
        *(
            (
                f"kernel_write_into_own_{t}",
                rec(at(lambda s, t=t: getattr(s.a, t), 5), const(NEEDLE)),
            )
            for t in ("l1", "l1b", "l2", "l3", "l4")
        ),
        ("kernel_write_into_victim_data", rec(at(lambda s: s.v.data[0], 1), const(NEEDLE))),
        ("kernel_write_into_victim_marker", rec(at(lambda s: s.v.marker), const(NEEDLE))),
        ("kernel_write_into_victim_l1", rec(lambda s: s.v.l1e(0), const(0))),
        ("kernel_write_into_xen_frame", rec(at(lambda s: s.a.xen, 300), const(NEEDLE))),
        ("kernel_write_into_free_frame", rec(at(lambda s: s.free_frame()), const(NEEDLE))),
        ("kernel_write_beyond_ram", rec(const(BEYOND << 12), const(NEEDLE))),
    ),
)


@pytest.mark.parametrize(("rule", "path"), rule_cases(RULES))
async def test_rejection_rule(hvp: HypervisorProcess, rule: Rule, path: str) -> None:
    """-EFAULT; nothing else moved (one kernel write counted, no trap); no
    leaked ref or type."""
    await check_rejection(hvp, rule, path)


async def test_kernel_write_through_a_read_only_linear_mapping(hvp: HypervisorProcess) -> None:
    """Once the frame's linear mapping is read-only the store faults; made
    writable again, it lands (the only word that changes)."""
    async with scene(hvp) as s:
        dom, frame = s.a.dom, s.a.prefix
        va = LINEAR_MAP_BASE + (dom.pfn_of(frame) << 12)
        ro, rw = pte(frame, _PAGE_PRESENT | _PAGE_NX), pte(frame, _PAGE_PRESENT | _PAGE_RW)
        assert await dom.update_va_mapping(va, ro, abi.UVMF_INVLPG) == 0
        before = await snapshot(s)
        assert await dom.kernel_write((frame << 12) + 16, NEEDLE.to_bytes(8, "little")) == (
            -abi.EFAULT
        )
        assert_unchanged(s, before, await snapshot(s), deltas={"kernel_writes": 1})
        assert await dom.update_va_mapping(va, rw, abi.UVMF_INVLPG) == 0
        before = await snapshot(s)
        assert await dom.kernel_write((frame << 12) + 16, NEEDLE.to_bytes(8, "little")) == 0
        deltas = {"kernel_writes": 1, "kernel_write_bytes": 8}
        written = (((frame << 12) + 16, NEEDLE),)
        assert_unchanged(s, before, await snapshot(s), deltas=deltas, rewritten=written)
        await probe(s, (frame,))


async def test_a_refused_remap_leaves_the_store_faulting(hvp: HypervisorProcess) -> None:
    """The attacker's own L1 made RW in the linear map is refused, so a store
    into it still faults, and a pin of a frame whose linear mapping the
    attacker left writable does not make that frame storable either."""
    async with scene(hvp) as s:
        dom = s.a.dom
        va = LINEAR_MAP_BASE + (dom.pfn_of(s.a.l1) << 12)
        assert await dom.update_va_mapping(va, pte(s.a.l1, _PAGE_PRESENT | _PAGE_RW), 0) == (
            -abi.EINVAL
        )
        spare = s.a.spare()
        assert await dom.mmuext_op([(abi.MMUEXT_PIN_L1_TABLE, spare, 0)]) == (0, 1)
        before = await snapshot(s)
        for frame in (s.a.l1, spare):
            assert await dom.kernel_write(frame << 12, bytes(8)) == -abi.EFAULT
        assert_unchanged(s, before, await snapshot(s), deltas={"kernel_writes": 2})
        assert await dom.mmuext_op([(abi.MMUEXT_UNPIN_TABLE, spare, 0)]) == (0, 1)
        await probe(s)
