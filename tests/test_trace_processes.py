"""Traces of programs that fork: the process tree in the strace parser and
the trace format (schema 2), and its replay as guest processes
(docs/traces.md, "Processes")."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvemu.guest.kernel import Kernel, boot, kernel_for
from pvemu.guest.replay import DEFAULT_FORK_TOUCH, replay_trace, run_trace_workload
from pvemu.guest.replay_result import PROCESS_PHASES, REPLAY_PHASES, TraceResult
from pvemu.hypervisor import Hypervisor
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
    Mprotect,
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
from tests.loopback import loopback_domain

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


# --- replay: processes as guest processes ----------------------------------------------------

#: 2 MiB aligned, far from the exec'd stack the kernel puts at STACK_TOP.
BASE = 0x5000_0000_0000
#: A shell: it maps 64 pages, forks a child that execs and maps 4 pages of
#: its own, vforks one that execs, then mprotects its pages and exits.
SHELL = [
    Exec(1, "/bin/sh"),
    Mmap(1, BASE, 64 * PAGE, RW, ANON),
    Fork(1, 2),
    Exec(2, "/bin/ls"),
    Mmap(2, BASE, 4 * PAGE, RW, ANON),
    Exit(2),
    Vfork(1, 3),
    Exec(3, "/bin/cat"),
    Exit(3),
    Mprotect(1, BASE, 64 * PAGE, PROT_READ),
    Exit(1),
]
HYPERVISOR_MODES = ["trap", "ptwr", "xen", "batched", "naive"]


def shell_trace(events: list[Any] | None = None) -> Trace:
    return Trace(["sh"], "hand-written", list(SHELL if events is None else events))


async def kernel_in(mode: str, memory_mib: int = 18) -> Kernel:
    if mode == "native":
        async with boot(mode="native", memory_mib=memory_mib) as kernel:
            return kernel  # the native machine lives on after the context exits
    hv = Hypervisor(memory_mib + 8)
    domain = await loopback_domain(hv, memory_mib=memory_mib, vcpus=2)
    return kernel_for(domain, mode)


def fork_traps(mode: str) -> int:
    """The shell's fork (docs/architecture.md, "fork, exec and exit"): its
    tree has two PTE pages, the 64 written pages' and the exec'd stack's one
    argument page (N = W = 65, under one PMD and PUD page each: E_pin = 12,
    one pin batch)."""
    n = w = 65
    return {
        "native": 0,
        "trap": w + n + 1 + 1,
        "ptwr": w + 1 + 1,
        "xen": w + math.ceil(64 / 31) + math.ceil(1 / 31) + 1 + 1,
        "batched": 2,
        "naive": 2,
    }[mode]


def exec_traps(mode: str) -> int:
    """Three execs, each of a tree unpinned in one batch: the shell's (over
    the empty tree the replay spawned for it), the forked child's, and the
    vfork child's (over an empty tree spawned for it: one pin, 1 trap)."""
    one = {"native": 0, "trap": 4, "xen": 4, "ptwr": 3, "batched": 3, "naive": 3}[mode]
    return 3 * one + (0 if mode == "native" else 1)


@pytest.mark.parametrize("mode", ["native", *HYPERVISOR_MODES])
async def test_a_forking_shell_replays_as_processes(mode: str) -> None:
    kernel = await kernel_in(mode)
    frames = kernel.free_frame_count()
    result = await replay_trace(kernel, shell_trace())
    assert result.counts_agree
    assert result.audit_clean, result.audit
    assert result.replay_clean, result.error_samples
    # The shell's write-after-fork comes at its next event (the vfork), once
    # the child is gone: its 8 pages are reused; the child's 8 were copies.
    assert result.processes == {
        "forks": 1,
        "vforks": 1,
        "execs": 3,
        "exits": 3,
        # to the shell (its exec), the child (its writes), the shell (its
        # writes), the vfork child (its exec), the shell (its exit)
        "context_switches": 5,
        "cow_copies": 8,
        "cow_reuses": 8,
    }
    assert result.pages == 64 + 4
    assert result.replayed == shell_trace().counts()
    assert list(result.phases) == [*REPLAY_PHASES, *PROCESS_PHASES]
    traps = {name: phase.counts["traps"] for name, phase in result.phases.items()}
    switch = 0 if mode == "native" else 1
    assert traps["fork"] == fork_traps(mode)
    assert traps["context_switch"] == 5 * switch
    assert traps["exec"] == exec_traps(mode)
    assert traps["exit"] == 3 * 2 * switch  # each leaves its vCPU, then one unpin batch
    assert result.phases["cow"].counts["page_faults"] == 16
    # Every process has exited: every frame is back but the kernel's own L4.
    assert set(kernel.processes) == {1}
    assert kernel.free_frame_count() == frames - 1
    doc = result.as_dict()
    assert doc["trace"]["processes"] == result.processes
    assert doc["trace"]["policy"]["fork_touch"] == DEFAULT_FORK_TOUCH


async def test_cow_costs_the_same_in_every_hypervisor_mode() -> None:
    costs = set()
    for mode in HYPERVISOR_MODES:
        result = await replay_trace(await kernel_in(mode), shell_trace())
        costs.add(result.phases["cow"].counts["traps"])
    (cost,) = costs
    assert cost > 16  # each fault and more: a copy's flush and install, a reuse's


async def test_without_write_after_fork_nothing_is_copied() -> None:
    result = await replay_trace(await kernel_in("native"), shell_trace(), fork_touch=0)
    assert result.processes["cow_copies"] == result.processes["cow_reuses"] == 0
    assert result.processes["context_switches"] == 4  # the shell writes nothing at the vfork
    assert result.policy["fork_touch"] == 0


async def test_a_vfork_child_runs_in_its_parents_address_space() -> None:
    kernel = await kernel_in("native")
    trace = shell_trace(
        [
            Mmap(1, BASE, 2 * PAGE, RW, ANON),
            Vfork(1, 2),
            Mmap(2, BASE + (1 << 21), PAGE, RW, ANON),  # before its exec: the parent's
            Exec(2, "/bin/true"),
            Mmap(2, BASE, PAGE, PROT_READ, ANON),  # after: its own
        ]
    )
    result = await replay_trace(kernel, trace)
    assert result.replay_clean, result.error_samples
    shell, child = sorted(set(kernel.processes) - {1})
    assert [v[:2] for v in kernel.vmas(pid=shell)] == [
        (BASE, BASE + 2 * PAGE),
        (BASE + (1 << 21), BASE + (1 << 21) + PAGE),
    ]
    assert (BASE, BASE + PAGE, PROT_READ) in [v[:3] for v in kernel.vmas(pid=child)]
    assert result.processes["vforks"] == 1
    assert result.processes["cow_copies"] == 0
    assert result.pages == 2 + 1 + 1  # both left alive, both read back by verify()


async def test_an_address_space_goes_with_the_last_process_in_it() -> None:
    """clone(CLONE_VM) without CLONE_THREAD: the parent exits first; its tree
    stays for the child, and goes when the child execs."""
    kernel = await kernel_in("native")
    frames = kernel.free_frame_count()
    trace = shell_trace(
        [
            Mmap(1, BASE, 2 * PAGE, RW, ANON),
            Vfork(1, 2),
            Exit(1),
            Mprotect(2, BASE, 2 * PAGE, PROT_READ),
            Exec(2, "/bin/next"),
            Exit(2),
        ]
    )
    result = await replay_trace(kernel, trace)
    assert result.replay_clean, result.error_samples
    assert result.phases["mprotect"].wall_s > 0  # the shared tree was still there
    assert set(kernel.processes) == {1}
    assert kernel.free_frame_count() == frames - 1


async def test_a_trace_that_breaks_the_tree_is_refused() -> None:
    with pytest.raises(TraceError, match="process 2 was never forked"):
        await replay_trace(await kernel_in("native"), shell_trace([Exit(2)]))


async def test_schema_1_replays_exactly_as_before() -> None:
    """A shipped schema-1 trace replays in process 1, with the phases, counts
    and report it always had (its mprotect traps as docs/traces.md gives)."""
    path = TRACES / "python-json.json"
    kernel = await kernel_in("xen")
    result = await run_trace_workload(kernel, path)
    assert isinstance(result, TraceResult)
    assert result.phases["mprotect"].counts["traps"] == 12  # 6 calls, each one MULTI flush
    assert list(result.phases) == list(REPLAY_PHASES)
    assert result.replayed == load_trace(path).counts()
    assert "fork" not in result.replayed
    assert result.processes == {}
    doc = result.as_dict()["trace"]
    assert "processes" not in doc
    assert list(doc["policy"]) == ["touch_limit", "max_resident", "relocation"]
    assert set(kernel.processes) == {1}
    assert kernel.loaded(1) == 1  # nothing switched


# --- the shipped trace of a program that forks ------------------------------------------------

FORKING = TRACES / "sh-fork-vfork.json"


def test_the_shipped_forking_trace_is_a_process_tree() -> None:
    trace = load_trace(FORKING)
    assert trace.schema == 2
    assert trace.command[:2] == ["sh", "-c"]
    assert [(e.OP, e.pid) for e in trace.events if e.OP in ("fork", "vfork", "exec", "exit")] == [
        ("exec", 1),
        ("fork", 1),
        ("exec", 2),
        ("exit", 2),
        ("vfork", 1),
        ("exec", 3),
        ("exit", 3),
        ("exit", 1),
    ]
    assert len(trace.events) < 300


@pytest.mark.parametrize("mode", ["native", *HYPERVISOR_MODES])
async def test_the_shipped_forking_trace_replays_in_every_mode(mode: str) -> None:
    kernel = await kernel_in(mode)
    frames = kernel.free_frame_count()
    result = await run_trace_workload(kernel, FORKING)
    assert isinstance(result, TraceResult)
    assert result.counts_agree
    assert result.audit_clean, result.audit
    assert result.errors == 0, result.error_samples
    assert result.replayed == load_trace(FORKING).counts()
    assert result.processes == {
        "forks": 1,
        "vforks": 1,
        "execs": 3,
        "exits": 3,
        "context_switches": 5,
        "cow_copies": 8,  # the subshell's, before it execs cat
        "cow_reuses": 8,  # the shell's, at its vfork: the subshell is gone
    }
    assert result.phases["fork"].counts["traps"] > 0 or mode == "native"
    # Every process exited: every frame is back but the kernel's own L4 and
    # the page cache's (a shared file mapping, gconv-modules.cache).
    assert set(kernel.processes) == {1}
    cached = len(kernel._cache.pages)
    assert kernel.free_frame_count() == frames - 1 - cached


def test_the_shipped_forking_trace_over_a_real_hypervisor(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``pvemu trace replay`` starts a hypervisor process; each guest is a
    process of its own talking to it over the socket."""
    from pvemu.scripts import trace_cmd
    from tests.test_trace import _parser

    args = _parser().parse_args(["replay", str(FORKING), "--modes", "xen", "--json"])
    assert trace_cmd.run(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["valid"]
    (result,) = doc["results"]
    assert result["counts_agree"]
    assert result["audit_clean"]
    assert result["trace"]["replay_clean"]
    assert result["trace"]["processes"]["execs"] == 3
    assert list(result["phases"]) == [*REPLAY_PHASES, *PROCESS_PHASES]
    assert result["phases"]["context_switch"]["traps"] == 5


# --- the command line -------------------------------------------------------------------------


def test_the_replay_table_notes_each_modes_process_counts() -> None:
    from pvemu.scripts.trace_cmd import replay_tabular

    counts = {"forks": 1, "vforks": 1, "execs": 3, "exits": 3, "context_switches": 5}
    phase = {f: 1 for f in ("traps", "hypercalls", "multicall_entries", "records", "ptwr")}
    phase |= {"page_faults": 0, "flush_ops": 0, "wall_s": 0.001}
    result = {
        "mode": "xen",
        "phases": {"fork": phase},
        "counts_agree": True,
        "audit_clean": True,
        "trace": {"replay_clean": True, "processes": {**counts, "cow_copies": 8}},
    }
    tab = replay_tabular("t.json", [result, {**result, "mode": "trap", "trace": {}}])
    assert tab.notes == [
        "xen: 1 fork, 1 vfork, 3 exec, 3 exit, 5 context switch, 8 COW copy, 0 COW reuse"
    ]
    assert [row[:2] for row in tab.rows] == [["xen", "fork"], ["trap", "fork"]]


def test_show_counts_the_processes(capsys: pytest.CaptureFixture[str]) -> None:
    from pvemu.scripts import trace_cmd
    from tests.test_trace import _parser

    assert trace_cmd.run(_parser().parse_args(["show", str(FORKING)])) == 0
    out = capsys.readouterr().out
    assert "processes:     3 (1 fork, 1 vfork, 3 exec, 3 exit)" in out
    assert trace_cmd.run(_parser().parse_args(["show", "--json", str(FORKING)])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["schema"] == "pvemu-trace-show/1"  # the document's, not the trace's
    assert summary["trace_schema"] == 2
    assert summary["processes"] == 3


def test_pvemu_guest_names_a_broken_trace_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from pvemu.scripts import guest_cmd

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_doc(2, {"op": "exit", "pid": 4})))
    parser = argparse.ArgumentParser()
    guest_cmd.configure(parser)
    args = parser.parse_args(["--mode", "native", "--workload", f"trace:{bad}", "--json"])
    assert guest_cmd.run(args) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"pvemu guest: {bad}: event 0 (exit): process 4 was never forked"
