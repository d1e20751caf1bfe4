"""The trace format: what a program did to its address spaces, normalised.

A trace is what ``strace -f -e trace=memory,...`` saw a program and the
processes it started do to their address spaces (mmap, mprotect, munmap,
mremap, brk, madvise that discards or populates pages, mlock, munlock), and
the calls that make and end address spaces (fork, vfork, execve,
exit_group), normalised into versioned
JSON (``docs/traces.md`` is the reference)::

    {"schema": 2, "command": ["sh", "-c", "..."], "recorded_with": "strace ...",
     "stats": {...parser counts...},
     "events": [
       {"op": "mmap", "pid": 1, "addr": "0x7f3a00000000", "length": 8192,
        "prot": "PROT_READ|PROT_WRITE", "flags": "MAP_PRIVATE|MAP_ANONYMOUS"},
       {"op": "fork", "pid": 1, "child": 2},
       {"op": "exec", "pid": 2, "path": "/usr/bin/ls"},
       {"op": "exit", "pid": 2}, ...]}

In schema 2 ``pid`` is the process an event belongs to, numbered in order of
appearance (the traced program is 1); :func:`check_trace` holds the events
to a consistent process tree. Schema 1 traces (one address space, ``pid``
the thread's OS id, no fork, vfork or exit) still load and replay as they
always did. Every event keeps the program's own addresses. The format is the contract
between the recorder (``scripts.strace``, a tool) and the replay
(``guest.replay``, guest-kernel code), so it lives in ``shared``: the event
dataclasses, :class:`Trace`, JSON encoding and decoding with validation
(:class:`TraceError`), and the strace spellings of prot/flag bits. Pure code:
no I/O besides :func:`load_trace`/:func:`save_trace`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Final

from pvemu.shared.x86 import PAGE_SIZE

__all__ = [
    "SCHEMA",
    "SCHEMAS",
    "PROCESS_OPS",
    "SCHEMA_OPS",
    "ROOT_PID",
    "TraceError",
    "Mmap",
    "Mprotect",
    "Munmap",
    "Mremap",
    "Brk",
    "Madvise",
    "Mlock",
    "Munlock",
    "Exec",
    "Fork",
    "Vfork",
    "Exit",
    "Event",
    "EVENT_TYPES",
    "Trace",
    "load_trace",
    "save_trace",
    "dump_trace",
    "trace_to_json",
    "trace_from_json",
    "event_to_json",
    "event_from_json",
    "check_event",
    "check_trace",
    "format_prot",
    "format_map_flags",
    "format_mremap_flags",
    "parse_symbols",
    "PROT_NAMES",
    "MAP_TYPES",
    "MAP_NAMES",
    "ALL_MAP_NAMES",
    "MREMAP_NAMES",
    "DISCARD_ADVICES",
    "POPULATE_ADVICES",
    "KEPT_ADVICES",
]

#: The schema :func:`dump_trace` writes for a new trace (the recorder's).
SCHEMA: Final = 2
#: Every schema :func:`load_trace` reads: 1 is one address space, 2 adds processes.
SCHEMAS: Final = (1, 2)
#: Ops only schema 2 has: processes made and ended.
PROCESS_OPS: Final = ("fork", "vfork", "exit")
#: The traced program's process number in a schema-2 trace.
ROOT_PID: Final = 1

PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2
PROT_EXEC: Final = 0x4

MAP_SHARED: Final = 0x01
MAP_PRIVATE: Final = 0x02
MAP_SHARED_VALIDATE: Final = 0x03
MAP_TYPE: Final = 0x0F
MAP_FIXED: Final = 0x10
MAP_ANONYMOUS: Final = 0x20
MAP_GROWSDOWN: Final = 0x100
MAP_LOCKED: Final = 0x2000
MAP_POPULATE: Final = 0x8000
MAP_NONBLOCK: Final = 0x10000
MAP_STACK: Final = 0x20000
_MAP_HUGE_SHIFT: Final = 26
_MAP_HUGE_MASK: Final = 0x3F

MREMAP_MAYMOVE: Final = 1
MREMAP_FIXED: Final = 2
MREMAP_DONTUNMAP: Final = 4

PROT_NAMES: Final[Mapping[str, int]] = {
    "PROT_NONE": 0,
    "PROT_READ": PROT_READ,
    "PROT_WRITE": PROT_WRITE,
    "PROT_EXEC": PROT_EXEC,
    "PROT_SEM": 0x8,
    "PROT_GROWSDOWN": 0x01000000,
    "PROT_GROWSUP": 0x02000000,
}
#: The mapping types (the low nibble), then the single-bit flags, as strace names them.
MAP_TYPES: Final[Mapping[str, int]] = {
    "MAP_SHARED": MAP_SHARED,
    "MAP_PRIVATE": MAP_PRIVATE,
    "MAP_SHARED_VALIDATE": MAP_SHARED_VALIDATE,
}
MAP_NAMES: Final[Mapping[str, int]] = {
    "MAP_FIXED": MAP_FIXED,
    "MAP_ANONYMOUS": MAP_ANONYMOUS,
    "MAP_32BIT": 0x40,
    "MAP_ABOVE4G": 0x80,
    "MAP_GROWSDOWN": MAP_GROWSDOWN,
    "MAP_DENYWRITE": 0x800,
    "MAP_EXECUTABLE": 0x1000,
    "MAP_LOCKED": MAP_LOCKED,
    "MAP_NORESERVE": 0x4000,
    "MAP_POPULATE": MAP_POPULATE,
    "MAP_NONBLOCK": MAP_NONBLOCK,
    "MAP_STACK": MAP_STACK,
    "MAP_HUGETLB": 0x40000,
    "MAP_SYNC": 0x80000,
    "MAP_FIXED_NOREPLACE": 0x100000,
    "MAP_UNINITIALIZED": 0x4000000,
}
_MAP_ALIASES: Final[Mapping[str, int]] = {"MAP_ANON": MAP_ANONYMOUS, "MAP_FILE": 0}
MREMAP_NAMES: Final[Mapping[str, int]] = {
    "MREMAP_MAYMOVE": MREMAP_MAYMOVE,
    "MREMAP_FIXED": MREMAP_FIXED,
    "MREMAP_DONTUNMAP": MREMAP_DONTUNMAP,
}
#: madvise advices that throw pages away.
DISCARD_ADVICES: Final = frozenset(
    {"MADV_DONTNEED", "MADV_FREE", "MADV_REMOVE", "MADV_DONTNEED_LOCKED"}
)
#: madvise advices that fault pages in (22 and 23).
POPULATE_ADVICES: Final = frozenset({"MADV_POPULATE_READ", "MADV_POPULATE_WRITE"})
#: The advices a trace keeps (the only ones that change page tables).
KEPT_ADVICES: Final = DISCARD_ADVICES | POPULATE_ADVICES
_HUGE_UNITS: Final = (("GB", 30), ("MB", 20), ("KB", 10))


_U64: Final = (1 << 64) - 1


def _page_align(n: int) -> int:
    """Round ``n`` up to a page multiple, wrapping at 2**64 like ``PAGE_ALIGN``
    (the same as ``guest.vma.page_align``, which shared code cannot import)."""
    return (n + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1) & _U64


class TraceError(ValueError):
    """A malformed trace (bad JSON, unknown schema, op, field or flag name,
    or an event no successful syscall could have produced)."""


# --- symbolic flags ------------------------------------------------------------------


def _huge_name(log2: int) -> str | None:
    for unit, shift in _HUGE_UNITS:
        if log2 >= shift:
            return f"MAP_HUGE_{1 << (log2 - shift)}{unit}"
    return None


def _huge_value(name: str) -> int | None:
    m = re.fullmatch(r"MAP_HUGE_(\d+)(KB|MB|GB)", name)
    if m is None:
        return None
    size = int(m.group(1)) << dict(_HUGE_UNITS)[m.group(2)]
    if size & (size - 1):
        return None
    return (size.bit_length() - 1) << _MAP_HUGE_SHIFT


def parse_symbols(text: str, names: Mapping[str, int], *, unknown: list[str] | None = None) -> int:
    """``PROT_READ|PROT_WRITE``, ``MAP_PRIVATE|0x40000`` (strace's spelling)
    to an int. Numbers (hex or decimal) are taken as they are; a name not in
    ``names`` is appended to ``unknown`` if given, else raises TraceError."""
    text = re.sub(r"/\*.*?\*/", "", text).strip()
    value = 0
    for token in (t.strip() for t in text.split("|")):
        if not token:
            raise TraceError(f"empty flag in {text!r}")
        if token in names:
            value |= names[token]
        elif re.fullmatch(r"0x[0-9a-fA-F]+|\d+", token):
            value |= int(token, 0)
        elif (huge := _huge_value(token)) is not None and "MAP_HUGETLB" in names:
            value |= huge
        elif unknown is not None:
            unknown.append(token)
        else:
            raise TraceError(f"unknown flag {token!r} in {text!r}")
    return value


def _format_bits(value: int, names: Mapping[str, int], head: list[str]) -> str:
    parts = list(head)
    for name, bit in names.items():
        if value & bit:
            parts.append(name)
            value &= ~bit
    if value:
        parts.append(hex(value))
    return "|".join(parts)


def format_prot(prot: int) -> str:
    """The strace spelling of a protection (``PROT_NONE`` for 0)."""
    if prot < 0:
        raise ValueError(f"negative prot {prot}")
    return _format_bits(prot, PROT_NAMES, []) if prot else "PROT_NONE"


def format_map_flags(flags: int) -> str:
    """The strace spelling of mmap flags: the type, then the flag names."""
    if flags < 0:
        raise ValueError(f"negative flags {flags}")
    mtype = flags & MAP_TYPE
    type_name = next((n for n, v in MAP_TYPES.items() if v == mtype), None)
    head = [type_name] if type_name else ([hex(mtype)] if mtype else [])
    rest = flags & ~MAP_TYPE
    huge = (rest >> _MAP_HUGE_SHIFT) & _MAP_HUGE_MASK
    huge_name = _huge_name(huge) if huge else None
    if huge_name is not None:
        rest &= ~(_MAP_HUGE_MASK << _MAP_HUGE_SHIFT)
    text = _format_bits(rest, MAP_NAMES, head)
    if huge_name is not None:
        text = f"{text}|{huge_name}" if text else huge_name
    return text or "0"


def format_mremap_flags(flags: int) -> str:
    return _format_bits(flags, MREMAP_NAMES, []) or "0"


ALL_MAP_NAMES: Final[Mapping[str, int]] = {**MAP_TYPES, **MAP_NAMES, **_MAP_ALIASES}


# --- events ------------------------------------------------------------------------------


def _meta(kind: str) -> dict[str, str]:
    return {"kind": kind}


@dataclass(frozen=True, slots=True)
class Mmap:
    """A successful mmap; ``addr`` is where it landed, ``hint`` what was asked."""

    OP: ClassVar[str] = "mmap"
    pid: int = field(metadata=_meta("int"))
    addr: int = field(metadata=_meta("addr"))
    length: int = field(metadata=_meta("int"))
    prot: int = field(metadata=_meta("prot"))
    flags: int = field(metadata=_meta("mflags"))
    hint: int | None = field(default=None, metadata=_meta("optaddr"))
    fd: int | None = field(default=None, metadata=_meta("optint"))
    path: str | None = field(default=None, metadata=_meta("optstr"))
    offset: int = field(default=0, metadata=_meta("int"))

    @property
    def anonymous(self) -> bool:
        return bool(self.flags & MAP_ANONYMOUS)

    @property
    def shared(self) -> bool:
        return (self.flags & MAP_TYPE) in (MAP_SHARED, MAP_SHARED_VALIDATE)


@dataclass(frozen=True, slots=True)
class Mprotect:
    OP: ClassVar[str] = "mprotect"
    pid: int = field(metadata=_meta("int"))
    addr: int = field(metadata=_meta("addr"))
    length: int = field(metadata=_meta("int"))
    prot: int = field(metadata=_meta("prot"))


@dataclass(frozen=True, slots=True)
class Munmap:
    OP: ClassVar[str] = "munmap"
    pid: int = field(metadata=_meta("int"))
    addr: int = field(metadata=_meta("addr"))
    length: int = field(metadata=_meta("int"))


@dataclass(frozen=True, slots=True)
class Mremap:
    """A successful mremap: ``new_addr`` is the result, ``target`` the
    MREMAP_FIXED argument if any."""

    OP: ClassVar[str] = "mremap"
    pid: int = field(metadata=_meta("int"))
    addr: int = field(metadata=_meta("addr"))
    old_length: int = field(metadata=_meta("int"))
    length: int = field(metadata=_meta("int"))
    flags: int = field(metadata=_meta("rflags"))
    new_addr: int = field(metadata=_meta("addr"))
    target: int | None = field(default=None, metadata=_meta("optaddr"))


@dataclass(frozen=True, slots=True)
class Brk:
    """brk(``request``) returned ``result`` (``request`` None for brk(NULL));
    a failed brk returns the old break, so the result is always the break."""

    OP: ClassVar[str] = "brk"
    pid: int = field(metadata=_meta("int"))
    result: int = field(metadata=_meta("addr"))
    request: int | None = field(default=None, metadata=_meta("optaddr"))


@dataclass(frozen=True, slots=True)
class Madvise:
    """A madvise that changes page tables: a discard (MADV_DONTNEED and
    kin: the pages are dropped) or a populate (MADV_POPULATE_READ/WRITE)."""

    OP: ClassVar[str] = "madvise"
    pid: int = field(metadata=_meta("int"))
    addr: int = field(metadata=_meta("addr"))
    length: int = field(metadata=_meta("int"))
    advice: str = field(metadata=_meta("str"))


@dataclass(frozen=True, slots=True)
class Mlock:
    """mlock, or mlock2 without MLOCK_ONFAULT: the range is locked and
    populated."""

    OP: ClassVar[str] = "mlock"
    pid: int = field(metadata=_meta("int"))
    addr: int = field(metadata=_meta("addr"))
    length: int = field(metadata=_meta("int"))


@dataclass(frozen=True, slots=True)
class Munlock:
    """munlock: the range is unlocked (no page-table change)."""

    OP: ClassVar[str] = "munlock"
    pid: int = field(metadata=_meta("int"))
    addr: int = field(metadata=_meta("addr"))
    length: int = field(metadata=_meta("int"))


@dataclass(frozen=True, slots=True)
class Exec:
    """A successful execve: process ``pid`` (schema 1: the traced program)
    continues in a new, empty address space."""

    OP: ClassVar[str] = "exec"
    pid: int = field(metadata=_meta("int"))
    path: str = field(metadata=_meta("str"))


@dataclass(frozen=True, slots=True)
class Fork:
    """fork, or clone without CLONE_VM: process ``child`` starts with a copy
    of ``pid``'s address space (copy-on-write)."""

    OP: ClassVar[str] = "fork"
    pid: int = field(metadata=_meta("int"))
    child: int = field(metadata=_meta("int"))


@dataclass(frozen=True, slots=True)
class Vfork:
    """vfork, or clone with CLONE_VM but not CLONE_THREAD: process ``child``
    runs in ``pid``'s address space (no copy) until it execs or exits."""

    OP: ClassVar[str] = "vfork"
    pid: int = field(metadata=_meta("int"))
    child: int = field(metadata=_meta("int"))


@dataclass(frozen=True, slots=True)
class Exit:
    """exit_group: process ``pid`` ends, and its address space with it
    unless a vfork child still runs in it."""

    OP: ClassVar[str] = "exit"
    pid: int = field(metadata=_meta("int"))


Event = (
    Mmap | Mprotect | Munmap | Mremap | Brk | Madvise | Mlock | Munlock | Exec | Fork | Vfork | Exit
)
EVENT_TYPES: Final[Mapping[str, type[Event]]] = {
    cls.OP: cls
    for cls in (
        Mmap,
        Mprotect,
        Munmap,
        Mremap,
        Brk,
        Madvise,
        Mlock,
        Munlock,
        Exec,
        Fork,
        Vfork,
        Exit,
    )
}
#: The ops of each schema, in report order.
SCHEMA_OPS: Final[Mapping[int, tuple[str, ...]]] = {
    1: tuple(op for op in EVENT_TYPES if op not in PROCESS_OPS),
    2: tuple(EVENT_TYPES),
}


def _encode(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind in ("addr", "optaddr"):
        return hex(value)
    if kind == "prot":
        return format_prot(value)
    if kind == "mflags":
        return format_map_flags(value)
    if kind == "rflags":
        return format_mremap_flags(value)
    return value


def _decode(kind: str, value: Any, where: str) -> Any:
    if value is None:
        if kind.startswith("opt"):
            return None
        raise TraceError(f"{where}: missing value")
    if kind in ("addr", "optaddr"):
        if isinstance(value, str) and re.fullmatch(r"0x[0-9a-fA-F]+", value):
            return int(value, 16)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise TraceError(f"{where}: expected a hex address, got {value!r}")
    if kind in ("int", "optint"):
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0 and kind == "int":
                raise TraceError(f"{where}: negative {value}")
            return value
        raise TraceError(f"{where}: expected an integer, got {value!r}")
    if kind in ("str", "optstr"):
        if isinstance(value, str):
            return value
        raise TraceError(f"{where}: expected a string, got {value!r}")
    if not isinstance(value, str):
        raise TraceError(f"{where}: expected symbolic flags, got {value!r}")
    if kind == "prot":
        return parse_symbols(value, PROT_NAMES)
    if kind == "mflags":
        return parse_symbols(value, ALL_MAP_NAMES)
    if kind == "rflags":
        return 0 if value.strip() == "0" else parse_symbols(value, MREMAP_NAMES)
    raise AssertionError(kind)


def event_to_json(event: Event) -> dict[str, Any]:
    out: dict[str, Any] = {"op": event.OP}
    for f in fields(event):
        value = getattr(event, f.name)
        if value is None or (f.default is not MISSING and value == f.default):
            continue  # defaults are left out: the files stay small
        out[f.name] = _encode(f.metadata["kind"], value)
    return out


def event_from_json(obj: Any, index: int = 0) -> Event:
    where = f"event {index}"
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected an object, got {type(obj).__name__}")
    cls = EVENT_TYPES.get(obj.get("op", ""))
    if cls is None:
        raise TraceError(f"{where}: unknown op {obj.get('op')!r}")
    known = {f.name for f in fields(cls)}
    extra = set(obj) - known - {"op"}
    if extra:
        raise TraceError(f"{where} ({cls.OP}): unknown fields {sorted(extra)}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in obj:
            kwargs[f.name] = _decode(f.metadata["kind"], obj[f.name], f"{where}.{f.name}")
        elif f.default is MISSING:
            raise TraceError(f"{where} ({cls.OP}): missing {f.name!r}")
    event = cls(**kwargs)
    check_event(event, where)
    return event


def check_event(event: Event, where: str) -> None:
    """What no successful syscall could have produced is malformed: raise
    TraceError (the decoder and the strace parser both hold events to it)."""
    if isinstance(event, Mmap | Mprotect | Munmap | Madvise) and event.addr % PAGE_SIZE:
        raise TraceError(f"{where} ({event.OP}): address {event.addr:#x} not page aligned")
    if isinstance(event, Mmap | Munmap) and event.length <= 0:
        raise TraceError(f"{where} ({event.OP}): length {event.length}")
    if isinstance(event, Mmap) and event.offset % PAGE_SIZE:
        raise TraceError(f"{where} (mmap): offset {event.offset:#x} not page aligned")
    if isinstance(event, Mremap) and (
        event.addr % PAGE_SIZE or event.new_addr % PAGE_SIZE or event.length <= 0
    ):
        raise TraceError(f"{where} (mremap): unaligned address or zero length")
    if isinstance(event, Madvise) and event.advice not in KEPT_ADVICES:
        raise TraceError(
            f"{where} (madvise): advice {event.advice!r} is neither a discard nor a populate"
        )
    for name in ("addr", "new_addr", "result"):
        value = getattr(event, name, 0)
        if not 0 <= value < 1 << 64:
            raise TraceError(f"{where} ({event.OP}): {name} out of range")
    if isinstance(event, Fork | Vfork) and event.child == event.pid:
        raise TraceError(f"{where} ({event.OP}): process {event.pid} cannot be its own child")


def check_trace(events: list[Event], schema: int) -> None:
    """Hold a whole trace to its schema: schema 1 has no process ops;
    schema 2 is one process tree. There process 1 runs from the start;
    every other process is made by a fork or vfork that comes before its
    first event and numbers it next (2, 3, ... in order of appearance); no
    event comes from a process that has exited. TraceError names the first
    event that breaks a rule."""
    if schema not in SCHEMAS:
        raise TraceError(f"unsupported trace schema {schema!r} (expected one of {SCHEMAS})")
    if schema == 1:
        for index, event in enumerate(events):
            if event.OP in PROCESS_OPS:
                raise TraceError(f"event {index}: op {event.OP!r} needs schema 2, this is schema 1")
        return
    running = {ROOT_PID}
    exited: dict[int, int] = {}
    next_pid = ROOT_PID + 1
    for index, event in enumerate(events):
        where = f"event {index} ({event.OP})"
        if event.pid not in running:
            if event.pid in exited:
                raise TraceError(
                    f"{where}: process {event.pid} exited at event {exited[event.pid]}"
                )
            raise TraceError(f"{where}: process {event.pid} was never forked")
        if isinstance(event, Fork | Vfork):
            if event.child != next_pid:
                raise TraceError(
                    f"{where}: child {event.child} is not the next process number ({next_pid})"
                )
            running.add(event.child)
            next_pid += 1
        elif isinstance(event, Exit):
            running.discard(event.pid)
            exited[event.pid] = index


# --- the trace -------------------------------------------------------------------------


@dataclass
class Trace:
    """A normalised trace: the command, how it was recorded, the events in
    completion order, and the parser's counts. ``schema`` 1 is a trace of
    one address space (:func:`check_trace`)."""

    command: list[str]
    recorded_with: str
    events: list[Event] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)
    schema: int = SCHEMA

    @property
    def has_processes(self) -> bool:
        """Whether ``pid`` names processes (schema 2), not threads of one."""
        return self.schema >= 2

    def ops(self) -> tuple[str, ...]:
        """The ops this trace's schema has, in report order."""
        return SCHEMA_OPS[self.schema]

    def counts(self) -> dict[str, int]:
        """Events per op, every op of the schema listed."""
        found = Counter(e.OP for e in self.events)
        return {op: found.get(op, 0) for op in self.ops()}

    def summary(self) -> dict[str, Any]:
        """What ``pvemu trace show`` prints: event counts and page volumes."""
        mapped = protected = unmapped = discarded = brk_grown = 0
        pids: set[int] = set()
        #: The break of each address space's program (schema 1: one, key 0).
        brk: dict[int, int | None] = {}
        prots: Counter[str] = Counter()
        processes = 1
        for e in self.events:
            pids.add(e.pid)
            space = e.pid if self.has_processes else 0
            if isinstance(e, Mmap):
                mapped += _page_align(e.length) // PAGE_SIZE
            elif isinstance(e, Mprotect):
                protected += _page_align(e.length) // PAGE_SIZE
                prots[format_prot(e.prot)] += 1
            elif isinstance(e, Munmap):
                unmapped += _page_align(e.length) // PAGE_SIZE
            elif isinstance(e, Madvise) and e.advice in DISCARD_ADVICES:
                discarded += _page_align(e.length) // PAGE_SIZE
            elif isinstance(e, Mremap) and e.length > e.old_length:
                mapped += (_page_align(e.length) - _page_align(e.old_length)) // PAGE_SIZE
            elif isinstance(e, Brk):
                old = brk.get(space)
                if old is not None and e.result > old:
                    brk_grown += (_page_align(e.result) - _page_align(old)) // PAGE_SIZE
                brk[space] = e.result
            elif isinstance(e, Exec):
                brk[space] = None
            elif isinstance(e, Fork | Vfork):
                processes += 1
                brk[e.child] = brk.get(space)
        threads = len(pids)
        if self.has_processes:  # pids are processes; the parser counted the threads
            threads = processes + self.stats.get("threads", 0)
        return {
            "command": self.command,
            "recorded_with": self.recorded_with,
            "trace_schema": self.schema,
            "events": len(self.events),
            "by_op": self.counts(),
            "processes": processes,
            "threads": threads,
            "pages_mapped": mapped,
            "pages_protected": protected,
            "pages_unmapped": unmapped,
            "pages_discarded": discarded,
            "brk_pages_grown": brk_grown,
            "mprotect_to": dict(prots.most_common()),
            "parser": dict(self.stats),
        }


def trace_to_json(trace: Trace) -> dict[str, Any]:
    return {
        "schema": trace.schema,
        "command": list(trace.command),
        "recorded_with": trace.recorded_with,
        "stats": dict(trace.stats),
        "events": [event_to_json(e) for e in trace.events],
    }


def dump_trace(trace: Trace) -> str:
    """The file text: the header, then one event per line (diff-friendly)."""
    doc = trace_to_json(trace)
    events = doc.pop("events")
    head = json.dumps(doc, separators=(",", ":"))
    lines = ",\n".join(json.dumps(e, separators=(",", ":")) for e in events)
    return f'{head[:-1]},"events":[\n{lines}\n]}}\n'


def trace_from_json(doc: Any) -> Trace:
    if not isinstance(doc, dict):
        raise TraceError("a trace is a JSON object")
    schema = doc.get("schema")
    if schema not in SCHEMAS or isinstance(schema, bool):
        raise TraceError(f"unsupported trace schema {schema!r} (expected one of {SCHEMAS})")
    command = doc.get("command")
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise TraceError("'command' must be a list of strings")
    recorded_with = doc.get("recorded_with")
    if not isinstance(recorded_with, str):
        raise TraceError("'recorded_with' must be a string")
    stats = doc.get("stats", {})
    if not isinstance(stats, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in stats.items()
    ):
        raise TraceError("'stats' must map names to integers")
    events = doc.get("events")
    if not isinstance(events, list):
        raise TraceError("'events' must be a list")
    parsed = [event_from_json(e, i) for i, e in enumerate(events)]
    check_trace(parsed, schema)
    return Trace(list(command), recorded_with, parsed, dict(stats), schema)


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read a trace file; TraceError if it is not a valid trace of a known schema."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{os.fspath(path)}: not JSON: {exc}") from None
    try:
        return trace_from_json(doc)
    except TraceError as exc:
        raise TraceError(f"{os.fspath(path)}: {exc}") from None


def save_trace(trace: Trace, path: str | os.PathLike[str]) -> None:
    """Write a trace file (atomically: a temporary file renamed over it)."""
    text = dump_trace(trace)
    target = os.fspath(path)
    tmp = f"{target}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, target)
