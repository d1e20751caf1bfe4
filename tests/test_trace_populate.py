"""A trace's populating calls replayed through the kernel's own paths:
MAP_POPULATE and MAP_LOCKED on mmap (``Kernel.mmap``), MADV_POPULATE_READ
and MADV_POPULATE_WRITE (``Kernel.madvise_populate``), mlock and munlock
(``Kernel.mlock``, ``Kernel.munlock``); the populated pages are resident, so
touch-on-grant leaves them alone and a later access takes no fault
(docs/traces.md, "How each syscall is reproduced").

The costs are docs/architecture.md's ("populate, mlock and MAP_FIXED"): a
populate of n missing pages in one PTE page costs, in ``trap`` and ``xen``,
n (one ``mmu_update`` per PTE), in ``batched`` 1 (one per PTE page), plus 2
per page-table page it builds. A fresh range at ``BASE`` builds 3 (the L3,
L2 and L1 tables under it): T = 3.
"""

from __future__ import annotations

from typing import Any

import pytest

from pvemu.guest.kernel import Kernel
from pvemu.guest.replay import replay_trace
from pvemu.guest.replay_result import TraceResult
from pvemu.shared.trace import (
    MAP_LOCKED,
    MAP_NONBLOCK,
    MAP_POPULATE,
    PROT_READ,
    Event,
    Mmap,
)
from tests.test_trace import ANON, BASE, PAGE, RW, local_kernel, trace_of

MODES = ("trap", "xen", "batched")
#: Page-table pages a first populate at BASE builds.
TABLES = 3


def populate_traps(mode: str, n: int, tables: int = 0) -> int:
    """n missing pages of one PTE page populated, ``tables`` tables built."""
    return (1 if mode == "batched" else n) + 2 * tables


async def replay(mode: str, *events: Event, **policy: Any) -> tuple[Kernel, TraceResult]:
    kernel = await local_kernel(mode)
    result = await replay_trace(kernel, trace_of(*events), **policy)
    assert result.audit_clean, result.audit
    assert result.counts_agree
    assert result.replay_clean, result.error_samples
    return kernel, result


def traps(result: TraceResult, phase: str) -> int:
    return result.phases[phase].counts.traps


# --- MAP_POPULATE and MAP_LOCKED ---------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("flag", [MAP_POPULATE, MAP_LOCKED, MAP_POPULATE | MAP_LOCKED])
@pytest.mark.parametrize("n", [4, 8])
async def test_a_populating_mmap_populates_in_the_mmap_phase_and_nothing_is_touched(
    mode: str, flag: int, n: int
) -> None:
    kernel, result = await replay(mode, Mmap(1, BASE, n * PAGE, RW, ANON | flag))
    assert traps(result, "mmap") == populate_traps(mode, n, TABLES)
    assert result.phases["mmap"].counts.page_faults == 0
    assert traps(result, "touch") == 0  # every page present: touch-on-grant skips them
    assert result.pages == 0
    assert result.peak_resident == n
    assert [v[:3] for v in kernel.vmas()] == [(BASE, BASE + n * PAGE, RW)]


@pytest.mark.parametrize("mode", MODES)
async def test_map_nonblock_keeps_map_populate_from_populating(mode: str) -> None:
    _, result = await replay(mode, Mmap(1, BASE, 4 * PAGE, RW, ANON | MAP_POPULATE | MAP_NONBLOCK))
    assert traps(result, "mmap") == 0
    assert result.pages == 4  # touch-on-grant populates instead
    assert result.phases["touch"].counts.page_faults == 4


@pytest.mark.parametrize("mode", MODES)
async def test_a_populated_read_only_mapping_reads_back_zeros(mode: str) -> None:
    kernel, result = await replay(mode, Mmap(1, BASE, 2 * PAGE, PROT_READ, ANON | MAP_POPULATE))
    assert traps(result, "mmap") == populate_traps(mode, 2, TABLES)
    assert result.pages == 0
    assert await kernel.read(BASE, 1) == b"\0"
