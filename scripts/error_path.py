"""How every ``pvemu`` process ends: one line on stderr and a documented exit code.

:func:`exit_status` wraps a subcommand (and each helper process, such as a
load worker): a :class:`~pvemu.scripts.errors.UserError`, an ``OSError``, a
``MemoryError`` or an interrupt becomes one line ``PROG: message`` with the
exit code of :mod:`pvemu.scripts.errors`; anything else is an internal error,
one line as well, with the traceback only under ``--debug`` or
``PVEMU_DEBUG=1``. trio wraps what its tasks raise in exception groups; the
group is unwrapped so that the user reads the error, not the nursery.

SIGTERM is turned into the same interrupt as SIGINT (Ctrl-C), so ``with``
blocks and ``finally`` clauses stop the children and remove temporary files
whichever signal arrives.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from pvemu.scripts.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, UserError

if TYPE_CHECKING:
    from types import FrameType


#: The environment variable that turns on ``--debug`` for every pvemu process.
DEBUG_ENV = "PVEMU_DEBUG"


def debug_from_environment() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


def one_line(text: str) -> str:
    """A message on one line: a multi-line message has its lines joined."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _os_error_text(exc: OSError) -> str:
    """``cannot open /missing/x.json: No such file or directory``."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        return f"{exc.filename}: {reason}"
    return reason


def describe(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) of an error the user can act on, or
    None for an internal error. In an exception group, an interrupt wins,
    then the first user error; a group with any other leaf is internal."""
    found = leaves(exc)
    if any(isinstance(leaf, KeyboardInterrupt) for leaf in found):
        return "interrupted", EXIT_INTERRUPTED
    described: list[tuple[str, int]] = []
    for leaf in found:
        if isinstance(leaf, UserError):
            described.append((one_line(leaf.message), leaf.exit_code))
        elif isinstance(leaf, MemoryError):
            described.append(("out of memory: choose smaller sizes (or fewer guests)", EXIT_USAGE))
        elif isinstance(leaf, OSError):
            described.append((one_line(_os_error_text(leaf)), EXIT_FAILURE))
        else:
            return None
    return described[0] if described else None


def internal_error_line(exc: BaseException) -> str:
    """An internal error as one line, naming the innermost exception."""
    leaf = leaves(exc)[0]
    text = one_line(str(leaf))
    kind = type(leaf).__name__
    detail = f"{kind}: {text}" if text else kind
    return f"internal error: {detail} (run with --debug or {DEBUG_ENV}=1 for the traceback)"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside: SIGTERM does what SIGINT does (KeyboardInterrupt, which
    trio delivers safely inside ``trio.run``), so cleanup runs for both.

    A background job of a non-interactive shell starts with SIGINT ignored;
    the default handler is put back, since trio delivers KeyboardInterrupt
    safely only through it (and SIGTERM goes the same way)."""

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # trio's handler (inside trio.run) or Python's default one; both are
        # for SIGINT and trio's checks that it gets SIGINT.
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # someone set SIGINT to SIG_IGN/SIG_DFL since: still stop
            raise KeyboardInterrupt

    try:
        previous_int = signal.getsignal(signal.SIGINT)
        if not callable(previous_int):
            signal.signal(signal.SIGINT, signal.default_int_handler)
        previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test's thread)
        yield
        return
    try:
        yield
    finally:
        if previous_term is not None:  # None: a handler set outside Python
            signal.signal(signal.SIGTERM, previous_term)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def exit_status(prog: str, work: Callable[[], int], *, debug: bool = False) -> int:
    """``work()``'s exit status; any exception it raises is reported as one
    line ``PROG: message`` on stderr and turned into its exit code."""
    debug = debug or debug_from_environment()
    try:
        with sigterm_interrupts():
            return work()
    except SystemExit:
        raise
    except BaseException as exc:  # the one place every error ends up
        described = describe(exc)
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        if described is None:
            print(f"{prog}: {internal_error_line(exc)}", file=sys.stderr)
            return EXIT_FAILURE
        message, code = described
        print(f"{prog}: {message}", file=sys.stderr)
        return code


__all__ = [
    "DEBUG_ENV",
    "debug_from_environment",
    "describe",
    "internal_error_line",
    "leaves",
    "one_line",
    "exit_status",
    "sigterm_interrupts",
]
