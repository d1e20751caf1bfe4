"""The one error path (scripts/error_path.py): the real CLI, run as a user
would, answers bad input with exactly one line on stderr and a documented
exit code, and SIGINT or SIGTERM stop every child and remove every temporary
file and folder (exit 130). Each test points TMPDIR at its own tmp_path and
then checks that nothing is left there and no process it started survives."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from pvemu.scripts import error_path
from pvemu.scripts.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, UserError
from pvemu.scripts.procs import (
    HypervisorStartError,
    child_error,
    descendants,
    hypervisor_process,
)

PVEMU = [sys.executable, "-m", "pvemu.scripts"]
REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "benchmarks" / "baseline.json"


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """TMPDIR in tmp_path (so leftovers show), no plain progress lines (so
    stderr holds only the error line) and no debug from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if k != error_path.DEBUG_ENV}
    env.update(TMPDIR=str(tmp_path), PVEMU_PROGRESS_INTERVAL="3600", COLUMNS="200", **extra)
    return env


def _session_leader(argv: list[str], tmp_path: Path) -> subprocess.Popen[str]:
    """pvemu with ``argv``, in tmp_path, leading a new session: a test can
    signal it alone or, as Ctrl-C does, its whole process group."""
    return subprocess.Popen(
        [*PVEMU, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_environment(tmp_path),
        start_new_session=True,
    )


def _interrupt(proc: subprocess.Popen[str], how: str) -> str:
    """SIGTERM to pvemu alone, as ``kill PID`` sends it, or SIGINT to its whole
    process group, as Ctrl-C does; waits for it to end; its stderr."""
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    return stderr


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """However the test ends, nothing of the session it started lives on."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _started_in(tmp_path: Path) -> list[int]:
    """Processes started under this test's TMPDIR (every pvemu child inherits
    it), by their environment or, for the non-dumpable hypervisor, whose
    environment only root can read, by their command line."""
    marker = os.fsencode(str(tmp_path))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        texts = []
        for name in ("environ", "cmdline"):
            try:
                texts.append(Path(f"/proc/{entry}/{name}").read_bytes())
            except OSError:
                continue
        if any(b"TMPDIR=" + marker in t or marker in t for t in texts):
            found.append(int(entry))
    return found


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot): a pid and its start
    time name one process, even if the pid is reused later. None when it is
    gone or a zombie (dead, waiting only for whoever reaps orphans)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return fields[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _assert_nothing_left(
    tmp_path: Path, seen: dict[int, str | None] | None = None, keep: tuple[str, ...] = ()
) -> None:
    """No process the test started is running (a dying child gets a few
    seconds), and tmp_path holds nothing but ``keep``."""
    deadline = time.monotonic() + 15
    while True:
        # A pid seen without a start time had already gone when it was seen.
        alive = [
            pid
            for pid, start in (seen or {}).items()
            if start is not None and _start_time(pid) == start
        ]
        alive += _started_in(tmp_path)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not alive, [_cmdline(pid) for pid in alive]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in keep)
    assert left == [], left


def _one_line(stderr: str) -> str:
    """The only line on stderr, which must not be part of a traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def pvemu(
    tmp_path: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PVEMU, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env=env or _environment(tmp_path),
    )


# --- bad input: one line, an exit code, nothing left ---------------------------------


@contextmanager
def _served(socket_path: Path, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """``pvemu hypervisor`` serving ``socket_path`` until the block ends
    (SIGTERM: it must then exit 0 and remove its socket file)."""
    cmd = [*PVEMU, "hypervisor", "--socket", str(socket_path), "--memory-mib", "64"]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(tmp_path),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("pvemu-hypervisor ready")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert stderr == ""
    assert not socket_path.exists()


def test_a_second_hypervisor_on_a_served_socket_is_one_line(tmp_path: Path) -> None:
    socket_path = tmp_path / "hv.sock"
    with _served(socket_path, tmp_path):
        done = pvemu(tmp_path, "hypervisor", "--socket", str(socket_path), "--memory-mib", "64")
        assert done.returncode == EXIT_USAGE
        line = _one_line(done.stderr)
        assert line.startswith("pvemu hypervisor: another server is already listening on ")
        assert socket_path.exists()  # the first one's socket is left alone
    _assert_nothing_left(tmp_path)


def test_a_hypervisor_socket_in_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    done = pvemu(tmp_path, "hypervisor", "--socket", str(tmp_path / "no" / "hv.sock"))
    assert done.returncode == EXIT_USAGE
    assert _one_line(done.stderr) == (
        f"pvemu hypervisor: --socket {tmp_path}/no/hv.sock: the folder {tmp_path}/no does not exist"
    )
    _assert_nothing_left(tmp_path)


def test_a_hypervisor_socket_path_too_long_for_af_unix_is_one_line(tmp_path: Path) -> None:
    socket_path = tmp_path / ("s" * 120)
    done = pvemu(tmp_path, "hypervisor", "--socket", str(socket_path))
    assert done.returncode == EXIT_USAGE
    line = _one_line(done.stderr)
    assert line.startswith(f"pvemu hypervisor: --socket {socket_path} is ")
    assert "at most 107" in line
    _assert_nothing_left(tmp_path)


def test_a_hypervisor_memory_larger_than_the_host_is_one_line(tmp_path: Path) -> None:
    socket_path = tmp_path / "hv.sock"
    done = pvemu(tmp_path, "hypervisor", "--socket", str(socket_path), "--memory-mib", "99999999")
    assert done.returncode == EXIT_USAGE
    assert _one_line(done.stderr).startswith("pvemu hypervisor: ")
    _assert_nothing_left(tmp_path)


def test_load_with_an_unknown_mode_is_one_line(tmp_path: Path) -> None:
    """Once dozens of worker tracebacks; now one line, before any worker starts."""
    done = pvemu(
        tmp_path, "load", "--mode", "bogus", "--guests", "1", "--pages", "16",
        "--records", "100", "--baseline", "0.2",
    )  # fmt: skip
    assert done.returncode == EXIT_USAGE
    line = _one_line(done.stderr)
    assert line.startswith("pvemu load: ")
    assert "bogus" in line
    _assert_nothing_left(tmp_path)


def test_trace_record_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    done = pvemu(tmp_path, "trace", "record", "-o", "/missing/dir/x.json", "--", "true")
    assert done.returncode == EXIT_USAGE
    line = _one_line(done.stderr)
    assert line.startswith("pvemu trace record: ")
    assert "/missing/dir" in line
    _assert_nothing_left(tmp_path)


def test_bench_plot_into_an_unwritable_folder_is_one_line(tmp_path: Path) -> None:
    done = pvemu(tmp_path, "bench", "plot", "--run", str(BASELINE), "--out", "/proc/x")
    assert done.returncode == EXIT_USAGE
    line = _one_line(done.stderr)
    assert line.startswith("pvemu bench plot: ")
    assert "/proc" in line
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--bogus"], "pvemu run: unrecognized arguments: --bogus (see 'pvemu run --help')"),
        (
            ["bench", "compare", "--bogus"],
            "pvemu bench compare: unrecognized arguments: --bogus "
            "(see 'pvemu bench compare --help')",
        ),
        (["race", "--pages", "-3"], "pvemu race: argument --pages: "),
        (["trace", "record"], "pvemu trace record: the following arguments are required: "),
        (["no-such-command"], "pvemu: argument COMMAND: invalid choice: 'no-such-command'"),
    ],
)
def test_a_usage_error_is_one_line_naming_the_subcommand(
    tmp_path: Path, argv: list[str], expected: str
) -> None:
    done = pvemu(tmp_path, *argv)
    assert done.returncode == EXIT_USAGE
    assert _one_line(done.stderr).startswith(expected)
    _assert_nothing_left(tmp_path)


def test_debug_shows_the_traceback_too(tmp_path: Path) -> None:
    argv = ["hypervisor", "--socket", str(tmp_path / "no" / "hv.sock")]
    for done in (
        pvemu(tmp_path, "--debug", *argv),
        pvemu(tmp_path, *argv, "--debug"),
        pvemu(tmp_path, *argv, env=_environment(tmp_path, PVEMU_DEBUG="1")),
    ):
        assert done.returncode == EXIT_USAGE
        assert done.stderr.startswith("Traceback (most recent call last):")
        assert "UserError" in done.stderr
        last = done.stderr.splitlines()[-1]
        assert last.startswith("pvemu hypervisor: --socket ")
    _assert_nothing_left(tmp_path)


# --- a child hypervisor that does not start --------------------------------------------


def test_a_child_hypervisor_that_refuses_its_arguments_is_reported_in_its_own_words(
    tmp_path: Path,
) -> None:
    with (
        pytest.raises(HypervisorStartError) as caught,
        hypervisor_process(tmp_path, 64, extra=["--max-batch", "0"]),
    ):
        pass
    assert caught.value.exit_code == EXIT_USAGE
    message = caught.value.message
    assert message.startswith("the hypervisor did not start: argument --max-batch: ")
    assert "\n" not in message
    assert "+---" not in message  # not the last line of an exception group's traceback


def test_a_child_hypervisor_on_a_served_socket_is_reported_in_its_own_words(
    tmp_path: Path,
) -> None:
    socket_path = tmp_path / "served.sock"
    with _served(socket_path, tmp_path):
        child = tmp_path / "child"
        child.mkdir()
        with (
            pytest.raises(HypervisorStartError) as caught,
            hypervisor_process(child, 64, socket_path=str(socket_path)),
        ):
            pass
        assert caught.value.message == (
            "the hypervisor did not start: another server is already listening on "
            f"{socket_path}: stop that hypervisor or choose another --socket"
        )
        assert caught.value.exit_code == EXIT_USAGE
        (child / "hypervisor.log").unlink()
        child.rmdir()
    _assert_nothing_left(tmp_path)


# --- how exit_status describes what was raised ---------------------------------------------


def _report(
    capsys: pytest.CaptureFixture[str], work: Callable[[], int], debug: bool = False
) -> tuple[int, str]:
    status = error_path.exit_status("pvemu x", work, debug=debug)
    captured = capsys.readouterr()
    assert captured.out == ""
    return status, captured.err


def _raise(exc: BaseException) -> Callable[[], int]:
    def work() -> int:
        raise exc

    return work


def test_an_internal_error_is_one_line_with_the_way_to_its_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(error_path.DEBUG_ENV, raising=False)
    status, err = _report(capsys, _raise(RuntimeError("boom\nsecond line")))
    assert status == EXIT_FAILURE
    assert err == (
        "pvemu x: internal error: RuntimeError: boom; second line "
        "(run with --debug or PVEMU_DEBUG=1 for the traceback)\n"
    )
    status, err = _report(capsys, _raise(RuntimeError("boom")), debug=True)
    assert status == EXIT_FAILURE
    assert err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("pvemu x: internal error: RuntimeError: boom")


def test_exception_groups_are_unwrapped_to_the_users_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(error_path.DEBUG_ENV, raising=False)
    nested = ExceptionGroup("tasks", [ExceptionGroup("inner", [UserError("too big", 2)])])
    assert _report(capsys, _raise(nested)) == (2, "pvemu x: too big\n")
    interrupted = BaseExceptionGroup("tasks", [OSError(9, "Bad fd"), KeyboardInterrupt()])
    assert _report(capsys, _raise(interrupted)) == (EXIT_INTERRUPTED, "pvemu x: interrupted\n")
    missing = FileNotFoundError(2, "No such file or directory", "/x/y")
    assert _report(capsys, _raise(missing)) == (
        EXIT_FAILURE,
        "pvemu x: /x/y: No such file or directory\n",
    )
    status, err = _report(capsys, _raise(MemoryError()))
    assert status == EXIT_USAGE
    assert err.startswith("pvemu x: out of memory")
    mixed = ExceptionGroup("tasks", [UserError("fine"), ValueError("a bug")])
    status, err = _report(capsys, _raise(mixed))
    assert status == EXIT_FAILURE
    assert err.startswith("pvemu x: internal error: UserError: fine")


# --- SIGINT and SIGTERM: every child stopped, every temporary file removed -------------


def _race_file_exists(tmp_path: Path, pids: list[int]) -> bool:
    return any(tmp_path.rglob("pvemu-race-*.bin"))


def _a_guest_runs(tmp_path: Path, pids: list[int]) -> bool:
    return any(" guest " in _cmdline(pid) for pid in pids)


def _load_workers_run(tmp_path: Path, pids: list[int]) -> bool:
    return sum("load_worker" in _cmdline(pid) for pid in pids) >= 4


#: (argv, when the work is under way): small sizes that still run for long
#: enough to be interrupted in the middle.
UNDER_WAY: dict[str, tuple[list[str], Callable[[Path, list[int]], bool]]] = {
    "run": (["run", "--pages", "20000", "--modes", "trap,batched"], _a_guest_runs),
    "race": (
        ["race", "--modes", "xen,naive", "--pages", "16", "--iterations", "100000"],
        _race_file_exists,
    ),
    "bench": (
        ["bench", "--modes", "trap", "--pages", "20000", "--repeat", "1", "--no-store"],
        _a_guest_runs,
    ),
    "load": (
        ["load", "--guests", "2", "--pages", "16", "--records", "1000", "--baseline", "60"],
        _load_workers_run,
    ),
}


@pytest.mark.parametrize("how", ["SIGTERM to pvemu", "SIGINT to the process group"])
@pytest.mark.parametrize("command", sorted(UNDER_WAY))
def test_a_signal_stops_every_child_and_removes_every_temporary_file(
    tmp_path: Path, command: str, how: str
) -> None:
    """SIGTERM as ``kill PID`` sends it, to pvemu alone (its children hear of
    it from pvemu); SIGINT as Ctrl-C sends it, to every process of the
    terminal's foreground group at once."""
    argv, under_way = UNDER_WAY[command]
    proc = _session_leader(argv, tmp_path)
    seen: dict[int, str | None] = {}
    try:
        deadline = time.monotonic() + 90
        while True:
            pids = descendants(proc.pid)
            seen.update((pid, _start_time(pid)) for pid in pids if pid not in seen)
            if under_way(tmp_path, pids):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, f"{command} never got under way"
            time.sleep(0.05)
        time.sleep(0.5)  # in the middle of the work, not at its first step
        stderr = _interrupt(proc, how)
    finally:
        _kill_group(proc)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    # bench says what it did not do: "interrupted: nothing was stored".
    assert _one_line(stderr).startswith(f"pvemu {command}: interrupted")
    _assert_nothing_left(tmp_path, seen)


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("how", ["SIGTERM to pvemu", "SIGINT to the process group"])
def test_a_signal_stops_trace_record_and_the_traced_program(tmp_path: Path, how: str) -> None:
    """The traced program is pvemu's child too: it must not outlive pvemu."""
    out = tmp_path / "out.json"
    proc = _session_leader(["trace", "record", "-o", str(out), "--", "sleep", "300"], tmp_path)
    seen: dict[int, str | None] = {}
    try:
        deadline = time.monotonic() + 60
        while not any(_cmdline(pid).startswith("sleep 300") for pid in seen):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the traced program never started"
            seen.update((pid, _start_time(pid)) for pid in descendants(proc.pid) if pid not in seen)
            time.sleep(0.05)
        stderr = _interrupt(proc, how)
    finally:
        _kill_group(proc)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert _one_line(stderr) == "pvemu trace record: interrupted"
    _assert_nothing_left(tmp_path, seen)


def test_a_childs_error_is_its_own_line() -> None:
    traceback_then_line = (
        "Traceback (most recent call last):\n  File 'x', line 1\nValueError: deep\n"
        "pvemu guest: disconnected: the hypervisor at /s is not running\n"
    )
    assert child_error(traceback_then_line, 1) == (
        "disconnected: the hypervisor at /s is not running"
    )
    assert child_error("some output\nits last line\n", 1) == "its last line"
    assert child_error("", -9) == "exit -9"


def test_a_load_workers_error_is_one_line_that_load_relays(tmp_path: Path) -> None:
    """A worker that cannot reach the hypervisor says so in one line (not a
    traceback on the terminal), and ``pvemu load`` quotes that line."""
    from pvemu.scripts.load_cmd import Worker

    missing = tmp_path / "none.sock"
    done = subprocess.run(
        [sys.executable, "-m", "pvemu.scripts.load_worker", "mprotect", "--socket", str(missing)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=_environment(tmp_path),
    )
    assert done.returncode == EXIT_FAILURE
    line = _one_line(done.stderr)
    assert line == (
        f"pvemu load mprotect: disconnected: the hypervisor at {missing} is not running "
        "(no such socket file)"
    )
    stderr_path = tmp_path / "load0.stderr"
    stderr_path.write_text(done.stderr)
    worker = Worker("load0", SimpleNamespace(returncode=done.returncode), stderr_path)
    assert worker.error() == line.removeprefix("pvemu load mprotect: ")
    stderr_path.unlink()
    _assert_nothing_left(tmp_path)


def test_load_workers_outlive_the_thread_that_started_them(tmp_path: Path) -> None:
    """trio starts processes from a worker thread that exits after 10 s idle;
    a child tied to it (PR_SET_PDEATHSIG) would be SIGTERMed mid-run. A run
    longer than that completes with every worker. (The batch lasts ~0.2 s,
    many probe intervals, so the run has latency samples during it and is ok;
    a 1,000-record batch was shorter than one interval and failed at random.)"""
    done = pvemu(
        tmp_path, "load", "--guests", "1", "--pages", "16", "--records", "100000",
        "--baseline", "11", "--interval-ms", "2", "--guest-priority", "normal", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    _assert_nothing_left(tmp_path)
