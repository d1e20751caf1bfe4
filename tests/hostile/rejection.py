"""The rejection-rule tests' machinery, shared by the ``test_rules_*`` modules.

Each of those modules holds the rule table of one attack family (a tuple of
:class:`Rule`, written with the builders here) and runs every rule on every
path that can carry it (:func:`rule_cases`, :func:`check_rejection`): the
offending request is sent after ``K`` valid ones, then Xen's errno and
``done`` are checked and everything :mod:`tests.hostile.scene` proves after
an attack.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import pytest

from pvemu.shared import abi
from pvemu.shared.x86 import (
    _PAGE_GLOBAL,
    _PAGE_PAT,
    _PAGE_PRESENT,
    _PAGE_RW,
    PAGE_SIZE,
    maddr_of_entry,
)
from pvemu.shared.x86 import make_pte as pte
from tests.hostile.scene import (
    BEYOND,
    L1B_VA,
    TABLE,
    USER_RO,
    USER_RW,
    Scene,
    assert_unchanged,
    probe,
    scene,
    snapshot,
)
from tests.hvproc import HypervisorProcess

#: Valid records or ops placed before the offending one, so ``done`` is seen.
K: Final = 2

Scope = Literal["request", "call", "xsm"]


# --- rules and their builders -------------------------------------------------------------


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
#: pvemu's batched exchange (``MMU_PT_XCHG_PVEMU``): the offending record and
#: the valid ones before it are all exchanges.
XCHG: Final = ("mmu_xchg",)
L1: Final = (*MMU, "update_va_mapping", "ptwr", "ptwr.xchg", *XCHG)
EXT: Final = ("mmuext_op", "multicall.mmuext_op")
UVM: Final = ("update_va_mapping", "multicall.update_va_mapping")
#: A trapped store, exchange, or atomic clear of bits (``ptep_set_wrprotect``).
PTWR: Final = ("ptwr", "ptwr.xchg", "ptwr.clear")
#: The kernel's plain store through its linear map (no trap).
KERNEL_WRITE: Final = ("kernel_write",)
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


def xchg_processed(rule: Rule, off: Offence) -> int:
    """1 when the offending record is an exchange the hypervisor reached."""
    is_xchg = off.ptr & abi.MMU_CMD_MASK == abi.MMU_PT_XCHG_PVEMU
    return int(is_xchg and rule.scope == "request")


async def via_mmu_update(s: Scene, rule: Rule, off: Offence) -> Outcome:
    reqs = [*prefix_records(s), (off.ptr, off.val)]
    result = await s.a.dom.mmu_update(reqs, off.foreigndom)
    assert result == (-rule.errno, K if rule.scope == "request" else 0)
    deltas = {**ONE_TRAP, "mmu_update_records": processed(rule)}
    return Outcome(prefix_mapped(rule), deltas | {"mmu_xchg_records": xchg_processed(rule, off)})


async def via_mmu_xchg(s: Scene, rule: Rule, off: Offence) -> Outcome:
    """The batch as exchanges: the K valid ones fill empty entries (old 0),
    the offending one is refused; only the applied records' olds return."""
    xchg = abi.MMU_PT_XCHG_PVEMU
    reqs = [(ptr | xchg, val) for ptr, val in prefix_records(s)]
    reqs.append((off.ptr & ~abi.MMU_CMD_MASK | xchg, off.val))
    rc, done, olds = await s.a.dom.mmu_update_olds(reqs, off.foreigndom)
    applied = K if rule.scope == "request" else 0
    assert (rc, done, olds) == (-rule.errno, applied, [0] * applied)
    n = processed(rule)
    deltas = {**ONE_TRAP, "mmu_update_records": n, "mmu_xchg_records": n}
    return Outcome(prefix_mapped(rule), deltas)


async def via_multicall_mmu(s: Scene, rule: Rule, off: Offence) -> Outcome:
    bad = (abi.HYPERVISOR_mmu_update, [*prefix_records(s), (off.ptr, off.val)], off.foreigndom)
    results = await s.a.dom.multicall([ok_mmu(s, 10), bad, ok_mmu(s, 11)])
    assert results == [0, -rule.errno, 0]  # a failing entry does not stop the batch
    deltas = {**ONE_TRAP, "multicall_entries": 3, "mmu_update_records": 2 + processed(rule)}
    deltas["mmu_xchg_records"] = xchg_processed(rule, off)
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


async def via_ptwr_clear(s: Scene, rule: Rule, off: Offence) -> Outcome:
    # The clear carries no value: it must be refused for the address alone.
    bits = _PAGE_RW | _PAGE_PRESENT
    assert await s.a.dom.ptwr_clear_bits(off.ptr, bits) == (-rule.errno, 0)
    return Outcome(deltas={"traps": 1, "ptwr": 1})


async def via_kernel_write(s: Scene, rule: Rule, off: Offence) -> Outcome:
    """A store of eight bytes of ``val`` at ``ptr``: refused, it writes
    nothing and is no trap (a kernel write of 0 bytes)."""
    assert await s.a.dom.kernel_write(off.ptr, off.val.to_bytes(8, "little")) == -rule.errno
    return Outcome(deltas={"kernel_writes": 1})


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
    "mmu_xchg": via_mmu_xchg,
    "mmuext_op": via_mmuext_op,
    "multicall.mmuext_op": via_multicall_ext,
    "update_va_mapping": via_update_va_mapping,
    "multicall.update_va_mapping": via_multicall_uvm,
    "ptwr": via_ptwr,
    "ptwr.xchg": via_ptwr_xchg,
    "ptwr.clear": via_ptwr_clear,
    "kernel_write": via_kernel_write,
    "hypercall": via_hypercall,
    "multicall.call": via_multicall_call,
}


def rule_cases(table: tuple[Rule, ...]) -> list[Any]:
    """One test per rule of ``table`` and path that can carry it."""
    names = [rule.name for rule in table]
    assert len(names) == len(set(names)), "rule names must be unique"
    cases = []
    for rule in table:
        marks = [pytest.mark.xfail(reason=rule.xfail, strict=True)] if rule.xfail else []
        for path in rule.paths:
            cases.append(pytest.param(rule, path, id=f"{rule.name}-{path}", marks=marks))
    return cases


async def check_rejection(hvp: HypervisorProcess, rule: Rule, path: str) -> None:
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
