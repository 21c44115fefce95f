"""Who may register a user at a relay: anyone, the holders of an invitation, or no one.

Registration makes devices, and devices fetch bundles and send: an operator
that lets anyone register lets anyone make a sybil army (see
tests/adversarial/test_prekey_drain.py for what one can still do). With
``--registration invite`` only a single-use token from ``hushchat relay
invite`` registers a user; with ``closed`` nothing does. Existing users
update their lists as before in every mode.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hushchat.transport.client.client import open_client
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.config import Registration
from hushchat.transport.relay.invites import issue_invites, token_hash
from hushchat.transport.wire.errors import (
    BadFrame,
    ConnectionClosed,
    DeviceListRejected,
    InviteRefused,
    RegistrationClosed,
    UnknownUser,
)
from hushchat.transport.wire.frames import PublishDeviceList, encode_body
from tests.support.children import RELAY_COMMAND
from tests.support.relay import (
    RawClient,
    announced_port,
    connected,
    register,
    relay_config,
    running_relay,
)
from tests.support.users import make_user


async def test_a_closed_relay_registers_no_one_and_serves_its_users(tmp_path: Path) -> None:
    alice, mallory = make_user("alice"), make_user("mallory")
    open_config = relay_config(tmp_path)
    async with running_relay(open_config) as port:
        await register(port, alice)
    closed = relay_config(tmp_path, registration=Registration.CLOSED)
    async with running_relay(closed) as port:
        with pytest.raises(RegistrationClosed):
            await register(port, mallory)
        async with connected(port, alice.devices[1]) as connection:
            alice.add_device(2)  # an existing user's update is no registration
            await connection.upload_device_list(alice.signed_list())
            with pytest.raises(UnknownUser):
                await connection.fetch_device_list("mallory")
    # Nothing of mallory's was stored.
    with sqlite3.connect(tmp_path / "relay.db") as db:
        assert db.execute("SELECT user_id FROM users").fetchall() == [("alice",)]


async def test_an_invitation_registers_one_user_once(tmp_path: Path) -> None:
    db_path = str(tmp_path / "relay.db")
    first, second = issue_invites(db_path, 2, lifetime_seconds=3600)
    config = relay_config(tmp_path, registration=Registration.INVITE)
    alice, bob, carol, mallory = (make_user(u) for u in ("alice", "bob", "carol", "mallory"))
    async with running_relay(config) as port:
        for token in (None, "not an issued token"):
            with pytest.raises(InviteRefused):
                await register(port, mallory, invite=token)
        await register(port, alice, invite=first)
        with pytest.raises(InviteRefused):  # single use
            await register(port, bob, invite=first)
        # A registration refused for another reason keeps its token: carol's list
        # names alice's device key (with a proof it made for carol too).
        carol.devices[1].identity = alice.devices[1].identity
        with pytest.raises(DeviceListRejected):
            await register(port, carol, invite=second)
        await register(port, bob, invite=second)
        async with connected(port, alice.devices[1]) as connection:
            assert await connection.fetch_device_list("bob") == bob.signed_list()
    # The database holds hashes of tokens only, and no longer the spent ones.
    files = b"".join(path.read_bytes() for path in tmp_path.glob("relay.db*"))
    assert first.encode() not in files and second.encode() not in files
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM invites").fetchone() == (0,)


async def test_an_expired_invitation_registers_no_one(tmp_path: Path) -> None:
    db_path = str(tmp_path / "relay.db")
    early, late = issue_invites(db_path, 2, lifetime_seconds=60)
    with sqlite3.connect(db_path) as db:
        ((expires_at,),) = set(db.execute("SELECT expires_at FROM invites").fetchall())
    now = [expires_at - 1]
    config = relay_config(tmp_path, registration=Registration.INVITE, clock=lambda: now[0])
    async with running_relay(config) as port:
        await register(port, make_user("alice"), invite=early)  # a millisecond before
        now[0] = expires_at
        with pytest.raises(InviteRefused):
            await register(port, make_user("bob"), invite=late)
    assert token_hash(late) != late.encode()


async def test_an_empty_or_oversized_token_is_a_bad_frame() -> None:
    alice = make_user("alice")
    async with running_relay(relay_config(registration=Registration.INVITE)) as port:
        for token in ("", "x" * 65):
            raw = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
            await raw.send_body(encode_body(PublishDeviceList(0, alice.signed_list(), token)))
            assert BadFrame.code.encode() in (await raw.receive_body() or b"")
            await raw.stream.aclose()


async def test_the_client_registers_with_an_invitation_or_says_why_not(tmp_path: Path) -> None:
    db_path = str(tmp_path / "relay.db")
    [token] = issue_invites(db_path, 1, lifetime_seconds=3600)
    config = relay_config(tmp_path, registration=Registration.INVITE)
    async with running_relay(config) as port:
        for name, invite in (("bob", None), ("carol", "wrong")):
            store = ClientStore.open(str(tmp_path / f"{name}.db"))
            with trio.fail_after(20), pytest.raises(InviteRefused):
                async with open_client(store, "127.0.0.1", port, user_id=name, invite=invite):
                    pass
            store.close()
        store = ClientStore.open(str(tmp_path / "alice.db"))
        async with open_client(store, "127.0.0.1", port, user_id="alice", invite=token) as c:
            assert c.core.user_id == "alice"
        # Registered: the next connection does not need the (spent) token.
        async with open_client(store, "127.0.0.1", port) as c:
            assert c.core.own_device_list is not None
        store.close()


async def test_the_invite_command_issues_tokens_a_relay_accepts(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    argv = [sys.executable, "-m", "hushchat.transport.cli", "relay", "invite"]
    issued = subprocess.run(
        [*argv, "--db", str(db), "--count", "2", "--valid-for", "1h"],
        capture_output=True,
        text=True,
        check=True,
    )
    tokens = issued.stdout.split()
    assert len(tokens) == 2 and len(set(tokens)) == 2
    process = await trio.lowlevel.open_process(
        [*RELAY_COMMAND, "--port", "0", "--db", str(db), "--registration", "invite"],
        stderr=subprocess.PIPE,
    )
    try:
        port = await announced_port(process)
        await register(port, make_user("alice"), invite=tokens[0])
        with pytest.raises((InviteRefused, ConnectionClosed)):
            await register(port, make_user("bob"), invite=tokens[0])
        await register(port, make_user("bob"), invite=tokens[1])
    finally:
        process.kill()
        await process.wait()
