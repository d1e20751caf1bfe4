"""Progress of a long command on stderr: a rich bar with an ETA on a
terminal, and without one (a log, CI) a plain line every few seconds, so a
five-minute ``pvemu run`` is never silent until the end.

Work is counted in steps; ``pvemu run`` counts five per mode (boot, the
three phases, the read-back check) from the guest's own phase reports
(:func:`progress_pipe`), so the ETA moves inside a mode too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TextIO

if TYPE_CHECKING:
    from types import TracebackType

#: Seconds between two plain progress lines (``PVEMU_PROGRESS_INTERVAL`` overrides).
PLAIN_INTERVAL_S: Final = 5.0


def plain_interval() -> float:
    text = os.environ.get("PVEMU_PROGRESS_INTERVAL", "")
    try:
        return max(0.05, float(text)) if text else PLAIN_INTERVAL_S
    except ValueError:
        return PLAIN_INTERVAL_S


def clock_text(seconds: float) -> str:
    """``1:05`` or ``1:02:03``."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def plain_line(prog: str, description: str, done: float, total: float, elapsed: float) -> str:
    """``pvemu run: 40% mode xen: protect_ro, 0:12 elapsed, about 0:18 left``."""
    fraction = min(1.0, done / total) if total > 0 else 0.0
    text = f"{prog}: {fraction:4.0%} {description}, {clock_text(elapsed)} elapsed"
    if 0 < fraction < 1:
        text += f", about {clock_text(elapsed * (1 - fraction) / fraction)} left"
    return text


class Progress:
    """``with Progress("pvemu run", total) as p: p.update(advance=1, description=...)``.

    Thread-safe: a guest's phase reports arrive on a reader thread."""

    def __init__(
        self,
        prog: str,
        total: float,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prog = prog
        self.total = total
        self.done = 0.0
        self.description = ""
        self.stream = stream or sys.stderr
        self.interval = plain_interval() if interval is None else interval
        self.clock = clock
        self.enabled = enabled
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = clock()
        self._rich: Any = None
        self._task: Any = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Progress:
        self._started = self.clock()
        if not self.enabled:
            return self
        if self.stream.isatty():
            self._rich = _rich_progress(self.stream)
            self._rich.__enter__()
            self._task = self._rich.add_task(self.description or self.prog, total=self.total)
        else:
            self._thread = threading.Thread(target=self._plain_loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._rich is not None:
            self._rich.__exit__(kind, exc, tb)

    def update(self, *, advance: float = 0.0, description: str | None = None) -> None:
        with self._lock:
            self.done += advance
            if description is not None:
                self.description = description
            if self._rich is not None:
                self._rich.update(self._task, completed=self.done, description=self.description)

    def line(self) -> str:
        with self._lock:
            done, description = self.done, self.description
        return plain_line(self.prog, description, done, self.total, self.clock() - self._started)

    def _plain_loop(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), file=self.stream, flush=True)


def _rich_progress(stream: TextIO) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(file=stream),
        transient=True,
    )


class ProgressPipe:
    """A pipe for a child's progress reports: pass :attr:`fd` to the child
    (``pass_fds`` and ``--progress-fd``), call :meth:`spawned` once it runs
    (the parent's copy of the write end closes, so the pipe ends with the
    child) and :meth:`close` when done. A thread calls ``on_line`` with
    every line the child writes."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        read_fd, self.fd = os.pipe()
        self._reader = os.fdopen(read_fd, "r", errors="replace")
        self._on_line = on_line
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        with self._reader:
            for line in self._reader:
                if line.strip():
                    self._on_line(line.strip())

    def spawned(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.spawned()
        self._thread.join(timeout=5)


def run_reporting(
    cmd: list[str], on_step: Callable[[str], None], tmpdir: str | os.PathLike[str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a ``pvemu guest`` child with ``--progress-fd`` appended, calling
    ``on_step`` with each step it reports; its output captured, its
    temporary files in ``tmpdir``. Whatever interrupts the wait (SIGINT,
    SIGTERM), the child is stopped (SIGTERM, then SIGKILL) and it dies with
    this process: never left running."""
    from pvemu.scripts.procs import child_environment, die_with_parent, stop_process

    pipe = ProgressPipe(on_step)
    try:
        with subprocess.Popen(
            [*cmd, "--progress-fd", str(pipe.fd)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=(pipe.fd,),
            preexec_fn=die_with_parent,
            env=child_environment(tmpdir),
        ) as proc:
            pipe.spawned()
            try:
                stdout, stderr = proc.communicate()
            except BaseException:
                stop_process(proc)
                raise
    finally:
        pipe.close()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_counted(
    cmd: list[str],
    progress: Progress,
    label: str,
    steps: int,
    tmpdir: str | os.PathLike[str] | None = None,
    *,
    already: int = 0,
) -> subprocess.CompletedProcess[str]:
    """:func:`run_reporting` for a child that reports ``steps`` steps (of
    which ``already`` were counted by the caller): each moves ``progress``
    by one under ``label``, and whatever it did not report is added at its
    end, so a failed child still leaves the bar where the next one starts."""
    counted = [already]

    def on_step(step: str) -> None:
        counted[0] += 1
        progress.update(advance=1, description=f"{label}: {step}")

    done = run_reporting(cmd, on_step, tmpdir)
    progress.update(advance=max(0, steps - counted[0]))
    return done


def phase_reporter(fd: int | None) -> Callable[[str], None] | None:
    """In the child: a function that writes one line per step to ``fd``."""
    if fd is None:
        return None
    out = os.fdopen(fd, "w", buffering=1)

    def report(step: str) -> None:
        with contextlib.suppress(OSError):
            out.write(step + "\n")

    return report
