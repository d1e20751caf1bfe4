"""The one error path of the ``pvemu`` command line.

A user's mistake or a missing resource is a :class:`UserError`: the CLI prints
it as one line, ``pvemu SUBCOMMAND: message``, on stderr and exits with its
code. Anything else is a bug and is reported the same way with the exit code
:data:`EXIT_FAILURE`, with the traceback only under ``--debug`` or
``PVEMU_DEBUG=1``.
"""

from __future__ import annotations

#: The command ran and found what it reports as a failure (lost data, a
#: regression, a hypercall error), or hit an internal error.
EXIT_FAILURE = 1
#: The command line or the environment is wrong: bad arguments, sizes over a
#: limit, a missing folder or program, a socket in use. Nothing was run.
EXIT_USAGE = 2
#: Stopped by SIGINT or SIGTERM; children and temporary files are gone.
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """An error the user can fix: printed as one line, never as a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
