"""What the library logs (silent unless asked; no identities at INFO), and the test relay helper."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hushchat.protocol.client_core import GroupUpdated, MessageReceived
from hushchat.protocol.group import MemberAdded
from hushchat.transport.client import ClientStore, open_client
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import Relay
from hushchat.transport.relay.storage.sqlite import SqliteStorage
from hushchat.transport.testing import open_test_relay

FAIL_TO_CONNECT = """
import logging, socket, sys, trio
{configure}
from hushchat.transport.client.connection import connect_relay
from hushchat.transport import ConnectionRefused

async def main():
    probe = socket.socket(); probe.bind(("127.0.0.1", 0)); port = probe.getsockname()[1]
    probe.close()
    try:
        async with connect_relay("127.0.0.1", port):
            pass
    except ConnectionRefused:
        print("refused")

trio.run(main)
"""


@pytest.mark.parametrize("configured", [False, True])
def test_the_library_is_silent_unless_the_app_configures_logging(configured: bool) -> None:
    configure = "logging.basicConfig(level=logging.INFO)" if configured else ""
    result = subprocess.run(
        [sys.executable, "-c", FAIL_TO_CONNECT.format(configure=configure)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout == "refused\n"
    if configured:
        assert "INFO:hushchat.client:cannot connect: nothing listens at 127.0.0.1:" in result.stderr
    else:
        assert result.stderr == ""


async def test_an_apps_test_starts_a_relay_and_handles_group_updates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="hushchat")
    stores = [ClientStore.open(str(tmp_path / f"{name}.db")) for name in ("alice", "bob")]
    try:
        async with open_test_relay() as relay:
            assert relay.host == "127.0.0.1" and relay.port > 0
            async with (
                open_client(stores[0], relay.host, relay.port, user_id="alice") as alice,
                open_client(stores[1], relay.host, relay.port, user_id="bob") as bob,
            ):
                group_id = await alice.create_group("friends", ["bob"])
                await alice.send_group(group_id, b"hello")
                seen: list[str] = []
                with trio.fail_after(10):
                    async for event in bob.events():
                        if isinstance(event, GroupUpdated):
                            added = [c.user_id for c in event.changes if isinstance(c, MemberAdded)]
                            seen.append(f"joined={event.joined} added={added}")
                        elif isinstance(event, MessageReceived):
                            seen.append(f"{event.sender.user_id}: {event.body.decode()}")
                            break
                assert seen == ["joined=True added=['alice', 'bob']", "alice: hello"]
                assert bob.group(group_id).user_ids == ("alice", "bob")
    finally:
        for store in stores:
            store.close()
    relay_info = [r.getMessage() for r in caplog.records if r.name == "hushchat.relay"]
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("listening on 127.0.0.1 port" in line for line in info)
    assert any(line.startswith("relay stopped (2 connections") for line in info)
    # Who connects is named at DEBUG only; nothing at INFO names a user.
    assert "device alice.1 authenticated" in relay_info
    assert not [line for line in info if "alice" in line or "bob" in line]


async def test_the_relay_logs_connection_counts_when_they_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hushchat.relay")
    storage = await SqliteStorage.open(":memory:")
    try:
        relay = Relay(RelayConfig(db_path=":memory:"), storage)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.log_activity, 0.05)
            relay.connections_open = relay.connections_served = 3
            await trio.sleep(0.2)  # several intervals, one change
            nursery.cancel_scope.cancel()
    finally:
        await storage.aclose()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["3 connections open, 0 devices authenticated; 3 connections since start"]
