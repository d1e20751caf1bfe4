"""structlog configuration shared by both processes.

Console rendering on a terminal, one JSON object per line otherwise (or when
asked with ``--log-format json``), with contextvars merged first so that a
connection's bound ``domid``/``vcpu`` reach every line it logs. With a log
file, every line goes there and only warnings and errors also reach the
console, so a busy hypervisor's terminal stays readable.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["console", "json", "auto"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}

#: The lowest level :func:`configure_logging` lets through; everything until
#: it is called (structlog's own default), so tests capture every line.
_min_level = logging.NOTSET


def enabled(level: int) -> bool:
    """Whether a line at ``level`` would be written. A hot path checks this
    before building a line: a filtered structlog call is not free (the
    unconfigured proxy binds a new logger per call, and the line's fields
    are computed before the filter sees them)."""
    return level >= _min_level


class _TeeLogger:
    """Every line to the log file; warnings and worse to the console too."""

    def __init__(self, file: TextIO, console: TextIO) -> None:
        self._file = file
        self._console = console

    def msg(self, message: str) -> None:
        self._file.write(message + "\n")

    def loud(self, message: str) -> None:
        self.msg(message)
        print(message, file=self._console, flush=True)

    debug = info = msg
    warning = warn = error = critical = exception = fatal = loud


def configure_logging(
    log_format: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    file: TextIO | None = None,
) -> None:
    """Configure structlog for this process: logs go to stderr by default;
    with ``file``, there (JSON unless ``log_format`` says otherwise), and
    warnings and errors to the console as well."""
    global _min_level
    _min_level = LEVELS[level]
    out = stream or sys.stderr
    if log_format == "auto":
        log_format = "console" if file is None and out.isatty() else "json"
    renderer: structlog.types.Processor
    if log_format == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=(
            structlog.PrintLoggerFactory(out)
            if file is None
            else (lambda *_args: _TeeLogger(file, out))
        ),
        cache_logger_on_first_use=False,
    )
