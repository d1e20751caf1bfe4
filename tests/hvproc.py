"""Start ``pvemu hypervisor`` as a real subprocess for integration tests."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


@contextmanager
def hypervisor_process(
    *extra: str, memory_mib: int = 128, quantum: int = 64, tag: str = "t"
) -> Iterator[HypervisorProcess]:
    socket_path = short_socket_path(tag)
    cmd = [
        sys.executable,
        "-m",
        "scripts",
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
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    handle = HypervisorProcess(proc, socket_path)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        ready = ""
        while time.monotonic() < deadline and proc.poll() is None:
            readable, _, _ = select.select([proc.stdout], [], [], 0.5)
            if readable:
                ready = proc.stdout.readline()
                break
        if not ready.startswith("pvemu-hypervisor ready"):
            handle.stop(signal.SIGKILL)
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"hypervisor did not start: {ready!r} {err}")
        yield handle
    finally:
        if proc.poll() is None:
            handle.stop()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        os.rmdir(os.path.dirname(socket_path))
