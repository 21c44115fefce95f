"""Where the examples keep a device's state: ~/.hushchat/NAME, made safe for any NAME.

Not part of hushchat; a few lines the chat and the echo bot share.
"""

from __future__ import annotations

import hashlib
import os
import re

# A name used as it is for a folder: a plain file name, not starting with a dot.
PLAIN_FOLDER_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def state_folder_name(name: str) -> str:
    """A folder name for a user name: the name itself if it is a plain file name.

    Otherwise (a slash, ``..``, spaces, a leading dot, non-ASCII) a readable
    part of it and 12 hex digits of its SHA-256, so that no name reaches
    outside ~/.hushchat and two names never share a folder.
    """
    if PLAIN_FOLDER_NAME.fullmatch(name):
        return name
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:32] or "user"
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def default_state_dir(name: str) -> str:
    return os.path.join(os.path.expanduser("~"), ".hushchat", state_folder_name(name))
