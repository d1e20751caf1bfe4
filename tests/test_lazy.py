"""Tests for guest/multicall.py and guest/lazy.py: Linux's multicall buffer,
whole-page batching and the lazy-MMU rules (docs/sources.md §9,
§10)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvemu.guest.lazy import LazyMmu, pte_page_of
from pvemu.guest.modes import lazy_for_mode
from pvemu.guest.multicall import (
    FLUSH_CONTEXT_SWITCH,
    FLUSH_EXPLICIT,
    FLUSH_FULL_ARGS,
    FLUSH_FULL_CALLBACKS,
    FLUSH_FULL_ENTRIES,
    FLUSH_FULL_RECORDS,
    FLUSH_LAZY_FLUSH,
    FLUSH_LAZY_LEAVE,
    FLUSH_NON_LAZY,
    MC_ARGS,
    MC_BATCH,
    MMU_UPDATE_BYTES,
    MMUEXT_OP_BYTES,
    Batch,
    KernelBug,
    McBuffer,
    WholePageBatcher,
    records_per_flush,
)
from pvemu.shared import abi, wire
from pvemu.shared.x86 import PAGE_SIZE

SELF = abi.DOMID_SELF
PRESERVE_AD = abi.MMU_PT_UPDATE_PRESERVE_AD
MMU = abi.HYPERVISOR_mmu_update
EXT = abi.HYPERVISOR_mmuext_op
UVM = abi.HYPERVISOR_update_va_mapping
INVLPG = abi.MMUEXT_INVLPG_LOCAL
TLB_FLUSH = abi.MMUEXT_TLB_FLUSH_LOCAL
PTE_RW = 0x67  # P | RW | U | A | D
PTE_RO = 0x65
#: Linux's single-page flush ceiling (docs/sources.md §9).
FLUSH_CEILING = 33

Call = tuple[object, ...]


def legacy(call: wire.Call) -> Call:
    """A typed call in the tuple form these tests were written in:
    ``(op, [ptr0, val0, ...], foreigndom)`` for mmu_update, ``(op, [ops],
    foreigndom)`` for mmuext_op, ``(op, *args)`` otherwise."""
    args = call.args
    if isinstance(args, wire.MmuUpdateArgs):
        return (call.op, list(args.records()), args.foreigndom)
    if isinstance(args, wire.MmuextOpArgs):
        return (call.op, list(args.ops), args.foreigndom)
    if isinstance(args, wire.MulticallArgs):
        return (call.op, [legacy(c) for c in args.calls])
    return (call.op, *args.to_wire())


def legacy_hypercall(call: wire.Call) -> tuple[object, Call]:
    """``(op, args)`` of a batch's hypercall in the tuple form."""
    op, *args = legacy(call)
    return op, tuple(args)


def calls_of(batch: Batch) -> tuple[Call, ...]:
    return tuple(legacy(c) for c in batch.calls)


def flat_to_pairs(reqs: Sequence[int]) -> list[tuple[int, int]]:
    return list(zip(reqs[0::2], reqs[1::2], strict=True))


class Recorder:
    """A sink that records every batch; entries succeed unless ``fail`` says
    otherwise."""

    def __init__(self, fail: Callable[[Call], int] | None = None) -> None:
        self.batches: list[Batch] = []
        self.fail = fail

    def __call__(self, batch: Batch) -> Sequence[int]:
        self.batches.append(batch)
        if self.fail is None:
            return [0] * len(batch.calls)
        return [self.fail(c) for c in calls_of(batch)]

    def records(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for b in self.batches:
            for call in calls_of(b):
                if call[0] == MMU:
                    reqs = call[1]
                    assert isinstance(reqs, list)
                    out += flat_to_pairs(reqs)
        return out


def ptep(page: int, index: int) -> int:
    """Machine address of PTE ``index`` in the PTE page at frame ``page``."""
    return page * PAGE_SIZE + 8 * index


def mprotect_page(
    lazy: LazyMmu, page: int, n: int, val: int = PTE_RO, *, tlb: bool = False
) -> None:
    """change_pte_range for one PTE page: enter, start/commit each PTE, (batched
    mode: fold the TLB flush), leave, unlock."""
    lazy.enter()
    for i in range(n):
        p = ptep(page, i)
        lazy.start(p)
        lazy.commit(p, val | (i << 12))
    if tlb:
        assert lazy.buffer is not None
        lazy.buffer.queue_mmuext(TLB_FLUSH)
        lazy.issue()
    lazy.leave()
    lazy.check_unlock(page)


def linux_tlb_flush(lazy: LazyMmu, pages: int) -> None:
    """Modern Linux after tlb_finish_mmu: <= 33 pages one INVLPG each, else one
    full flush; each issued outside any lazy section."""
    assert lazy.buffer is not None
    if pages <= FLUSH_CEILING:
        for i in range(pages):
            lazy.buffer.queue_mmuext(INVLPG, i * PAGE_SIZE)
            lazy.issue()
    else:
        lazy.buffer.queue_mmuext(TLB_FLUSH)
        lazy.issue()


# --- the numbers ------------------------------------------------------------------------


def test_linux_constants() -> None:
    assert (MC_BATCH, MC_ARGS) == (32, 512)
    assert (MMU_UPDATE_BYTES, MMUEXT_OP_BYTES) == (16, 24)
    # the >= rule: 31 records (496 bytes) fit, the 32nd would reach 512
    assert records_per_flush() == 31
    assert records_per_flush(512, 10) == 10
    assert records_per_flush(None) is None
    assert pte_page_of(ptep(7, 511)) == 7


@pytest.mark.parametrize("n", [1, 10, 31, 32, 33, 34, 62, 63, 512])
def test_xen_mode_n_records_one_section(n: int) -> None:
    rec = Recorder()
    lazy = LazyMmu(McBuffer(rec))
    mprotect_page(lazy, 5, n)
    assert lazy.buffer is not None
    s = lazy.buffer.stats
    k = math.ceil(n / 31)
    assert s.hypercalls == len(rec.batches) == k
    # every flush holds a single coalesced mmu_update entry: all direct calls
    assert s.direct_calls == k
    assert s.multicalls == 0
    assert s.entries == k
    assert s.records == n
    assert [b.records for b in rec.batches] == [31] * (k - 1) + [n - 31 * (k - 1)]
    assert all(b.records == 31 for b in rec.batches[:-1])
    assert s.flushes == Counter({FLUSH_FULL_ARGS: k - 1, FLUSH_LAZY_LEAVE: 1})
    assert [b.reason for b in rec.batches] == [FLUSH_FULL_ARGS] * (k - 1) + [FLUSH_LAZY_LEAVE]
    for b in rec.batches:
        assert not b.multicall
        op, args = legacy_hypercall(b.hypercall())
        assert op == MMU
        assert args[1] == SELF
        assert b.arg_bytes == 16 * b.records
    assert rec.records() == [(ptep(5, i) | PRESERVE_AD, PTE_RO | (i << 12)) for i in range(n)]


def test_full_flush_happens_on_the_32nd_record() -> None:
    rec = Recorder()
    buf = McBuffer(rec)
    for i in range(31):
        buf.queue_mmu_update(8 * i, i)
    assert rec.batches == []
    assert buf.pending_arg_bytes == 496
    assert (buf.pending_entries, buf.pending_records) == (1, 31)
    buf.queue_mmu_update(8 * 31, 31)
    assert len(rec.batches) == 1
    assert rec.batches[0].records == 31
    assert rec.batches[0].reason == FLUSH_FULL_ARGS
    assert (buf.pending_records, buf.pending_arg_bytes) == (1, 16)


@pytest.mark.parametrize("n", [1, 10, 33, 34, 512])
def test_xen_mode_trap_formula_with_linux_tlb_flush(n: int) -> None:
    """docs/sources.md §2: xen costs ceil(N/31) + F, F = N if N <= 33 else 1."""
    rec = Recorder()
    lazy = lazy_for_mode("xen", rec)
    mprotect_page(lazy, 9, n)
    linux_tlb_flush(lazy, n)
    flushes = n if n <= FLUSH_CEILING else 1
    assert lazy.buffer is not None
    s = lazy.buffer.stats
    assert s.hypercalls == math.ceil(n / 31) + flushes
    assert s.flushes[FLUSH_NON_LAZY] == flushes
    assert s.multicalls == 0  # the TLB flushes go out alone, outside the batch
    assert s.mmuext_ops == flushes


def test_several_pte_pages_formula() -> None:
    """K PTE pages of n_i PTEs: sum(ceil(n_i/31)) update hypercalls."""
    rec = Recorder()
    lazy = LazyMmu(McBuffer(rec))
    sizes = [512, 512, 100, 1]
    for page, n in enumerate(sizes, start=20):
        mprotect_page(lazy, page, n)
    assert lazy.buffer is not None
    assert lazy.buffer.stats.hypercalls == sum(math.ceil(n / 31) for n in sizes)
    assert lazy.buffer.stats.flushes[FLUSH_LAZY_LEAVE] == len(sizes)
    assert lazy.sections == len(sizes)


# --- entries, coalescing, direct calls ---------------------------------------------------


def test_mmuext_op_breaks_coalescing() -> None:
    rec = Recorder()
    lazy = LazyMmu(McBuffer(rec))
    lazy.enter()
    for i in range(5):
        lazy.set_pte(ptep(1, i), i)
    assert lazy.buffer is not None
    lazy.buffer.queue_mmuext(INVLPG, 0x4000)
    lazy.issue()
    for i in range(5, 10):
        lazy.set_pte(ptep(1, i), i)
    lazy.leave()
    assert len(rec.batches) == 1
    (b,) = rec.batches
    assert b.multicall
    assert [c[0] for c in calls_of(b)] == [MMU, EXT, MMU]
    assert calls_of(b)[1] == (EXT, [(INVLPG, 0x4000, 0)], SELF)
    assert b.records == 10
    assert b.mmuext_ops == 1
    assert b.arg_bytes == 16 * 5 + 24 + 16 * 5
    op, args = legacy_hypercall(b.hypercall())
    assert op == abi.HYPERVISOR_multicall
    assert args == (list(calls_of(b)),)
    assert lazy.buffer.stats.multicalls == 1


def test_extend_mmuext_and_foreigndom() -> None:
    rec = Recorder()
    buf = McBuffer(rec)
    buf.queue_mmuext(abi.MMUEXT_PIN_L1_TABLE, 1, extend=True)
    buf.queue_mmuext(abi.MMUEXT_PIN_L1_TABLE, 2, extend=True)  # appended
    buf.queue_mmuext(INVLPG, 3)  # TLB path: its own entry
    buf.queue_mmuext(abi.MMUEXT_UNPIN_TABLE, 4, extend=True)  # Linux extends on op alone
    buf.queue_mmu_update(8, 1)
    buf.queue_mmu_update(16, 2, foreigndom=0)  # different foreigndom: new entry
    buf.queue_mmu_update(24, 3, foreigndom=0)
    buf.queue_update_va_mapping(0x1000, 5, abi.UVMF_INVLPG)
    buf.queue_mmu_update(32, 4, foreigndom=0)  # after another op: new entry
    buf.flush()
    (b,) = rec.batches
    assert calls_of(b) == (
        (EXT, [(abi.MMUEXT_PIN_L1_TABLE, 1, 0), (abi.MMUEXT_PIN_L1_TABLE, 2, 0)], SELF),
        (EXT, [(INVLPG, 3, 0), (abi.MMUEXT_UNPIN_TABLE, 4, 0)], SELF),
        (MMU, [8, 1], SELF),
        (MMU, [16, 2, 24, 3], 0),
        (UVM, 0x1000, 5, abi.UVMF_INVLPG),
        (MMU, [32, 4], 0),
    )
    assert b.reason == FLUSH_EXPLICIT
    assert (b.records, b.mmuext_ops) == (4, 4)


def test_one_entry_is_a_direct_hypercall() -> None:
    rec = Recorder()
    buf = McBuffer(rec)
    buf.queue_mmu_update(0x5008 | PRESERVE_AD, 0x1065)
    batch = buf.flush()
    assert batch is not None
    assert not batch.multicall
    assert legacy_hypercall(batch.hypercall()) == (MMU, ([0x5008 | PRESERVE_AD, 0x1065], SELF))
    assert (buf.stats.direct_calls, buf.stats.multicalls) == (1, 0)
    buf.queue_update_va_mapping(0x2000, 0, 0)
    batch = buf.flush()
    assert batch is not None
    assert legacy_hypercall(batch.hypercall()) == (UVM, (0x2000, 0, 0))
    # bypass off: a one-entry multicall
    off = McBuffer(rec, single_direct=False)
    off.queue_mmu_update(8, 1)
    batch = off.flush()
    assert batch is not None
    assert batch.multicall
    assert legacy_hypercall(batch.hypercall()) == (
        abi.HYPERVISOR_multicall,
        ([(MMU, [8, 1], SELF)],),
    )


def test_empty_flush_sends_nothing() -> None:
    rec = Recorder()
    buf = McBuffer(rec)
    assert buf.flush() is None
    buf.issue(lazy=False)
    lazy = LazyMmu(buf)
    lazy.enter()
    lazy.leave()
    assert rec.batches == []
    assert buf.stats.hypercalls == 0
    assert buf.stats.empty_flushes == 3
    assert buf.stats.flushes == {}
    assert buf.idle


def test_issue_lazy_batches_non_lazy_flushes() -> None:
    rec = Recorder()
    buf = McBuffer(rec)
    buf.queue_mmu_update(8, 1)
    buf.issue(lazy=True)
    assert rec.batches == []
    buf.issue(lazy=False)
    assert [b.reason for b in rec.batches] == [FLUSH_NON_LAZY]
    # outside a section every commit is its own hypercall
    lazy = LazyMmu(McBuffer(rec))
    for i in range(3):
        lazy.start(ptep(2, i))
        lazy.commit(ptep(2, i), PTE_RO)
    assert lazy.buffer is not None
    assert lazy.buffer.stats.flushes == {FLUSH_NON_LAZY: 3}
    assert lazy.buffer.stats.direct_calls == 3


def test_full_args_before_full_entries_for_mmuext() -> None:
    """32 one-op mmuext entries: 24 bytes each, so (512-1)//24 = 21 fit; the 22nd
    flushes for argument space before the 32 slots run out."""
    rec = Recorder()
    buf = McBuffer(rec)
    for i in range(32):
        buf.queue_mmuext(INVLPG, i * PAGE_SIZE)
    buf.flush(FLUSH_LAZY_LEAVE)
    assert [len(b.calls) for b in rec.batches] == [21, 11]
    assert [b.reason for b in rec.batches] == [FLUSH_FULL_ARGS, FLUSH_LAZY_LEAVE]
    assert rec.batches[0].arg_bytes == 504
    assert buf.stats.multicalls == 2


def test_full_entries_with_zero_byte_entries() -> None:
    """update_va_mapping entries take no argument bytes: the 33rd finds the 32
    slots used and flushes with reason full_entries."""
    rec = Recorder()
    buf = McBuffer(rec)
    for i in range(33):
        buf.queue_update_va_mapping(i * PAGE_SIZE, i, 0)
    buf.flush(FLUSH_LAZY_LEAVE)
    assert [len(b.calls) for b in rec.batches] == [32, 1]
    assert [b.reason for b in rec.batches] == [FLUSH_FULL_ENTRIES, FLUSH_LAZY_LEAVE]
    assert [b.multicall for b in rec.batches] == [True, False]
    assert buf.stats.entries_per_flush == {32: 1, 1: 1}


def test_alternating_mmu_update_and_invlpg() -> None:
    """Pairs of 16 + 24 bytes: 12 pairs (480) and one more record (496) fit; the
    next 24-byte op would reach 520 >= 512."""
    rec = Recorder()
    buf = McBuffer(rec)
    for i in range(20):
        buf.queue_mmu_update(8 * i, i)
        buf.queue_mmuext(INVLPG, i * PAGE_SIZE)
    buf.flush()
    first = rec.batches[0]
    assert len(first.calls) == 25
    assert first.reason == FLUSH_FULL_ARGS
    assert first.arg_bytes == 496
    assert sum(len(b.calls) for b in rec.batches) == 40


def test_generic_call_alignment() -> None:
    """A fresh entry's arguments start at roundup(argidx, 8)."""
    buf = McBuffer(Recorder())
    buf.queue_call(abi.HYPERVISOR_vm_assist, 0, 2, arg_bytes=13)
    assert buf.pending_arg_bytes == 13
    buf.queue_mmu_update(8, 1)
    assert buf.pending_arg_bytes == 16 + 16
    with pytest.raises(ValueError, match="queue_mmu_update"):
        buf.queue_call(MMU, [], SELF)
    with pytest.raises(ValueError, match="multicall"):
        buf.queue_call(abi.HYPERVISOR_multicall, [])
    with pytest.raises(ValueError, match="arg_bytes"):
        buf.queue_call(abi.HYPERVISOR_vm_assist, arg_bytes=-1)
    with pytest.raises(ValueError, match="reason"):
        buf.flush("whenever")


# --- parameter sweeps -------------------------------------------------------------------


@pytest.mark.parametrize("max_arg_bytes", [17, 32, 33, 48, 100, 256, 511, 512, 513, 1024, 4096])
def test_sweep_arg_bytes(max_arg_bytes: int) -> None:
    n = 700
    rec = Recorder()
    lazy = LazyMmu(McBuffer(rec, max_arg_bytes=max_arg_bytes))
    mprotect_page(lazy, 3, n)
    per = (max_arg_bytes - 1) // 16
    assert records_per_flush(max_arg_bytes) == per
    assert len(rec.batches) == math.ceil(n / per)
    assert all(b.records == per for b in rec.batches[:-1])
    assert rec.batches[-1].records == n - per * (len(rec.batches) - 1)
    assert len(rec.records()) == n


@pytest.mark.parametrize("max_entries", [1, 2, 7, 31, 32, 33, 64])
def test_sweep_entries(max_entries: int) -> None:
    n = 100
    rec = Recorder()
    buf = McBuffer(rec, max_entries=max_entries)
    for i in range(n):
        buf.queue_update_va_mapping(i * PAGE_SIZE, i, 0)
    buf.flush(FLUSH_LAZY_LEAVE)
    k = math.ceil(n / max_entries)
    assert len(rec.batches) == k
    assert [len(b.calls) for b in rec.batches[:-1]] == [max_entries] * (k - 1)
    assert buf.stats.flushes[FLUSH_FULL_ENTRIES] == k - 1
    if max_entries == 1:
        assert buf.stats.multicalls == 0
        assert buf.stats.direct_calls == n
    # coalesced records only ever use one slot: entries do not limit them
    rec2 = Recorder()
    lazy = LazyMmu(McBuffer(rec2, max_entries=max_entries))
    mprotect_page(lazy, 4, 512)
    assert len(rec2.batches) == math.ceil(512 / 31)


@pytest.mark.parametrize(
    ("max_entries", "max_arg_bytes"), [(32, 512), (8, 512), (32, 100), (5, 49), (64, 2048)]
)
def test_sweep_mmuext_entries(max_entries: int, max_arg_bytes: int) -> None:
    n = 90
    rec = Recorder()
    buf = McBuffer(rec, max_entries=max_entries, max_arg_bytes=max_arg_bytes)
    for i in range(n):
        buf.queue_mmuext(INVLPG, i * PAGE_SIZE)
    buf.flush()
    per = min(max_entries, (max_arg_bytes - 1) // 24)
    assert [len(b.calls) for b in rec.batches[:-1]] == [per] * (len(rec.batches) - 1)
    assert len(rec.batches) == math.ceil(n / per)
    reason = FLUSH_FULL_ENTRIES if max_entries <= (max_arg_bytes - 1) // 24 else FLUSH_FULL_ARGS
    assert {b.reason for b in rec.batches[:-1]} == {reason}


@pytest.mark.parametrize("cap", [1, 2, 5, 16, 30, 31, 32, 100])
def test_sweep_records_per_flush(cap: int) -> None:
    n = 300
    rec = Recorder()
    lazy = lazy_for_mode("xen", rec, records_per_flush=cap)
    mprotect_page(lazy, 6, n)
    per = min(cap, 31)
    assert records_per_flush(MC_ARGS, cap) == per
    assert len(rec.batches) == math.ceil(n / per)
    assert all(b.records == per for b in rec.batches[:-1])
    # the cap is tested first, so it names the flush when it binds
    full = FLUSH_FULL_RECORDS if cap <= 31 else FLUSH_FULL_ARGS
    assert {b.reason for b in rec.batches[:-1]} == {full}
    # the cap alone, on the unlimited policy
    rec2 = Recorder()
    buf = WholePageBatcher(rec2, records_per_flush=cap)
    for i in range(n):
        buf.queue_mmu_update(8 * i, i)
    buf.flush()
    assert len(rec2.batches) == math.ceil(n / cap)


def test_entry_that_can_never_fit_is_a_bug() -> None:
    buf = McBuffer(Recorder(), max_arg_bytes=16)
    with pytest.raises(KernelBug, match="never fits"):
        buf.queue_mmu_update(8, 1)
    buf = McBuffer(Recorder(), max_arg_bytes=24)
    buf.queue_mmu_update(8, 1)
    with pytest.raises(KernelBug, match="never fits"):
        buf.queue_mmuext(INVLPG, 0)


@pytest.mark.parametrize(
    "name", ["max_entries", "max_arg_bytes", "records_per_flush", "max_callbacks"]
)
@pytest.mark.parametrize("value", [0, -1])
def test_bad_limits(name: str, value: int) -> None:
    limits: dict[str, int | None] = {
        "max_entries": MC_BATCH,
        "max_arg_bytes": MC_ARGS,
        "records_per_flush": None,
        "max_callbacks": None,
    }
    limits[name] = value
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        McBuffer(
            None,
            max_entries=limits["max_entries"],
            max_arg_bytes=limits["max_arg_bytes"],
            records_per_flush=limits["records_per_flush"],
            max_callbacks=limits["max_callbacks"],
        )


# --- batched / naive --------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 33, 34, 512])
def test_batched_one_multicall_per_section_with_tlb_folded(n: int) -> None:
    rec = Recorder()
    lazy = lazy_for_mode("batched", rec)
    assert isinstance(lazy.buffer, WholePageBatcher)
    mprotect_page(lazy, 8, n, tlb=True)
    (b,) = rec.batches
    assert b.multicall
    assert b.reason == FLUSH_LAZY_LEAVE
    assert len(b.calls) == 2
    assert calls_of(b)[0][0] == MMU
    assert calls_of(b)[1] == (EXT, [(TLB_FLUSH, 0, 0)], SELF)
    assert b.records == n
    assert rec.records() == [(ptep(8, i) | PRESERVE_AD, PTE_RO | (i << 12)) for i in range(n)]
    assert lazy.buffer.stats.hypercalls == 1


def test_batched_several_pages_and_no_flush_needed() -> None:
    rec = Recorder()
    lazy = lazy_for_mode("batched", rec)
    for page in range(4):
        mprotect_page(lazy, 40 + page, 512, tlb=page == 3)
    assert lazy.buffer is not None
    # one hypercall per PTE page; pages without a folded flush go out direct
    assert lazy.buffer.stats.hypercalls == 4
    assert [b.multicall for b in rec.batches] == [False, False, False, True]
    assert [b.records for b in rec.batches] == [512] * 4


def test_naive_commits_normal_records() -> None:
    rec = Recorder()
    lazy = lazy_for_mode("naive", rec)
    mprotect_page(lazy, 2, 3)
    assert rec.records() == [(ptep(2, i), PTE_RO | (i << 12)) for i in range(3)]
    for mode in ("native", "trap", "ptwr"):
        assert lazy_for_mode(mode).buffer is None
    with pytest.raises(ValueError, match="mode"):
        lazy_for_mode("fast")


# --- results ----------------------------------------------------------------------------


def test_failing_direct_entry_is_a_kernel_bug() -> None:
    rec = Recorder(fail=lambda call: -abi.EINVAL)
    lazy = LazyMmu(McBuffer(rec))
    lazy.enter()
    lazy.start(ptep(1, 0))
    lazy.commit(ptep(1, 0), PTE_RO)
    with pytest.raises(KernelBug) as info:
        lazy.leave()
    assert info.value.errno == abi.EINVAL
    assert info.value.index == 0
    assert info.value.entry is not None
    assert legacy(info.value.entry) == (MMU, [ptep(1, 0) | PRESERVE_AD, PTE_RO], SELF)
    assert "-EINVAL" in str(info.value)
    assert not lazy.active
    assert lazy.buffer is not None
    assert lazy.buffer.stats.failed_entries == 1


def test_failing_multicall_entry_is_a_kernel_bug() -> None:
    rec = Recorder(fail=lambda call: -abi.EFAULT if call[0] == EXT else 0)
    buf = McBuffer(rec)
    ran: list[int] = []
    buf.queue_mmu_update(8, 1)
    buf.queue_mmuext(INVLPG, 0)
    buf.add_callback(lambda: ran.append(1))
    with pytest.raises(KernelBug) as info:
        buf.flush()
    assert (info.value.index, info.value.errno) == (1, abi.EFAULT)
    assert info.value.entry is not None
    assert legacy(info.value.entry) == (EXT, [(INVLPG, 0, 0)], SELF)
    assert ran == [1]  # callbacks run before the results are checked, as in Linux


def test_wrong_result_count_is_a_kernel_bug() -> None:
    buf = McBuffer(lambda batch: [0])
    buf.queue_mmu_update(8, 1)
    buf.queue_mmuext(INVLPG, 0)
    with pytest.raises(KernelBug, match="1 results for a batch of 2"):
        buf.flush()


# --- outbox mode (async kernels) and callbacks -------------------------------------------


def test_outbox_mode() -> None:
    buf = McBuffer()
    lazy = LazyMmu(buf)
    lazy.enter()
    for i in range(40):
        lazy.start(ptep(3, i))
        lazy.commit(ptep(3, i), PTE_RO)
    (first,) = buf.take_ready()
    assert first.records == 31
    assert buf.take_ready() == []
    lazy.leave()
    (second,) = buf.take_ready()
    assert second.records == 9
    # the page's last update has not reached the hypervisor yet
    with pytest.raises(ValueError, match="out of order"):
        buf.complete(second, [0])
    buf.complete(first, [0])
    with pytest.raises(KernelBug, match="still queued"):
        lazy.check_unlock(3)
    buf.complete(second, [0])
    assert buf.idle
    lazy.check_unlock(3)
    assert buf.stats.hypercalls == 2


def test_outbox_unlock_after_complete_is_fine() -> None:
    buf = McBuffer()
    lazy = LazyMmu(buf)
    mprotect_page_outbox(lazy, buf, 4, 70)
    assert buf.completed == buf.generation == 3


def mprotect_page_outbox(lazy: LazyMmu, buf: McBuffer, page: int, n: int) -> None:
    lazy.enter()
    for i in range(n):
        lazy.start(ptep(page, i))
        lazy.commit(ptep(page, i), PTE_RO)
        for batch in buf.take_ready():
            buf.complete(batch, [0] * len(batch.calls))
    lazy.leave()
    for batch in buf.take_ready():
        buf.complete(batch, [0] * len(batch.calls))
    lazy.check_unlock(page)


def test_callbacks() -> None:
    rec = Recorder()
    buf = McBuffer(rec)
    ran: list[int] = []
    buf.add_callback(lambda: ran.append(0))
    assert buf.flush() is None  # nothing queued: callbacks still run
    assert ran == [0]
    for i in range(33):
        buf.add_callback(lambda i=i: ran.append(i))  # type: ignore[misc]
    assert buf.stats.empty_flushes == 2  # the 33rd callback flushed the first 32
    assert ran == [0, *range(32)]
    buf.queue_mmu_update(8, 1)
    buf.flush()
    assert ran == [0, *range(33)]
    # outbox: an empty flush's callbacks wait for the batch in flight
    out = McBuffer()
    out.queue_mmu_update(8, 1)
    batch = out.flush()
    assert batch is not None
    out.add_callback(lambda: ran.append(99))
    out.flush()
    assert ran[-1] == 32
    (ready,) = out.take_ready()
    out.complete(ready, [0])
    assert ran[-1] == 99


def test_callback_limit_reason() -> None:
    rec = Recorder()
    buf = McBuffer(rec, max_callbacks=2)
    buf.queue_mmu_update(8, 1)
    for _ in range(3):
        buf.add_callback(lambda: None)
    assert [b.reason for b in rec.batches] == [FLUSH_FULL_CALLBACKS]


# --- lazy-MMU rules (docs/sources.md §10) -----------------------------------------------------


def test_legal_sequence_does_not_raise() -> None:
    rec = Recorder()
    lazy = LazyMmu(McBuffer(rec))
    for _ in range(2):
        lazy.enter()
        for i in range(100):
            p = ptep(10, i)
            lazy.note_read(p)  # reading before the transaction is fine
            lazy.start(p)
            lazy.commit(p, PTE_RO)
        lazy.note_read(ptep(10, 200))  # untouched PTE
        lazy.leave()
        lazy.check_unlock(10)
        for i in range(100):
            lazy.note_read(ptep(10, i))  # outside the section
    assert lazy.open_transactions == 0
    assert lazy.sections == 2
    # without a buffer only the rules are tracked
    bare = LazyMmu()
    bare.enter()
    bare.start(8)
    bare.commit(8, 1)
    bare.set_pte(16, 1)
    bare.leave()
    bare.check_unlock(0)


def test_nested_enter_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    with pytest.raises(KernelBug, match="nesting"):
        lazy.enter()


def test_leave_outside_is_a_bug() -> None:
    with pytest.raises(KernelBug, match="outside"):
        LazyMmu().leave()


def test_start_twice_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    lazy.start(ptep(1, 1))
    with pytest.raises(KernelBug, match="again before its commit"):
        lazy.start(ptep(1, 1))


def test_commit_without_start_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    lazy.start(ptep(1, 1))
    with pytest.raises(KernelBug, match="without a matching start"):
        lazy.commit(ptep(1, 2), PTE_RO)  # another PTE
    lazy.commit(ptep(1, 1), PTE_RO)
    with pytest.raises(KernelBug, match="without a matching start"):
        lazy.commit(ptep(1, 1), PTE_RO)  # twice


def test_leave_with_open_start_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    lazy.start(ptep(1, 3))
    with pytest.raises(KernelBug, match="without commit: 0x1018"):
        lazy.leave()


def test_reread_after_start_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    lazy.start(ptep(1, 0))
    with pytest.raises(KernelBug, match="read hazard"):
        lazy.note_read(ptep(1, 0))


def test_reread_after_commit_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    lazy.start(ptep(1, 0))
    lazy.commit(ptep(1, 0), PTE_RO)
    with pytest.raises(KernelBug, match="read hazard"):
        lazy.note_read(ptep(1, 0))
    with pytest.raises(KernelBug, match="read hazard"):
        lazy.start(ptep(1, 0))  # start reads *ptep


def test_reread_after_set_pte_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    lazy.set_pte(ptep(1, 0), PTE_RW)
    with pytest.raises(KernelBug, match="read hazard"):
        lazy.note_read(ptep(1, 0))


def test_set_pte_inside_transaction_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.start(ptep(1, 0))
    with pytest.raises(KernelBug, match="inside its start/commit"):
        lazy.set_pte(ptep(1, 0), PTE_RW)


def test_unlock_with_queued_commit_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    lazy.start(ptep(4, 0))
    lazy.commit(ptep(4, 0), PTE_RO)
    lazy.check_unlock(5)  # another page: nothing queued for it
    with pytest.raises(KernelBug, match="still queued"):
        lazy.check_unlock(4)


def test_unlock_after_early_flush_is_fine() -> None:
    """A flush for any reason sends the page's updates; then unlocking is legal."""
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.enter()
    lazy.start(ptep(4, 0))
    lazy.commit(ptep(4, 0), PTE_RO)
    lazy.flush()
    lazy.check_unlock(4)
    assert lazy.buffer is not None
    assert lazy.buffer.stats.flushes == {FLUSH_LAZY_FLUSH: 1}
    lazy.note_read(ptep(4, 0))  # flushed: no longer a hazard
    lazy.leave()


def test_unlock_with_open_start_is_a_bug() -> None:
    lazy = LazyMmu()
    lazy.start(ptep(6, 2))
    lazy.check_unlock(7)
    with pytest.raises(KernelBug, match="not committed"):
        lazy.check_unlock(6)


def test_misaligned_ptep_is_a_bug() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.start(0x1004)
    with pytest.raises(KernelBug, match="aligned"):
        lazy.commit(0x1004, PTE_RO)


def test_flush_keeps_open_transactions() -> None:
    lazy = LazyMmu(McBuffer(Recorder()))
    lazy.flush()  # outside a section: nothing
    lazy.enter()
    lazy.start(ptep(1, 0))
    lazy.start(ptep(1, 1))
    lazy.commit(ptep(1, 1), PTE_RO)
    lazy.flush()
    lazy.note_read(ptep(1, 1))
    with pytest.raises(KernelBug, match="read hazard"):
        lazy.note_read(ptep(1, 0))
    lazy.commit(ptep(1, 0), PTE_RO)
    lazy.leave()


def is_active(lazy: LazyMmu) -> bool:
    return lazy.active


def test_context_switch_flushes_and_reenters() -> None:
    rec = Recorder()
    lazy = LazyMmu(McBuffer(rec))
    lazy.pause()  # not in a section: nothing
    lazy.resume()
    assert not is_active(lazy)
    lazy.enter()
    lazy.set_pte(ptep(1, 0), PTE_RW)
    lazy.pause()
    assert not is_active(lazy)
    assert [b.reason for b in rec.batches] == [FLUSH_CONTEXT_SWITCH]
    with pytest.raises(KernelBug, match="paused"):
        lazy.enter()
    lazy.resume()
    assert lazy.active
    lazy.start(ptep(1, 1))
    with pytest.raises(KernelBug, match="context switch"):
        lazy.pause()


# --- properties -------------------------------------------------------------------------

Unit = tuple[object, ...]

op_strategy = st.one_of(
    st.tuples(st.just("mmu"), st.sampled_from([SELF, 0])),
    st.tuples(st.just("ext"), st.sampled_from([INVLPG, abi.MMUEXT_PIN_L1_TABLE]), st.booleans()),
    st.tuples(st.just("uvm")),
    st.tuples(st.just("call"), st.sampled_from([0, 8, 13, 40])),
    st.tuples(st.just("flush")),
    st.tuples(st.just("issue"), st.booleans()),
)


def units_of(typed: wire.Call) -> list[Unit]:
    call = legacy(typed)
    op = call[0]
    if op == MMU:
        reqs = call[1]
        assert isinstance(reqs, list)
        return [("mmu", p, v, call[2]) for p, v in flat_to_pairs(reqs)]
    if op == EXT:
        ops = call[1]
        assert isinstance(ops, list)
        return [("ext", *o, call[2]) for o in ops]
    return [("call", *call)]


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(op_strategy, max_size=300),
    max_entries=st.one_of(st.none(), st.integers(1, 40)),
    max_arg_bytes=st.one_of(st.none(), st.integers(41, 700)),
    cap=st.one_of(st.none(), st.integers(1, 40)),
    use_sink=st.booleans(),
    single_direct=st.booleans(),
)
def test_everything_queued_is_sent_in_order_within_limits(
    ops: list[tuple[object, ...]],
    max_entries: int | None,
    max_arg_bytes: int | None,
    cap: int | None,
    use_sink: bool,
    single_direct: bool,
) -> None:
    rec = Recorder()
    buf = McBuffer(
        rec if use_sink else None,
        max_entries=max_entries,
        max_arg_bytes=max_arg_bytes,
        records_per_flush=cap,
        single_direct=single_direct,
    )
    queued: list[Unit] = []
    sent: list[Batch] = []

    def drain() -> None:
        for batch in buf.take_ready():
            sent.append(batch)
            buf.complete(batch, [0] * len(batch.calls))

    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "mmu":
            fd = op[1]
            assert isinstance(fd, int)
            buf.queue_mmu_update(8 * n, n, fd)
            queued.append(("mmu", 8 * n, n, fd))
        elif kind == "ext":
            cmd, extend = op[1], op[2]
            assert isinstance(cmd, int)
            assert isinstance(extend, bool)
            buf.queue_mmuext(cmd, n, extend=extend)
            queued.append(("ext", cmd, n, 0, SELF))
        elif kind == "uvm":
            buf.queue_update_va_mapping(n * PAGE_SIZE, n, 0)
            queued.append(("call", UVM, n * PAGE_SIZE, n, 0))
        elif kind == "call":
            size = op[1]
            assert isinstance(size, int)
            buf.queue_call(abi.HYPERVISOR_vm_assist, n, size, arg_bytes=size)
            queued.append(("call", abi.HYPERVISOR_vm_assist, n, size))
        elif kind == "flush":
            buf.flush()
        else:
            buf.issue(lazy=bool(op[1]))
        drain()
    buf.flush(FLUSH_LAZY_LEAVE)
    drain()
    batches = rec.batches if use_sink else sent
    assert buf.idle

    assert [u for b in batches for c in b.calls for u in units_of(c)] == queued
    sizes = {"mmu": MMU_UPDATE_BYTES, "ext": MMUEXT_OP_BYTES}
    for b in batches:
        assert b.calls
        assert b.multicall == (len(b.calls) > 1 or not single_direct)
        units = [u for c in b.calls for u in units_of(c)]
        raw = sum(sizes.get(str(u[0]), 0) for u in units) + sum(
            int(str(u[3])) for u in units if u[0] == "call" and u[1] == abi.HYPERVISOR_vm_assist
        )
        assert raw <= b.arg_bytes
        if max_entries is not None:
            assert len(b.calls) <= max_entries
        if max_arg_bytes is not None:
            assert b.arg_bytes < max_arg_bytes
        assert b.records == sum(1 for u in units if u[0] == "mmu")
        if cap is not None:
            assert b.records <= cap
        # coalescing is maximal: never two adjacent mmu_update entries for one domain
        for prev, nxt in zip(calls_of(b), calls_of(b)[1:], strict=False):
            assert not (prev[0] == nxt[0] == MMU and prev[2] == nxt[2])
    s = buf.stats
    assert s.hypercalls == len(batches) == s.multicalls + s.direct_calls
    assert s.entries == sum(len(b.calls) for b in batches)
    assert s.records == sum(1 for u in queued if u[0] == "mmu")
    assert sum(s.flushes.values()) == len(batches)


@settings(max_examples=100, deadline=None)
@given(
    pages=st.lists(st.integers(1, 512), min_size=1, max_size=6),
    max_arg_bytes=st.integers(17, 1024),
)
def test_legal_mprotect_never_bugs_and_counts_match(pages: list[int], max_arg_bytes: int) -> None:
    rec = Recorder()
    lazy = LazyMmu(McBuffer(rec, max_arg_bytes=max_arg_bytes))
    for page, n in enumerate(pages, start=100):
        mprotect_page(lazy, page, n)
    per = (max_arg_bytes - 1) // 16
    assert len(rec.batches) == sum(math.ceil(n / per) for n in pages)
    assert len(rec.records()) == sum(pages)


def test_a_batch_is_the_hypercall_the_wire_carries() -> None:
    """The buffer builds the typed call itself: its records are one packed
    blob that goes on the wire as it is and decodes to the same call."""
    rec = Recorder()
    buf = McBuffer(rec)
    buf.queue_mmu_update(0x5008 | PRESERVE_AD, 0x1065)
    buf.queue_mmu_update(0x5010 | PRESERVE_AD, 0x2065)
    buf.queue_mmuext(INVLPG, 0x4000)
    batch = buf.flush()
    assert batch is not None
    first = batch.calls[0].args
    assert isinstance(first, wire.MmuUpdateArgs)
    assert first.pairs() == [(0x5008 | PRESERVE_AD, 0x1065), (0x5010 | PRESERVE_AD, 0x2065)]
    call = batch.hypercall()
    assert call.op == abi.HYPERVISOR_multicall
    encoded = msgpack.packb(call.args.to_wire(), use_bin_type=True)
    decoded = msgpack.unpackb(encoded, use_list=False)
    assert wire.args_from_wire(call.op, decoded) == call.args


# --- a run of records queued at once (the range form) -----------------------------------

#: One queueing step: a run of records, one mmuext op, or a flush.
queue_steps = st.lists(
    st.one_of(
        st.tuples(st.just("run"), st.integers(0, 70), st.sampled_from([abi.DOMID_SELF, 3])),
        st.tuples(st.just("ext"), st.just(0), st.just(abi.DOMID_SELF)),
        st.tuples(st.just("flush"), st.just(0), st.just(abi.DOMID_SELF)),
    ),
    max_size=12,
)
queue_limits = st.sampled_from([None, 1, 2, 16, 17, 31, 32, 33, 100, 512, 513])


def batches_of(recorded: list[Batch]) -> list[tuple[object, ...]]:
    return [
        (b.seq, b.reason, b.multicall, b.records, b.mmuext_ops, b.arg_bytes, b.hypercall())
        for b in recorded
    ]


@settings(max_examples=300)
@given(queue_steps, queue_limits, queue_limits, queue_limits, st.sampled_from([None, 1, 3, 32]))
def test_queue_mmu_updates_equals_one_record_at_a_time(
    plan: list[tuple[str, int, int]],
    max_entries: int | None,
    max_arg_bytes: int | None,
    cap: int | None,
    max_callbacks: int | None,
) -> None:
    arg_bytes = None if max_arg_bytes is None else max(max_arg_bytes, 25)  # an mmuext_op fits

    def run(bulk: bool) -> tuple[list[tuple[object, ...]], dict[str, object]]:
        seen: list[Batch] = []

        def sink(batch: Batch) -> list[int]:
            seen.append(batch)
            return [0] * len(batch.calls)

        buf = McBuffer(
            sink,
            max_entries=max_entries,
            max_arg_bytes=arg_bytes,
            records_per_flush=cap,
            max_callbacks=max_callbacks,
        )
        serial = 0
        for kind, n, fd in plan:
            if kind == "run":
                pairs = [((serial + i) * 8 | PRESERVE_AD, serial + i) for i in range(n)]
                serial += n
                if bulk:
                    buf.queue_mmu_updates(
                        np.array([x for p in pairs for x in p], dtype=np.uint64), fd
                    )
                else:
                    for ptr, val in pairs:
                        buf.queue_mmu_update(ptr, val, fd)
            elif kind == "ext":
                buf.queue_mmuext(abi.MMUEXT_TLB_FLUSH_ALL)
            else:
                buf.flush()
        buf.flush()
        return batches_of(seen), buf.stats.as_dict()

    assert run(bulk=True) == run(bulk=False)


def test_queue_mmu_updates_refuses_half_a_record() -> None:
    with pytest.raises(ValueError, match="whole number"):
        WholePageBatcher().queue_mmu_updates(np.array([1, 2, 3], dtype=np.uint64))
