"""argparse types shared by the development tools' commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (``why`` says why, if given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(why or f"{value} is less than {minimum}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0 seconds")
    return value
