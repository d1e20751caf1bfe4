"""Starting ``pvemu hypervisor`` as a child process, for every command that
runs guests in their own processes (run, race, bench, trace replay)."""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class HypervisorStartError(RuntimeError):
    """The child hypervisor exited or stayed silent instead of getting ready."""


@dataclass
class HypervisorProcess:
    """A running ``pvemu hypervisor`` child: its process, socket and log."""

    proc: subprocess.Popen[str]
    socket_path: str
    log_path: Path

    def log_tail(self) -> str:
        """The last line the hypervisor logged (its logs go to ``log_path``)."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the parent dies, so a
    SIGKILLed ``pvemu bench``/``run`` never leaves a hypervisor behind."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


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
    (SIGTERM, then SIGKILL after 30 s): no orphan, no socket file left."""
    socket_path = socket_path or str(directory / "hv.sock")
    log_path = directory / "hypervisor.log"
    cmd = [sys.executable, "-m", "pvemu.scripts", "hypervisor", "--socket", socket_path]
    cmd += ["--memory-mib", str(memory_mib), "--quantum", str(quantum)]
    cmd += ["--log-level", "warning", "--log-format", "json", *extra]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=_die_with_parent
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
            raise HypervisorStartError(
                f"the hypervisor did not start: {hv.log_tail() or ready or 'no output'}"
            )
        yield hv
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
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
