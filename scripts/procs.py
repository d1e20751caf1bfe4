"""Starting ``pvemu hypervisor`` as a child process, for every command that
runs guests in their own processes (run, race, bench, trace replay)."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pvemu.scripts.errors import EXIT_FAILURE, EXIT_USAGE, UserError

#: The longest path a Unix socket can be bound to (sun_path less its NUL).
MAX_SOCKET_PATH: Final = 107
#: Seconds a child has to clean up after SIGTERM before it is SIGKILLed.
STOP_GRACE_S: Final = 10.0


class HypervisorStartError(UserError):
    """The child hypervisor exited or stayed silent instead of getting ready.
    Its message is the child's own one-line error."""


@dataclass
class HypervisorProcess:
    """A running ``pvemu hypervisor`` child: its process, socket and log."""

    proc: subprocess.Popen[str]
    socket_path: str
    log_path: Path

    def log_tail(self) -> str:
        """The hypervisor's own error line (``pvemu hypervisor: ...``, without
        that prefix) if it printed one, else the last line it logged."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        prefix = "pvemu hypervisor: "
        errors = [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]
        if errors:
            return errors[-1]
        return lines[-1].strip() if lines else ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the parent dies, so a
    SIGKILLed ``pvemu bench``/``run`` never leaves a child behind.

    Linux sends it when the *thread* that started the child exits: start the
    child from the main thread (``trio.lowlevel.open_process`` uses a worker
    thread, which exits when idle, and must not be given this)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def stop_process(proc: subprocess.Popen[Any], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: the child gets to run
    its own cleanup (a guest removes its temporary files) but cannot hang us."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    queue = [pid]
    while queue:
        kids = children.get(queue.pop(0), [])
        found += kids
        queue += kids
    return found


def stop_tree(proc: subprocess.Popen[Any], grace: float = STOP_GRACE_S) -> None:
    """Stop a child that runs programs of its own (strace and the traced
    command): SIGTERM its descendants, give the child ``grace`` seconds to
    exit once they have, then :func:`stop_process` it and SIGKILL any left."""
    for pid in descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    left = descendants(proc.pid) if proc.poll() is None else []
    stop_process(proc, grace=1.0)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def child_environment(tmpdir: str | os.PathLike[str] | None) -> dict[str, str] | None:
    """A child's environment with ``TMPDIR`` in the parent's temporary
    folder: whatever the child leaves there goes when the parent removes it."""
    if tmpdir is None:
        return None
    return {**os.environ, "TMPDIR": os.fspath(tmpdir)}


def run_child(
    cmd: Sequence[str],
    *,
    tmpdir: str | Path | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(cmd, capture_output=True, text=True)`` for a pvemu
    child: it dies with this process, keeps its temporary files in ``tmpdir``
    and, if we are interrupted (or time out), is stopped by :func:`stop_process`
    rather than SIGKILLed at once."""
    environment = None if env is None else dict(env)
    if tmpdir is not None:
        environment = {**(environment or os.environ), "TMPDIR": str(tmpdir)}
    with subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        preexec_fn=die_with_parent,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            stop_process(proc)
            raise
    return subprocess.CompletedProcess(list(cmd), proc.returncode, stdout, stderr)


def child_error(stderr: str, returncode: int) -> str:
    """What a failed child said, as one line: its own ``pvemu ...: message``
    line when it printed one, else its last line, else its exit status."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    own = [line for line in lines if line.startswith("pvemu ")]
    if own:
        return own[-1].split(": ", 1)[-1]
    return lines[-1] if lines else f"exit {returncode}"


@contextlib.contextmanager
def hypervisor_process(
    directory: Path,
    memory_mib: int,
    *,
    socket_path: str | None = None,
    quantum: int = 256,
    ready_timeout: float = 60.0,
    extra: Sequence[str] = (),
) -> Iterator[HypervisorProcess]:
    """Start the hypervisor, wait for its ready line, always stop it on exit
    (SIGTERM, then SIGKILL after 30 s): no orphan, no socket file left.

    The socket goes in ``directory`` unless that path is too long for a Unix
    socket; then in a short-lived folder of its own under /tmp."""
    with contextlib.ExitStack() as stack:
        if socket_path is None:
            socket_path = str(directory / "hv.sock")
            if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
                short = tempfile.mkdtemp(prefix="pvemu-sock-", dir="/tmp")
                stack.callback(shutil.rmtree, short, ignore_errors=True)
                socket_path = os.path.join(short, "hv.sock")
        yield stack.enter_context(
            _started_hypervisor(directory, memory_mib, socket_path, quantum, ready_timeout, extra)
        )


@contextlib.contextmanager
def _started_hypervisor(
    directory: Path,
    memory_mib: int,
    socket_path: str,
    quantum: int,
    ready_timeout: float,
    extra: Sequence[str],
) -> Iterator[HypervisorProcess]:
    log_path = directory / "hypervisor.log"
    cmd = [sys.executable, "-m", "pvemu.scripts", "hypervisor", "--socket", socket_path]
    cmd += ["--memory-mib", str(memory_mib), "--quantum", str(quantum)]
    cmd += ["--log-level", "warning", "--log-format", "json", *extra]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            preexec_fn=die_with_parent,
            env=child_environment(directory),
        )
    hv = HypervisorProcess(proc, socket_path, log_path)
    try:
        assert proc.stdout is not None
        ready = ""
        poller = select.poll()  # not select(): it fails once fds pass 1023
        poller.register(proc.stdout, select.POLLIN | select.POLLHUP)
        if poller.poll(ready_timeout * 1000):
            ready = proc.stdout.readline()
        if not ready.startswith("pvemu-hypervisor ready"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # its error line is complete once it has exited
            # A child that refused its arguments (exit 2) is the user's to fix.
            code = EXIT_USAGE if proc.returncode == EXIT_USAGE else EXIT_FAILURE
            why = hv.log_tail() or ready.strip() or f"no output in {ready_timeout:g} s"
            raise HypervisorStartError(f"the hypervisor did not start: {why}", code)
        yield hv
    finally:
        stop_process(proc, grace=30)
        if proc.stdout is not None:
            proc.stdout.close()


@contextlib.contextmanager
def maybe_hypervisor(
    needed: bool, directory: Path, memory_mib: int, **options: object
) -> Iterator[HypervisorProcess | None]:
    """:func:`hypervisor_process` when some mode needs one, else None."""
    if not needed:
        yield None
        return
    with hypervisor_process(directory, memory_mib, **options) as hv:  # type: ignore[arg-type]
        yield hv
