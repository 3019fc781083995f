"""Argument types shared by the CLI's subcommands."""
from __future__ import annotations

import argparse


def count(text: str) -> int:
    """Whole numbers that may be written 1e5."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(v)
