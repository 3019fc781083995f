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


class OneLineParser(argparse.ArgumentParser):
    """argparse with the product's error style: one line `modeaudit: error: ...` (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"modeaudit: error: {message}; `{self.prog} --help` lists the options\n")
