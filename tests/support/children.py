"""Child processes of the hardening tests: started from the repository, reaped after each test.

A test module appends every process it starts to :data:`STARTED`; conftest.py
kills any still running when the test ends (a failure), so no child outlives
its test.
"""

from __future__ import annotations

import os
import signal
import sys

import trio

from tests.support.paths import REPO as REPO  # re-exported: the children start in it

STARTED: list[trio.Process] = []
# `hushchat relay` as a child of the test's interpreter (the installed package).
RELAY_COMMAND = [sys.executable, "-m", "hushchat.transport.cli", "relay"]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def reap_started() -> None:
    """Kill and reap every started child still running."""
    while STARTED:
        pid = STARTED.pop().pid
        try:
            if os.waitpid(pid, os.WNOHANG) == (0, 0):  # our child, still running
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass  # reaped already (so the pid is not ours to signal any more)


async def read_until(stream: trio.abc.ReceiveStream, text: bytes, said: bytes = b"") -> bytes:
    """``said`` and what ``stream`` (a child's output) says next, read until ``text`` is
    in it; the stream ending first fails the test, showing what was said."""
    while text not in said:
        chunk = await stream.receive_some()
        assert chunk, said
        said += chunk
    return said
