"""argparse value types shared by the ``pvemu`` subcommands."""

from __future__ import annotations

import argparse
import os
from typing import Final

from pvemu.guest.modes import MODE_NAMES
from pvemu.scripts.checks import output_file_problem, output_folder_problem


def positive_int(text: str) -> int:
    """A strictly positive integer (sizes, counts, limits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def positive_float(text: str) -> float:
    """A strictly positive, finite number (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {text}")
    return value


def mode_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of pv-ops modes, each one of ``guest.modes.MODE_NAMES``."""
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODE_NAMES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {unknown}; choose from {MODE_NAMES}")
    return modes


#: The modes whose guest runs on the hypervisor (all but ``native``).
HYPERVISOR_MODES: Final = tuple(m for m in MODE_NAMES if m != "native")


def hypervisor_mode(text: str) -> str:
    """One pv-ops mode of the registry that runs on the hypervisor."""
    if text not in HYPERVISOR_MODES:
        raise argparse.ArgumentTypeError(
            f"unknown mode {text!r}; choose from {', '.join(HYPERVISOR_MODES)}"
        )
    return text


def output_file(text: str) -> str:
    """A file this process may create or overwrite, checked when the command
    line is parsed: a run must not fail at its end for want of a folder."""
    problem = output_file_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_folder(text: str) -> str:
    """A folder this process creates if needed (with its parents), checked
    when the command line is parsed: the nearest existing folder on its path
    must take new entries."""
    problem = output_folder_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def output_file_in_new_folder(text: str) -> str:
    """A file whose folder this process creates if needed (``bench -o``)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    output_folder(os.path.dirname(os.path.abspath(text)))
    return text
