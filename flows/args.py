"""Argument types shared by the CLI's subcommands."""
from __future__ import annotations

import argparse


def count(text: str) -> int:
    """Whole numbers that may be written 1e5 (a plain integer is read exactly, not through a float)."""
    t = text.strip()
    if t.lstrip("+").isdigit():
        return int(t)
    if t.startswith("-") and t[1:].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give a whole number >= 0")
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if v != v or v in (float("inf"), float("-inf")) or v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative; give a whole number >= 0")
    return int(v)


class OneLineParser(argparse.ArgumentParser):
    """argparse with the product's error style: one line `modeaudit: error: ...` (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"modeaudit: error: {message}; `{self.prog} --help` lists the options\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help with "(default: X)" only where it informs: not for flags (a --no-report "default: True" reads as
    if the flag were on), not for unset (None) defaults, not where the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                                argparse._HelpAction, argparse._VersionAction))
                or action.default is None or action.default is argparse.SUPPRESS or "default" in text.lower()):
            return text
        return super()._get_help_string(action)
