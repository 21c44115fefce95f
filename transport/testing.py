"""Helpers for an application's own tests, like :mod:`trio.testing`'s.

::

    from hushchat.transport.testing import open_test_relay

    async def test_my_bot(tmp_path):
        async with open_test_relay() as relay:
            store = ClientStore.open(str(tmp_path / "alice.db"))
            async with open_client(store, relay.host, relay.port, user_id="alice") as alice:
                ...

The relay is the real one (:func:`~hushchat.transport.relay.serve_relay`)
in this process, on loopback and a free port, with its database in memory
unless ``db_path`` names a file; it stops when the block ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .relay.config import Registration, RelayConfig, RelayLimits
from .relay.server import serve_relay
from .wire.limits import DEFAULT_RETENTION_SECONDS

# Where a test relay listens: loopback only, never a reachable interface.
TEST_RELAY_HOST = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class TestRelay:
    """Where a relay started by :func:`open_test_relay` listens, and its name."""

    __test__ = False  # not a test class, though pytest collects names starting with Test

    host: str
    port: int
    name: str


@asynccontextmanager
async def open_test_relay(
    *,
    db_path: str = ":memory:",
    name: str = TEST_RELAY_HOST,
    retention_seconds: int = DEFAULT_RETENTION_SECONDS,
    registration: Registration = Registration.OPEN,
    limits: RelayLimits | None = None,
) -> AsyncIterator[TestRelay]:
    """Run a relay on 127.0.0.1 (a free port) for the block; yields where it listens.

    ``db_path``: its SQLite file (default: in memory, gone with the block).
    ``name``: the relay name devices sign when they authenticate, and
    compare with the name they dial: by default the host, so that
    ``open_client(store, relay.host, relay.port)`` connects as it is.
    ``registration``, ``retention_seconds`` and ``limits`` override the
    relay's defaults (with ``Registration.INVITE``, issue tokens into a
    ``db_path`` file with :func:`hushchat.transport.relay.invites.issue_invites`).
    """
    config = RelayConfig(
        host=TEST_RELAY_HOST,
        port=0,
        db_path=db_path,
        name=name,
        retention_seconds=retention_seconds,
        registration=registration,
        limits=limits or RelayLimits(),
    )
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_relay, config)
        try:
            yield TestRelay(TEST_RELAY_HOST, port, name)
        finally:
            nursery.cancel_scope.cancel()
