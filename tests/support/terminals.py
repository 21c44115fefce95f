"""The examples as a person runs them: a relay process, and the chat in a pseudo-terminal.

Used by the tests of the examples and of the chat's command line; the
``terminals`` fixture (conftest.py) closes every Terminal a test opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support.paths import REPO

EXAMPLES = REPO / "examples"
# Generous: a loaded CI machine is slow, and a failure shows what was on screen.
WAIT = 20.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[=>]")


# The chats' store key: the key itself, so that no test but the passphrase's
# spends a second of scrypt on every start.
STORE_KEY = "00" * 32


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS")}
    env["HUSHCHAT_STORE_KEY"] = STORE_KEY
    env.update(extra)
    return env


RELAY_SCRIPT = """
import sys, trio
from hushchat.transport.relay.config import Registration, RelayConfig
from hushchat.transport.relay.server import serve_relay

async def main():
    async with trio.open_nursery() as nursery:
        config = RelayConfig(
            port=int(sys.argv[2]),
            db_path=sys.argv[1],
            registration=Registration(sys.argv[3]),
            name=sys.argv[4],
        )
        port = await nursery.start(serve_relay, config)
        print(port, flush=True)

trio.run(main)
"""


@contextlib.contextmanager
def relay_process(
    db: Path, port: int = 0, *, registration: str = "open", name: str = ""
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """A relay on ``db``, on ``port`` (0: any free port, as it says), registering
    ``registration`` (open, invite, closed), calling itself ``name`` (by default, as dialled)."""
    relay = subprocess.Popen(
        [sys.executable, "-c", RELAY_SCRIPT, str(db), str(port), registration, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert relay.stdout is not None
        line = relay.stdout.readline()
        assert line.strip().isdigit(), relay.stderr.read() if relay.stderr else line
        yield relay, int(line)
    finally:
        relay.kill()
        relay.wait()


def issue_invites(db: Path, count: int) -> list[str]:
    """Tokens from the operator's `hushchat relay invite` on the relay's database."""
    command = [sys.executable, "-m", "hushchat.transport.cli", "relay", "invite", "--db", str(db)]
    issued = subprocess.run(
        [*command, "--count", str(count)], capture_output=True, text=True, timeout=60, check=True
    )
    return [line.split()[0] for line in issued.stdout.splitlines() if line.strip()][:count]


class Terminal:
    """One chat in a pseudo-terminal: type lines, wait for text on its screen."""

    def __init__(
        self,
        tmp_path: Path,
        port: int,
        name: str,
        state: str = "",
        *,
        args: tuple[str, ...] = (),
        **env: str,
    ) -> None:
        self._start(
            name,
            [
                "chat",
                "--relay",
                f"127.0.0.1:{port}",
                "--name",
                name,
                "--state",
                str(tmp_path / (state or name)),
                *args,
            ],
            clean_env(TERM="xterm", HOME=str(tmp_path), **env),
        )

    @classmethod
    def command(cls, name: str, arguments: Sequence[str], env: dict[str, str]) -> Terminal:
        """group_chat.py with ``arguments`` (another command than a chat) in a terminal."""
        terminal = cls.__new__(cls)
        terminal._start(name, arguments, env)
        return terminal

    def _start(self, name: str, arguments: Sequence[str], env: dict[str, str]) -> None:
        self.name = name
        master, slave = pty.openpty()
        # A wide screen, so that readline does not wrap what the tests type.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "group_chat.py"), *arguments],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.fd = master
        self.raw = b""
        self.seen = 0  # how much of the cleaned screen text expect() has consumed

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw.decode(errors="replace")).replace("\r", "")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the program ended and the terminal closed
            chunk = b""
        self.raw += chunk
        return bool(chunk)

    def expect(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) after what earlier expects matched."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.compile(pattern).search(self.text, self.seen)
            if match:
                self.seen = match.end()
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(min(left, 0.2)):
                raise AssertionError(
                    f"{self.name}: {pattern!r} not on screen; after the last match:\n"
                    + self.text[self.seen :]
                )

    def type(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\r")

    def finish(self, timeout: float = WAIT) -> int:
        """Wait for the program to end; its exit status."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        while self._read(0):  # what it printed last
            pass
        return self.process.wait(timeout=1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.fd)
