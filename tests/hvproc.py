"""Start ``pvemu hypervisor`` as a real subprocess for integration tests."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class HypervisorProcess:
    proc: subprocess.Popen[str]
    socket_path: str

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def short_socket_path(tag: str) -> str:
    """Unix socket paths are limited to 108 bytes: keep them in /tmp."""
    return os.path.join(tempfile.mkdtemp(prefix=f"pvemu-{tag}-", dir="/tmp"), "hv.sock")


def _readable(stream: object, timeout: float) -> bool:
    """poll(), not select(): select fails once descriptors pass 1023."""
    poller = select.poll()
    poller.register(stream, select.POLLIN | select.POLLHUP)  # type: ignore[arg-type]
    return bool(poller.poll(timeout * 1000))


@contextmanager
def hypervisor_process(
    *extra: str,
    memory_mib: int = 128,
    quantum: int = 64,
    tag: str = "t",
    user: int | None = None,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[HypervisorProcess]:
    """Start ``pvemu hypervisor`` and wait for its ready line.

    ``user`` runs it as that uid (the socket's directory is handed to it);
    ``python`` and ``env`` choose an interpreter that uid can execute and the
    environment (e.g. ``PYTHONPATH``) it needs to import the project.
    """
    socket_path = short_socket_path(tag)
    if user is not None:
        os.chown(os.path.dirname(socket_path), user, -1)
    cmd = [
        python or sys.executable,
        "-m",
        "pvemu.scripts",
        "hypervisor",
        "--socket",
        socket_path,
        "--memory-mib",
        str(memory_mib),
        "--quantum",
        str(quantum),
        "--log-format",
        "json",
        "--log-level",
        "warning",
        *extra,
    ]
    # Logs go to a file, never an undrained pipe: a flood of warnings from a
    # hostile guest must not block the hypervisor on a full pipe.
    log_path = os.path.join(os.path.dirname(socket_path), "hypervisor.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            user=user,
            env=None if env is None else dict(env),
        )
    handle = HypervisorProcess(proc, socket_path)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        ready = ""
        while time.monotonic() < deadline and proc.poll() is None:
            if _readable(proc.stdout, 0.5):
                ready = proc.stdout.readline()
                break
        if not ready.startswith("pvemu-hypervisor ready"):
            handle.stop(signal.SIGKILL)
            with open(log_path) as log:
                err = log.read()
            raise RuntimeError(f"hypervisor did not start: {ready!r} {err}")
        yield handle
    finally:
        if proc.poll() is None:
            handle.stop()
        if proc.stdout is not None:
            proc.stdout.close()
        for leftover in (socket_path, log_path):
            if os.path.exists(leftover):
                os.unlink(leftover)
        os.rmdir(os.path.dirname(socket_path))
