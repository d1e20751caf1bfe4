"""The pv-ops modes, each declared once (docs/sources.md §2).

A :class:`Mode` says which backend runs the page-table hooks, which
multicall buffer (if any) batches them, which ``mmu_update`` command a
commit uses, whether it is unsafe, and how many traps one PTE page of N
present PTEs costs for mprotect RW→RO. Every list of modes in pvemu (the
CLI's choices, the comparison tables, the docs' table, the tests) reads
from :data:`MODES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pvemu.shared import abi

from .lazy import LazyMmu
from .machine import NativeMachine
from .multicall import MC_ARGS, MC_BATCH, McBuffer, Sink, WholePageBatcher, records_per_flush
from .pvops import BatchedOps, BufferedOps, NaiveOps, NativeOps, PtwrOps, PvOps, TrapOps, XenOps

if TYPE_CHECKING:
    from .client import Domain


@dataclass(frozen=True, slots=True)
class Mode:
    """One row of the comparison."""

    name: str
    #: Start / commit per PTE, in words (the docs' table).
    transaction: str
    #: How the hooks are batched, in words.
    batching: str
    backend: type[PvOps]
    #: "none" (the kernel writes or traps each PTE itself), "linux" (Linux's
    #: multicall buffer, its limits tunable) or "whole_page" (no limits).
    buffer: str
    commit_cmd: int
    unsafe: bool
    #: Traps of mprotect RW→RO for one PTE page of ``n`` present PTEs
    #: (``n`` ≥ 34, so the TLB flush is one op), given the records a full
    #: flush carries ``per``; and the same as the docs write it.
    traps_per_pte_page: Callable[[int, int], int]
    formula: str

    @property
    def needs_hypervisor(self) -> bool:
        return self.backend is not NativeOps

    @property
    def tunable(self) -> bool:
        """Takes the buffer limits as parameters (``--mc-*``)."""
        return self.buffer == "linux"


_PRESERVE_AD: Final = abi.MMU_PT_UPDATE_PRESERVE_AD
_NORMAL: Final = abi.MMU_NORMAL_PT_UPDATE

#: Every mode, in the order tables show them.
MODES: Final[dict[str, Mode]] = {
    mode.name: mode
    for mode in (
        Mode(
            "native",
            "xchg / store, in-process page tables, no hypervisor",
            "none",
            NativeOps,
            "none",
            _NORMAL,
            False,
            lambda n, per: 0,
            "0",
        ),
        Mode(
            "trap",
            "get_and_clear by trapped write / `mmu_update` count=1",
            "none",
            TrapOps,
            "none",
            _NORMAL,
            False,
            lambda n, per: 2 * n + 1,
            "2N + 1",
        ),
        Mode(
            "ptwr",
            "trapped xchg / trapped store (writable page tables)",
            "none",
            PtwrOps,
            "none",
            _NORMAL,
            False,
            lambda n, per: 2 * n + 1,
            "2N + 1",
        ),
        Mode(
            "xen",
            "plain read / queue PRESERVE_AD record",
            "Linux's multicall buffer (32 entries, 512 argument bytes, 31 records a flush); "
            "TLB flush outside the batch",
            XenOps,
            "linux",
            _PRESERVE_AD,
            False,
            lambda n, per: math.ceil(n / per) + 1,
            "⌈N/{per}⌉ + 1",
        ),
        Mode(
            "batched",
            "plain read / queue PRESERVE_AD record",
            "a whole PTE page per flush, TLB flush folded into the same multicall",
            BatchedOps,
            "whole_page",
            _PRESERVE_AD,
            False,
            lambda n, per: 1,
            "1",
        ),
        Mode(
            "naive",
            "plain read / queue NORMAL record (UNSAFE: loses A/D bits)",
            "as batched",
            NaiveOps,
            "whole_page",
            _NORMAL,
            True,
            lambda n, per: 1,
            "1",
        ),
    )
}
#: Mode names in table order (the CLI's choices).
MODE_NAMES: Final = tuple(MODES)
#: Modes that lose hardware-set A/D bits on purpose.
UNSAFE_MODES: Final = frozenset(name for name, mode in MODES.items() if mode.unsafe)
#: The correct modes, in table order (what comparisons run by default).
SAFE_MODES: Final = tuple(name for name in MODE_NAMES if name not in UNSAFE_MODES)
#: Records a full flush of Linux's buffer carries (31).
LINUX_RECORDS_PER_FLUSH: Final = records_per_flush(MC_ARGS)


def mode(name: str) -> Mode:
    """The mode called ``name``."""
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}") from None


def lazy_for_mode(
    name: str,
    sink: Sink | None = None,
    *,
    max_entries: int | None = MC_BATCH,
    max_arg_bytes: int | None = MC_ARGS,
    records_per_flush: int | None = None,
) -> LazyMmu:
    """The lazy-MMU machinery of a mode: its buffer (limits apply to Linux's
    buffer only) and its commit command; rules only for modes with no
    buffer (the kernel writes or traps PTEs itself)."""
    m = mode(name)
    if m.buffer == "linux":
        buffer: McBuffer = McBuffer(
            sink,
            max_entries=max_entries,
            max_arg_bytes=max_arg_bytes,
            records_per_flush=records_per_flush,
        )
        return LazyMmu(buffer, commit_cmd=m.commit_cmd)
    if m.buffer == "whole_page":
        return LazyMmu(WholePageBatcher(sink), commit_cmd=m.commit_cmd)
    return LazyMmu(None)


def make_backend(name: str, domain: Domain, vcpu: int = 0, **params: int) -> PvOps:
    """The backend of a hypervisor mode for one vCPU; ``params`` (buffer
    limits) only for a tunable mode."""
    m = mode(name)
    if not m.needs_hypervisor:
        raise ValueError(f"mode {name!r} runs without a hypervisor: use make_native_backend")
    if params and not m.tunable:
        raise ValueError(f"mode {name!r} takes no buffer parameters")
    backend = m.backend
    if issubclass(backend, BufferedOps):
        return backend(domain, vcpu, lazy_for_mode(name, None, **params))
    assert issubclass(backend, TrapOps)
    return backend(domain, vcpu)


def make_native_backend(machine: NativeMachine, vcpu: int = 0) -> NativeOps:
    return NativeOps(machine, vcpu)


def docs_table() -> str:
    """The modes as the Markdown table the docs show (a test keeps the docs
    equal to it)."""
    per = LINUX_RECORDS_PER_FLUSH
    assert per is not None
    rows = [
        "| mode | start / commit per PTE | batching | traps for one PTE page of N "
        "present PTEs, RW→RO (N ≥ 34) |",
        "|---|---|---|---|",
    ]
    for m in MODES.values():
        formula = m.formula.format(per=per)
        rows.append(f"| `{m.name}` | {m.transaction} | {m.batching} | {formula} |")
    return "\n".join(rows) + "\n"


__all__ = [
    "LINUX_RECORDS_PER_FLUSH",
    "MODES",
    "MODE_NAMES",
    "SAFE_MODES",
    "UNSAFE_MODES",
    "Mode",
    "docs_table",
    "lazy_for_mode",
    "make_backend",
    "make_native_backend",
    "mode",
]
