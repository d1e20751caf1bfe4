"""``pvemu completion SHELL``: print a tab-completion script for the shell.

Made by shtab from the same argparse parser ``pvemu`` parses with, so every
subcommand, option and choice completes as it is today; options whose value
is a file or a socket path complete file names.
"""

from __future__ import annotations

import argparse
import sys

SHELLS = ("bash", "zsh", "tcsh")

EPILOG = """\
Load it in the running shell, or install it for every new one:

  eval "$(pvemu completion bash)"
  pvemu completion bash > ~/.local/share/bash-completion/completions/pvemu
  pvemu completion zsh > ~/.zfunc/_pvemu   # with fpath+=(~/.zfunc) before compinit
"""

#: Option values that name a file (or a socket) or a folder, by metavar.
FILE_METAVARS = frozenset({"FILE", "PATH"})
DIR_METAVARS = frozenset({"DIR"})


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("shell", choices=SHELLS, help="the shell to complete for")


def _mark_files(parser: argparse.ArgumentParser) -> None:
    """Let shtab complete file names for options whose value is a path."""
    import shtab

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _mark_files(child)
        elif action.metavar in FILE_METAVARS:
            action.complete = shtab.FILE  # type: ignore[attr-defined]
        elif action.metavar in DIR_METAVARS:
            action.complete = shtab.DIRECTORY  # type: ignore[attr-defined]


def run(args: argparse.Namespace) -> int:
    import shtab

    from pvemu.scripts.cli import build_parser

    parser = build_parser()
    _mark_files(parser)
    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0
