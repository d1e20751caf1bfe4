"""Traces of programs that fork: the process tree in the strace parser and
the trace format (schema 2), and its replay as guest processes
(docs/traces.md, "Processes")."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvemu.scripts.strace import parse_strace
from pvemu.shared.trace import (
    MAP_ANONYMOUS,
    MAP_PRIVATE,
    PROT_READ,
    PROT_WRITE,
    Brk,
    Exec,
    Exit,
    Fork,
    Mmap,
    Munmap,
    Trace,
    TraceError,
    Vfork,
    check_trace,
    dump_trace,
    load_trace,
    save_trace,
    trace_from_json,
)

TRACES = Path(__file__).resolve().parent.parent / "benchmarks" / "traces"
PAGE = 4096
RW = PROT_READ | PROT_WRITE
ANON = MAP_PRIVATE | MAP_ANONYMOUS


def anon(pid: int, addr: int) -> Mmap:
    return Mmap(pid, addr, PAGE, PROT_READ, ANON)


# --- the strace parser ------------------------------------------------------------------

TREE = """\
10 execve("/bin/sh", ["sh"], 0x7ffe /* 3 vars */) = 0
10 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000010000
11 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000020000
10 clone3({flags=CLONE_VM|CLONE_FS|CLONE_FILES|CLONE_SIGHAND|CLONE_THREAD|CLONE_SYSVSEM, \
exit_signal=0, stack=0x7f00, stack_size=0x7ffe80} => {parent_tid=[11]}, 88) = 11
10 clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, \
child_tidptr=0x7f0000000a10) = 12
12 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000030000
12 execve("/bin/ls", ["ls"], 0x7ffe /* 3 vars */) = 0
12 exit_group(0)                     = ?
10 --- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=12, si_uid=0, si_status=0} ---
10 vfork() = 13
13 execve("/bin/true", ["true"], 0x7ffe /* 3 vars */) = 0
13 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000040000
13 exit_group(0)                     = ?
10 clone3({flags=CLONE_VM|CLONE_VFORK|CLONE_CLEAR_SIGHAND, exit_signal=SIGCHLD, \
stack=0x7f0000100000, stack_size=0x9000}, 88) = 14
14 execve("/no/such", ["such"], 0x7ffe /* 3 vars */) = -1 ENOENT (No such file or directory)
14 exit_group(127)                   = ?
11 execve("/bin/prog", ["prog"], 0x7ffe /* 3 vars */) = 0
11 munmap(0x7f0000010000, 4096) = 0
11 exit_group(0)                     = ?
10 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0 <unfinished ...>
"""


def test_the_process_tree_of_fork_clone_vfork_and_threads() -> None:
    trace = parse_strace(TREE)
    assert trace.schema == 2
    assert trace.events == [
        Exec(1, "/bin/sh"),
        anon(1, 0x7F0000010000),
        anon(1, 0x7F0000020000),  # a thread's call, before its clone3 returned
        Fork(1, 2),  # clone without CLONE_VM
        anon(2, 0x7F0000030000),
        Exec(2, "/bin/ls"),
        Exit(2),
        Vfork(1, 3),  # vfork()
        Exec(3, "/bin/true"),
        anon(3, 0x7F0000040000),
        Exit(3),
        Vfork(1, 4),  # posix_spawn: CLONE_VM|CLONE_VFORK without CLONE_THREAD
        Exit(4),  # its execve failed: it exits in its parent's address space
        Exec(1, "/bin/prog"),  # a thread's execve is its process's
        Munmap(1, 0x7F0000010000, PAGE),
        Exit(1),
    ]
    assert trace.stats["threads"] == 1
    assert trace.stats["processes"] == 4
    assert trace.stats["failed"] == 1
    assert trace.stats["never_resumed"] == 1
    check_trace(trace.events, trace.schema)


def test_unfinished_and_resumed_lines_interleaved_across_processes() -> None:
    """A child's first call may complete before its parent's clone returns:
    the fork is placed before it. exit_group ends its process where it starts."""
    text = """\
[pid   200] clone(child_stack=NULL, flags=CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD \
<unfinished ...>
[pid   201] mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0 \
<unfinished ...>
[pid   201] <... mmap resumed>)        = 0x7f0000050000
[pid   200] <... clone resumed>, child_tidptr=0x7f0000000a10) = 201
[pid   200] vfork( <unfinished ...>
[pid   202] execve("/usr/bin/cat", ["cat"], 0x55 /* 35 vars */ <unfinished ...>
[pid   201] brk(NULL <unfinished ...>
[pid   200] <... vfork resumed>)       = 202
[pid   202] <... execve resumed>)      = 0
[pid   201] <... brk resumed>)         = 0x55d000000000
[pid   202] exit_group(0 <unfinished ...>
[pid   201] munmap(0x7f0000050000, 8192) = 0
[pid   202] <... exit_group resumed>)  = ?
[pid   201] exit_group(0)              = ?
[pid   200] exit_group(0)              = ?
"""
    trace = parse_strace(text)
    assert trace.events == [
        Fork(1, 2),
        Mmap(2, 0x7F0000050000, 8192, RW, ANON),
        Vfork(1, 3),
        Exec(3, "/usr/bin/cat"),
        Brk(2, 0x55D000000000),
        Exit(3),
        Munmap(2, 0x7F0000050000, 8192),
        Exit(2),
        Exit(1),
    ]
    assert "orphan_resumed" not in trace.stats
    check_trace(trace.events, trace.schema)


def test_a_call_completing_after_its_process_exited_is_dropped() -> None:
    text = """\
10 mmap(NULL, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0 <unfinished ...>
11 exit_group(0)                     = ?
10 <... mmap resumed>)               = 0x7f0000010000
"""
    trace = parse_strace(text)  # 11: no clone line, so a thread of process 1
    assert trace.events == [Exit(1)]
    assert trace.stats["after_exit"] == 1


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_record_a_real_program_that_forks_and_spawns(tmp_path: Path) -> None:
    from pvemu.scripts import trace_cmd
    from tests.test_trace import _parser

    out = tmp_path / "fork.json"
    code = (
        "import os, subprocess; subprocess.run(['true']); pid = os.fork(); "
        "os._exit(0) if pid == 0 else os.waitpid(pid, 0)"
    )
    args = _parser().parse_args(["record", "-o", str(out), "--", sys.executable, "-c", code])
    assert trace_cmd.run(args) == 0
    trace = load_trace(out)
    assert trace.schema == 2
    assert "exit_group" in trace.recorded_with
    made = [e for e in trace.events if isinstance(e, Fork | Vfork)]
    assert len(made) == 2  # subprocess (fork or vfork, as the runtime chose), os.fork
    assert isinstance(made[-1], Fork)
    assert any(isinstance(e, Exec) and e.pid == made[0].child for e in trace.events)
    assert [e.pid for e in trace.events if isinstance(e, Exit)] == [2, 3, 1]


_TASKS = st.sampled_from([10, 11, 12, 13])
_LINE = st.one_of(
    st.tuples(_TASKS, st.sampled_from(["fork()", "vfork()"]), _TASKS),
    st.tuples(
        _TASKS,
        st.sampled_from(
            [
                "clone(child_stack=NULL, flags=CLONE_CHILD_SETTID|SIGCHLD)",
                "clone3({flags=CLONE_VM|CLONE_VFORK, exit_signal=SIGCHLD}, 88)",
                "clone3({flags=CLONE_VM|CLONE_THREAD|CLONE_SIGHAND}, 88)",
            ]
        ),
        _TASKS,
    ),
    st.tuples(_TASKS, st.just('execve("/bin/x", ["x"], 0x7ffe /* 1 var */)'), st.just(0)),
    st.tuples(_TASKS, st.just("exit_group(0)"), st.just(-1)),
    st.tuples(
        _TASKS, st.just("mmap(NULL, 4096, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)"), st.just(1)
    ),
    st.tuples(_TASKS, st.just("munmap(0x7f0000010000, 4096)"), st.just(0)),
)


def _strace_line(task: int, call: str, ret: int, split: bool) -> list[str]:
    value = "?" if ret == -1 else "0x7f0000010000" if ret == 1 else str(ret)
    if not split:
        return [f"{task} {call} = {value}"]
    name = call[: call.index("(")]
    return [f"{task} {call[:-1]} <unfinished ...>", f"{task} <... {name} resumed>) = {value}"]


@given(st.lists(st.tuples(_LINE, st.booleans()), max_size=30))
def test_any_strace_text_parses_to_a_valid_tree(lines: list[Any]) -> None:
    """Whatever order clones, execs, exits and calls come in (garbage too:
    a task cloned twice, a call after its process exited), the parser
    keeps a trace that loads."""
    text = "\n".join(
        row for (task, call, ret), split in lines for row in _strace_line(task, call, ret, split)
    )
    trace = parse_strace(text)
    check_trace(trace.events, trace.schema)
    assert trace_from_json(json.loads(dump_trace(trace))) == trace


# --- the format ---------------------------------------------------------------------------

TREE_EVENTS: list[Any] = [
    Exec(1, "/bin/sh"),
    Mmap(1, 0x7F0000010000, 2 * PAGE, RW, ANON),
    Fork(1, 2),
    Exec(2, "/bin/ls"),
    Vfork(1, 3),
    Exit(2),
    Exit(3),
    Exit(1),
]


def test_schema_2_round_trip(tmp_path: Path) -> None:
    trace = Trace(["sh"], "strace 6.1", list(TREE_EVENTS), {"threads": 2})
    path = tmp_path / "t.json"
    save_trace(trace, path)
    assert load_trace(path) == trace
    doc = json.loads(path.read_text())
    assert doc["schema"] == 2
    assert doc["events"][2] == {"op": "fork", "pid": 1, "child": 2}
    assert doc["events"][4] == {"op": "vfork", "pid": 1, "child": 3}
    assert doc["events"][5] == {"op": "exit", "pid": 2}
    summary = trace.summary()
    assert summary["processes"] == 3
    assert summary["threads"] == 5  # one per process, plus the two the parser counted
    assert summary["by_op"]["fork"] == 1


@pytest.mark.parametrize("name", ["python-json", "node-alloc", "java-version"])
def test_schema_1_traces_still_load_as_schema_1(name: str) -> None:
    path = TRACES / f"{name}.json"
    trace = load_trace(path)
    assert trace.schema == 1
    assert not trace.has_processes
    assert "fork" not in trace.counts()
    assert dump_trace(trace) == path.read_text()  # still written as it was read


def _doc(schema: int, *events: dict[str, Any]) -> dict[str, Any]:
    return {"schema": schema, "command": [], "recorded_with": "", "events": list(events)}


MMAP_JSON = {
    "addr": "0x10000",
    "length": 4096,
    "prot": "PROT_READ",
    "flags": "MAP_PRIVATE|MAP_ANONYMOUS",
}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_doc(1, {"op": "fork", "pid": 1, "child": 2}), "event 0: op 'fork' needs schema 2"),
        (_doc(1, {"op": "exit", "pid": 1}), "needs schema 2"),
        (_doc(2, {"op": "fork", "pid": 1}), r"event 0 \(fork\): missing 'child'"),
        (_doc(2, {"op": "fork", "pid": 1, "child": -2}), "negative"),
        (_doc(2, {"op": "vfork", "pid": 1, "child": 1}), "its own child"),
        (
            _doc(2, {"op": "fork", "pid": 1, "child": 3}),
            r"event 0 \(fork\): child 3 is not the next process number \(2\)",
        ),
        (
            _doc(2, {"op": "mmap", "pid": 2, **MMAP_JSON}),
            r"event 0 \(mmap\): process 2 was never forked",
        ),
        (
            _doc(2, {"op": "exit", "pid": 1}, {"op": "exec", "pid": 1, "path": "/x"}),
            r"event 1 \(exec\): process 1 exited at event 0",
        ),
        (_doc(2, {"op": "exit", "pid": 0}), "process 0 was never forked"),
        (_doc(2, {"op": "exit", "pid": 1, "status": 0}), "unknown fields"),
    ],
)
def test_process_tree_violations_are_named(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(TraceError, match=message):
        trace_from_json(doc)


def test_load_names_the_file_in_its_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_doc(2, {"op": "exit", "pid": 4})))
    with pytest.raises(TraceError, match=r"bad\.json: event 0 \(exit\): process 4"):
        load_trace(path)
