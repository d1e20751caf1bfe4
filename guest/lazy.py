"""Lazy-MMU batching for the guest kernel: Linux's Xen multicall buffer and the
lazy-MMU section rules, as pure sans-I/O state machines.

Two pieces, both per vCPU (Linux keeps them per CPU):

:class:`McBuffer`
    Linux's multicall buffer (``arch/x86/xen/multicalls.c``), reproduced as
    ``../shared/reference/linux-lazy-mmu.md`` §2 describes it: 32 entries, 512
    argument bytes, consecutive ``mmu_update`` records appended to the previous
    entry, the ``>=`` full test, the one-entry direct-call bypass, callbacks run
    after the batch executed, a failing entry is a kernel bug. Every limit is a
    parameter so a harness can sweep it. :class:`WholePageBatcher` is the same
    machine with no limits: the ``batched``/``naive`` modes' policy (one
    multicall per lazy section, i.e. per PTE page, TLB flush folded in).

:class:`LazyMmu`
    The lazy-MMU section and the rules of reference §3.5 *enforced*: no nested
    enter, start/commit exactly paired, no re-read of a PTE inside a section
    once its transaction started, no queued update left when the PTE-page lock
    is released. A violation raises :class:`KernelBug`.

Numbers (reference §2.1-§2.3), with the defaults ``MC_BATCH = 32``,
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
sends each (``batch.multicall`` says multicall or direct hypercall) and hands the
results back with :meth:`McBuffer.complete`, in order.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from pvemu.shared import abi
from pvemu.shared.x86 import PAGE_SHIFT

#: One hypercall in the shape the hypervisor dispatches: ``(op, *args)``.
#: ``mmu_update``: ``(1, [ptr0, val0, ptr1, val1, ...], foreigndom)``;
#: ``mmuext_op``: ``(26, [(cmd, arg1, arg2), ...], foreigndom)``;
#: ``update_va_mapping``: ``(14, va, val, flags)``.
Call = tuple[object, ...]

#: Sends one batch and returns one result per entry (``[rc]`` for a direct call).
Sink = Callable[["Batch"], Sequence[int]]

# --- Linux's constants (reference §2.1) ---------------------------------------------------

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


def pte_page_of(ptep: int) -> int:
    """The PTE page (its machine frame) holding the PTE at machine address ``ptep``."""
    return ptep >> PAGE_SHIFT


def flat_to_pairs(reqs: Sequence[int]) -> list[tuple[int, int]]:
    """``[ptr0, val0, ptr1, val1, ...]`` as ``[(ptr0, val0), ...]`` (the raw
    client's ``mmu_update`` form)."""
    return list(zip(reqs[0::2], reqs[1::2], strict=True))


class KernelBug(Exception):
    """What Linux would BUG() on: a broken lazy-MMU rule or a failed batch entry.

    Attributes:
        entry: the failing multicall entry ``(op, *args)``, if one failed.
        errno: its error number (positive, e.g. ``abi.EINVAL``).
        index: its position in the batch.
    """

    def __init__(
        self,
        message: str,
        *,
        entry: Call | None = None,
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
    calls: tuple[Call, ...]
    multicall: bool
    records: int
    mmuext_ops: int
    arg_bytes: int
    callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def hypercall(self) -> tuple[int, tuple[object, ...]]:
        """``(op, args)`` of the one hypercall this batch is."""
        if self.multicall:
            return abi.HYPERVISOR_multicall, (list(self.calls),)
        call = self.calls[0]
        op = call[0]
        assert isinstance(op, int)
        return op, call[1:]

    def client_calls(self) -> list[Call]:
        """``calls`` in the raw client's form (``guest.client.Domain``): the
        ``mmu_update`` requests as ``(ptr, val)`` pairs instead of a flat list."""
        out: list[Call] = []
        for call in self.calls:
            reqs = call[1] if call[0] == abi.HYPERVISOR_mmu_update else None
            if isinstance(reqs, list):
                out.append((call[0], flat_to_pairs(reqs), *call[2:]))
            else:
                out.append(call)
        return out


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
    """One multicall entry being built. Extendable entries carry a payload list."""

    __slots__ = ("args", "foreigndom", "op", "ops", "reqs")

    def __init__(
        self,
        op: int,
        *,
        foreigndom: int = abi.DOMID_SELF,
        reqs: list[int] | None = None,
        ops: list[tuple[int, int, int]] | None = None,
        args: tuple[object, ...] = (),
    ) -> None:
        self.op = op
        self.foreigndom = foreigndom
        self.reqs = reqs
        self.ops = ops
        self.args = args

    def call(self) -> Call:
        if self.reqs is not None:
            return (self.op, self.reqs, self.foreigndom)
        if self.ops is not None:
            return (self.op, self.ops, self.foreigndom)
        return (self.op, *self.args)


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1 or None, not {value}")


class McBuffer:
    """Linux's per-CPU Xen multicall buffer (reference §2.2), parameterised.

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
    def idle(self) -> bool:
        """Nothing queued and nothing flushed but unsent."""
        return not self._entries and self._completed == self._produced

    # --- queueing ---------------------------------------------------------------------

    def queue_mmu_update(self, ptr: int, val: int, foreigndom: int = abi.DOMID_SELF) -> None:
        """Queue one ``mmu_update`` record (``xen_extend_mmu_update``): appended
        to the previous entry when it is an ``mmu_update`` for the same
        ``foreigndom`` and argument space remains, else a fresh entry."""
        if self.records_per_flush is not None and self._records >= self.records_per_flush:
            self.flush(FLUSH_FULL_RECORDS)
        entry = self._extend(abi.HYPERVISOR_mmu_update, MMU_UPDATE_BYTES, foreigndom)
        if entry is None:
            self._entry(MMU_UPDATE_BYTES)
            entry = _Entry(abi.HYPERVISOR_mmu_update, foreigndom=foreigndom, reqs=[])
            self._entries.append(entry)
        assert entry.reqs is not None
        entry.reqs += (ptr, val)
        self._records += 1

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
        """Queue any other hypercall as its own entry, reserving ``arg_bytes``."""
        if op in (abi.HYPERVISOR_mmu_update, abi.HYPERVISOR_mmuext_op):
            raise ValueError("use queue_mmu_update / queue_mmuext for this op")
        if op == abi.HYPERVISOR_multicall:
            raise ValueError("a multicall cannot be a multicall entry")
        if arg_bytes < 0:
            raise ValueError(f"arg_bytes must be >= 0, not {arg_bytes}")
        self._entry(arg_bytes)
        self._entries.append(_Entry(op, args=args))

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
        if last.reqs is None and last.ops is None:
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
        calls = tuple(e.call() for e in entries)
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
                f"op {entry[0]} -> {abi.errno_name(rc)}",
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


class LazyMmu:
    """One vCPU's lazy-MMU state with the reference §3.5 rules enforced.

    With a ``buffer``, :meth:`commit` and :meth:`set_pte` queue their
    ``mmu_update`` record there and issue it (batched inside a section,
    immediate outside); :meth:`leave` flushes. Without one, only the rules are
    tracked (modes whose kernel writes PTEs itself).

    Args:
        buffer: the multicall buffer (or :class:`WholePageBatcher`).
        page_of: maps a PTE's machine address to its PTE page, the unit
            :meth:`check_unlock` is called with (default: the machine frame).
        commit_cmd: the ``mmu_update`` command :meth:`commit` uses
            (``MMU_PT_UPDATE_PRESERVE_AD``; ``MMU_NORMAL_PT_UPDATE`` for the
            unsafe ``naive`` mode).
    """

    def __init__(
        self,
        buffer: McBuffer | None = None,
        *,
        page_of: Callable[[int], int] = pte_page_of,
        commit_cmd: int = abi.MMU_PT_UPDATE_PRESERVE_AD,
    ) -> None:
        self.buffer = buffer
        self.page_of = page_of
        self.commit_cmd = commit_cmd
        self.sections = 0
        self._active = False
        self._paused = False
        # ptep -> True while started and not committed; False once written in
        # this section (a later read of it is a hazard). Cleared at leave.
        self._ptes: dict[int, bool] = {}
        self._open = 0
        # PTE page -> seq of the batch carrying its last queued update.
        self._queued: dict[int, int] = {}

    @property
    def active(self) -> bool:
        """In a lazy-MMU section (updates are batched)."""
        return self._active

    @property
    def open_transactions(self) -> int:
        """Starts not yet committed."""
        return self._open

    # --- sections -------------------------------------------------------------------------

    def enter(self) -> None:
        """``arch_enter_lazy_mmu_mode``: nesting is a BUG."""
        if self._active:
            raise KernelBug("lazy MMU enter while already in lazy MMU mode (nesting)")
        if self._paused:
            raise KernelBug("lazy MMU enter while a paused section awaits resume")
        self._active = True
        self.sections += 1

    def leave(self) -> None:
        """``arch_leave_lazy_mmu_mode``: every start committed, then flush."""
        if not self._active:
            raise KernelBug("lazy MMU leave outside lazy MMU mode")
        self._require_no_open("lazy MMU leave")
        self._active = False
        self._ptes.clear()
        self._flush(FLUSH_LAZY_LEAVE)

    def flush(self) -> None:
        """``arch_flush_lazy_mmu_mode``: in a section, send what is queued (leave +
        re-enter); open transactions stay open."""
        if not self._active:
            return
        if self._open:
            self._ptes = {p: s for p, s in self._ptes.items() if s}
        else:
            self._ptes.clear()
        self._flush(FLUSH_LAZY_FLUSH)

    def pause(self) -> None:
        """Context switch away (``start_context_switch``): leave a section,
        flushing, and remember to re-enter it on :meth:`resume`."""
        if not self._active:
            return
        self._require_no_open("context switch")
        self._active = False
        self._paused = True
        self._ptes.clear()
        self._flush(FLUSH_CONTEXT_SWITCH)

    def resume(self) -> None:
        """Context switch back (``end_context_switch``)."""
        if self._paused:
            self._paused = False
            self._active = True

    def _flush(self, reason: str) -> None:
        buf = self.buffer
        if buf is None:
            return
        buf.flush(reason)
        if self._queued and buf.completed == buf.generation:
            self._queued.clear()

    def _require_no_open(self, what: str) -> None:
        if self._open:
            open_ptes = ", ".join(f"{p:#x}" for p, s in self._ptes.items() if s)
            raise KernelBug(
                f"{what} with {self._open} ptep_modify_prot_start without commit: {open_ptes}"
            )

    # --- PTE transactions -----------------------------------------------------------------

    def start(self, ptep: int) -> None:
        """``ptep_modify_prot_start`` on the PTE at machine address ``ptep``."""
        state = self._ptes.get(ptep)
        if state is True:
            raise KernelBug(f"ptep_modify_prot_start({ptep:#x}) again before its commit")
        if state is False:
            raise KernelBug(
                f"read hazard: ptep_modify_prot_start({ptep:#x}) re-reads a PTE already "
                "updated in this lazy MMU section"
            )
        self._ptes[ptep] = True
        self._open += 1

    def commit(self, ptep: int, val: int) -> None:
        """``ptep_modify_prot_commit``: closes the transaction :meth:`start`
        opened on ``ptep``; queues ``ptep | commit_cmd := val`` and issues it."""
        if self._ptes.get(ptep) is not True:
            raise KernelBug(f"ptep_modify_prot_commit({ptep:#x}) without a matching start")
        self._open -= 1
        if self._active:
            self._ptes[ptep] = False
        else:
            del self._ptes[ptep]
        if self.buffer is not None:
            self._queue(ptep, self.commit_cmd, val)

    def set_pte(self, ptep: int, val: int, cmd: int = abi.MMU_NORMAL_PT_UPDATE) -> None:
        """``set_pte``: queues ``ptep | cmd := val`` (batched inside a section)."""
        if self._ptes.get(ptep) is True:
            raise KernelBug(f"set_pte({ptep:#x}) inside its start/commit transaction")
        if self._active:
            self._ptes[ptep] = False
        if self.buffer is not None:
            self._queue(ptep, cmd, val)

    def _queue(self, ptep: int, cmd: int, val: int) -> None:
        if ptep & abi.MMU_CMD_MASK:
            raise KernelBug(f"PTE pointer {ptep:#x} is not 8-byte aligned")
        buf = self.buffer
        assert buf is not None
        buf.queue_mmu_update(ptep | cmd, val)
        buf.issue(lazy=self._active)
        seq = buf.generation if buf.has_pending else buf.generation - 1
        if buf.completed <= seq:
            self._queued[self.page_of(ptep)] = seq

    def issue(self) -> None:
        """``xen_mc_issue(XEN_LAZY_MMU)`` for something the kernel queued on the
        buffer itself (e.g. a TLB-flush ``mmuext_op``): immediate outside a
        section, batched inside."""
        if self.buffer is not None:
            self.buffer.issue(lazy=self._active)

    # --- rule checks the kernel calls -----------------------------------------------------

    def note_read(self, ptep: int) -> None:
        """The kernel is about to read ``*ptep``: inside a section that is a
        read hazard once the PTE's transaction started."""
        if self._active and ptep in self._ptes:
            raise KernelBug(
                f"read hazard: PTE {ptep:#x} re-read inside a lazy MMU section after its start"
            )

    def check_unlock(self, pte_page: int) -> None:
        """The kernel is about to release ``pte_page``'s lock: every transaction
        on it must be committed and every queued update sent."""
        if self._open:
            page_of = self.page_of
            for p, started in self._ptes.items():
                if started and page_of(p) == pte_page:
                    raise KernelBug(
                        f"PTE-page lock {pte_page:#x} released with "
                        f"ptep_modify_prot_start({p:#x}) not committed"
                    )
        if self._queued:
            seq = self._queued.pop(pte_page, None)
            buf = self.buffer
            if seq is not None and buf is not None and buf.completed <= seq:
                raise KernelBug(
                    f"PTE-page lock {pte_page:#x} released with its update still queued "
                    "(commit must reach the hypervisor before unlock)"
                )


def lazy_for_mode(
    mode: str,
    sink: Sink | None = None,
    *,
    max_entries: int | None = MC_BATCH,
    max_arg_bytes: int | None = MC_ARGS,
    records_per_flush: int | None = None,
) -> LazyMmu:
    """The lazy-MMU machinery for a pv-ops mode (DESIGN §5).

    ``xen``: Linux's buffer with the given limits, PRESERVE_AD commits.
    ``batched``: whole-page batching, PRESERVE_AD. ``naive``: whole-page
    batching, NORMAL commits (unsafe). ``native``/``trap``/``ptwr``: rules only,
    no buffer (the kernel writes PTEs itself).
    """
    if mode == "xen":
        buf: McBuffer = McBuffer(
            sink,
            max_entries=max_entries,
            max_arg_bytes=max_arg_bytes,
            records_per_flush=records_per_flush,
        )
        return LazyMmu(buf)
    if mode == "batched":
        return LazyMmu(WholePageBatcher(sink))
    if mode == "naive":
        return LazyMmu(WholePageBatcher(sink), commit_cmd=abi.MMU_NORMAL_PT_UPDATE)
    if mode in ("native", "trap", "ptwr"):
        return LazyMmu(None)
    raise ValueError(f"unknown pv-ops mode {mode!r}")


__all__ = [
    "Call",
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
    "pte_page_of",
    "flat_to_pairs",
    "KernelBug",
    "Batch",
    "McStats",
    "McBuffer",
    "WholePageBatcher",
    "LazyMmu",
    "lazy_for_mode",
]
