"""Linux's Xen multicall buffer (``arch/x86/xen/multicalls.c``) as a pure
sans-I/O state machine, one per vCPU (Linux keeps it per CPU).

Reproduced as Linux has it (docs/sources.md §9): 32 entries,
512 argument bytes, consecutive ``mmu_update`` records appended to the
previous entry, the ``>=`` full test, the one-entry direct-call bypass,
callbacks run after the batch executed, a failing entry is a kernel bug.
Every limit is a parameter so a harness can sweep it; with no limits it is
the ``batched``/``naive`` modes' whole-page policy (``guest.modes``).

What the buffer builds is what the hypervisor validates: each entry is a
typed :class:`~pvemu.shared.wire.Call`, and queued ``mmu_update`` records
are appended to one ``array('Q')`` in Xen's ``struct mmu_update[]`` layout
(one at a time, or a run of them already in that layout at once) and packed
once, at flush, into the blob that goes on the wire.

Numbers (docs/sources.md §9), with the defaults ``MC_BATCH = 32``,
``MC_ARGS = 512``:

* an ``mmu_update`` record takes 16 bytes of argument space, an ``mmuext_op``
  24 (``sizeof(struct mmuext_op)`` on x86-64: u32 cmd, 4 bytes padding, two
  8-byte unions), an ``update_va_mapping`` entry none (its arguments live in
  the multicall entry itself, ``__xen_mc_entry(0)``);
* a fresh entry is taken at ``a = roundup(argidx, 8)`` and the buffer is
  flushed first when ``mcidx == max_entries`` (``"full_entries"``) or
  ``a + n >= max_arg_bytes`` (``"full_args"``); extending the previous entry
  fails when its op differs or ``argidx + n >= max_arg_bytes``;
* so a run of coalesced records flushes on the 32nd record and a full flush
  carries ``(512 - 1) // 16 = 31`` records (496 bytes) in a single
  ``mmu_update`` entry, which goes out as a *direct* hypercall;
* one-op ``mmuext_op`` entries (the TLB-flush path) fit ``(512 - 1) // 24 = 21``
  per flush (504 bytes): the argument space, not the 32 slots, runs out first;
  0-byte entries (``update_va_mapping``) are the ones that exhaust the slots.

Sending is not done here. A *sink* ``(batch) -> per-entry results`` may be
given, and then a flush sends synchronously; without one, flushed batches wait
in an outbox: the (async) kernel takes them with :meth:`McBuffer.take_ready`,
sends ``batch.hypercall()`` and hands the results back with
:meth:`McBuffer.complete`, in order.
"""

from __future__ import annotations

from array import array
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np

from pvemu.shared import abi, wire

if TYPE_CHECKING:
    import numpy.typing as npt

#: Sends one batch and returns one result per entry (``[rc]`` for a direct call).
Sink = Callable[["Batch"], Sequence[int]]

# --- Linux's constants (docs/sources.md §9) ---------------------------------------------------

#: Multicall entries per buffer (``MC_BATCH``).
MC_BATCH: Final = 32
#: Argument bytes per buffer (``MC_ARGS = MC_BATCH * 16``).
MC_ARGS: Final = MC_BATCH * 16
#: Callbacks per buffer.
MC_CALLBACKS: Final = MC_BATCH
#: Argument offsets of fresh entries are rounded up to this (``sizeof(u64)``).
ARG_ALIGN: Final = 8
#: ``sizeof(struct mmu_update)``: u64 ptr, u64 val.
MMU_UPDATE_BYTES: Final = 16
#: ``sizeof(struct mmuext_op)`` on x86-64.
MMUEXT_OP_BYTES: Final = 24
#: Argument bytes an ``update_va_mapping`` entry reserves (none).
UPDATE_VA_MAPPING_BYTES: Final = 0

# --- flush reasons -----------------------------------------------------------------------

FLUSH_FULL_ENTRIES: Final = "full_entries"  # Linux XEN_MC_FL_BATCH
FLUSH_FULL_ARGS: Final = "full_args"  # XEN_MC_FL_ARGS
FLUSH_FULL_RECORDS: Final = "full_records"  # pvemu's records_per_flush cap
FLUSH_FULL_CALLBACKS: Final = "full_callbacks"  # XEN_MC_FL_CALLBACK
FLUSH_LAZY_LEAVE: Final = "lazy_leave"  # xen_leave_lazy_mmu
FLUSH_LAZY_FLUSH: Final = "lazy_flush"  # arch_flush_lazy_mmu_mode (leave + enter)
FLUSH_NON_LAZY: Final = "non_lazy"  # xen_mc_issue outside the matching lazy mode
FLUSH_CONTEXT_SWITCH: Final = "context_switch"  # start_context_switch leaves lazy MMU
FLUSH_EXPLICIT: Final = "explicit"  # a direct xen_mc_flush() call

FLUSH_REASONS: Final = frozenset(
    {
        FLUSH_FULL_ENTRIES,
        FLUSH_FULL_ARGS,
        FLUSH_FULL_RECORDS,
        FLUSH_FULL_CALLBACKS,
        FLUSH_LAZY_LEAVE,
        FLUSH_LAZY_FLUSH,
        FLUSH_NON_LAZY,
        FLUSH_CONTEXT_SWITCH,
        FLUSH_EXPLICIT,
    }
)


def records_per_flush(
    max_arg_bytes: int | None = MC_ARGS, records_cap: int | None = None
) -> int | None:
    """Records a full flush carries for a run of coalesced ``mmu_update``s.

    With the ``>=`` rule a run of ``r`` records needs ``16 r < max_arg_bytes``,
    so ``(max_arg_bytes - 1) // 16``: 31 for Linux's 512 bytes. ``None`` when
    nothing limits it (the whole-page policy).
    """
    limits = [records_cap] if records_cap is not None else []
    if max_arg_bytes is not None:
        limits.append((max_arg_bytes - 1) // MMU_UPDATE_BYTES)
    return min(limits) if limits else None


class KernelBug(Exception):
    """What Linux would BUG() on: a broken lazy-MMU rule or a failed batch entry.

    Attributes:
        entry: the failing multicall entry, if one failed.
        errno: its error number (positive, e.g. ``abi.EINVAL``).
        index: its position in the batch.
    """

    def __init__(
        self,
        message: str,
        *,
        entry: wire.Call | None = None,
        errno: int | None = None,
        index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.entry = entry
        self.errno = errno
        self.index = index


@dataclass(eq=False, slots=True)
class Batch:
    """One flush: what goes to the hypervisor as one hypercall.

    ``multicall`` is False when the buffer held exactly one entry (and the
    single-entry bypass is on): send ``calls[0]`` as a direct hypercall.
    """

    seq: int
    reason: str
    calls: tuple[wire.Call, ...]
    multicall: bool
    records: int
    mmuext_ops: int
    arg_bytes: int
    callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def hypercall(self) -> wire.Call:
        """The one hypercall this batch is: the multicall of its entries, or
        its only entry sent directly."""
        if self.multicall:
            return wire.Call(abi.HYPERVISOR_multicall, wire.MulticallArgs(self.calls))
        return self.calls[0]


@dataclass
class McStats:
    """Counts of what a buffer issued (counted when a batch is flushed)."""

    hypercalls: int = 0
    multicalls: int = 0
    direct_calls: int = 0
    entries: int = 0
    records: int = 0
    mmuext_ops: int = 0
    failed_entries: int = 0
    empty_flushes: int = 0
    #: Non-empty flushes by reason.
    flushes: Counter[str] = field(default_factory=Counter)
    #: Entries per flush (Linux's ``batch_histo``).
    entries_per_flush: Counter[int] = field(default_factory=Counter)
    records_per_flush: Counter[int] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, object]:
        return {
            "hypercalls": self.hypercalls,
            "multicalls": self.multicalls,
            "direct_calls": self.direct_calls,
            "entries": self.entries,
            "records": self.records,
            "mmuext_ops": self.mmuext_ops,
            "failed_entries": self.failed_entries,
            "empty_flushes": self.empty_flushes,
            "flushes": dict(sorted(self.flushes.items())),
            "entries_per_flush": dict(sorted(self.entries_per_flush.items())),
            "records_per_flush": dict(sorted(self.records_per_flush.items())),
        }


class _Entry:
    """One multicall entry being built. ``mmu_update`` and ``mmuext_op``
    entries can be extended; ``mmu_update`` records accumulate in Xen's
    ``struct mmu_update[]`` layout (ptr, val u64 pairs) in one array."""

    __slots__ = ("call", "foreigndom", "op", "ops", "reqs")

    def __init__(
        self,
        op: int,
        *,
        foreigndom: int = abi.DOMID_SELF,
        reqs: array[int] | None = None,
        ops: list[tuple[int, int, int]] | None = None,
        call: wire.Call | None = None,
    ) -> None:
        self.op = op
        self.foreigndom = foreigndom
        self.reqs = reqs
        self.ops = ops
        self.call = call

    def build(self) -> wire.Call:
        """The typed hypercall (the records packed once, here)."""
        if self.reqs is not None:
            blob = wire.u64_array_blob(self.reqs)
            return wire.Call(self.op, wire.MmuUpdateArgs(blob, self.foreigndom))
        if self.ops is not None:
            return wire.Call(self.op, wire.MmuextOpArgs(tuple(self.ops), self.foreigndom))
        assert self.call is not None
        return self.call


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1 or None, not {value}")


class McBuffer:
    """Linux's per-CPU Xen multicall buffer (docs/sources.md §9), parameterised.

    Args:
        sink: sends a :class:`Batch` and returns its per-entry results; when
            None, batches wait in an outbox (:meth:`take_ready` /
            :meth:`complete`).
        max_entries: entry slots (``MC_BATCH``); None for no limit.
        max_arg_bytes: argument bytes (``MC_ARGS``); None for no limit.
        records_per_flush: an extra cap on ``mmu_update`` records per flush
            (checked before the slot/argument tests); None for none.
        max_callbacks: callback slots; None for no limit.
        single_direct: send a one-entry buffer as a direct hypercall, as
            Linux's ``xen_mc_flush`` does.
    """

    def __init__(
        self,
        sink: Sink | None = None,
        *,
        max_entries: int | None = MC_BATCH,
        max_arg_bytes: int | None = MC_ARGS,
        records_per_flush: int | None = None,
        max_callbacks: int | None = MC_CALLBACKS,
        single_direct: bool = True,
    ) -> None:
        _check_limit("max_entries", max_entries)
        _check_limit("max_arg_bytes", max_arg_bytes)
        _check_limit("records_per_flush", records_per_flush)
        _check_limit("max_callbacks", max_callbacks)
        self.sink = sink
        self.max_entries = max_entries
        self.max_arg_bytes = max_arg_bytes
        self.records_per_flush = records_per_flush
        self.max_callbacks = max_callbacks
        self.single_direct = single_direct
        self.stats = McStats()
        self._entries: list[_Entry] = []
        self._argidx = 0
        self._records = 0
        self._ops = 0
        self._callbacks: list[Callable[[], None]] = []
        self._ready: deque[Batch] = deque()
        self._last: Batch | None = None
        self._produced = 0
        self._completed = 0

    # --- state ----------------------------------------------------------------------

    @property
    def pending_entries(self) -> int:
        """Entries queued and not yet flushed (Linux's ``mcidx``)."""
        return len(self._entries)

    @property
    def pending_arg_bytes(self) -> int:
        """Argument bytes in use (Linux's ``argidx``)."""
        return self._argidx

    @property
    def pending_records(self) -> int:
        """``mmu_update`` records queued and not yet flushed."""
        return self._records

    @property
    def has_pending(self) -> bool:
        return bool(self._entries)

    @property
    def generation(self) -> int:
        """Batches flushed so far; also the ``seq`` the next batch will get."""
        return self._produced

    @property
    def completed(self) -> int:
        """Batches sent and their results checked (equal to :attr:`generation`
        with a sink)."""
        return self._completed

    @property
    def has_ready(self) -> bool:
        """Flushed batches wait in the outbox (:meth:`take_ready`)."""
        return bool(self._ready)

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing flushed but unsent."""
        return not self._entries and self._completed == self._produced

    # --- queueing ---------------------------------------------------------------------

    def queue_mmu_update(self, ptr: int, val: int, foreigndom: int = abi.DOMID_SELF) -> None:
        """Queue one ``mmu_update`` record (``xen_extend_mmu_update``): appended
        to the previous entry when it is an ``mmu_update`` for the same
        ``foreigndom`` and argument space remains, else a fresh entry."""
        reqs = self._mmu_entry(foreigndom)
        reqs.append(ptr)
        reqs.append(val)
        self._records += 1

    def queue_mmu_updates(
        self, records: npt.NDArray[np.uint64], foreigndom: int = abi.DOMID_SELF
    ) -> None:
        """Queue a run of ``mmu_update`` records given in the wire's layout: a
        flat array of ``ptr | cmd, val`` u64 pairs.

        The same entries, flushes and flush reasons as :meth:`queue_mmu_update`
        once per record: the first record of each stretch takes the
        per-record path, then as many records as fit before the next flush
        or fresh entry (the records cap, the ``>=`` argument rule) are
        appended at once. With no limits that is the whole run in one copy.

        Raises:
            ValueError: ``records`` is not a whole number of 16-byte records.
        """
        data = np.ascontiguousarray(records, dtype=np.uint64).data.cast("B")
        if len(data) % MMU_UPDATE_BYTES:
            raise ValueError(f"{len(data)} bytes are not a whole number of mmu_update records")
        n = len(data) // MMU_UPDATE_BYTES
        done = 0
        while done < n:
            reqs = self._mmu_entry(foreigndom)
            self._records += 1
            take = 1 + self._room(n - done - 1)
            reqs.frombytes(data[done * MMU_UPDATE_BYTES : (done + take) * MMU_UPDATE_BYTES])
            self._argidx += (take - 1) * MMU_UPDATE_BYTES
            self._records += take - 1
            done += take

    def _mmu_entry(self, foreigndom: int) -> array[int]:
        """The record array one more ``mmu_update`` record goes into, its 16
        argument bytes claimed: the previous entry extended, or a fresh one
        (flushing first as the limits say)."""
        if self.records_per_flush is not None and self._records >= self.records_per_flush:
            self.flush(FLUSH_FULL_RECORDS)
        entry = self._extend(abi.HYPERVISOR_mmu_update, MMU_UPDATE_BYTES, foreigndom)
        if entry is None:
            self._entry(MMU_UPDATE_BYTES)
            entry = _Entry(abi.HYPERVISOR_mmu_update, foreigndom=foreigndom, reqs=array("Q"))
            self._entries.append(entry)
        assert entry.reqs is not None
        return entry.reqs

    def _room(self, wanted: int) -> int:
        """How many of ``wanted`` more records extend the open ``mmu_update``
        entry with no flush and no fresh entry: while the records cap is not
        reached and ``argidx + 16 < max_arg_bytes``."""
        room = wanted
        if self.records_per_flush is not None:
            room = min(room, self.records_per_flush - self._records)
        if self.max_arg_bytes is not None:
            room = min(room, (self.max_arg_bytes - 1 - self._argidx) // MMU_UPDATE_BYTES)
        return max(room, 0)

    def queue_mmuext(
        self,
        cmd: int,
        arg1: int = 0,
        arg2: int = 0,
        foreigndom: int = abi.DOMID_SELF,
        *,
        extend: bool = False,
    ) -> None:
        """Queue one ``mmuext_op``.

        ``extend=False`` is Linux's TLB-flush path (``xen_mc_entry`` +
        ``MULTI_mmuext_op``: one op, its own entry); ``extend=True`` is
        ``xen_extend_mmuext_op`` (pin/unpin), which appends to a previous
        ``mmuext_op`` entry like ``mmu_update`` records do.
        """
        op = (cmd, arg1, arg2)
        entry = None
        if extend:
            entry = self._extend(abi.HYPERVISOR_mmuext_op, MMUEXT_OP_BYTES, foreigndom)
        if entry is None:
            self._entry(MMUEXT_OP_BYTES)
            entry = _Entry(abi.HYPERVISOR_mmuext_op, foreigndom=foreigndom, ops=[])
            self._entries.append(entry)
        assert entry.ops is not None
        entry.ops.append(op)
        self._ops += 1

    def queue_update_va_mapping(self, va: int, val: int, flags: int) -> None:
        """Queue ``update_va_mapping(va, val, flags)`` as its own entry (no
        argument bytes)."""
        self.queue_call(abi.HYPERVISOR_update_va_mapping, va, val, flags)

    def queue_call(self, op: int, *args: object, arg_bytes: int = 0) -> None:
        """Queue any other hypercall as its own entry, reserving ``arg_bytes``
        (``args`` in the raw client's form, :func:`~pvemu.shared.wire.make_call`)."""
        if op in (abi.HYPERVISOR_mmu_update, abi.HYPERVISOR_mmuext_op):
            raise ValueError("use queue_mmu_update / queue_mmuext for this op")
        if op == abi.HYPERVISOR_multicall:
            raise ValueError("a multicall cannot be a multicall entry")
        if arg_bytes < 0:
            raise ValueError(f"arg_bytes must be >= 0, not {arg_bytes}")
        call = wire.make_call(op, *args)
        self._entry(arg_bytes)
        self._entries.append(_Entry(op, call=call))

    def add_callback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the current batch has executed (``xen_mc_callback``)."""
        if self.max_callbacks is not None and len(self._callbacks) >= self.max_callbacks:
            self.flush(FLUSH_FULL_CALLBACKS)
        self._callbacks.append(fn)

    def issue(self, *, lazy: bool) -> None:
        """``xen_mc_issue``: flush now unless the caller is in the lazy mode."""
        if not lazy:
            self.flush(FLUSH_NON_LAZY)

    # --- Linux's entry allocation -------------------------------------------------------

    def _entry(self, n_bytes: int) -> None:
        """``__xen_mc_entry(n)``: claim a slot and ``n`` argument bytes, flushing
        first when the slots are used up or the bytes would reach the limit."""
        limit = self.max_arg_bytes
        if limit is not None and n_bytes >= limit:
            raise KernelBug(f"a {n_bytes}-byte multicall entry never fits in {limit} bytes")
        a = -(-self._argidx // ARG_ALIGN) * ARG_ALIGN
        if self.max_entries is not None and len(self._entries) >= self.max_entries:
            self.flush(FLUSH_FULL_ENTRIES)
            a = 0
        elif limit is not None and a + n_bytes >= limit:
            self.flush(FLUSH_FULL_ARGS)
            a = 0
        self._argidx = a + n_bytes

    def _extend(self, op: int, n_bytes: int, foreigndom: int) -> _Entry | None:
        """``xen_mc_extend_args``: the previous entry if it is ``op`` (same
        ``foreigndom``) and ``n`` more bytes stay below the limit."""
        if not self._entries:
            return None
        last = self._entries[-1]
        if last.op != op or last.foreigndom != foreigndom:
            return None
        if last.call is not None:
            return None
        if self.max_arg_bytes is not None and self._argidx + n_bytes >= self.max_arg_bytes:
            return None
        self._argidx += n_bytes
        return last

    # --- flushing -------------------------------------------------------------------------

    def flush(self, reason: str = FLUSH_EXPLICIT) -> Batch | None:
        """``xen_mc_flush``: send what is queued as one hypercall.

        Nothing queued: nothing is sent (pending callbacks still run once
        earlier batches have executed). One entry: a direct hypercall. More: a
        multicall. Returns the batch (None when empty).

        Raises:
            KernelBug: with a sink, when an entry failed.
        """
        if reason not in FLUSH_REASONS:
            raise ValueError(f"unknown flush reason {reason!r}")
        callbacks, self._callbacks = self._callbacks, []
        if not self._entries:
            self.stats.empty_flushes += 1
            self._argidx = 0
            if self._last is not None and self._completed < self._produced:
                self._last.callbacks.extend(callbacks)
            else:
                for fn in callbacks:
                    fn()
            return None
        entries = self._entries
        calls = tuple(e.build() for e in entries)
        multicall = len(calls) > 1 or not self.single_direct
        batch = Batch(
            seq=self._produced,
            reason=reason,
            calls=calls,
            multicall=multicall,
            records=self._records,
            mmuext_ops=self._ops,
            arg_bytes=self._argidx,
            callbacks=callbacks,
        )
        self._entries = []
        self._argidx = self._records = self._ops = 0
        self._produced += 1
        self._last = batch
        st = self.stats
        st.hypercalls += 1
        if multicall:
            st.multicalls += 1
        else:
            st.direct_calls += 1
        st.entries += len(calls)
        st.records += batch.records
        st.mmuext_ops += batch.mmuext_ops
        st.flushes[reason] += 1
        st.entries_per_flush[len(calls)] += 1
        st.records_per_flush[batch.records] += 1
        if self.sink is None:
            self._ready.append(batch)
        else:
            self.complete(batch, self.sink(batch))
        return batch

    def take_ready(self) -> list[Batch]:
        """The flushed batches waiting to be sent, oldest first (outbox mode)."""
        out = list(self._ready)
        self._ready.clear()
        return out

    def complete(self, batch: Batch, results: Sequence[int]) -> None:
        """Hand back a sent batch's per-entry results (in flush order): runs its
        callbacks, then checks the results.

        Raises:
            KernelBug: an entry returned a negative result (Linux BUGs/WARNs),
                or the result count does not match the entries.
            ValueError: ``batch`` is not the next one to complete.
        """
        if batch.seq != self._completed:
            raise ValueError(f"batch {batch.seq} completed out of order (next {self._completed})")
        self._completed += 1
        for fn in batch.callbacks:
            fn()
        if len(results) != len(batch.calls):
            raise KernelBug(f"{len(results)} results for a batch of {len(batch.calls)} entries")
        failed = [(i, rc) for i, rc in enumerate(results) if rc < 0]
        if failed:
            self.stats.failed_entries += len(failed)
            i, rc = failed[0]
            entry = batch.calls[i]
            raise KernelBug(
                f"{len(failed)} of {len(results)} multicall(s) failed: entry {i} "
                f"op {entry.op} -> {abi.errno_name(rc)}",
                entry=entry,
                errno=-rc,
                index=i,
            )


class WholePageBatcher(McBuffer):
    """The ``batched``/``naive`` policy: :class:`McBuffer` without limits.

    Everything queued inside a lazy section goes out at lazy leave as one
    hypercall: all records of the PTE page coalesced in one ``mmu_update``
    entry, plus a TLB-flush op the caller queued (``queue_mmuext``) before
    leaving, in the same multicall. Same API as :class:`McBuffer`.
    """

    def __init__(
        self,
        sink: Sink | None = None,
        *,
        max_entries: int | None = None,
        max_arg_bytes: int | None = None,
        records_per_flush: int | None = None,
        max_callbacks: int | None = None,
        single_direct: bool = True,
    ) -> None:
        super().__init__(
            sink,
            max_entries=max_entries,
            max_arg_bytes=max_arg_bytes,
            records_per_flush=records_per_flush,
            max_callbacks=max_callbacks,
            single_direct=single_direct,
        )


__all__ = [
    "Sink",
    "MC_BATCH",
    "MC_ARGS",
    "MC_CALLBACKS",
    "ARG_ALIGN",
    "MMU_UPDATE_BYTES",
    "MMUEXT_OP_BYTES",
    "UPDATE_VA_MAPPING_BYTES",
    "FLUSH_FULL_ENTRIES",
    "FLUSH_FULL_ARGS",
    "FLUSH_FULL_RECORDS",
    "FLUSH_FULL_CALLBACKS",
    "FLUSH_LAZY_LEAVE",
    "FLUSH_LAZY_FLUSH",
    "FLUSH_NON_LAZY",
    "FLUSH_CONTEXT_SWITCH",
    "FLUSH_EXPLICIT",
    "FLUSH_REASONS",
    "records_per_flush",
    "KernelBug",
    "Batch",
    "McStats",
    "McBuffer",
]
