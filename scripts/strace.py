"""The strace parser: ``strace -f`` output to a :class:`~pvemu.shared.trace.Trace`.

``pvemu trace record`` runs a program under ``strace -f -qq -y -e
trace=%memory,clone,clone3,fork,vfork,execve,exit_group`` and hands the
text to :func:`parse_strace`, which keeps the successful memory syscalls of
the traced program and of every process it starts, with the process tree
(fork, vfork, execve, exit_group), as trace events (``docs/traces.md``,
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
    KEPT_ADVICES,
    MAP_ANONYMOUS,
    MREMAP_FIXED,
    MREMAP_NAMES,
    PROT_NAMES,
    ROOT_PID,
    Brk,
    Event,
    Exec,
    Exit,
    Fork,
    Madvise,
    Mlock,
    Mmap,
    Mprotect,
    Mremap,
    Munlock,
    Munmap,
    Trace,
    TraceError,
    Vfork,
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
_CLONE_THREAD: Final = re.compile(r"\bCLONE_THREAD\b")
_FD: Final = re.compile(r"^(?P<fd>-?\d+)(?:<(?P<path>.*)>)?$")
_MEMORY_CALLS: Final = frozenset(
    {
        "mmap",
        "mmap2",
        "mprotect",
        "pkey_mprotect",
        "munmap",
        "mremap",
        "brk",
        "madvise",
        "mlock",
        "mlock2",
        "munlock",
    }
)
_CLONE_CALLS: Final = frozenset({"clone", "clone2", "clone3", "fork", "vfork"})
_PROCESS_CALLS: Final = _CLONE_CALLS | {"execve", "exit_group"}


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


def _first_task(text: str) -> int:
    """The task of the first line: the traced program (its first completed
    call may come after a child's)."""
    for raw in text.splitlines():
        if raw.strip():
            m = _PREFIX.match(raw)
            assert m is not None
            return int(m.group("pid1") or m.group("pid2") or 0)
    return 0


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
            if unfinished.group("name") == "exit_group":
                # It never returns: the process ends from here on.
                yield _Call(pid, "exit_group", [], None, False)
                continue
            pending[pid] = (unfinished.group("name"), unfinished.group("text"))
            continue
        resumed = _RESUMED.match(body)
        if resumed is not None:
            if resumed.group("name") == "exit_group":
                continue  # already taken at its start
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


def _parse_mmap(c: _Call, pid: int, ret: int, stats: Counter[str]) -> Mmap:
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
        return Mmap(pid, ret, _number(c.args[1]), prot, flags, hint)
    offset = _number(c.args[5])
    if c.name == "mmap2":
        offset *= PAGE_SIZE
    return Mmap(pid, ret, _number(c.args[1]), prot, flags, hint, fd, fd_match.group("path"), offset)


def _parse_memory(c: _Call, pid: int, stats: Counter[str]) -> Event | None:
    ret = c.ret
    assert ret is not None
    name = c.name
    if name in ("mmap", "mmap2"):
        return _parse_mmap(c, pid, ret, stats)
    if name in ("mprotect", "pkey_mprotect"):
        unknown: list[str] = []
        prot = parse_symbols(c.args[2], PROT_NAMES, unknown=unknown)
        stats["unknown_flag_names"] += len(unknown)
        return Mprotect(pid, _number(c.args[0]), _number(c.args[1]), prot)
    if name == "munmap":
        return Munmap(pid, _number(c.args[0]), _number(c.args[1]))
    if name == "mremap":
        flags = 0 if c.args[3] == "0" else parse_symbols(c.args[3], MREMAP_NAMES)
        target = _number(c.args[4]) if len(c.args) > 4 and flags & MREMAP_FIXED else None
        return Mremap(
            pid, _number(c.args[0]), _number(c.args[1]), _number(c.args[2]), flags, ret, target
        )
    if name == "brk":
        return Brk(pid, ret, _number(c.args[0]) or None)
    if name == "madvise":
        advice = c.args[2].strip()
        if advice not in KEPT_ADVICES:
            stats["ignored_madvise"] += 1
            return None
        return Madvise(pid, _number(c.args[0]), _number(c.args[1]), advice)
    if name == "mlock2" and c.args[2].strip() != "0":
        # MLOCK_ONFAULT: locks without populating, which the guest kernel has not.
        stats["ignored_mlock2_onfault"] += 1
        return None
    if name in ("mlock", "mlock2"):
        return Mlock(pid, _number(c.args[0]), _number(c.args[1]))
    if name == "munlock":
        return Munlock(pid, _number(c.args[0]), _number(c.args[1]))
    raise AssertionError(name)


#: How a clone made its child: a new process with a copy of the address
#: space, a new process in the same one (vfork), or a thread.
_FORK, _VFORK, _THREAD = "fork", "vfork", "thread"


def _clone_kind(c: _Call) -> str:
    if c.name == "fork":
        return _FORK
    if c.name == "vfork":
        return _VFORK
    flags = ",".join(c.args)
    if _CLONE_THREAD.search(flags) is not None:
        return _THREAD
    return _VFORK if _CLONE_VM.search(flags) is not None else _FORK


def _clones(calls: list[_Call]) -> dict[int, tuple[int, str]]:
    """Each child task -> (the task that cloned it, how). Read before any
    event is kept, since a child's first lines may come before its parent's
    clone returns."""
    made: dict[int, tuple[int, str]] = {}
    for c in calls:
        if c.name in _CLONE_CALLS and not c.failed and c.ret is not None and c.ret > 0:
            made[c.ret] = (c.pid, _clone_kind(c))
    return made


@dataclass
class _Tree:
    """The process tree as the events see it: each task's process, numbered
    in order of appearance (the first task's is 1). A process appears with
    its first event or its parent's clone, whichever completes first, and
    its fork or vfork event is emitted then, so it precedes the child's own
    events."""

    root: int
    clones: dict[int, tuple[int, str]]
    events: list[Event]
    stats: Counter[str]
    process: dict[int, int] = field(default_factory=dict)
    exited: set[int] = field(default_factory=set)
    next_pid: int = ROOT_PID + 1

    def of(self, task: int) -> int:
        """The process of ``task``, made (and its creation emitted) on first sight."""
        chain: list[int] = []
        while task not in self.process:
            link = self.clones.get(task)
            if task == self.root or link is None or link[0] in chain or link[0] == task:
                # the root, or a task no clone line made: a thread of the program
                self.process[task] = ROOT_PID
                break
            chain.append(task)
            task = link[0]
        for child in reversed(chain):
            parent_task, kind = self.clones[child]
            parent = self.process[parent_task]
            if kind == _THREAD or parent in self.exited:
                # A thread is its process's; a task whose parent has exited
                # (odd input) too: its calls are dropped as after_exit.
                self.process[child] = parent
                self.stats["threads" if kind == _THREAD else "after_exit"] += 1
                continue
            pid = self.next_pid
            self.next_pid += 1
            self.process[child] = pid
            self.events.append(Fork(parent, pid) if kind == _FORK else Vfork(parent, pid))
        return self.process[chain[0] if chain else task]


def _memory_event(c: _Call, pid: int, stats: Counter[str]) -> Event | None:
    """The event of process ``pid``'s successful memory call; None if it is
    not one a trace keeps (a madvise that neither discards nor populates,
    an mlock2 with MLOCK_ONFAULT) or malformed (counted in
    ``stats``)."""
    try:
        event = _parse_memory(c, pid, stats)
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
    """Parse ``strace -f`` output (any of ``-o``'s pid column, ``[pid N]``
    prefixes, ``-t``/``-tt``/``-ttt`` timestamps, ``-T`` times, ``-y`` paths)
    into a schema-2 trace of the traced program and every process it started.

    Successful memory calls become events of their process; fork/clone/
    clone3/vfork make processes (a clone with CLONE_THREAD a thread of the
    same one), a successful execve gives a process a new address space and
    exit_group ends it. Processes are numbered in order of appearance, the
    first task's being 1; a task no clone line made (a recording without
    process calls) is a thread of process 1. Failed calls are skipped;
    unknown lines, unknown syscalls, madvises that neither discard nor
    populate and mlock2(MLOCK_ONFAULT) are counted in ``Trace.stats`` and
    skipped.
    """
    stats: Counter[str] = Counter()
    calls = list(_calls(text, stats))
    events: list[Event] = []
    tree = _Tree(_first_task(text), _clones(calls), events, stats)
    for c in calls:
        if c.name == "exit_group":  # it never returns: its result is always '?'
            pid = tree.of(c.pid)
            if pid not in tree.exited:
                tree.exited.add(pid)
                events.append(Exit(pid))
            continue
        if c.name not in _MEMORY_CALLS and c.name not in _PROCESS_CALLS:
            stats[f"ignored_{c.name}"] += 1
            continue
        if c.failed or c.ret is None:
            stats["failed" if c.failed else "no_result"] += 1
            continue
        if c.name in _CLONE_CALLS:
            if c.ret > 0:
                tree.of(c.pid)
                tree.of(c.ret)  # the creation event, unless the child was seen first
            continue
        pid = tree.of(c.pid)
        if pid in tree.exited:  # a thread's call completing after exit_group
            stats["after_exit"] += 1
            continue
        if c.name == "execve":
            events.append(Exec(pid, c.args[0].strip('"') if c.args else ""))
            continue
        event = _memory_event(c, pid, stats)
        if event is not None:
            events.append(event)
    stats["processes"] = tree.next_pid - 1
    stats["events"] = len(events)
    return Trace(list(command), recorded_with, events, {k: v for k, v in stats.items() if v})
