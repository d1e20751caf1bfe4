"""argparse value types shared by the ``pvemu`` subcommands."""

from __future__ import annotations

import argparse
import os

from pvemu.guest.modes import MODE_NAMES


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


def output_file(text: str) -> str:
    """A file this process may create or overwrite, checked when the command
    line is parsed: a run must not fail at its end for want of a folder."""
    path = os.path.abspath(text)
    if os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"{text} is a folder")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"no folder {folder}")
    target = path if os.path.exists(path) else folder
    if not os.access(target, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable")
    return text
