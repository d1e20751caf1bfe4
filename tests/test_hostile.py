"""Hostile guests against a real hypervisor process (issue "Robustness" §1).

Every rejection rule of ``../shared/reference/xen-pv-mmu.md`` §6.7 that a
64-bit PV domU without grants, I/O memory or linear page tables can reach is
sent through the raw client over the real socket, on every path that can carry
it. Then the memfd a guest receives is attacked, and the protocol abused.

After every attack the same things are proved, because a refusal is only
worth something if it left nothing behind: Xen's errno and ``done``; every
byte of the attacker's and of a bystander ("victim") domain's memory
unchanged (the targeted entry included); the trap counters moved by exactly
the one trap taken; the free-frame count unchanged; ``audit()`` clean; and
follow-up probes that Xen would refuse had a type or reference leaked (each
page table still pins as its own level, each frame the refused request named
still maps writable). A probe that succeeds also proves the server is alive.
"""

from __future__ import annotations

import array
import ctypes
import dataclasses
import errno
import fcntl
import itertools
import json
import mmap
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import msgpack
import pytest
import trio

from pvemu.guest.client import Domain, connect
from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_GLOBAL,
    _PAGE_PAT,
    _PAGE_PCD,
    _PAGE_PRESENT,
    _PAGE_PSE,
    _PAGE_PWT,
    PAGE_SIZE,
    PTE_MFN_MASK,
    maddr_of_entry,
    pte_mfn,
)
from pvemu.shared.x86 import make_pte as pte
from tests.hvproc import HypervisorProcess, hypervisor_process

MACHINE_MIB: Final = 16
MACHINE_FRAMES: Final = MACHINE_MIB * 256
DOMAIN_FRAMES: Final = 256  # memory_mib=1
#: A frame number past machine memory: not RAM (MMIO for Xen).
BEYOND: Final = MACHINE_FRAMES + 7
#: A domid no domain of this module ever gets (domids count up from 1).
UNKNOWN_DOMID: Final = 0x7FEF
#: Valid records or ops placed before the offending one, so ``done`` is seen.
K: Final = 2
USER_RO: Final = 0x5
USER_RW: Final = 0x7
TABLE: Final = 0x7
#: VA mapped by the second L1 (``l1b``, L2 slot 1), where probes and the
#: valid prefix records write.
L1B_VA: Final = 1 << 21
MARKER_WORDS: Final = 64
REPO: Final = Path(__file__).resolve().parent.parent

Scope = Literal["request", "call", "xsm"]


@pytest.fixture(scope="module")
def hvp() -> Iterator[HypervisorProcess]:
    with hypervisor_process(memory_mib=MACHINE_MIB, tag="hostile") as process:
        yield process


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
    "mmuext_ops",
    "ptwr",
    "page_faults",
    "tlb_flush_ops",
    "user_runs",
    "user_accesses",
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
        return int(words[dom.m2p[maddr >> 12] * 512 + (maddr & 0xFFF) // 8])

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


# --- the rule table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Offence:
    """One offending request, in every form a path needs.

    ``ptr``/``val``/``foreigndom``: the mmu_update record (also the ptwr
    target). ``l1_index``: set when ``ptr`` is that entry of the loaded L1, so
    update_va_mapping (VA ``l1_index`` pages) and ptwr carry it too. ``op``:
    an mmuext op. ``va``: an update_va_mapping address. ``call``: a whole
    hypercall ``(op, *args)``. ``prepare``: plain-data stores into untyped
    frames, done before the snapshot. ``writable``: frames the refused request
    would have typed or referenced; they must still map writable afterwards.
    ``rewritten``: (maddr, value) of the only words allowed to change: entries
    a failed L1 validation had already accepted keep the 64-bit PV adjustment
    (§6.3, §6.6; Xen's promote_l1_table does not undo it either).
    """

    ptr: int = 0
    val: int = 0
    foreigndom: int = abi.DOMID_SELF
    l1_index: int | None = None
    op: tuple[int, int, int] = (0, 0, 0)
    va: int = 0
    call: tuple[Any, ...] = ()
    prepare: tuple[tuple[int, int], ...] = ()
    writable: tuple[int, ...] = ()
    rewritten: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Rule:
    name: str
    errno: int
    paths: tuple[str, ...]
    build: Callable[[Scene], Offence]
    ref: str
    #: "request": the batch stops at the offending entry (done = K);
    #: "call": the whole call is refused before the loop (done 0, nothing
    #: counted); "xsm": every entry is refused, the first stops the batch.
    scope: Scope = "request"
    xfail: str | None = None


MMU: Final = ("mmu_update", "multicall.mmu_update")
L1: Final = (*MMU, "update_va_mapping", "ptwr", "ptwr.xchg")
EXT: Final = ("mmuext_op", "multicall.mmuext_op")
UVM: Final = ("update_va_mapping", "multicall.update_va_mapping")
PTWR: Final = ("ptwr", "ptwr.xchg")
CALL: Final = ("hypercall", "multicall.call")


Build = Callable[[Scene], Offence]
Case = tuple[str, Build]


def rules(
    err: int,
    ref: str,
    paths: tuple[str, ...],
    *cases: Case,
    scope: Scope = "request",
    xfail: str | None = None,
) -> tuple[Rule, ...]:
    """One row per case, all with the same errno, reference rule and paths."""
    return tuple(Rule(name, err, paths, build, ref, scope, xfail) for name, build in cases)


def rec(ptr: Callable[[Scene], int], val: Callable[[Scene], int], fd: int | None = None) -> Build:
    """An mmu_update record (ptr, val), under ``fd`` (default DOMID_SELF)."""
    return lambda s: Offence(ptr(s), val(s), abi.DOMID_SELF if fd is None else fd)


def l1(val: Callable[[Scene], int], index: int = 5) -> Build:
    """A new value for entry ``index`` of the attacker's loaded L1 (VA
    ``index`` pages): every path that writes an L1 entry can carry it."""
    return lambda s: Offence(s.a.l1e(index), val(s), l1_index=index, writable=(s.a.data[1],))


def upper(table: str, index: int, target: Callable[[Scene], int], flags: int = TABLE) -> Build:
    """Entry ``index`` of the attacker's ``table`` -> ``target``."""
    return lambda s: Offence(maddr_of_entry(getattr(s.a, table), index), pte(target(s), flags))


def op(cmd: int, arg1: Callable[[Scene], int], arg2: int = 0, fd: int | None = None) -> Build:
    foreigndom = abi.DOMID_SELF if fd is None else fd
    return lambda s: Offence(op=(cmd, arg1(s), arg2), foreigndom=foreigndom)


def at(frame: Callable[[Scene], int], index: int = 0) -> Callable[[Scene], int]:
    """The machine address of entry ``index`` of ``frame``."""
    return lambda s: maddr_of_entry(frame(s), index)


def const(value: int) -> Callable[[Scene], int]:
    return lambda s: value


#: Entries that make an L1 fail validation, with the inner error.
BAD_L1_ENTRIES: Final[tuple[tuple[str, int, Callable[[Scene], int]], ...]] = (
    ("pat_bit", abi.EINVAL, lambda s: pte(s.a.data[1], USER_RO | _PAGE_PAT)),
    ("rw_page_table", abi.EBUSY, lambda s: pte(s.a.l3, USER_RW)),
    ("victim_frame", abi.EBUSY, lambda s: pte(s.v.data[0], USER_RO)),
    ("non_ram", abi.EPERM, lambda s: pte(BEYOND, USER_RO)),
)


def bad_l1(s: Scene, entry: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """An untyped frame holding two good entries and ``entry`` at index 7.

    The good entries take references during validation that the failure
    must roll back.
    """
    frame = s.a.spare()
    stores = (
        (maddr_of_entry(frame, 0), pte(s.a.data[1], USER_RW)),
        (maddr_of_entry(frame, 1), pte(s.a.data[2], USER_RO)),
        (maddr_of_entry(frame, 7), entry),
    )
    return frame, stores


def with_bad_l1(entry: Callable[[Scene], int], use: Callable[[Scene, int], Offence]) -> Build:
    """``use`` the frame of :func:`bad_l1` (as an L2's target, or to pin).

    The two good entries validation accepted before failing keep the 64-bit
    PV adjustment, user mappings get G (§6.3, §6.6): they are ``rewritten``.
    """

    def build(s: Scene) -> Offence:
        frame, stores = bad_l1(s, entry(s))
        return dataclasses.replace(
            use(s, frame),
            prepare=stores,
            writable=(frame, s.a.data[1], s.a.data[2]),
            rewritten=tuple((maddr, val | _PAGE_GLOBAL) for maddr, val in stores[:2]),
        )

    return build


def bad_chain(levels: int, use: Callable[[Scene, int], Offence]) -> Build:
    """``use`` the top of ``levels`` untyped frames linked top-down whose
    bottom one maps the attacker's L3 read-write: validation fails ``levels``
    deep with -EBUSY."""

    def build(s: Scene) -> Offence:
        frames = [s.a.spare() for _ in range(levels)]
        stores = [(maddr_of_entry(a, 3), pte(b, TABLE)) for a, b in itertools.pairwise(frames)]
        stores.append((maddr_of_entry(frames[-1], 7), pte(s.a.l3, USER_RW)))
        return dataclasses.replace(use(s, frames[0]), prepare=tuple(stores), writable=tuple(frames))

    return build


def as_l2_target(s: Scene, frame: int) -> Offence:
    return Offence(maddr_of_entry(s.a.l2, 2), pte(frame, TABLE))


def as_l3_target(s: Scene, frame: int) -> Offence:
    return Offence(maddr_of_entry(s.a.l3, 1), pte(frame, TABLE))


def ext_on(cmd: int) -> Callable[[Scene, int], Offence]:
    return lambda s, frame: Offence(op=(cmd, frame, 0))


def copy_into_spare(src: Callable[[Scene], int]) -> Build:
    """COPY_PAGE into a fresh frame of the attacker: it must stay zero."""

    def build(s: Scene) -> Offence:
        dst = s.a.spare()
        return Offence(op=(abi.MMUEXT_COPY_PAGE, dst, src(s)), writable=(dst,))

    return build


def victim_pfd(s: Scene) -> int:
    """foreigndom naming the victim as page-table owner (PFD + 1 << 16)."""
    return (s.v.dom.domid + 1) << 16 | abi.DOMID_SELF


def own_l1e5(s: Scene) -> int:
    return s.a.l1e(5)


def ro_data1(s: Scene) -> int:
    return pte(s.a.data[1], USER_RO)


def prefix_ro(s: Scene) -> int:
    return pte(s.a.prefix, USER_RO)


def unmap(s: Scene) -> int:
    return 0


def own_l1e5_with_cmd(cmd: int) -> Callable[[Scene], int]:
    return lambda s: s.a.l1e(5) | cmd


def rw_data1_with(bit: int) -> Callable[[Scene], int]:
    return lambda s: pte(s.a.data[1], USER_RW | bit)


def rw_own(table: str) -> Callable[[Scene], int]:
    """A read-write mapping of one of the attacker's own page tables."""
    return lambda s: pte(getattr(s.a, table), USER_RW)


S67 = "§6.7 mmu_update per request: "
WHOLE = "§6.7 mmu_update whole call: "
NOT_OWNED_PTR = S67 + "frame of ptr not owned by the PT owner / not RAM"
L1_FLAGS = S67 + "new L1 entry has PWT/PCD/PAT"
L1_NOT_FD = S67 + "new L1 maps a RAM frame not owned by FD (or unallocated)"
UPPER_FLAGS = S67 + "new L2/L3/L4 entry has PWT/PCD/PSE/G"
UPPER_NOT_OWNED = S67 + "new L2/L3/L4 target frame not owned by the domain"
UPPER_TYPED = S67 + "new L2/L3/L4 target typed differently with refs"
NOT_EMULATED = "§7 ptwr: not emulated (pvemu's rc -EFAULT, docs/architecture.md)"

RULES: Final[tuple[Rule, ...]] = (
    # --- mmu_update, whole call (§2.2): done 0, nothing applied
    *rules(
        abi.ESRCH,
        WHOLE + "PFD (foreigndom >> 16) names a non-existent domain",
        MMU,
        ("pt_owner_unknown", rec(own_l1e5, ro_data1, (UNKNOWN_DOMID + 1) << 16 | abi.DOMID_SELF)),
        scope="call",
    ),
    *rules(
        abi.ESRCH,
        WHOLE + "FD is the caller's own numeric domid, or unknown",
        MMU,
        ("fd_is_own_numeric_domid", lambda s: Offence(s.a.l1e(5), ro_data1(s), s.a.dom.domid)),
        ("fd_unknown", rec(own_l1e5, ro_data1, UNKNOWN_DOMID)),
        scope="call",
    ),
    # --- XSM (§2.3 step 4): an unprivileged domain acts on itself only
    *rules(
        abi.EPERM,
        S67 + "XSM denies a foreign PT owner (also MACHPHYS_UPDATE with foreign PFD)",
        MMU,
        ("pt_owner_is_victim", lambda s: Offence(s.v.l1e(0), 0, victim_pfd(s))),
        (
            "machphys_pt_owner_is_victim",
            lambda s: Offence(s.a.data[1] << 12 | abi.MMU_MACHPHYS_UPDATE, 7, victim_pfd(s)),
        ),
        scope="xsm",
    ),
    *rules(
        abi.EPERM,
        S67 + "XSM denies a foreign FD",
        MMU,
        ("fd_is_victim", lambda s: Offence(s.a.l1e(5), pte(s.v.data[0], USER_RO), s.v.dom.domid)),
        scope="xsm",
    ),
    # --- per request
    *rules(
        abi.ENOSYS,
        S67 + "ptr & 7 in 4..7",
        MMU,
        *((f"subcommand_{cmd}", rec(own_l1e5_with_cmd(cmd), ro_data1)) for cmd in range(4, 8)),
    ),
    *rules(
        abi.EINVAL,
        NOT_OWNED_PTR,
        MMU,
        ("ptr_in_victim_l1", rec(lambda s: s.v.l1e(0), unmap)),
        ("ptr_in_victim_untyped_frame", rec(at(lambda s: s.v.marker), unmap)),
        ("ptr_in_xen_frame", rec(at(lambda s: s.a.xen, 1), unmap)),
        ("ptr_in_free_frame", rec(at(Scene.free_frame), unmap)),
        ("ptr_beyond_ram", rec(const(BEYOND << 12), unmap)),
        ("ptr_top_of_address_space", rec(const((1 << 64) - 8), unmap)),
    ),
    *rules(
        abi.EINVAL,
        S67 + "L4 slot 256..271",
        MMU,
        *((f"l4_xen_slot_{n}", rec(at(lambda s: s.a.l4, n), unmap)) for n in (256, 271)),
    ),
    *rules(
        abi.EINVAL,
        L1_FLAGS,
        L1,
        *(
            (f"l1_{name}", l1(rw_data1_with(bit)))
            for name, bit in (("pwt", _PAGE_PWT), ("pcd", _PAGE_PCD), ("pat", _PAGE_PAT))
        ),
    ),
    *rules(
        abi.EINVAL,
        L1_FLAGS + " (§2.6: checked on PRESERVE_AD's val too)",
        MMU,
        (
            "l1_pat_preserve_ad",
            rec(
                lambda s: s.a.l1e(5) | abi.MMU_PT_UPDATE_PRESERVE_AD,
                lambda s: pte(s.a.data[1], USER_RW | _PAGE_PAT),
            ),
        ),
    ),
    *rules(
        abi.EPERM,
        S67 + "new L1 maps MMIO/non-RAM without I/O permission",
        L1,
        ("l1_non_ram", l1(const(pte(BEYOND, USER_RO)))),
    ),
    *rules(
        abi.EINVAL,
        "§6.4 rule 2: a non-RAM frame field of all ones",
        L1,
        ("l1_frame_all_ones", l1(const(PTE_MFN_MASK | USER_RO))),
    ),
    *rules(
        abi.EBUSY,
        L1_NOT_FD,
        L1,
        ("l1_victim_frame_ro", l1(lambda s: pte(s.v.data[0], USER_RO))),
        ("l1_victim_frame_rw", l1(lambda s: pte(s.v.data[0], USER_RW))),
        ("l1_victim_marker", l1(lambda s: pte(s.v.marker, USER_RO))),
        ("l1_victim_root", l1(lambda s: pte(s.v.l4, USER_RO))),
        # over a live mapping: the old entry keeps its references
        ("l1_replace_mapping_with_victim_frame", l1(lambda s: pte(s.v.data[0], USER_RW), 0)),
        ("l1_free_frame", l1(lambda s: pte(s.free_frame(), USER_RO))),
        ("l1_xen_frame", l1(lambda s: pte(s.a.xen, USER_RO))),
    ),
    *rules(
        abi.EBUSY,
        L1_NOT_FD + " (§2.1: NO_TRANSLATE is NORMAL for PV)",
        MMU,
        (
            "l1_no_translate_victim_frame",
            rec(
                lambda s: s.a.l1e(5) | abi.MMU_PT_UPDATE_NO_TRANSLATE,
                lambda s: pte(s.v.data[0], USER_RO),
            ),
        ),
    ),
    *rules(
        abi.EBUSY,
        S67 + "new L1 maps RW a frame typed as page table",
        L1,
        *((f"l1_rw_own_{level}", l1(rw_own(level))) for level in ("l1", "l1b", "l2", "l3", "l4")),
    ),
    *rules(
        abi.EINVAL,
        UPPER_FLAGS,
        MMU,
        *(
            (f"l2_{name}", upper("l2", 2, lambda s: s.a.l1, TABLE | bit))
            for name, bit in (
                ("pwt", _PAGE_PWT),
                ("pcd", _PAGE_PCD),
                ("pse", _PAGE_PSE),
                ("global", _PAGE_GLOBAL),
            )
        ),
        ("l3_pse", upper("l3", 1, lambda s: s.a.l2, TABLE | _PAGE_PSE)),
        ("l4_pcd", upper("l4", 1, lambda s: s.a.l3, TABLE | _PAGE_PCD)),
    ),
    *rules(
        abi.EINVAL,
        UPPER_NOT_OWNED,
        MMU,
        ("l2_target_victim_l1", upper("l2", 2, lambda s: s.v.l1)),
        ("l2_target_victim_marker", upper("l2", 2, lambda s: s.v.marker)),
        ("l4_target_victim_l3", upper("l4", 1, lambda s: s.v.l3)),
        ("l2_target_xen_frame", upper("l2", 2, lambda s: s.a.xen)),
        ("l2_target_free_frame", upper("l2", 2, Scene.free_frame)),
        ("l2_target_beyond_ram", upper("l2", 2, const(BEYOND))),
    ),
    *rules(
        abi.EINVAL,
        UPPER_TYPED,
        MMU,
        (
            "l2_target_rw_mapped_data",
            lambda s: Offence(
                maddr_of_entry(s.a.l2, 2), pte(s.a.data[0], TABLE), writable=(s.a.data[0],)
            ),
        ),
        ("l3_target_is_l1", upper("l3", 1, lambda s: s.a.l1)),
        ("l4_target_is_l1", upper("l4", 1, lambda s: s.a.l1)),
        ("l2_target_is_l3", upper("l2", 2, lambda s: s.a.l3)),
        ("l2_target_is_pinned_root", upper("l2", 2, lambda s: s.a.l4)),
    ),
    *rules(
        abi.EINVAL,
        UPPER_TYPED + ": a linear page table (§6.3, pv-linear-pt off)",
        MMU,
        ("linear_l2", upper("l2", 2, lambda s: s.a.l2, USER_RO)),
        ("linear_l4", upper("l4", 1, lambda s: s.a.l4, USER_RO)),
    ),
    *(
        rule
        for name, err, entry in BAD_L1_ENTRIES
        for rule in rules(
            err,
            S67 + "new target needs validation and it fails: the inner error",
            MMU,
            (f"l2_target_fails_validation_{name}", with_bad_l1(entry, as_l2_target)),
        )
    ),
    *rules(
        abi.EBUSY,
        S67 + "new target needs validation and it fails two levels down: the inner error",
        MMU,
        ("l3_target_fails_nested_validation", bad_chain(2, as_l3_target)),
    ),
    *rules(
        abi.EINVAL,
        S67 + "MACHPHYS_UPDATE of a frame not owned by FD (§2.8)",
        MMU,
        ("machphys_victim_frame", rec(lambda s: s.v.data[0] << 12 | 1, const(7))),
        ("machphys_beyond_ram", rec(const(BEYOND << 12 | 1), const(7))),
    ),
    # --- mmuext_op (§3)
    *rules(
        abi.ESRCH,
        "§3 foreigndom lookup fails (the own numeric domid, an unknown one)",
        EXT,
        (
            "ext_fd_is_own_numeric_domid",
            lambda s: Offence(op=(abi.MMUEXT_TLB_FLUSH_LOCAL, 0, 0), foreigndom=s.a.dom.domid),
        ),
        ("ext_fd_unknown", op(abi.MMUEXT_TLB_FLUSH_LOCAL, const(0), fd=UNKNOWN_DOMID)),
        scope="call",
    ),
    *rules(
        abi.EPERM,
        "§3 XSM denies a foreign FD (on a flush, and on PIN, whose owner FD names)",
        EXT,
        (
            "ext_flush_with_victim_fd",
            lambda s: Offence(op=(abi.MMUEXT_TLB_FLUSH_ALL, 0, 0), foreigndom=s.v.dom.domid),
        ),
        (
            "ext_pin_with_victim_fd",
            lambda s: Offence(op=(abi.MMUEXT_PIN_L1_TABLE, s.v.l1, 0), foreigndom=s.v.dom.domid),
        ),
        scope="xsm",
    ),
    *rules(
        abi.EINVAL,
        "§3 PIN: not owned / not RAM",
        EXT,
        ("pin_victim_l1", op(abi.MMUEXT_PIN_L1_TABLE, lambda s: s.v.l1)),
        ("pin_victim_marker", op(abi.MMUEXT_PIN_L1_TABLE, lambda s: s.v.marker)),
        ("pin_xen_frame", op(abi.MMUEXT_PIN_L4_TABLE, lambda s: s.a.xen)),
        ("pin_free_frame", op(abi.MMUEXT_PIN_L1_TABLE, Scene.free_frame)),
        ("pin_beyond_ram", op(abi.MMUEXT_PIN_L1_TABLE, const(BEYOND))),
    ),
    *rules(
        abi.EINVAL,
        "§3 PIN: already pinned (the refs taken are dropped again)",
        EXT,
        ("pin_already_pinned", op(abi.MMUEXT_PIN_L4_TABLE, lambda s: s.a.l4)),
    ),
    *rules(
        abi.EINVAL,
        "§3 PIN: frame already typed differently with refs",
        EXT,
        ("pin_l1_as_l2", op(abi.MMUEXT_PIN_L2_TABLE, lambda s: s.a.l1)),
        (
            "pin_rw_mapped_data_as_l1",
            lambda s: Offence(
                op=(abi.MMUEXT_PIN_L1_TABLE, s.a.data[0], 0), writable=(s.a.data[0],)
            ),
        ),
    ),
    *(
        rule
        for name, err, entry in BAD_L1_ENTRIES
        for rule in rules(
            err,
            "§3 PIN: validation failure -> that error",
            EXT,
            (f"pin_fails_validation_{name}", with_bad_l1(entry, ext_on(abi.MMUEXT_PIN_L1_TABLE))),
        )
    ),
    *rules(
        abi.EBUSY,
        "§3 PIN / NEW_BASEPTR: a validation failure deeper down -> that error",
        EXT,
        ("pin_l2_fails_nested_validation", bad_chain(2, ext_on(abi.MMUEXT_PIN_L2_TABLE))),
        ("new_baseptr_fails_deep_validation", bad_chain(4, ext_on(abi.MMUEXT_NEW_BASEPTR))),
    ),
    *rules(
        abi.EINVAL,
        "§3 UNPIN: not owned / not pinned",
        EXT,
        ("unpin_not_pinned", op(abi.MMUEXT_UNPIN_TABLE, lambda s: s.a.l1)),
        ("unpin_victim_root", op(abi.MMUEXT_UNPIN_TABLE, lambda s: s.v.l4)),
        ("unpin_xen_frame", op(abi.MMUEXT_UNPIN_TABLE, lambda s: s.a.xen)),
    ),
    *rules(
        abi.EINVAL,
        "§3 NEW_BASEPTR / NEW_USER_BASEPTR: the frame cannot become the root",
        EXT,
        ("new_baseptr_victim_root", op(abi.MMUEXT_NEW_BASEPTR, lambda s: s.v.l4)),
        ("new_baseptr_own_l1", op(abi.MMUEXT_NEW_BASEPTR, lambda s: s.a.l1)),
        ("new_user_baseptr_victim_root", op(abi.MMUEXT_NEW_USER_BASEPTR, lambda s: s.v.l4)),
    ),
    *rules(
        abi.EINVAL,
        "§3 SET_LDT: nr_ents > 8192, base not page-aligned or not a guest address",
        EXT,
        ("set_ldt_too_many_entries", op(abi.MMUEXT_SET_LDT, const(0x10000), 8193)),
        ("set_ldt_unaligned", op(abi.MMUEXT_SET_LDT, const(0x10008), 1)),
        ("set_ldt_in_xen_range", op(abi.MMUEXT_SET_LDT, const(abi.HYPERVISOR_VIRT_START), 1)),
    ),
    *rules(
        abi.EACCES,
        "§3 cache flush not permitted",
        EXT,
        ("flush_cache", op(abi.MMUEXT_FLUSH_CACHE, const(0))),
        ("flush_cache_global", op(abi.MMUEXT_FLUSH_CACHE_GLOBAL, const(0))),
    ),
    *rules(
        abi.EOPNOTSUPP,
        "§3 MARK_SUPER / UNMARK_SUPER",
        EXT,
        ("mark_super", op(abi.MMUEXT_MARK_SUPER, lambda s: s.a.data[1])),
        ("unmark_super", op(abi.MMUEXT_UNMARK_SUPER, lambda s: s.a.data[1])),
    ),
    *rules(
        abi.ENOSYS,
        "§3 unknown cmd",
        EXT,
        *(
            (f"ext_unknown_cmd_{cmd}", op(cmd, lambda s: s.a.data[1]))
            for cmd in (14, 21, 2**32 - 1)
        ),
    ),
    *rules(
        abi.EINVAL,
        "§3 CLEAR_PAGE: not owned RAM, or typed (a page table)",
        EXT,
        ("clear_victim_page", op(abi.MMUEXT_CLEAR_PAGE, lambda s: s.v.marker)),
        ("clear_xen_frame", op(abi.MMUEXT_CLEAR_PAGE, lambda s: s.a.xen)),
        ("clear_own_page_table", op(abi.MMUEXT_CLEAR_PAGE, lambda s: s.a.l1)),
    ),
    *rules(
        abi.EINVAL,
        "§3 COPY_PAGE: bad src; bad dst or dst not writable-typable",
        EXT,
        ("copy_from_victim", copy_into_spare(lambda s: s.v.marker)),
        ("copy_from_xen_frame", copy_into_spare(lambda s: s.a.xen)),
        (
            "copy_to_victim",
            lambda s: Offence(op=(abi.MMUEXT_COPY_PAGE, s.v.data[1], s.a.marker)),
        ),
        (
            "copy_to_own_page_table",
            lambda s: Offence(op=(abi.MMUEXT_COPY_PAGE, s.a.l1, s.a.marker)),
        ),
    ),
    # --- update_va_mapping (§5; its mod_l1_entry errors are the L1 rows above)
    *rules(
        abi.EINVAL,
        "§5 step 2: va not a guest address, or no (non-superpage) L2 covers it",
        UVM,
        *(
            (f"uvm_{name}", lambda s, v=va: Offence(va=v, val=ro_data1(s)))
            for name, va in (
                ("va_in_xen_range", abi.HYPERVISOR_VIRT_START + PAGE_SIZE),
                ("va_non_canonical", 1 << 47),
                ("no_l4_entry", 1 << 39),
                ("no_l3_entry", 1 << 30),
                ("no_l2_entry", 2 << 21),
            )
        ),
    ),
    *rules(
        abi.ESRCH,
        "§6.7 update_va_mapping: -ESRCH (_otherdomain with a bad domid: unknown, or the "
        "caller's own numeric one, as for FD in §2.2 step 5)",
        CALL,
        (
            "uvm_otherdomain_unknown_domid",
            lambda s: Offence(
                call=(
                    abi.HYPERVISOR_update_va_mapping_otherdomain,
                    5 * PAGE_SIZE,
                    ro_data1(s),
                    abi.UVMF_INVLPG,
                    UNKNOWN_DOMID,
                )
            ),
        ),
        (
            "uvm_otherdomain_own_numeric_domid",
            lambda s: Offence(
                call=(
                    abi.HYPERVISOR_update_va_mapping_otherdomain,
                    5 * PAGE_SIZE,
                    ro_data1(s),
                    abi.UVMF_INVLPG,
                    s.a.dom.domid,
                )
            ),
        ),
    ),
    *rules(
        abi.EPERM,
        "§5 step 1 / §6.7 update_va_mapping: XSM denies a foreign owner (_otherdomain)",
        CALL,
        (
            "uvm_otherdomain_victim_frame",
            lambda s: Offence(
                call=(
                    abi.HYPERVISOR_update_va_mapping_otherdomain,
                    5 * PAGE_SIZE,
                    pte(s.v.data[0], USER_RW),
                    abi.UVMF_INVLPG,
                    s.v.dom.domid,
                )
            ),
        ),
    ),
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


# --- the paths -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What the valid parts of the attack did: the l1b entries they filled,
    the attacker's counters that moved."""

    mapped: frozenset[int] = frozenset()
    deltas: dict[str, int] = field(default_factory=dict)


def processed(rule: Rule) -> int:
    """Entries the hypervisor processed in a batch of K valid + 1 offending."""
    return {"request": K + 1, "call": 0, "xsm": 1}[rule.scope]


def prefix_records(s: Scene) -> list[tuple[int, int]]:
    return [(s.a.l1be(i), pte(s.a.prefix, USER_RO)) for i in range(K)]


def prefix_mapped(rule: Rule) -> frozenset[int]:
    return frozenset(range(K)) if rule.scope == "request" else frozenset()


def ok_mmu(s: Scene, index: int) -> tuple[Any, ...]:
    return (abi.HYPERVISOR_mmu_update, [(s.a.l1be(index), pte(s.a.prefix, USER_RO))])


INVLPG: Final = (abi.MMUEXT_INVLPG_LOCAL, PAGE_SIZE, 0)
ONE_TRAP: Final = {"traps": 1, "hypercalls": 1}


async def via_mmu_update(s: Scene, rule: Rule, off: Offence) -> Outcome:
    reqs = [*prefix_records(s), (off.ptr, off.val)]
    result = await s.a.dom.mmu_update(reqs, off.foreigndom)
    assert result == (-rule.errno, K if rule.scope == "request" else 0)
    return Outcome(prefix_mapped(rule), {**ONE_TRAP, "mmu_update_records": processed(rule)})


async def via_multicall_mmu(s: Scene, rule: Rule, off: Offence) -> Outcome:
    bad = (abi.HYPERVISOR_mmu_update, [*prefix_records(s), (off.ptr, off.val)], off.foreigndom)
    results = await s.a.dom.multicall([ok_mmu(s, 10), bad, ok_mmu(s, 11)])
    assert results == [0, -rule.errno, 0]  # a failing entry does not stop the batch
    deltas = {**ONE_TRAP, "multicall_entries": 3, "mmu_update_records": 2 + processed(rule)}
    return Outcome(prefix_mapped(rule) | {10, 11}, deltas)


async def via_mmuext_op(s: Scene, rule: Rule, off: Offence) -> Outcome:
    result = await s.a.dom.mmuext_op([INVLPG] * K + [off.op], off.foreigndom)
    assert result == (-rule.errno, K if rule.scope == "request" else 0)
    flushes = K if rule.scope == "request" else 0
    return Outcome(deltas={**ONE_TRAP, "mmuext_ops": processed(rule), "tlb_flush_ops": flushes})


async def via_multicall_ext(s: Scene, rule: Rule, off: Offence) -> Outcome:
    ok = (abi.HYPERVISOR_mmuext_op, [INVLPG])
    bad = (abi.HYPERVISOR_mmuext_op, [INVLPG] * K + [off.op], off.foreigndom)
    assert await s.a.dom.multicall([ok, bad, ok]) == [0, -rule.errno, 0]
    flushes = 2 + (K if rule.scope == "request" else 0)
    deltas = {
        **ONE_TRAP,
        "multicall_entries": 3,
        "mmuext_ops": 2 + processed(rule),
        "tlb_flush_ops": flushes,
    }
    return Outcome(deltas=deltas)


def uvm_target(off: Offence) -> int:
    return off.va if off.l1_index is None else off.l1_index * PAGE_SIZE


async def via_update_va_mapping(s: Scene, rule: Rule, off: Offence) -> Outcome:
    rc = await s.a.dom.update_va_mapping(uvm_target(off), off.val, abi.UVMF_INVLPG)
    assert rc == -rule.errno
    return Outcome(deltas=ONE_TRAP)  # no flush on error (§5 step 5)


async def via_multicall_uvm(s: Scene, rule: Rule, off: Offence) -> Outcome:
    def ok(index: int) -> tuple[int, int, int, int]:
        va = L1B_VA + index * PAGE_SIZE
        return (abi.HYPERVISOR_update_va_mapping, va, pte(s.a.prefix, USER_RO), abi.UVMF_INVLPG)

    bad = (abi.HYPERVISOR_update_va_mapping, uvm_target(off), off.val, abi.UVMF_INVLPG)
    assert await s.a.dom.multicall([ok(10), bad, ok(11)]) == [0, -rule.errno, 0]
    deltas = {**ONE_TRAP, "multicall_entries": 3, "tlb_flush_ops": 2}
    return Outcome(frozenset({10, 11}), deltas)


async def via_ptwr(s: Scene, rule: Rule, off: Offence) -> Outcome:
    assert await s.a.dom.ptwr_write(off.ptr, off.val) == -rule.errno
    return Outcome(deltas={"traps": 1, "ptwr": 1})


async def via_ptwr_xchg(s: Scene, rule: Rule, off: Offence) -> Outcome:
    # Nothing was exchanged, so no previous value comes back.
    assert await s.a.dom.ptwr_exchange(off.ptr, off.val, exchange=True) == (-rule.errno, 0)
    return Outcome(deltas={"traps": 1, "ptwr": 1})


async def via_hypercall(s: Scene, rule: Rule, off: Offence) -> Outcome:
    assert await s.a.dom.raw_hypercall(*off.call) == -rule.errno
    return Outcome(deltas=ONE_TRAP)


async def via_multicall_call(s: Scene, rule: Rule, off: Offence) -> Outcome:
    results = await s.a.dom.multicall([ok_mmu(s, 10), off.call, ok_mmu(s, 11)])
    assert results == [0, -rule.errno, 0]
    deltas = {**ONE_TRAP, "multicall_entries": 3, "mmu_update_records": 2}
    return Outcome(frozenset({10, 11}), deltas)


PATHS: Final = {
    "mmu_update": via_mmu_update,
    "multicall.mmu_update": via_multicall_mmu,
    "mmuext_op": via_mmuext_op,
    "multicall.mmuext_op": via_multicall_ext,
    "update_va_mapping": via_update_va_mapping,
    "multicall.update_va_mapping": via_multicall_uvm,
    "ptwr": via_ptwr,
    "ptwr.xchg": via_ptwr_xchg,
    "hypercall": via_hypercall,
    "multicall.call": via_multicall_call,
}


def rule_cases() -> Iterator[Any]:
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names)), "rule names must be unique"
    for rule in RULES:
        marks = [pytest.mark.xfail(reason=rule.xfail, strict=True)] if rule.xfail else []
        for path in rule.paths:
            yield pytest.param(rule, path, id=f"{rule.name}-{path}", marks=marks)


@pytest.mark.parametrize(("rule", "path"), list(rule_cases()))
async def test_rejection_rule(hvp: HypervisorProcess, rule: Rule, path: str) -> None:
    """The rule's errno and ``done``; nothing else moved; no leaked ref or type."""
    async with scene(hvp) as s:
        off = rule.build(s)
        if off.prepare:
            assert await s.a.dom.mmu_update(off.prepare) == (0, len(off.prepare))
        before = await snapshot(s)
        outcome = await PATHS[path](s, rule, off)
        after = await snapshot(s)
        assert_unchanged(
            s, before, after, mapped=outcome.mapped, deltas=outcome.deltas, rewritten=off.rewritten
        )
        await probe(s, off.writable)


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


# --- the memfd --------------------------------------------------------------------------------

LIBC: Final = ctypes.CDLL(None, use_errno=True)
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
MAP_FAILED: Final = ctypes.c_void_p(-1).value
F_SEAL_FUTURE_WRITE: Final = 0x10
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02


def memfd(dom: Domain) -> int:
    """The domain's memory fd as the guest received it (SCM_RIGHTS)."""
    return dom.memory_fd


def denied(call: Callable[[], object]) -> int:
    """The errno a refused syscall raised (fails if it was not refused)."""
    with pytest.raises(OSError) as caught:
        call()
    assert caught.value.errno is not None
    return caught.value.errno


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if LIBC.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


async def calm(s: Scene, before: Snapshot) -> None:
    """After a memfd attack: no byte, counter or frame moved; all still works."""
    assert_unchanged(s, before, await snapshot(s))
    await probe(s)


async def test_memfd_is_sealed(hvp: HypervisorProcess) -> None:
    """The guest's fd is exactly its own memory, sealed against writes and resizing."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        assert os.fstat(fd).st_size == DOMAIN_FRAMES * PAGE_SIZE
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
        assert seals & wanted == wanted
        # F_SEAL_WRITE cannot be added while the hypervisor maps it writable.
        assert denied(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)) == errno.EBUSY


async def test_memfd_write_syscalls_are_refused(hvp: HypervisorProcess) -> None:
    """Every way to write, resize or punch the memfd from the guest: EPERM."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        l1_offset = s.a.dom.m2p[s.a.l1] * PAGE_SIZE
        before = await snapshot(s)
        rpipe, wpipe = os.pipe()
        source = os.open(__file__, os.O_RDONLY)
        try:
            os.write(wpipe, b"\xff" * 8)
            attempts: dict[str, Callable[[], object]] = {
                "write": lambda: os.write(fd, b"\xff" * 8),
                "pwrite": lambda: os.pwrite(fd, b"\xff" * 8, l1_offset),
                "pwritev": lambda: os.pwritev(fd, [b"\xff" * 8], l1_offset),
                "splice": lambda: os.splice(rpipe, fd, 8, offset_dst=l1_offset),
                "sendfile": lambda: os.sendfile(fd, source, 0, 8),
                "ftruncate_grow": lambda: os.ftruncate(fd, size + PAGE_SIZE),
                "ftruncate_shrink": lambda: os.ftruncate(fd, size - PAGE_SIZE),
                "ftruncate_zero": lambda: os.ftruncate(fd, 0),
                "posix_fallocate_grow": lambda: os.posix_fallocate(fd, size, PAGE_SIZE),
                "punch_hole": lambda: _fallocate(
                    fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, l1_offset, PAGE_SIZE
                ),
            }
            outcomes = {name: denied(call) for name, call in attempts.items()}
        finally:
            for opened in (rpipe, wpipe, source):
                os.close(opened)
        assert outcomes == dict.fromkeys(attempts, errno.EPERM)
        assert os.fstat(fd).st_size == size
        await calm(s, before)


async def test_memfd_writable_mappings_are_refused(hvp: HypervisorProcess) -> None:
    """A shared writable mapping cannot be had: not by mmap, not by mprotect
    of a read-only one, not through a re-opened /proc/self/fd/N."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        before = await snapshot(s)
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        assert denied(lambda: mmap.mmap(fd, size, mmap.MAP_SHARED, rw)) == errno.EPERM
        addr = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, MAP_FAILED)
        try:
            assert LIBC.mprotect(addr, size, rw) == -1
            assert ctypes.get_errno() == errno.EACCES
        finally:
            assert LIBC.munmap(addr, size) == 0
        reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        try:
            assert denied(lambda: os.pwrite(reopened, b"\xff" * 8, 0)) == errno.EPERM
            assert denied(lambda: mmap.mmap(reopened, size, mmap.MAP_SHARED, rw)) == errno.EPERM
        finally:
            os.close(reopened)
        await calm(s, before)


async def test_memfd_private_writable_mapping_is_a_private_copy(hvp: HypervisorProcess) -> None:
    """MAP_PRIVATE may be writable, but the writes stay in the guest's copy:
    the page table the guest scribbles over is untouched for the hypervisor."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        # Walk the upper levels once, so the walk below sets no new A bits.
        assert (await s.a.dom.run_user(0, [(0, "r", 8)]))["fault"] is None
        before = await snapshot(s)
        private = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            offset = s.a.dom.m2p[s.a.l1] * PAGE_SIZE + 5 * 8
            forged = pte(s.v.data[0], USER_RW).to_bytes(8, "little")
            private[offset : offset + 8] = forged
            assert private[offset : offset + 8] == forged
        finally:
            private.close()
        assert s.a.dom.read_u64(s.a.l1e(5)) == 0
        # The hardware walk (the hypervisor's view) does not see the forged entry.
        outcome = await s.a.dom.run_user(0, [(5 * PAGE_SIZE, "r", 8)])
        assert outcome["fault"] == {"va": 5 * PAGE_SIZE, "error_code": 0x4}
        deltas = {"traps": 1, "page_faults": 1, "user_runs": 1}
        assert_unchanged(s, before, await snapshot(s), deltas=deltas)
        await probe(s)


FAULT_CHILD: Final = textwrap.dedent(
    """
    import ctypes, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    fd, length, offset, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        sys.exit(f"mmap failed: errno {ctypes.get_errno()}")
    print("mapped", flush=True)
    if mode == "write":
        ctypes.memset(addr + offset, 0xFF, 8)
    else:
        ctypes.string_at(addr + offset, 8)
    print("survived", flush=True)
    """
)


async def fault_child(
    fd: int, length: int, offset: int, mode: str
) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-I", "-c", FAULT_CHILD, str(fd), str(length), str(offset), mode],
        pass_fds=(fd,),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_memfd_store_through_read_only_mapping_faults(hvp: HypervisorProcess) -> None:
    """A store through the guest's read-only shared mapping is a SIGSEGV (in a
    child: it would kill the test), and nothing reaches the page table."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        before = await snapshot(s)
        offset = s.a.dom.m2p[s.a.l1] * PAGE_SIZE
        done = await fault_child(fd, size, offset, "write")
        assert (done.returncode, done.stdout) == (-signal.SIGSEGV, b"mapped\n"), done.stderr
        await calm(s, before)


async def test_memfd_beyond_its_size_holds_nothing(hvp: HypervisorProcess) -> None:
    """Guessing past the end: reads return nothing and a mapping past EOF
    faults (SIGBUS) instead of showing some other memory."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        before = await snapshot(s)
        for offset in (size, size + PAGE_SIZE, MACHINE_FRAMES * PAGE_SIZE, 1 << 40):
            assert os.pread(fd, PAGE_SIZE, offset) == b""
        done = await fault_child(fd, size + 16 * PAGE_SIZE, size + 8 * PAGE_SIZE, "read")
        assert (done.returncode, done.stdout) == (-signal.SIGBUS, b"mapped\n"), done.stderr
        await calm(s, before)


async def test_memfd_never_shows_another_domains_memory(hvp: HypervisorProcess) -> None:
    """The victim's distinctive content, written by the victim, is nowhere in
    the attacker's fd, at any offset: the fd is the attacker's memory, whole."""
    async with scene(hvp) as s:
        fd = memfd(s.a.dom)
        size = os.fstat(fd).st_size
        before = await snapshot(s)
        everything = os.pread(fd, size + (1 << 20), 0)  # ask for more than there is
        assert len(everything) == size
        assert everything == before.a_mem
        assert s.a.needle in everything  # the search can find a needle ...
        assert s.v.needle in before.v_mem  # ... and the victim's is real,
        for word in range(0, len(s.v.needle), 8):  # but no word of it is here
            assert s.v.needle[word : word + 8] not in everything
        for mfn in s.v.dom.p2m[:8]:
            with pytest.raises(KeyError):
                s.a.dom.read_u64(mfn << 12)
        await calm(s, before)


# --- another user's process cannot reach into the hypervisor ------------------------------

NOBODY: Final = 65534

ATTACKER: Final = textwrap.dedent(
    """
    import ctypes, errno, json, os, sys, trio
    from pvemu.guest.client import connect

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    SYS_pidfd_open, SYS_pidfd_getfd = 434, 438

    def outcome(call):
        try:
            call()
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
        return "ok"

    def opening(path):
        return lambda: os.close(os.open(path, os.O_RDONLY))

    def getfd(pid, target):
        def go():
            pidfd = libc.syscall(SYS_pidfd_open, pid, 0)
            if pidfd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_open")
            try:
                got = libc.syscall(SYS_pidfd_getfd, pidfd, target, 0)
                if got < 0:
                    raise OSError(ctypes.get_errno(), "pidfd_getfd")
                os.close(got)
            finally:
                os.close(pidfd)
        return go

    async def main(path, hv, control):
        async with connect(path, memory_mib=1, name="same-uid guest") as dom:
            report = {
                "control_fd_dir": outcome(lambda: os.listdir(f"/proc/{control}/fd")),
                "control_fd_open": outcome(opening(f"/proc/{control}/fd/0")),
                "control_getfd": outcome(getfd(control, 0)),
                "hv_fd_dir": outcome(lambda: os.listdir(f"/proc/{hv}/fd")),
                "hv_fd_open": sorted({outcome(opening(f"/proc/{hv}/fd/{n}")) for n in range(64)}),
                "hv_mem": outcome(opening(f"/proc/{hv}/mem")),
                "hv_getfd": sorted({outcome(getfd(hv, n)) for n in range(64)}),
                "audit": await dom.audit(),
            }
        print(json.dumps(report))

    trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    """
)


@pytest.fixture(scope="module")
def importable_tree() -> Iterator[Path]:
    """A directory where ``pvemu`` is the repository's packages (symlinks):
    what the editable install's finder does, for an interpreter that does
    not run the venv's site hooks. Removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="pvemu-import-"))
    try:
        package = root / "pvemu"
        package.mkdir()
        for name in ("shared", "hypervisor", "guest", "scripts"):
            (package / name).symlink_to(REPO / name)
        root.chmod(0o755)
        package.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root)


def interpreter_for(uid: int, tree: Path) -> tuple[str, dict[str, str]] | None:
    """A Python that ``uid`` can execute and that imports the project."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join([str(tree), sysconfig.get_paths()["purelib"]]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in dict.fromkeys(
        [sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"]
    ):
        try:
            check = subprocess.run(
                [
                    candidate,
                    "-c",
                    "import pvemu.guest.client, pvemu.hypervisor.server, pvemu.scripts.cli",
                ],
                user=uid,
                env=env,
                cwd="/",
                capture_output=True,
                timeout=60,
                check=False,
            )
        except OSError:
            continue
        if check.returncode == 0:
            return candidate, env
    return None


async def test_same_uid_guest_cannot_open_the_hypervisors_fds(importable_tree: Path) -> None:
    """The hypervisor makes itself non-dumpable, so a guest running as the
    same user cannot take another domain's memfd out of /proc/PID/fd or with
    pidfd_getfd. A dumpable process of that user, the control, shows the
    same attempts would otherwise work."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the hypervisor and the attacker as uid 65534")
    found = interpreter_for(NOBODY, importable_tree)
    if found is None:
        pytest.skip("no Python interpreter that uid 65534 can run imports the project")
    python, env = found
    report: dict[str, Any] = {}
    with hypervisor_process(
        memory_mib=MACHINE_MIB, tag="nobody", user=NOBODY, python=python, env=env
    ) as hv:
        # Non-dumpable: its /proc entries now belong to root, not to its user.
        assert os.stat(f"/proc/{hv.proc.pid}/fd").st_uid == 0
        assert os.stat(f"/proc/{hv.proc.pid}").st_uid == NOBODY
        control = await trio.lowlevel.open_process(
            ["sleep", "60"], user=NOBODY, stdin=subprocess.DEVNULL
        )
        try:
            async with connect(hv.socket_path, memory_mib=1, name="victim") as victim:
                tree = await furnish(victim)
                before = memory(victim)
                stats_before = counts(await victim.stats())
                done = await trio.run_process(
                    [python, "-c", ATTACKER, hv.socket_path, str(hv.proc.pid), str(control.pid)],
                    user=NOBODY,
                    env=env,
                    cwd="/",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                assert done.returncode == 0, done.stderr.decode()
                report = json.loads(done.stdout)
                assert changed_words(before, memory(victim), victim) == []
                assert counts(await victim.stats()) == stats_before
                assert await victim.audit() == []
                assert tree.needle in memory(victim)
        finally:
            control.kill()
            with trio.CancelScope(shield=True):
                await control.wait()
    assert report == {
        "control_fd_dir": "ok",
        "control_fd_open": "ok",
        "control_getfd": "ok",
        "hv_fd_dir": "EACCES",
        "hv_fd_open": ["EACCES"],
        "hv_mem": "EACCES",
        "hv_getfd": ["EPERM"],
        "audit": [],
    }


# --- the protocol, spoken by hand -------------------------------------------------------------


class Raw:
    """A guest that speaks msgpack by hand and may send anything."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False)
        self.fds: list[int] = []

    @classmethod
    async def open(cls, path: str) -> Raw:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(path)
        return cls(sock)

    async def send(self, *messages: dict[str, Any]) -> None:
        data = b"".join(msgpack.packb(m) for m in messages)
        while data:
            data = data[await self.sock.send(data) :]

    async def recv(self) -> dict[str, Any]:
        while True:
            message = next(self.unpacker, None)
            if message is not None:
                assert isinstance(message, dict)
                return message
            data, ancdata, _flags, _addr = await self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
            for _level, _kind, payload in ancdata:
                self.fds.extend(array.array("i", payload[: len(payload) // 4 * 4]))
            assert data, "the server closed the connection"
            self.unpacker.feed(data)

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        await self.send(message)
        return await self.recv()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.sock.close()


@asynccontextmanager
async def raw(path: str) -> AsyncIterator[Raw]:
    conn = await Raw.open(path)
    try:
        yield conn
    finally:
        conn.close()


def hello(rid: int, vcpus: int = 1) -> dict[str, Any]:
    return {"t": "hello", "id": rid, "version": 1, "memory_mib": 1, "vcpus": vcpus, "name": "raw"}


def join(rid: int, domid: int, secret: bytes, vcpu: int) -> dict[str, Any]:
    return {"t": "join", "id": rid, "version": 1, "domid": domid, "secret": secret, "vcpu": vcpu}


def error(reply: dict[str, Any]) -> tuple[str, Any, str]:
    return reply["t"], reply["id"], reply.get("code", "")


async def test_joins_with_wrong_secrets_attach_nothing(hvp: HypervisorProcess) -> None:
    """Join with a wrong, another domain's, short, empty or long secret, or to
    a domain that does not exist: a typed error, the connection stays
    unattached, the vCPU slot stays free and the victims never notice."""
    async with scene(hvp) as s, raw(hvp.socket_path) as owner, raw(hvp.socket_path) as attacker:
        welcome = await owner.ask(hello(1, vcpus=2))  # a domain with a free vCPU slot
        assert welcome["t"] == "welcome"
        domid, secret = welcome["domid"], welcome["secret"]
        before = await snapshot(s)
        owner_before = await owner.ask({"t": "stats", "id": 2})
        flipped = bytes([secret[0] ^ 1]) + secret[1:]
        attempts = [
            (join(0, domid, bytes(16), 1), "bad_secret"),
            (join(0, domid, flipped, 1), "bad_secret"),
            (join(0, domid, s.v.dom.secret, 1), "bad_secret"),  # a real secret, wrong domain
            (join(0, domid, flipped, 0), "bad_secret"),  # a taken slot: the secret comes first
            (join(0, s.v.dom.domid, secret, 0), "bad_secret"),  # forged: the victim's domid
            (join(0, s.v.dom.domid, bytes(16), 1), "bad_secret"),
            (join(0, UNKNOWN_DOMID, secret, 1), "no_such_domain"),
            # A secret must be exactly 16 bytes: the decoder refuses others
            # (docs/protocol.md §6: short is bad_type, over the field's limit
            # too_large) before any domain is looked at.
            (join(0, domid, secret[:15], 1), "bad_type"),
            (join(0, domid, b"", 1), "bad_type"),
            (join(0, domid, secret + b"\0", 1), "too_large"),
        ]
        for rid, (message, code) in enumerate(attempts, start=10):
            assert error(await attacker.ask({**message, "id": rid})) == ("error", rid, code)
            # Still not attached to anything: requests are out of state.
            reply = await attacker.ask({"t": "stats", "id": rid + 100})
            assert error(reply) == ("error", rid + 100, "bad_state")
        # The slot was never taken: the right secret gets it, exactly once.
        welcome = await attacker.ask(join(500, domid, secret, 1))
        assert (welcome["t"], welcome["vcpu"]) == ("welcome", 1)
        async with raw(hvp.socket_path) as late:
            assert error(await late.ask(join(1, domid, secret, 1))) == ("error", 1, "out_of_range")
        owner_after = await owner.ask({"t": "stats", "id": 3})
        for name in COUNTERS:
            assert owner_after["stats"]["total"][name] == owner_before["stats"]["total"][name]
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)


async def test_requests_before_hello_do_nothing(hvp: HypervisorProcess) -> None:
    """Every request before hello/join is bad_state (id echoed) and the
    connection lives on; none of them touched anything."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        before = await snapshot(s)
        early: list[dict[str, Any]] = [
            {"t": "stats"},
            {"t": "audit"},
            {"t": "hypercall", "op": 1, "args": [pack_record(s.v.l1e(0), 0), abi.DOMID_SELF]},
            {
                "t": "hypercall",
                "op": 26,
                "args": [[[abi.MMUEXT_UNPIN_TABLE, s.v.l4, 0]], abi.DOMID_SELF],
            },
            {"t": "ptwr", "maddr": s.v.l1e(0), "val": 0, "exchange": False},
            {"t": "run_user", "accesses": [[0, "r", 8]]},
        ]
        for rid, message in enumerate(early, start=1):
            assert error(await conn.ask({**message, "id": rid})) == ("error", rid, "bad_state")
        assert_unchanged(s, before, await snapshot(s))
        welcome = await conn.ask(hello(50))
        assert welcome["t"] == "welcome"
        reply = await conn.ask({"t": "stats", "id": 51})
        assert reply["stats"]["total"]["traps"] == 0  # nothing from before was counted
        await probe(s)


def pack_record(ptr: int, val: int) -> bytes:
    return array.array("Q", [ptr, val]).tobytes()


async def test_second_hello_or_join_on_a_ready_connection(hvp: HypervisorProcess) -> None:
    """A ready connection cannot become another domain or vCPU: a second
    hello or join is bad_state, no memory is allocated, no slot is taken."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        welcome = await conn.ask(hello(1, vcpus=2))
        domid, secret = welcome["domid"], welcome["secret"]
        free = (await conn.ask({"t": "stats", "id": 2}))["stats"]["free_frames"]
        before = await snapshot(s)
        again = [
            hello(3),
            join(4, domid, secret, 1),
            join(5, s.v.dom.domid, s.v.dom.secret, 0),  # even with the victim's real secret
        ]
        for message in again:
            assert error(await conn.ask(message)) == ("error", message["id"], "bad_state")
        reply = await conn.ask({"t": "stats", "id": 6})
        assert (reply["stats"]["domid"], reply["stats"]["free_frames"]) == (domid, free)
        async with raw(hvp.socket_path) as other:
            assert (await other.ask(join(1, domid, secret, 1)))["t"] == "welcome"
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)


async def test_replies_sent_to_the_server_are_unknown_messages(hvp: HypervisorProcess) -> None:
    """Replies to nobody: a guest sending reply types (even a welcome naming the
    victim with its real secret) gets unknown_message with its id echoed, and
    the connection carries on in the state it was in."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        v = s.v.dom
        replies: list[dict[str, Any]] = [
            {"t": "result", "rc": 0, "done": 0},
            {"t": "multicall_result", "rc": 0, "results": [0]},
            {"t": "ptwr_result", "rc": 0, "old": 0},
            {"t": "user_result", "executed": 0, "reads": [], "fault": None},
            {"t": "stats_result", "stats": {"domid": v.domid}},
            {"t": "audit_result", "violations": []},
            {"t": "goodbye"},
            {
                "t": "welcome",
                "domid": v.domid,
                "vcpu": 0,
                "p2m": b"",
                "secret": v.secret,
                "limits": {},
                "features": [],
            },
        ]
        before = await snapshot(s)
        for phase, base in (("idle", 10), ("ready", 30)):
            for rid, reply in enumerate(replies, start=base):
                answer = await conn.ask({**reply, "id": rid})
                assert error(answer) == ("error", rid, "unknown_message"), phase
            answer = await conn.ask({"t": "error", "id": None, "code": "internal", "message": "x"})
            assert error(answer) == ("error", None, "unknown_message")
            if phase == "idle":  # still idle: the forged welcome attached nothing
                assert error(await conn.ask({"t": "stats", "id": 20})) == ("error", 20, "bad_state")
                assert (await conn.ask(hello(21)))["t"] == "welcome"
        reply = await conn.ask({"t": "stats", "id": 50})
        assert reply["t"] == "stats_result"
        assert reply["stats"]["domid"] not in (v.domid, s.a.dom.domid)
        assert_unchanged(s, before, await snapshot(s), frames_taken=DOMAIN_FRAMES)
        await probe(s)


async def test_reused_request_ids_are_each_answered(hvp: HypervisorProcess) -> None:
    """Three pipelined requests with the same id, the first a sliced 3000-record
    batch: the server reads a request only after answering the one before, so
    the id is never pending twice and each request gets its own answer, in order."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        welcome = await conn.ask(hello(1))
        mfns = array.array("Q", welcome["p2m"])
        words = array.array("Q")
        for i in range(3000):  # plain data into the new domain's own untyped frames
            words.extend([(mfns[i % 200] << 12) + 8 * (i // 200), i])
        before = await snapshot(s)
        batch = {"t": "hypercall", "id": 7, "op": 1, "args": [words.tobytes(), abi.DOMID_SELF]}
        await conn.send(batch, {"t": "stats", "id": 7}, {"t": "audit", "id": 7})
        answers = [await conn.recv() for _ in range(3)]
        assert [(a["t"], a["id"]) for a in answers] == [
            ("result", 7),
            ("stats_result", 7),
            ("audit_result", 7),
        ]
        assert (answers[0]["rc"], answers[0]["done"]) == (0, 3000)
        assert answers[1]["stats"]["total"]["mmu_update_records"] == 3000
        assert answers[2]["violations"] == []
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)


async def test_forged_pt_owner_field_changes_nothing(hvp: HypervisorProcess) -> None:
    """An mmu_update whose foreigndom names the victim as page-table owner
    (PFD, reference §2.1), or as data-frame owner, travels over the raw wire
    as the u32 it is and is refused by XSM (-EPERM, nothing done); the
    victim's entry stays."""
    async with scene(hvp) as s, raw(hvp.socket_path) as conn:
        assert (await conn.ask(hello(1)))["t"] == "welcome"
        before = await snapshot(s)
        forged = (s.v.dom.domid + 1) << 16 | abi.DOMID_SELF
        for rid, fd in enumerate((forged, s.v.dom.domid), start=2):
            args = [pack_record(s.v.l1e(0), 0), fd]
            answer = await conn.ask({"t": "hypercall", "id": rid, "op": 1, "args": args})
            assert (answer["t"], answer["id"], answer["rc"], answer["done"]) == (
                "result",
                rid,
                -abi.EPERM,
                0,
            )
        assert_unchanged(s, before, await snapshot(s))
        await probe(s)
