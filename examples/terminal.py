"""Terminal colours for the examples: on a terminal only, and never when NO_COLOR is set.

Not part of hushchat; a few lines the demo and the chat share.
"""

from __future__ import annotations

import os
from typing import TextIO

_CODES = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
}


def wants_colour(stream: TextIO) -> bool:
    """Colour only on a terminal; NO_COLOR (https://no-color.org) or TERM=dumb turn it off."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    return stream.isatty()


class Palette:
    """Wraps text in ANSI colour codes, or leaves it alone when colour is off."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def paint(self, style: str, text: str) -> str:
        """``style``: names from _CODES separated by spaces, e.g. "bold red"."""
        if not self.enabled or not style:
            return text
        codes = ";".join(_CODES[name] for name in style.split())
        return f"\x1b[{codes}m{text}\x1b[0m"
