"""The client library against a real relay: in this process, or a relay process.

No tests here; the client-library and forgetting tests import it.

* :class:`Relay` runs the relay in the test's own trio loop, in a cancel
  scope of its own, so a test can stop it and start it again on the same
  port (and the same database, or another one);
* :class:`RelayProcess` runs ``hushchat relay`` as a child process on a fixed
  port, for tests that kill it as an operator (or a crash) would;
* :func:`client` opens a store and a client for a user, :func:`next_matching`
  waits for an event.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from hushchat.transport.client.client import Client, open_client
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import serve_relay
from tests.support.children import RELAY_COMMAND, STARTED, child_env
from tests.support.paths import REPO

# How long a test waits for an event before it fails.
TIMEOUT = 20


class Relay:
    """A relay in a cancel scope of its own, so a test can stop and restart it.

    ``config``: RelayConfig fields beside the database path and the port.
    """

    def __init__(self, nursery: trio.Nursery, db_path: str, **config: Any) -> None:
        self.nursery = nursery
        self.db_path = db_path
        self.port = 0
        self._config = config
        self._scope: trio.CancelScope | None = None

    async def start(self) -> int:
        """Start on the port it had (any port the first time); the port."""

        async def run(task_status: trio.TaskStatus[int]) -> None:
            with trio.CancelScope() as scope:
                self._scope = scope
                config = RelayConfig(db_path=self.db_path, port=self.port, **self._config)
                await serve_relay(config, task_status=task_status)

        self.port = await self.nursery.start(run)
        return self.port

    async def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await trio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RelayProcess:
    """``hushchat relay`` on a fixed port and a database file, started and killed at will."""

    def __init__(self, db: Path, port: int | None = None) -> None:
        self.db = db
        self.port = port or free_port()
        self.process: trio.Process | None = None
        self.log = db.with_suffix(".log")

    async def start(self, *options: str) -> float:
        """Start it; the trio time at which it listens."""
        args = [*RELAY_COMMAND, "--port", str(self.port), "--db", str(self.db), *options]
        self.log.write_bytes(b"")
        with self.log.open("ab") as stderr:
            self.process = await trio.lowlevel.open_process(
                args, stderr=stderr, env=child_env(), cwd=str(REPO)
            )
        STARTED.append(self.process)
        with trio.fail_after(TIMEOUT):
            while b"listening on" not in self.log.read_bytes():
                assert self.process.poll() is None, self.log.read_text()
                await trio.sleep(0.01)
        return trio.current_time()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        with trio.fail_after(TIMEOUT):
            await self.process.wait()


@asynccontextmanager
async def client(
    tmp_path: Path, relay: Relay | RelayProcess | int, name: str, **options: Any
) -> AsyncIterator[Client]:
    """User ``name``'s device, its store in ``tmp_path``, connected to ``relay`` (or a port)."""
    port = relay if isinstance(relay, int) else relay.port
    store = ClientStore.open(str(tmp_path / f"{name}.db"))
    try:
        options.setdefault("reconnect_first_delay", 0.05)
        async with open_client(store, "127.0.0.1", port, user_id=name, **options) as c:
            yield c
    finally:
        store.close()


async def next_matching(
    c: Client, kind: type[Any], predicate: Callable[[Any], bool] = bool, timeout: float = TIMEOUT
) -> Any:
    """The next event of ``kind`` that ``predicate`` accepts (within ``timeout``)."""
    with trio.fail_after(timeout):
        async for event in c.events():
            if isinstance(event, kind) and predicate(event):
                return event
    raise AssertionError("event stream ended")
