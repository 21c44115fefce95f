"""The relay end to end over TCP on 127.0.0.1: directory, prekeys, mailboxes, sends, storage."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio

from hushchat.protocol.account import Account
from hushchat.protocol.consts import PROTOCOL_VERSION
from hushchat.protocol.devices import SignedDeviceList
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import InvalidArgument
from hushchat.protocol.keys import encode_mlkem768, encode_x25519, verify_prekey_signature
from hushchat.protocol.messages import PreKeyMessage, decode_message
from hushchat.protocol.pqxdh import Party
from hushchat.protocol.prekeys import OneTimePreKeyPublic, PreKeyBundle, SignedPreKeyPublic
from hushchat.transport.client.connection import RelayConnection
from hushchat.transport.relay.config import wall_clock_ms
from hushchat.transport.relay.ratelimit import RateLimit
from hushchat.transport.relay.server import Relay
from hushchat.transport.relay.storage.sqlite import SqliteDatabase, SqliteStorage
from hushchat.transport.wire.auth import sign_auth
from hushchat.transport.wire.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    DeviceListMismatch,
    DeviceListRejected,
    DeviceRemoved,
    Forbidden,
    InternalError,
    MailboxFull,
    NoPreKeys,
    PreKeyIdInUse,
    PreKeysRejected,
    RateLimited,
    Superseded,
    UnknownDevice,
    UnknownUser,
)
from hushchat.transport.wire.frames import (
    Auth,
    ErrorFrame,
    FrameType,
    Hello,
    MailExpired,
    Ok,
    PreKeysLow,
    QueueEmpty,
    Welcome,
    decode_relay_frame,
    encode_body,
)
from hushchat.transport.wire.framing import encode_frame
from hushchat.transport.wire.limits import (
    BUNDLE_FETCH_CAPACITY,
    MAX_IN_FLIGHT,
    RELAY_PROTOCOL_VERSION,
)
from hushchat.transport.wire.records import Envelope, EnvelopeKind, PreKeyCounts
from tests.support.relay import (
    RawClient,
    connected,
    envelopes_until_empty,
    make_prekeys,
    next_envelope,
    register,
    relay_config,
    running_relay,
)
from tests.support.storage import copy_at_one_moment, schema_2_database
from tests.support.users import User, keypair, make_user, signed_list_naming

# Every relay these tests start without a folder runs once on SQLite, once on PostgreSQL.
pytestmark = pytest.mark.usefixtures("relay_backend")


def decode_bundle(data: bytes) -> list[Any]:
    value = unpack(data, what="bundle", max_size=10_000)
    assert isinstance(value, list) and len(value) == 8
    return value


# ------------------------------------------------------------------ users and authentication


async def test_register_authenticate_and_fetch_lists() -> None:
    alice, bob = make_user("alice", [1, 2]), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[2]) as connection:
            assert connection.user_id == "alice" and connection.device_id == 2
            assert await connection.fetch_device_list("bob") == bob.signed_list()
            fetched = SignedDeviceList.decode(await connection.fetch_device_list("alice"))
            assert fetched.device_list.device_ids == (1, 2)
            with pytest.raises(UnknownUser) as info:
                await connection.fetch_device_list("nobody")
            assert info.value.user_id == "nobody"
            await connection.ping()


async def test_registration_is_first_come_and_updates_need_authentication() -> None:
    alice = make_user("alice")
    impostor = make_user("alice")
    impostor.identity = make_user("mallory").identity
    async with running_relay(relay_config()) as port:
        await register(port, alice)
        async with connected(port) as connection:
            with pytest.raises(Forbidden):
                await connection.upload_device_list(impostor.signed_list())
            with pytest.raises(ConnectionClosed):  # an unauthenticated error closes
                await connection.ping()
        alice.add_device(2)
        async with connected(port) as connection:
            with pytest.raises(Forbidden):  # a valid newer list, but not authenticated
                await connection.upload_device_list(alice.signed_list())
        async with connected(port) as connection:
            with pytest.raises(DeviceListRejected) as info:
                await connection.upload_device_list(b"\x92\xc4\x00\xc4\x00")
            assert info.value.cause == "MALFORMED"


async def test_a_user_kept_from_protocol_version_1_publishes_a_proven_list(
    tmp_path: Path,
) -> None:
    """After the relay's database is migrated, a user whose stored list is of protocol
    version 1 (no device proofs, no longer decodable) authenticates and publishes a list of
    the current version, checked against what is stored: same identity, higher counter."""
    alice = make_user("alice")
    device_key = alice.devices[1].identity.public.ed25519
    schema_2_database(
        tmp_path / "relay.db",
        [("alice", alice.identity.public.ed25519, 3, b"a version 1 list", [(1, device_key)])],
    )
    async with (
        running_relay(relay_config(tmp_path)) as port,
        connected(port, alice.devices[1]) as connection,
    ):
        assert await connection.fetch_device_list("alice") == b"a version 1 list"
        alice.counter = 3
        with pytest.raises(DeviceListRejected) as info:
            await connection.upload_device_list(alice.signed_list())
        assert info.value.cause == "STALE_CHANGE"
        stranger = make_user("alice")
        stranger.identity, stranger.counter = make_user("mallory").identity, 4
        stranger.devices = alice.devices
        with pytest.raises(DeviceListRejected) as info:
            await connection.upload_device_list(stranger.signed_list())
        assert info.value.cause == "UNTRUSTED_IDENTITY"
        alice.counter = 4
        await connection.upload_device_list(alice.signed_list())
        assert await connection.fetch_device_list("alice") == alice.signed_list()


@pytest.mark.parametrize("case", ["wrong key", "device not listed", "unknown user"])
async def test_authentication_failures_close_the_connection(case: str) -> None:
    alice = make_user("alice")
    async with running_relay(relay_config()) as port:
        await register(port, alice)
        device = alice.devices[1]
        user_id, device_id, key = device.user_id, device.device_id, device.identity
        if case == "wrong key":
            key = make_user("mallory").devices[1].identity
        elif case == "device not listed":
            device_id = 2
        else:
            user_id = "nobody"
        async with connected(port) as connection:
            with pytest.raises(AuthenticationFailed):
                await connection.authenticate(user_id, device_id, key)
            with pytest.raises(ConnectionClosed):
                await connection.ping()


async def raw_hello(port: int) -> tuple[RawClient, bytes, str]:
    client = RawClient(await trio.open_tcp_stream("127.0.0.1", port))
    await client.send_body(encode_body(Hello(0, RELAY_PROTOCOL_VERSION, 10)))
    body = await client.receive_body()
    assert body is not None
    welcome = decode_relay_frame(body)
    assert isinstance(welcome, Welcome)
    return client, welcome.challenge, welcome.relay_name


async def test_replayed_or_misdirected_auth_signature_fails() -> None:
    alice = make_user("alice")
    device = alice.devices[1]
    async with running_relay(relay_config(name="relay-a")) as port:
        await register(port, alice, expected_relay_name="relay-a")
        first, challenge, name = await raw_hello(port)
        assert name == "relay-a"
        signature = sign_auth(device.identity, name, challenge, "alice", 1)
        await first.send_body(encode_body(Auth(1, "alice", 1, signature)))
        assert decode_relay_frame(await first.receive_body() or b"") == Ok(1)
        # The same signature on a new connection (a new challenge) is refused...
        second, challenge2, _ = await raw_hello(port)
        assert challenge2 != challenge
        await second.send_body(encode_body(Auth(1, "alice", 1, signature)))
        refusal = decode_relay_frame(await second.receive_body() or b"")
        assert isinstance(refusal, ErrorFrame) and refusal.code == "AUTH_FAILED"
        assert await second.receive_body() is None  # closed
        # ...as is one made for another relay's name.
        third, challenge3, _ = await raw_hello(port)
        other = sign_auth(device.identity, "relay-b", challenge3, "alice", 1)
        await third.send_body(encode_body(Auth(2, "alice", 1, other)))
        refusal = decode_relay_frame(await third.receive_body() or b"")
        assert isinstance(refusal, ErrorFrame) and refusal.code == "AUTH_FAILED"
        for client in (first, second, third):
            await client.stream.aclose()


async def test_new_connection_supersedes_the_old_one() -> None:
    bob = make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, bob)
        async with connected(port, bob.devices[1]) as old:
            assert await envelopes_until_empty(old) == []
            async with connected(port, bob.devices[1]) as new:
                with pytest.raises(ConnectionClosed) as info:
                    with trio.fail_after(5):
                        while True:
                            await old.receive()
                assert isinstance(info.value.reason, Superseded)
                assert isinstance(old.close_reason, Superseded)
                await new.ping()


# ------------------------------------------------------------------ isolation and stamping


async def raw_authenticated(port: int, device: Any) -> RawClient:
    client, challenge, name = await raw_hello(port)
    signature = sign_auth(device.identity, name, challenge, device.user_id, device.device_id)
    await client.send_body(encode_body(Auth(1, device.user_id, device.device_id, signature)))
    assert decode_relay_frame(await client.receive_body() or b"") == Ok(1)
    return client


async def test_sender_is_stamped_by_the_relay() -> None:
    alice, bob = make_user("alice", [1, 2]), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[2]) as sender:
            await sender.send_direct("bob", [(1, b"hi")])
        # SEND frames have no sender field; one that tries to carry one is malformed.
        raw = await raw_authenticated(port, alice.devices[1])
        forged = pack([FrameType.SEND_DIRECT, 5, "bob", [[1, b"forged"]], False, "mallory", 9])
        await raw.send_body(forged)
        with trio.fail_after(5):
            while not isinstance(
                reply := decode_relay_frame(await raw.receive_body() or b""), ErrorFrame
            ):
                pass
        assert (reply.request_id, reply.code) == (5, "BAD_FRAME")
        await raw.stream.aclose()
        async with connected(port, bob.devices[1]) as receiver:
            (envelope,) = await envelopes_until_empty(receiver)
            assert (envelope.sender_user, envelope.sender_device) == ("alice", 2)
            assert envelope.kind == EnvelopeKind.DIRECT and envelope.payload == b"hi"


async def test_a_connection_reads_and_deletes_only_its_own_mail() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"for bob")])
            assert await envelopes_until_empty(sender) == []  # alice's mailbox is empty
        async with connected(port, bob.devices[1]) as receiver:
            envelope = await next_envelope(receiver)
        async with connected(port, alice.devices[1]) as other:
            await other.ack(envelope.guid)  # accepted, but it is not alice's envelope
        async with connected(port, bob.devices[1]) as receiver:
            assert [e.guid for e in await envelopes_until_empty(receiver)] == [envelope.guid]


async def test_prekeys_of_another_device_are_refused() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as connection:
            # Keys signed by bob's device identity do not verify as alice's.
            with pytest.raises(PreKeysRejected) as info:
                await connection.upload_prekeys(
                    **make_prekeys(bob.devices[1], one_time=1, one_time_kem=1)
                )
            assert info.value.cause == "BAD_SIGNATURE"
            # Nor may alice publish bob's (validly signed, newer) device list.
            bob.add_device(2)
            with pytest.raises(Forbidden):
                await connection.upload_device_list(bob.signed_list())
            with pytest.raises(NoPreKeys):
                await connection.fetch_bundle("bob", 1)


@pytest.mark.parametrize("swapped", ["signed_prekey", "last_resort_kem", "one_time_kem"])
async def test_a_prekey_a_proxy_swaps_into_an_upload_is_refused(swapped: str) -> None:
    """A hostile proxy between alice's device and the relay swaps one key of her upload
    for one of its own: every signature is checked, not only the first, and the relay
    stores nothing of the upload (an initiator would refuse such a bundle)."""
    alice, mallory = make_user("alice"), make_user("mallory")
    genuine = make_prekeys(alice.devices[1], one_time=1, one_time_kem=1)
    theirs = make_prekeys(mallory.devices[1], one_time=1, one_time_kem=1)
    async with running_relay(relay_config()) as port:
        await register(port, alice)
        async with connected(port, alice.devices[1]) as connection:
            with pytest.raises(PreKeysRejected) as info:
                await connection.upload_prekeys(**{**genuine, swapped: theirs[swapped]})
            assert info.value.cause == "BAD_SIGNATURE"
            assert await connection.upload_prekeys() == PreKeyCounts(0, 0)
            with pytest.raises(NoPreKeys):
                await connection.fetch_bundle("alice", 1)
            await connection.upload_prekeys(**genuine)
            await connection.fetch_bundle("alice", 1)


# Canonical u-coordinates of small order (libsodium's blocklist): every X25519 with
# them is all zero, so an initiator refuses the bundle (NON_CONTRIBUTORY).
LOW_ORDER_KEYS = [
    bytes.fromhex(u)
    for u in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
]


@pytest.mark.parametrize("low_order", LOW_ORDER_KEYS, ids=lambda key: key[:2].hex())
async def test_low_order_prekeys_are_refused_at_upload(low_order: bytes) -> None:
    """A signed or one-time prekey of small order, validly signed by the device: the
    relay refuses it instead of handing it out to initiators who must refuse it."""
    bob = make_user("bob")
    device = bob.devices[1]
    keys = make_prekeys(device, one_time=1, one_time_kem=1)
    signature = device.identity.sign(encode_x25519(low_order))
    low_spk = SignedPreKeyPublic(keys["signed_prekey"].key_id, low_order, signature)
    async with running_relay(relay_config()) as port:
        await register(port, bob)
        async with connected(port, device) as owner:
            for upload in (
                {**keys, "signed_prekey": low_spk},
                {**keys, "one_time": [OneTimePreKeyPublic(9, low_order)]},
            ):
                with pytest.raises(PreKeysRejected) as info:
                    await owner.upload_prekeys(**upload)
                assert info.value.cause == "INVALID_KEY"
            assert await owner.upload_prekeys() == PreKeyCounts(0, 0)
            with pytest.raises(NoPreKeys):  # nothing of either upload was stored
                await owner.fetch_bundle("bob", 1)


# ------------------------------------------------------------------ delivery


async def test_live_delivery_ack_and_redelivery_of_unacknowledged() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, bob.devices[1]) as receiver:
            assert await envelopes_until_empty(receiver) == []
            async with connected(port, alice.devices[1]) as sender:
                ts = (await sender.send_direct("bob", [(1, b"one")])).server_ts
                first = await next_envelope(receiver)
                await sender.send_direct("bob", [(1, b"two")])
                second = await next_envelope(receiver)
            assert (first.payload, first.server_ts, len(first.guid)) == (b"one", ts, 16)
            await receiver.ack(first.guid)
        async with connected(port, bob.devices[1]) as receiver:
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"two"]
            await receiver.ack(second.guid)
        async with connected(port, bob.devices[1]) as receiver:
            assert await envelopes_until_empty(receiver) == []


async def test_offline_mail_arrives_in_order_then_queue_empty() -> None:
    alice, bob = make_user("alice", [1, 2]), make_user("bob")
    async with running_relay(relay_config(max_in_flight=3)) as port:
        await register(port, alice, bob)
        async with (
            connected(port, alice.devices[1]) as one,
            connected(port, alice.devices[2]) as two,
        ):
            for index in range(8):
                await (one if index % 2 else two).send_direct("bob", [(1, bytes([index]))])
        async with connected(port, bob.devices[1]) as receiver:
            got = await envelopes_until_empty(receiver, acknowledge=True)
            assert [e.payload for e in got] == [bytes([i]) for i in range(8)]


async def queue_for_bob(port: int, sender: User, count: int) -> None:
    """``count`` one-byte messages 0, 1, ... from ``sender`` to bob's device 1."""
    async with connected(port, sender.devices[1]) as connection:
        for index in range(count):
            await connection.send_direct("bob", [(1, bytes([index]))])


async def test_in_flight_window_waits_for_acknowledgements() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config(max_in_flight=2)) as port:
        await register(port, alice, bob)
        await queue_for_bob(port, alice, 4)
        async with connected(port, bob.devices[1]) as receiver:
            first, second = await next_envelope(receiver), await next_envelope(receiver)
            with trio.move_on_after(0.3):
                await receiver.receive()
                pytest.fail("pushed beyond the in-flight window")
            await receiver.ack(first.guid)
            third = await next_envelope(receiver)
            assert third.payload == b"\x02"
            await receiver.ack(second.guid)
            await receiver.ack(third.guid)
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"\x03"]


async def test_one_ack_deletes_a_batch_and_frees_the_window() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config(max_in_flight=3)) as port:
        await register(port, alice, bob)
        await queue_for_bob(port, alice, 7)
        async with connected(port, bob.devices[1]) as receiver:
            got: list[bytes] = []
            with trio.fail_after(5):
                while len(got) < 7:
                    batch = [i for i in await receiver.receive_batch() if isinstance(i, Envelope)]
                    if not batch:
                        continue
                    assert len(batch) <= 3  # the window
                    got += [envelope.payload for envelope in batch]
                    await receiver.ack(*(envelope.guid for envelope in batch))
            assert got == [bytes([i]) for i in range(7)]
            with pytest.raises(InvalidArgument):
                await receiver.ack()
            # More guids than one ACK may name go in several (gone ones are fine).
            await receiver.ack(*(bytes([i]) * 16 for i in range(2 * MAX_IN_FLIGHT + 1)))
        async with connected(port, bob.devices[1]) as receiver:
            assert await envelopes_until_empty(receiver) == []


async def test_live_mail_of_concurrent_senders_arrives_once_and_in_order() -> None:
    # A window of 3: mail committed while the receiver is busy outgrows what
    # the relay keeps for it, so pushes alternate between mail handed over at
    # commit and mailbox reads.
    senders = [make_user(f"sender{i}") for i in range(4)]
    bob = make_user("bob")
    async with running_relay(relay_config(max_in_flight=3)) as port:
        await register(port, bob, *senders)
        async with connected(port, bob.devices[1]) as receiver:
            assert await envelopes_until_empty(receiver) == []
            got: list[bytes] = []

            async def send_all(sender: User) -> None:
                async with connected(port, sender.devices[1]) as connection:
                    for seq in range(30):
                        await connection.send_direct(
                            "bob", [(1, f"{sender.user_id}:{seq}".encode())]
                        )

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for sender in senders:
                        nursery.start_soon(send_all, sender)
                    while len(got) < 120:
                        batch = [
                            i for i in await receiver.receive_batch() if isinstance(i, Envelope)
                        ]
                        got += [envelope.payload for envelope in batch]
                        if batch:
                            await receiver.ack(*(envelope.guid for envelope in batch))
            for sender in senders:
                mine = [p for p in got if p.startswith(f"{sender.user_id}:".encode())]
                assert mine == [f"{sender.user_id}:{seq}".encode() for seq in range(30)]
            with trio.move_on_after(0.3):
                await receiver.receive()
                pytest.fail("an envelope came twice")


async def test_an_envelope_handed_over_during_a_read_that_found_it_is_pushed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bob's mailbox read starts; alice's send to him commits before it runs and is
    handed to his connection (its report comes first, as in one writer batch), then
    the epoch moves on (a send at a later time) before the read runs. The read finds
    the envelope in the older epoch and nothing in the newest: the connection has the
    newest epoch up to seq 0 (MailboxRead.newest_epoch), yet the envelope handed over
    is one the read had, and is not pushed again."""
    reading, go = trio.Event(), trio.Event()
    armed = [False]
    original = SqliteStorage.pending

    async def held(self: SqliteStorage, user_id: str, *args: Any, **kwargs: Any) -> Any:
        if armed[0] and user_id == "bob":
            armed[0] = False
            reading.set()
            await go.wait()
        return await original(self, user_id, *args, **kwargs)

    monkeypatch.setattr(SqliteStorage, "pending", held)
    now = [wall_clock_ms()]
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    fast = RateLimit(10_000, 10_000)
    config = relay_config(
        clock=lambda: now[0],
        retention_seconds=30,  # epochs of 1 s
        max_in_flight=2,
        send_rate=fast,
        frame_rate=fast,
    )
    async with running_relay(config) as port:
        await register(port, alice, bob, carol)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"first")])
            await sender.send_direct("bob", [(1, b"second")])
            async with connected(port, bob.devices[1]) as receiver:
                # The first read fills the window: the mailbox is read again after the ACK.
                backlog = [await next_envelope(receiver) for _ in range(2)]
                assert [e.payload for e in backlog] == [b"first", b"second"]
                armed[0] = True
                await receiver.ack(*(e.guid for e in backlog))
                with trio.fail_after(10):
                    await reading.wait()
                await sender.send_direct("bob", [(1, b"third")])  # handed over, then read
                now[0] += 2_000
                await sender.send_direct("carol", [(1, b"later")])  # the epoch moves on
                go.set()
                third = await next_envelope(receiver)
                await receiver.ack(third.guid)
                await sender.send_direct("bob", [(1, b"fourth")])
                fourth = await next_envelope(receiver)
                assert [third.payload, fourth.payload] == [b"third", b"fourth"]


async def test_own_other_devices_are_addressed_like_any_user() -> None:
    alice = make_user("alice", [1, 2, 3])
    async with running_relay(relay_config()) as port:
        await register(port, alice)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("alice", [(2, b"sync 2"), (3, b"sync 3")])
            with pytest.raises(DeviceListMismatch) as info:
                await sender.send_direct("alice", [(1, b"x"), (2, b"y"), (3, b"z")])
            assert info.value.mismatches[0].unknown == (1,)  # never oneself
        async with connected(port, alice.devices[3]) as receiver:
            envelope = await next_envelope(receiver)
            assert (envelope.payload, envelope.sender_device) == (b"sync 3", 1)


# ------------------------------------------------------------------ the device directory


async def test_device_list_mismatch_returns_the_current_list() -> None:
    alice, bob, carol = make_user("alice"), make_user("bob", [1, 2]), make_user("carol", [4])
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob, carol)
        async with connected(port, alice.devices[1]) as sender:
            with pytest.raises(DeviceListMismatch) as info:
                await sender.send_direct("bob", [(1, b"x"), (3, b"y")])
            (mismatch,) = info.value.mismatches
            assert (mismatch.user_id, mismatch.missing, mismatch.unknown) == ("bob", (2,), (3,))
            current = SignedDeviceList.decode(mismatch.signed_device_list)
            assert current.device_list.device_ids == (1, 2)
            with pytest.raises(DeviceListMismatch) as info:
                await sender.send_group(b"g", [("bob", 1), ("carol", 5)])
            assert [(m.user_id, m.missing, m.unknown) for m in info.value.mismatches] == [
                ("bob", (2,), ()),
                ("carol", (4,), (5,)),
            ]
            with pytest.raises(UnknownUser) as unknown:
                await sender.send_group(b"g", [("bob", 1), ("bob", 2), ("zed", 1)])
            assert unknown.value.user_id == "zed"
            # Nothing of the refused sends was stored.
            await sender.send_direct("bob", [(1, b"ok 1"), (2, b"ok 2")])
        async with connected(port, bob.devices[2]) as receiver:
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"ok 2"]


async def test_removing_a_device_wipes_its_mail_and_closes_it() -> None:
    alice, bob = make_user("alice"), make_user("bob", [1, 2])
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"m1"), (2, b"m2")])
        old_key = bob.devices[2].identity
        async with connected(port, bob.devices[2]) as removed:
            assert len(await envelopes_until_empty(removed)) == 1
            async with connected(port, bob.devices[1]) as primary:
                bob.remove_device(2)
                await primary.upload_device_list(bob.signed_list())
                with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                    while True:
                        await removed.receive()
                assert isinstance(info.value.reason, DeviceRemoved)
                # Replays of older lists are stale.
                bob.counter -= 1
                with pytest.raises(DeviceListRejected) as rejected:
                    await primary.upload_device_list(bob.signed_list())
                assert rejected.value.cause == "STALE_CHANGE"
                bob.counter += 2
                bob.identity = make_user("mallory").identity
                with pytest.raises(DeviceListRejected) as rejected:
                    await primary.upload_device_list(bob.signed_list())
                assert rejected.value.cause == "UNTRUSTED_IDENTITY"
        async with connected(port) as connection:
            with pytest.raises(AuthenticationFailed):
                await connection.authenticate("bob", 2, old_key)
        async with connected(port, alice.devices[1]) as sender:
            with pytest.raises(DeviceListMismatch):
                await sender.send_direct("bob", [(1, b"x"), (2, b"y")])


async def test_a_device_removing_itself_is_closed_after_the_reply() -> None:
    bob = make_user("bob", [1, 2])
    async with running_relay(relay_config()) as port:
        await register(port, bob)
        async with connected(port, bob.devices[2]) as leaving:
            bob.remove_device(2)
            await leaving.upload_device_list(bob.signed_list())
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                while True:
                    await leaving.receive()
            assert isinstance(info.value.reason, DeviceRemoved)


async def test_re_created_device_gets_no_old_mail() -> None:
    alice, bob = make_user("alice"), make_user("bob", [1, 2])
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"m1"), (2, b"old mail for 2")])
        async with connected(port, bob.devices[1]) as primary:
            bob.devices.pop(2)
            new_device = bob.add_device(2, label="bob/2 reinstalled")
            await primary.upload_device_list(bob.signed_list())
        async with connected(port, new_device) as receiver:
            assert await envelopes_until_empty(receiver) == []


# ------------------------------------------------------------------ prekeys


async def test_bundle_has_the_exact_layout_and_verifies() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        keys = make_prekeys(bob.devices[1], one_time=1, one_time_kem=1)
        async with connected(port, bob.devices[1]) as owner:
            assert await owner.upload_prekeys(**keys) == PreKeyCounts(1, 1)
            with pytest.raises(PreKeyIdInUse):
                await owner.upload_prekeys(one_time=keys["one_time"])
            assert await owner.upload_prekeys() == PreKeyCounts(1, 1)
        async with connected(port, alice.devices[1]) as fetcher:
            with pytest.raises(UnknownDevice):
                await fetcher.fetch_bundle("bob", 9)
            first = decode_bundle(await fetcher.fetch_bundle("bob", 1))
            second = decode_bundle(await fetcher.fetch_bundle("bob", 1))
    identity = bob.devices[1].identity.public.ed25519
    spk, opk, kem = keys["signed_prekey"], keys["one_time"][0], keys["one_time_kem"][0]
    assert first == [
        PROTOCOL_VERSION,
        "bob",
        1,
        identity,
        [spk.key_id, spk.public, spk.signature],
        [opk.key_id, opk.public],
        [kem.key_id, kem.public, kem.signature],
        False,
    ]
    last_resort = keys["last_resort_kem"]
    assert second[5] is None
    assert second[6:] == [[last_resort.key_id, last_resort.public, last_resort.signature], True]
    verify_prekey_signature(identity, encode_x25519(first[4][1]), first[4][2])
    verify_prekey_signature(identity, encode_mlkem768(second[6][1]), second[6][2])


async def test_concurrent_fetches_never_share_a_one_time_prekey() -> None:
    bob = make_user("bob")
    fetchers = make_user("alice", range(1, 6))
    config = relay_config(bundle_fetch_rate=RateLimit(100, 1.0))
    async with running_relay(config) as port:
        await register(port, bob, fetchers)
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=20, one_time_kem=20))
        bundles: list[list[Any]] = []

        async def fetch_ten(device_id: int) -> None:
            async with (
                connected(port, fetchers.devices[device_id]) as connection,
                trio.open_nursery() as nursery,
            ):
                for _ in range(10):
                    nursery.start_soon(fetch_one, connection)

        async def fetch_one(connection: RelayConnection) -> None:
            bundles.append(decode_bundle(await connection.fetch_bundle("bob", 1)))

        async with trio.open_nursery() as nursery:
            for device_id in fetchers.devices:
                nursery.start_soon(fetch_ten, device_id)
    assert len(bundles) == 50
    one_time = [b[5][0] for b in bundles if b[5] is not None]
    assert sorted(one_time) == list(range(1, 21))
    kems = [b[6][0] for b in bundles if not b[7]]
    assert sorted(kems) == list(range(1, 21))
    assert [b[6][0] for b in bundles if b[7]] == [1_000_000] * 30


async def test_owner_is_told_when_prekeys_run_low() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config(prekey_low_threshold=3)) as port:
        await register(port, alice, bob)
        async with connected(port, bob.devices[1]) as owner:
            assert await owner.receive() == PreKeysLow(0, 0)  # nothing uploaded yet
            assert await owner.receive() == QueueEmpty()
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=4, one_time_kem=4))
            async with connected(port, alice.devices[1]) as fetcher:
                await fetcher.fetch_bundle("bob", 1)  # 3 left: not below 3
                await fetcher.fetch_bundle("bob", 1)  # 2 left
                with trio.fail_after(5):
                    assert await owner.receive() == PreKeysLow(2, 2)
                await fetcher.fetch_bundle("bob", 1)  # told once until the next upload
                with trio.move_on_after(0.2):
                    pytest.fail(f"unexpected {await owner.receive()}")
        async with connected(port, bob.devices[1]) as owner:
            assert await owner.receive() == PreKeysLow(1, 1)  # told again on connect


async def test_bundle_fetches_are_rate_limited_per_device_pair() -> None:
    alice, bob, carol = make_user("alice", [1, 2]), make_user("bob"), make_user("carol")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob, carol)
        for user in (bob, carol):
            async with connected(port, user.devices[1]) as owner:
                await owner.upload_prekeys(
                    **make_prekeys(user.devices[1], one_time=0, one_time_kem=0)
                )
        async with connected(port, alice.devices[1]) as fetcher:
            for _ in range(6):
                await fetcher.fetch_bundle("bob", 1)
            with pytest.raises(RateLimited) as info:
                await fetcher.fetch_bundle("bob", 1)
            assert 590_000 <= info.value.retry_after_ms <= 600_000
            await fetcher.fetch_bundle("carol", 1)  # another target
        async with connected(port, alice.devices[2]) as other:
            await other.fetch_bundle("bob", 1)  # another requester


async def test_sends_are_rate_limited_per_connection() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config(send_rate=RateLimit(3, 0.01))) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            for _ in range(3):
                await sender.send_direct("bob", [(1, b"x")])
            with pytest.raises(RateLimited):
                await sender.send_group(b"y", [("bob", 1)])


async def test_a_refused_request_spends_no_rate_limit_token() -> None:
    # Refused sends and bundle fetches change nothing, their tokens included.
    alice, bob = make_user("alice"), make_user("bob", [1, 2])
    async with running_relay(relay_config(send_rate=RateLimit(2, 0.001))) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            for _ in range(5):
                with pytest.raises(DeviceListMismatch):
                    await sender.send_direct("bob", [(1, b"bob/2 missing")])
                with pytest.raises(UnknownUser):
                    await sender.send_group(b"x", [("nobody", 1)])
            await sender.send_direct("bob", [(1, b"1"), (2, b"1")])
            await sender.send_direct("bob", [(1, b"2"), (2, b"2")])
            with pytest.raises(RateLimited):
                await sender.send_direct("bob", [(1, b"3"), (2, b"3")])
            for _ in range(int(BUNDLE_FETCH_CAPACITY) + 1):  # bob has no prekeys yet
                with pytest.raises(NoPreKeys):
                    await sender.fetch_bundle("bob", 1)
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=0, one_time_kem=0))
        async with connected(port, alice.devices[1]) as sender:
            for _ in range(int(BUNDLE_FETCH_CAPACITY)):
                await sender.fetch_bundle("bob", 1)
            with pytest.raises(RateLimited):
                await sender.fetch_bundle("bob", 1)


async def test_a_full_mailbox_delays_only_what_is_addressed_to_it() -> None:
    alice, bob, carol = make_user("alice"), make_user("bob", [1, 2]), make_user("carol")
    async with running_relay(relay_config(max_mailbox_size=2)) as port:
        await register(port, alice, bob, carol)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_group(b"1", [("bob", 1)], resend=True)
            await sender.send_group(b"2", [("bob", 1)], resend=True)
            # bob/1 is full: the others named get the send, and the answer names bob/1.
            group = await sender.send_group(b"3", [("carol", 1), ("bob", 1), ("bob", 2)])
            assert group.mailbox_full == (("bob", 1),)
            direct = await sender.send_direct("bob", [(1, b"4"), (2, b"5")])
            assert direct.mailbox_full == (("bob", 1),) and direct.server_ts > 0
            # Every named mailbox full: nothing is stored, MAILBOX_FULL names them all.
            with pytest.raises(MailboxFull) as info:
                await sender.send_direct("bob", [(1, b"6")], resend=True)
            assert info.value.devices == (("bob", 1),)
        async with connected(port, carol.devices[1]) as receiver:
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"3"]
        async with connected(port, bob.devices[2]) as receiver:
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"3", b"5"]
        async with connected(port, bob.devices[1]) as receiver:
            queued = await envelopes_until_empty(receiver)
            assert [e.payload for e in queued] == [b"1", b"2"]
            await receiver.ack(*(e.guid for e in queued))
        async with connected(port, alice.devices[1]) as sender:
            # The refused ones again, to bob/1 alone once there is room (the
            # deletion commits after the OK to the ACK, spec 7.8).
            with trio.fail_after(5):
                while True:
                    try:
                        retry = await sender.send_group(b"3", [("bob", 1)], resend=True)
                        break
                    except MailboxFull:
                        await trio.sleep(0.01)
            assert retry.mailbox_full == ()
            retry = await sender.send_direct("bob", [(1, b"4")], resend=True)
            assert retry.mailbox_full == ()
        async with connected(port, bob.devices[1]) as receiver:
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"3", b"4"]


async def test_a_group_change_is_refused_whole_by_one_full_mailbox() -> None:
    # Every device must meet a change at one place in the relay's order (spec 12.4).
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    async with running_relay(relay_config(max_mailbox_size=1)) as port:
        await register(port, alice, bob, carol)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"fills bob's mailbox")])
            with pytest.raises(MailboxFull) as info:
                await sender.send_change(bytes(16), [("bob", [(1, b"c")]), ("carol", [(1, b"c")])])
            assert info.value.devices == (("bob", 1),)
        async with connected(port, carol.devices[1]) as receiver:
            assert await envelopes_until_empty(receiver) == []


async def test_a_resend_names_current_devices_only() -> None:
    alice, bob = make_user("alice"), make_user("bob", [1, 2])
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            # Without resend, every current device must be named (spec 7.8, step 4).
            with pytest.raises(DeviceListMismatch) as info:
                await sender.send_direct("bob", [(2, b"x")])
            assert info.value.mismatches[0].missing == (1,)
            # A resend may name a subset, but no device outside the list.
            with pytest.raises(DeviceListMismatch) as info:
                await sender.send_direct("bob", [(2, b"x"), (3, b"y")], resend=True)
            assert (info.value.mismatches[0].missing, info.value.mismatches[0].unknown) == (
                (),
                (3,),
            )
            with pytest.raises(DeviceListMismatch):
                await sender.send_group(b"x", [("alice", 1)], resend=True)  # oneself
            assert (await sender.send_direct("bob", [(2, b"x")], resend=True)).mailbox_full == ()


# ------------------------------------------------------------------ group fan-out and storage


async def test_group_fan_out_stores_the_payload_once(tmp_path: Path) -> None:
    alice, bob, carol = make_user("alice", [1, 2]), make_user("bob"), make_user("carol", [1, 2])
    recipients = [("alice", 2), ("bob", 1), ("carol", 1), ("carol", 2)]
    async with running_relay(relay_config(tmp_path)) as port:
        await register(port, alice, bob, carol)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_group(b"the group ciphertext", recipients)
        with sqlite3.connect(tmp_path / "relay.db") as db:
            assert db.execute("SELECT COUNT(*) FROM payloads").fetchone() == (1,)
            assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (4,)
        for user_id, device_id in recipients:
            user = {"alice": alice, "bob": bob, "carol": carol}[user_id]
            async with connected(port, user.devices[device_id]) as receiver:
                envelope = await next_envelope(receiver)
                assert envelope.kind == EnvelopeKind.GROUP
                assert envelope.payload == b"the group ciphertext"
                assert (envelope.sender_user, envelope.sender_device) == ("alice", 1)


async def test_a_change_reaches_every_device_and_its_receipt_our_own_mailbox() -> None:
    alice, bob, carol = make_user("alice", [1, 2]), make_user("bob", [1, 2]), make_user("carol")
    receipt = bytes(range(16))
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob, carol)
        async with connected(port, alice.devices[1]) as sender:
            assert await envelopes_until_empty(sender) == []
            messages = [
                ("alice", [(2, b"to alice 2")]),
                ("bob", [(1, b"to bob 1"), (2, b"to bob 2")]),
                ("carol", [(1, b"to carol 1")]),
            ]
            await sender.send_change(receipt, messages)
            own = await next_envelope(sender)
            assert (own.kind, own.payload) == (EnvelopeKind.RECEIPT, receipt)
            assert (own.sender_user, own.sender_device) == ("alice", 1)
            with pytest.raises(DeviceListMismatch) as info:  # every device of every user named
                await sender.send_change(receipt, [("bob", [(1, b"x")])])
            assert info.value.mismatches[0].missing == (2,)
            with pytest.raises(InvalidArgument):
                await sender.send_change(receipt[:15], [])
        for user, device_id, payload in [
            (alice, 2, b"to alice 2"),
            (bob, 1, b"to bob 1"),
            (bob, 2, b"to bob 2"),
            (carol, 1, b"to carol 1"),
        ]:
            async with connected(port, user.devices[device_id]) as receiver:
                envelopes = await envelopes_until_empty(receiver)
                assert [(e.kind, e.payload) for e in envelopes] == [(EnvelopeKind.DIRECT, payload)]


async def test_concurrent_changes_reach_every_device_in_one_order() -> None:
    # Two admins change a group at once, each to the other and to bob and carol: every
    # device meets the two changes in the same order, and each author its own receipt at
    # its change's place (spec 7.8, Order).
    alice, bob, carol, dave = (make_user(u) for u in ("alice", "bob", "carol", "dave"))
    authors = {"alice": alice, "dave": dave}
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob, carol, dave)

        async def change(author: str, rounds: int) -> None:
            others = [u for u in ("alice", "bob", "carol", "dave") if u != author]
            async with connected(port, authors[author].devices[1]) as connection:
                for n in range(rounds):
                    tag = f"{author}:{n}".encode()
                    receipt = tag.ljust(16, b".")
                    await connection.send_change(receipt, [(u, [(1, tag)]) for u in others])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(change, "alice", 20)
            nursery.start_soon(change, "dave", 20)
        orders = {}
        for user in (alice, bob, carol, dave):
            async with connected(port, user.devices[1]) as receiver:
                envelopes = await envelopes_until_empty(receiver)
                orders[user.user_id] = [e.payload.rstrip(b".") for e in envelopes]
        assert len(orders["bob"]) == 40
        assert orders["carol"] == orders["bob"]
        # An author meets its receipts where the others meet its changes.
        assert orders["alice"] == orders["bob"] == orders["dave"]


async def test_a_send_to_no_device_stores_nothing(tmp_path: Path) -> None:
    # A hostile client sends to no device at all: the relay accepts (a group of one member
    # with one device sends so), but a payload no delivery refers to would never be deleted,
    # neither by an acknowledgement nor by the retention sweep: disk filled for good.
    alice = make_user("alice")
    marker = b"NOBODY-READS-THIS-" + bytes(range(64))
    async with running_relay(relay_config(tmp_path)) as port:
        await register(port, alice)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_group(marker, [])
            await sender.send_direct("alice", [])  # one's own user, no other device
        with sqlite3.connect(tmp_path / "relay.db") as db:
            assert db.execute("SELECT COUNT(*) FROM payloads").fetchone() == (0,)
            assert db.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,)
    assert not any(marker in f.read_bytes() for f in tmp_path.glob("relay.db*"))


async def test_queued_mail_survives_a_relay_restart(tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    config = relay_config(tmp_path)
    async with running_relay(config) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"before restart")])
    async with running_relay(config) as port, connected(port, bob.devices[1]) as receiver:
        assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"before restart"]


async def test_accepted_means_committed_to_disk(tmp_path: Path) -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config(tmp_path)) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"durable")])
            # The files as a crash right after ACCEPTED would leave them.
            crash = copy_at_one_moment(tmp_path / "relay.db", tmp_path / "crash")
    recovered = SqliteDatabase(str(crash))
    pending = recovered.pending("bob", 1, after_seq=0, limit=10, now=0)
    assert [q.envelope.payload for q in pending] == [b"durable"]
    recovered.close()


# ------------------------------------------------------------------ retention


async def test_expired_mail_is_never_delivered_is_swept_with_its_epoch_and_is_told(
    tmp_path: Path,
) -> None:
    now = [1_000_000]
    alice, bob = make_user("alice"), make_user("bob")
    # Retention 1 h: epochs of 50 s (EPOCHS_PER_RETENTION), the first from 1,000,000 ms on.
    config = relay_config(
        tmp_path, clock=lambda: now[0], retention_seconds=3600, sweep_interval=0.05
    )
    async with running_relay(config) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"old")])
            now[0] += 3_599_000
            await sender.send_direct("bob", [(1, b"newer")])
            now[0] += 1_000  # "old" is exactly 3600 s old: expired, never pushed again
        async with connected(port, bob.devices[1]) as receiver:
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"newer"]
        with sqlite3.connect(tmp_path / "relay.db") as db:
            assert db.execute("SELECT COUNT(*) FROM payloads").fetchone() == (2,)
        now[0] = 1_050_000 + 3_600_000  # its epoch leaves the window: deleted, keys gone
        with trio.fail_after(5):
            while True:
                with sqlite3.connect(tmp_path / "relay.db") as db:
                    if db.execute("SELECT COUNT(*) FROM payloads").fetchone() == (1,):
                        break
                await trio.sleep(0.02)
        async with connected(port, bob.devices[1]) as receiver:
            with trio.fail_after(5):
                assert await receiver.receive() == PreKeysLow(0, 0)  # none uploaded
                assert await receiver.receive() == MailExpired(1, 1_000_000, 1_000_000)
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"newer"]
        async with connected(port, bob.devices[1]) as receiver:  # told once
            assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"newer"]


async def test_expiry_is_checked_at_delivery_before_any_sweep() -> None:
    now = [5_000_000]
    alice, bob = make_user("alice"), make_user("bob")
    config = relay_config(clock=lambda: now[0], retention_seconds=60, sweep_interval=3600)
    async with running_relay(config) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"stale")])
        now[0] += 60_000
        async with connected(port, bob.devices[1]) as receiver:
            assert await envelopes_until_empty(receiver) == []


# ------------------------------------------------------------------ what the relay lets out


async def test_logs_contain_no_payloads_or_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    alice, bob = make_user("alice"), make_user("bob")
    marker = b"PAYLOAD-MARKER-\x00\x01\x02"
    keys = make_prekeys(bob.devices[1], one_time=2, one_time_kem=2)
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**keys)
            async with connected(port, alice.devices[1]) as sender:
                await sender.fetch_bundle("bob", 1)
                await sender.send_direct("bob", [(1, marker)])
                await sender.send_group(marker, [("bob", 1)])
                with pytest.raises(DeviceListMismatch):
                    await sender.send_direct("bob", [(2, marker)])
                # A malformed frame carrying the marker is refused (and not logged).
                await sender._stream.send_all(encode_frame(b"\x93\x12\x01" + marker))
                await sender.ping()
            for _ in range(2):
                await owner.ack((await next_envelope(owner)).guid)
    assert caplog.records, "the relay logged nothing: the check would be empty"
    text = caplog.text
    secrets_ = [marker, bob.devices[1].identity.public.ed25519, keys["signed_prekey"].public]
    secrets_ += [k.public for k in keys["one_time"]] + [keys["signed_prekey"].signature]
    secrets_ += [alice.devices[1].identity.seed, bob.identity.public.ed25519]
    for secret in secrets_:
        assert secret.hex() not in text
        assert repr(secret)[2:-1] not in text
        assert secret[:8].hex() not in text
    assert "PAYLOAD-MARKER" not in text


async def test_refused_logins_are_one_warning_a_minute_without_identities(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="hushchat.relay")
    alice, stranger = make_user("alice"), make_user("a-stranger")
    async with running_relay(relay_config()) as port:
        await register(port, alice)
        for attempt in range(20):  # a client retrying in a loop, refused every time
            device = stranger.devices[1] if attempt % 2 else alice.devices[1]
            key = stranger.devices[1].identity
            async with connected(port) as connection:
                with pytest.raises(AuthenticationFailed):
                    await connection.authenticate(device.user_id, device.device_id, key)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["refused a login: the signature does not verify"]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "refused the login of alice/1: the signature does not verify" in debug
    assert "refused the login of a-stranger/1: the user is not registered" in debug


def test_refused_login_warnings_count_what_they_leave_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = Relay(relay_config(), storage=None)  # type: ignore[arg-type]
    for now, reason in [(0.0, "a"), (1.0, "b"), (59.0, "c"), (60.0, "d"), (61.0, "e")]:
        relay.login_refused("alice", 1, reason, now=now)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "refused a login: a",
        "refused a login: d (2 more refused since the last report)",
    ]


def test_internal_errors_are_one_traceback_a_minute_per_request_type(
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = Relay(relay_config(), storage=None)  # type: ignore[arg-type]
    faults = [(0.0, "PING"), (1.0, "PING"), (2.0, "ACK"), (59.0, "PING"), (60.0, "PING")]
    for now, request in faults:
        try:
            raise RuntimeError("a fault")
        except RuntimeError:
            relay.internal_error(request, now=now)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "internal error handling PING",
        "internal error handling ACK",
        "internal error handling PING (2 more since the last report)",
    ]
    assert all(r.exc_info is not None for r in errors)  # each with its traceback


async def test_a_stranger_repeating_a_request_the_relay_fails_on_cannot_flood_its_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A request the relay fails on (here its storage raising what nothing expects): a
    client, not even authenticated, that registers again and again gets INTERNAL_ERROR
    each time, and the relay logs one traceback, not one a request."""

    async def failing(self: SqliteStorage, user_ids: Any) -> Any:
        raise RuntimeError("the storage fails on this request")

    # PostgresStorage inherits this method: the test fails the same call on either backend.
    monkeypatch.setattr(SqliteStorage, "device_lists", failing)
    caplog.set_level(logging.DEBUG, logger="hushchat.relay")
    stranger = make_user("stranger")
    async with running_relay(relay_config()) as port:
        for _ in range(20):
            async with connected(port) as connection:
                with pytest.raises(InternalError):
                    await connection.upload_device_list(stranger.signed_list())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["internal error handling PUBLISH_DEVICE_LIST"]


async def test_a_storage_outage_that_ends_every_connection_cannot_flood_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The database goes away (or fails on every mailbox read): each connected device's
    connection ends as its mailbox is read. One traceback for that kind of failure, not
    one per device: a relay holds thousands, and each reconnects and fails again."""
    users = [make_user(f"user{i}") for i in range(8)]
    caplog.set_level(logging.DEBUG, logger="hushchat.relay")
    async with running_relay(relay_config()) as port:
        await register(port, *users)

        async def failing(self: SqliteStorage, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the database is away")

        monkeypatch.setattr(SqliteStorage, "pending", failing)
        for user in users:
            with contextlib.suppress(ConnectionClosed):
                async with connected(port, user.devices[1]) as connection:
                    with trio.fail_after(10):
                        await connection.wait_closed()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["connection failed (RuntimeError)"], errors
    assert errors[0].exc_info is not None  # with its traceback


async def test_acknowledgements_the_storage_fails_to_store_cannot_flood_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every acknowledgement fails to be stored (the database away): one traceback a
    minute, not one per acknowledgement of every device."""
    alice, bob = make_user("alice"), make_user("bob")
    caplog.set_level(logging.DEBUG, logger="hushchat.relay")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            for index in range(6):
                await sender.send_direct("bob", [(1, b"%d" % index)])

        async def failing(self: SqliteStorage, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the database is away")

        monkeypatch.setattr(SqliteStorage, "acknowledge", failing)
        async with connected(port, bob.devices[1]) as receiver:
            for envelope in await envelopes_until_empty(receiver):
                await receiver.ack(envelope.guid)
            await receiver.ping()  # the relay has read every acknowledgement
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["acknowledgement not stored: the envelope will come again"], errors


async def test_a_user_id_containing_u0000_is_refused_as_malformed() -> None:
    """A stranger registers and authenticates as "a\\x00stranger", which a C program
    reads as "a" and PostgreSQL text cannot hold: the relay refuses it as malformed on
    either backend (not INTERNAL_ERROR on one and a stored list on the other), and a
    member cannot look that name up or send to it either."""
    stranger = "a\x00stranger"
    alice = make_user("alice")
    async with running_relay(relay_config()) as port:
        await register(port, alice)
        async with connected(port) as connection:
            with pytest.raises(DeviceListRejected) as rejected:
                await connection.upload_device_list(signed_list_naming(stranger))
            assert rejected.value.cause == "MALFORMED"
        client, challenge, name = await raw_hello(port)
        device = keypair(f"{stranger}/1")
        signature = sign_auth(device, name, challenge, stranger, 1)
        await client.send_body(pack([FrameType.AUTH, 1, stranger, 1, signature]))
        refusal = decode_relay_frame(await client.receive_body() or b"")
        assert isinstance(refusal, ErrorFrame)
        assert (refusal.request_id, refusal.code) == (1, "BAD_FRAME")
        await client.stream.aclose()
        member = await raw_authenticated(port, alice.devices[1])
        for request_id, frame in enumerate(
            [
                [FrameType.FETCH_DEVICE_LIST, stranger],
                [FrameType.FETCH_BUNDLE, stranger, 1],
                [FrameType.SEND_DIRECT, stranger, [[1, b"hi"]], False],
            ],
            start=2,
        ):
            await member.send_body(pack([frame[0], request_id, *frame[1:]]))
            with trio.fail_after(5):
                while not isinstance(
                    reply := decode_relay_frame(await member.receive_body() or b""), ErrorFrame
                ):
                    pass
            assert (reply.request_id, reply.code) == (request_id, "BAD_FRAME")
        await member.stream.aclose()


# ------------------------------------------------------------------ with the protocol core


async def test_pqxdh_session_through_the_relay() -> None:
    """Bundles the relay hands out decode as PreKeyBundle and start working sessions."""
    bob_account = Account.create(now=0, one_time_prekeys=2)
    alice_account = Account.create(now=0, one_time_prekeys=0)
    alice, bob = make_user("alice"), make_user("bob")
    alice.devices[1].identity = alice_account.identity
    bob.devices[1].identity = bob_account.identity
    alice_device = Party("alice", 1, alice.identity.public.ed25519)
    bob_device = Party("bob", 1, bob.identity.public.ed25519)
    upload = bob_account.prekey_upload()
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(
                signed_prekey=upload.signed_prekey,
                last_resort_kem=upload.last_resort_kem_prekey,
                one_time=upload.one_time_prekeys,
                one_time_kem=upload.one_time_kem_prekeys,
            )
        async with connected(port, alice.devices[1]) as sender:
            bundle = PreKeyBundle.decode(await sender.fetch_bundle("bob", 1))
            bundle.verify()
            assert bundle.one_time_prekey is not None and not bundle.kem_is_last_resort
            session = alice_account.create_outbound_session(
                bundle, local=alice_device, remote=bob_device, now=0
            )
            await sender.send_direct("bob", [(1, session.encrypt(b"hello through the relay"))])
        async with connected(port, bob.devices[1]) as receiver:
            envelope = await next_envelope(receiver)
            message = decode_message(envelope.payload)
            assert isinstance(message, PreKeyMessage)
            _, plaintext = bob_account.create_inbound_session(
                message, local=bob_device, remote=alice_device, now=0
            )
            assert plaintext == b"hello through the relay"
            await receiver.ack(envelope.guid)
