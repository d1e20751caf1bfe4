"""The scene of every hostile test: an attacker and a victim domain, furnished
with a known layout, and what must not change after an attack."""

from __future__ import annotations

import array
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import trio

from pvemu.guest.client import Domain, connect
from pvemu.shared import abi
from pvemu.shared.x86 import _PAGE_PRESENT, PAGE_SIZE, maddr_of_entry, pte_mfn
from pvemu.shared.x86 import make_pte as pte
from tests.hvproc import HypervisorProcess

MACHINE_MIB: Final = 16
MACHINE_FRAMES: Final = MACHINE_MIB * 256
DOMAIN_FRAMES: Final = 256  # memory_mib=1
#: A frame number past machine memory: not RAM (MMIO for Xen).
BEYOND: Final = MACHINE_FRAMES + 7
#: A domid no domain of these tests ever gets (domids count up from 1).
UNKNOWN_DOMID: Final = 0x7FEF
USER_RO: Final = 0x5
USER_RW: Final = 0x7
TABLE: Final = 0x7
#: VA mapped by the second L1 (``l1b``, L2 slot 1), where probes and the
#: valid prefix records write.
L1B_VA: Final = 1 << 21
MARKER_WORDS: Final = 64


# --- the scene: an attacker and a victim, both furnished ----------------------------------


@dataclass(frozen=True)
class Tree:
    """A booted domain with a known layout.

    L1 maps ``data`` read-write at VA 0..; ``l1b`` (L2 slot 1) starts empty;
    ``marker`` is an untyped frame holding ``needle``, this domain's
    distinctive content; ``xen`` is Xen's own frame, read from the L4 slot
    Xen fills.
    """

    dom: Domain
    l4: int
    l3: int
    l2: int
    l1: int
    l1b: int
    data: tuple[int, ...]
    prefix: int
    marker: int
    needle: bytes
    xen: int

    def l1e(self, index: int) -> int:
        return maddr_of_entry(self.l1, index)

    def l1be(self, index: int) -> int:
        return maddr_of_entry(self.l1b, index)

    def spare(self) -> int:
        return self.dom.alloc_frame()


def child(dom: Domain, table: int, index: int) -> int:
    return pte_mfn(dom.read_u64(maddr_of_entry(table, index)))


async def furnish(dom: Domain) -> Tree:
    l4 = dom.l4_mfn
    l3 = child(dom, l4, 0)
    l2 = child(dom, l3, 0)
    l1 = child(dom, l2, 0)
    xen = child(dom, l4, abi.ROOT_PAGETABLE_FIRST_XEN_SLOT)
    l1b = dom.alloc_frame()
    data = tuple(dom.alloc_frame() for _ in range(4))
    prefix, marker = dom.alloc_frame(), dom.alloc_frame()
    words = array.array("Q", os.urandom(8 * MARKER_WORDS))
    reqs = [(maddr_of_entry(l1, i), pte(m, USER_RW)) for i, m in enumerate(data)]
    reqs.append((maddr_of_entry(l2, 1), pte(l1b, TABLE)))
    reqs += [(maddr_of_entry(marker, i), w) for i, w in enumerate(words)]
    assert await dom.mmu_update(reqs) == (0, len(reqs))
    return Tree(dom, l4, l3, l2, l1, l1b, data, prefix, marker, words.tobytes(), xen)


@dataclass(frozen=True)
class Scene:
    a: Tree  # the attacker
    v: Tree  # the victim: a bystander that must never notice

    def free_frame(self) -> int:
        """A machine frame no domain owns (only these two domains exist)."""
        owned = {*self.a.dom.p2m, *self.v.dom.p2m, self.a.xen}
        return next(m for m in range(MACHINE_FRAMES) if m not in owned)


async def settle(dom: Domain) -> None:
    """Wait until the domains of earlier tests are gone: only two remain."""
    expected = MACHINE_FRAMES - 1 - 2 * DOMAIN_FRAMES
    with trio.fail_after(10):
        while True:
            if (await dom.stats())["hypervisor"]["free_frames"] == expected:
                return
            await trio.sleep(0.01)


@asynccontextmanager
async def scene(hvp: HypervisorProcess) -> AsyncIterator[Scene]:
    async with (
        connect(hvp.socket_path, memory_mib=1, name="attacker") as a,
        connect(hvp.socket_path, memory_mib=1, name="victim") as v,
    ):
        await settle(a)
        yield Scene(await furnish(a), await furnish(v))


# --- snapshots and what must not change -------------------------------------------------

COUNTERS: Final = (
    "traps",
    "hypercalls",
    "multicall_entries",
    "mmu_update_records",
    "mmu_xchg_records",
    "mmuext_ops",
    "ptwr",
    "page_faults",
    "tlb_flush_ops",
    "user_runs",
    "user_accesses",
    "kernel_writes",
    "kernel_write_bytes",
)


def memory(dom: Domain) -> bytes:
    """A domain's whole memory in PFN order, read through its own mapping."""
    return b"".join(dom.read_bytes(mfn << 12, PAGE_SIZE) for mfn in dom.p2m)


def counts(stats: dict[str, Any]) -> dict[str, int]:
    total = stats["hypervisor"]["total"]
    return {name: int(total[name]) for name in COUNTERS}


@dataclass(frozen=True)
class Snapshot:
    a_mem: bytes
    v_mem: bytes
    a_counts: dict[str, int]
    v_counts: dict[str, int]
    free: int


async def snapshot(s: Scene) -> Snapshot:
    a_stats = await s.a.dom.stats()
    v_stats = await s.v.dom.stats()
    # The hypervisor counted exactly the traps the attacker issued.
    assert a_stats["guest"]["total"]["traps"] == a_stats["hypervisor"]["total"]["traps"]
    return Snapshot(
        memory(s.a.dom),
        memory(s.v.dom),
        counts(a_stats),
        counts(v_stats),
        a_stats["hypervisor"]["free_frames"],
    )


def changed_words(before: bytes, after: bytes, dom: Domain) -> list[str]:
    """Every 8-byte word that differs, as 'mfn[index]: old -> new'."""
    old = memoryview(before).cast("Q")
    new = memoryview(after).cast("Q")
    out = []
    for i in range(len(old)):
        if old[i] != new[i]:
            out.append(f"mfn {dom.p2m[i >> 9]:#x}[{i & 511}]: {old[i]:#x} -> {new[i]:#x}")
    return out


def assert_unchanged(
    s: Scene,
    before: Snapshot,
    after: Snapshot,
    *,
    mapped: frozenset[int] = frozenset(),
    deltas: dict[str, int] | None = None,
    rewritten: tuple[tuple[int, int], ...] = (),
    frames_taken: int = 0,
) -> None:
    """Nothing moved but what the valid requests did.

    ``mapped``: the entries of ``l1b`` the valid requests filled (each maps
    the prefix frame); ``deltas``: the attacker's counters that moved;
    ``rewritten``: other words allowed to change, with their new value;
    ``frames_taken``: frames a new domain took from the pool meanwhile.
    """
    dom = s.a.dom
    words = memoryview(after.a_mem).cast("Q")

    def word(maddr: int) -> int:
        return int(words[dom.pfn_of(maddr >> 12) * 512 + (maddr & 0xFFF) // 8])

    for index in mapped:
        entry = word(s.a.l1be(index))
        assert entry & _PAGE_PRESENT, (index, hex(entry))
        assert pte_mfn(entry) == s.a.prefix, (index, hex(entry))
    for maddr, value in rewritten:
        assert word(maddr) == value, (hex(maddr), hex(word(maddr)), hex(value))
    allowed = {f"mfn {s.a.l1b:#x}[{i}]" for i in mapped}
    allowed |= {f"mfn {maddr >> 12:#x}[{(maddr & 0xFFF) // 8}]" for maddr, _ in rewritten}
    changes = changed_words(before.a_mem, after.a_mem, dom)
    assert [c for c in changes if c.split(":")[0] not in allowed] == []
    assert len(changes) == len(mapped) + len(rewritten)
    assert changed_words(before.v_mem, after.v_mem, s.v.dom) == []
    assert after.v_counts == before.v_counts
    assert after.free == before.free - frames_taken
    moved = {k: after.a_counts[k] - before.a_counts[k] for k in COUNTERS}
    assert moved == {k: (deltas or {}).get(k, 0) for k in COUNTERS}


async def probe(s: Scene, writable: tuple[int, ...] = ()) -> None:
    """Follow-up requests Xen would refuse had the attack leaked a type or ref.

    Each table of both domains pins as its own level (and unpins), the roots
    reload; ``data[0]`` and every frame in ``writable`` map read-write (a
    leaked page-table type would make that -EBUSY) and unmap again.
    """
    assert await s.a.dom.audit() == []
    for t in (s.a, s.v):
        ops = [
            (abi.MMUEXT_PIN_L1_TABLE, t.l1, 0),
            (abi.MMUEXT_UNPIN_TABLE, t.l1, 0),
            (abi.MMUEXT_PIN_L1_TABLE, t.l1b, 0),
            (abi.MMUEXT_UNPIN_TABLE, t.l1b, 0),
            (abi.MMUEXT_PIN_L2_TABLE, t.l2, 0),
            (abi.MMUEXT_UNPIN_TABLE, t.l2, 0),
            (abi.MMUEXT_PIN_L3_TABLE, t.l3, 0),
            (abi.MMUEXT_UNPIN_TABLE, t.l3, 0),
            (abi.MMUEXT_NEW_BASEPTR, t.l4, 0),
        ]
        assert await t.dom.mmuext_op(ops) == (0, len(ops))
    frames = dict.fromkeys((s.a.data[0], *writable))
    on = [(s.a.l1be(400 + i), pte(m, USER_RW)) for i, m in enumerate(frames)]
    assert await s.a.dom.mmu_update(on) == (0, len(on))
    assert await s.a.dom.mmu_update([(ptr, 0) for ptr, _ in on]) == (0, len(on))
    assert await s.a.dom.audit() == []
