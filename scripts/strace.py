"""The strace parser: ``strace -f`` output to a :class:`~pvemu.shared.trace.Trace`.

``pvemu trace record`` runs a program under ``strace -f -qq -y -e
trace=%memory,clone,clone3,fork,vfork,execve`` and hands the text to
:func:`parse_strace`, which keeps the successful memory syscalls of the
traced program's own address space as trace events (``docs/traces.md``,
"Recording"). It is tool code: the guest kernel only ever sees the
normalised trace (:mod:`pvemu.shared.trace`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from pvemu.shared.trace import (
    ALL_MAP_NAMES,
    DISCARD_ADVICES,
    MAP_ANONYMOUS,
    MREMAP_FIXED,
    MREMAP_NAMES,
    PROT_NAMES,
    Brk,
    Event,
    Exec,
    Madvise,
    Mmap,
    Mprotect,
    Mremap,
    Munmap,
    Trace,
    TraceError,
    check_event,
    parse_symbols,
)
from pvemu.shared.x86 import PAGE_SIZE

__all__ = ["parse_strace"]

_PREFIX: Final = re.compile(
    r"^\s*(?:\[pid\s+(?P<pid1>\d+)\]\s*|(?P<pid2>\d+)\s+)?"
    r"(?:(?:\d+:\d+:\d+(?:\.\d+)?|\d+\.\d+)\s+)?(?P<body>.*?)\s*$"
)
_UNFINISHED: Final = re.compile(r"^(?P<text>(?P<name>\w+)\(.*?)\s*<unfinished \.\.\.>$")
_RESUMED: Final = re.compile(r"^<\.\.\. (?P<name>\w+) resumed>\s?(?P<rest>.*)$")
_CALL: Final = re.compile(
    r"^(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<ret>0x[0-9a-fA-F]+|-?\d+|\?)(?P<tail>.*)$"
)
_ERRNO: Final = re.compile(r"^\s+E[A-Z0-9]+\b")
_CLONE_VM: Final = re.compile(r"\bCLONE_VM\b")
_FD: Final = re.compile(r"^(?P<fd>-?\d+)(?:<(?P<path>.*)>)?$")
_MEMORY_CALLS: Final = frozenset(
    {"mmap", "mmap2", "mprotect", "pkey_mprotect", "munmap", "mremap", "brk", "madvise"}
)
_PROCESS_CALLS: Final = frozenset({"clone", "clone2", "clone3", "fork", "vfork", "execve"})


@dataclass
class _Call:
    pid: int
    name: str
    args: list[str]
    ret: int | None  # None: '?' (no result)
    failed: bool


def _split_args(text: str) -> list[str]:
    """Top-level ``, ``-separated arguments, respecting brackets, quotes and
    ``-y``'s ``3</path>`` decorations."""
    args: list[str] = []
    depth = 0
    angle = False
    quote = False
    start = 0
    i = 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == '"':
                quote = False
        elif angle:
            if c == ">":
                angle = False
        elif c == '"':
            quote = True
        elif c == "<" and i > 0 and text[i - 1].isdigit():
            angle = True
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif c == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
        i += 1
    tail = text[start:].strip()
    if tail or args:
        args.append(tail)
    return args


def _number(text: str) -> int:
    text = text.strip()
    if text == "NULL":
        return 0
    return int(text, 0)


def _ret_value(text: str) -> int | None:
    if text == "?":
        return None
    return int(text, 16) if text.startswith("0x") else int(text)


def _calls(text: str, stats: Counter[str]) -> Iterator[_Call]:
    """Complete calls in completion order, unfinished/resumed pairs joined."""
    pending: dict[int, tuple[str, str]] = {}
    for raw in text.splitlines():
        if not raw.strip():
            continue
        stats["lines"] += 1
        m = _PREFIX.match(raw)
        assert m is not None  # the pattern matches any line
        pid = int(m.group("pid1") or m.group("pid2") or 0)
        body = m.group("body")
        if body.startswith(("---", "+++")):
            stats["signal_or_exit_lines"] += 1
            continue
        unfinished = _UNFINISHED.match(body)
        if unfinished is not None:
            stats["unfinished"] += 1
            pending[pid] = (unfinished.group("name"), unfinished.group("text"))
            continue
        resumed = _RESUMED.match(body)
        if resumed is not None:
            before = pending.pop(pid, None)
            if before is None or before[0] != resumed.group("name"):
                stats["orphan_resumed"] += 1
                continue
            body = before[1] + resumed.group("rest")
        call = _CALL.match(body)
        if call is None:
            stats["unknown_lines"] += 1
            continue
        ret = _ret_value(call.group("ret"))
        failed = _ERRNO.match(call.group("tail")) is not None or (ret is not None and ret < 0)
        yield _Call(pid, call.group("name"), _split_args(call.group("args")), ret, failed)
    stats["never_resumed"] += len(pending)


def _parse_mmap(c: _Call, ret: int, stats: Counter[str]) -> Mmap:
    if len(c.args) != 6:
        raise ValueError("mmap takes 6 arguments")
    unknown: list[str] = []
    prot = parse_symbols(c.args[2], PROT_NAMES, unknown=unknown)
    flags = parse_symbols(c.args[3], ALL_MAP_NAMES, unknown=unknown)
    stats["unknown_flag_names"] += len(unknown)
    fd_match = _FD.match(c.args[4])
    if fd_match is None:
        raise ValueError(f"bad fd {c.args[4]!r}")
    fd = int(fd_match.group("fd"))
    hint = _number(c.args[0]) or None
    if flags & MAP_ANONYMOUS or fd < 0:
        flags |= MAP_ANONYMOUS
        return Mmap(c.pid, ret, _number(c.args[1]), prot, flags, hint)
    offset = _number(c.args[5])
    if c.name == "mmap2":
        offset *= PAGE_SIZE
    return Mmap(
        c.pid, ret, _number(c.args[1]), prot, flags, hint, fd, fd_match.group("path"), offset
    )


def _parse_memory(c: _Call, stats: Counter[str]) -> Event | None:
    ret = c.ret
    assert ret is not None
    name = c.name
    if name in ("mmap", "mmap2"):
        return _parse_mmap(c, ret, stats)
    if name in ("mprotect", "pkey_mprotect"):
        unknown: list[str] = []
        prot = parse_symbols(c.args[2], PROT_NAMES, unknown=unknown)
        stats["unknown_flag_names"] += len(unknown)
        return Mprotect(c.pid, _number(c.args[0]), _number(c.args[1]), prot)
    if name == "munmap":
        return Munmap(c.pid, _number(c.args[0]), _number(c.args[1]))
    if name == "mremap":
        flags = 0 if c.args[3] == "0" else parse_symbols(c.args[3], MREMAP_NAMES)
        target = _number(c.args[4]) if len(c.args) > 4 and flags & MREMAP_FIXED else None
        return Mremap(
            c.pid, _number(c.args[0]), _number(c.args[1]), _number(c.args[2]), flags, ret, target
        )
    if name == "brk":
        return Brk(c.pid, ret, _number(c.args[0]) or None)
    if name == "madvise":
        advice = c.args[2].strip()
        if advice not in DISCARD_ADVICES:
            stats["ignored_madvise"] += 1
            return None
        return Madvise(c.pid, _number(c.args[0]), _number(c.args[1]), advice)
    raise AssertionError(name)


def _clone_parents(calls: list[_Call]) -> dict[int, tuple[int, bool]]:
    """Each child pid -> (its parent, whether it shares the parent's address
    space: CLONE_VM or vfork). Read before any event is kept, since a
    child's first lines may come before its parent's clone returns."""
    parent: dict[int, tuple[int, bool]] = {}
    for c in calls:
        if c.name in ("clone", "clone2", "clone3", "fork", "vfork") and not c.failed:
            if c.ret is None or c.ret <= 0:
                continue
            shared_vm = c.name == "vfork" or _CLONE_VM.search(",".join(c.args)) is not None
            parent[c.ret] = (c.pid, shared_vm)
    return parent


@dataclass
class _MainAddressSpace:
    """Which pids run in the first process's (``root``'s) address space:
    threads of it, transitively, until they exec (``left``)."""

    root: int
    parent: dict[int, tuple[int, bool]]
    left: set[int] = field(default_factory=set)

    def has(self, pid: int) -> bool:
        seen: set[int] = set()
        while pid != self.root:
            if pid in self.left or pid in seen:
                return False
            seen.add(pid)
            link = self.parent.get(pid)
            if link is None:
                return True  # no process lines: assume a thread
            if not link[1]:
                return False
            pid = link[0]
        return self.root not in self.left


def _memory_event(c: _Call, stats: Counter[str]) -> Event | None:
    """The event of a successful memory call; None if it is not one a trace
    keeps (a non-discard madvise) or malformed (counted in ``stats``)."""
    try:
        event = _parse_memory(c, stats)
    except (ValueError, IndexError):
        stats["malformed_calls"] += 1
        return None
    if event is None:
        return None
    try:
        check_event(event, c.name)
    except TraceError:
        stats["malformed_calls"] += 1
        return None
    return event


def parse_strace(text: str, *, command: Sequence[str] = (), recorded_with: str = "strace") -> Trace:
    """Parse ``strace -f -e trace=memory`` output (any of ``-o``'s pid
    column, ``[pid N]`` prefixes, ``-t``/``-tt``/``-ttt`` timestamps, ``-T``
    times, ``-y`` paths) into a trace of the traced program's address space.

    Failed calls are skipped; unknown lines, unknown syscalls and non-discard
    madvises are counted in ``Trace.stats`` and skipped. If the text also
    traces clone/clone3/fork/vfork/execve, only the first process's address
    space is kept (threads created with CLONE_VM share it; processes that
    fork or exec elsewhere are counted in ``other_address_space``) and a
    successful execve of the first process becomes an :class:`Exec` event.
    Without those lines every pid is taken to be a thread of one process.
    """
    stats: Counter[str] = Counter()
    calls = list(_calls(text, stats))
    root = calls[0].pid if calls else 0
    main = _MainAddressSpace(root, _clone_parents(calls))
    events: list[Event] = []
    for c in calls:
        if c.name not in _MEMORY_CALLS and c.name not in _PROCESS_CALLS:
            stats[f"ignored_{c.name}"] += 1
            continue
        if c.failed or c.ret is None:
            stats["failed" if c.failed else "no_result"] += 1
            continue
        if c.name in _PROCESS_CALLS:
            if c.name == "execve" and main.has(c.pid):
                if c.pid == root:
                    path = c.args[0].strip('"') if c.args else ""
                    events.append(Exec(c.pid, path))
                else:
                    main.left.add(c.pid)  # a vfork child or thread leaving for a new program
            continue
        if not main.has(c.pid):
            stats["other_address_space"] += 1
            continue
        event = _memory_event(c, stats)
        if event is not None:
            events.append(event)
    stats["events"] = len(events)
    return Trace(list(command), recorded_with, events, {k: v for k, v in stats.items() if v})
