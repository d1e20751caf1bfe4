"""argparse value types shared by the ``pvemu`` subcommands."""

from __future__ import annotations

import argparse
import os

from pvemu.guest.modes import MODE_NAMES
from pvemu.scripts.checks import check_output_file, check_output_folder
from pvemu.scripts.errors import UserError


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


def mode_name(text: str) -> str:
    """One pv-ops mode, from the registry (``guest.modes.MODE_NAMES``)."""
    if text not in MODE_NAMES:
        raise argparse.ArgumentTypeError(
            f"unknown mode {text!r}; choose from {', '.join(MODE_NAMES)}"
        )
    return text


def output_file(text: str) -> str:
    """A file this process may create or overwrite, checked when the command
    line is parsed: a run must not fail at its end for want of a folder."""
    try:
        check_output_file(text, "")
    except UserError as exc:
        raise argparse.ArgumentTypeError(exc.message.strip()) from None
    return text


def output_folder(text: str) -> str:
    """A folder this process creates if needed (with its parents), checked
    when the command line is parsed: the nearest existing folder on its path
    must take new entries."""
    try:
        check_output_folder(text, "")
    except UserError as exc:
        raise argparse.ArgumentTypeError(exc.message.strip()) from None
    return text


def output_file_in_new_folder(text: str) -> str:
    """A file whose folder this process creates if needed (``bench -o``)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    output_folder(os.path.dirname(os.path.abspath(text)))
    return text
