"""The client library against an in-process relay: a relay a test can stop and restart, a
client on a store of its own, and waiting for an event.

No tests here; the client-library and forgetting tests import it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from hushchat.transport.client.client import Client, open_client
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import serve_relay

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


@asynccontextmanager
async def client(tmp_path: Path, relay: Relay, name: str, **options: Any) -> AsyncIterator[Client]:
    """User ``name``'s device, its store in ``tmp_path``, connected to ``relay`` for the block."""
    store = ClientStore.open(str(tmp_path / f"{name}.db"))
    try:
        options.setdefault("reconnect_first_delay", 0.05)
        async with open_client(store, "127.0.0.1", relay.port, user_id=name, **options) as c:
            yield c
    finally:
        store.close()


async def next_matching(c: Client, kind: type[Any], predicate: Callable[[Any], bool] = bool) -> Any:
    """The next event of ``kind`` that ``predicate`` accepts (within TIMEOUT)."""
    with trio.fail_after(TIMEOUT):
        async for event in c.events():
            if isinstance(event, kind) and predicate(event):
                return event
    raise AssertionError("event stream ended")
