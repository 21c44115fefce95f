"""Real clients, a real relay, and a hostile proxy between them that acts as a lying relay.

tests/adversarial/test_malicious_relay.py drives ClientCores directly; here the same
attacks go over TCP through :class:`HostileRelay`, which decodes every frame
both ways and can drop an envelope (acknowledging it to the relay itself, so
the relay deletes it), duplicate it, hold it back and reorder it, replay it
(same or fresh guid, even after it was acknowledged), restamp its sender,
inject made-up envelopes, and rewrite the bundles and device lists the relay
serves. The clients are unmodified :class:`~hushchat.transport.client.client.Client`s with
their SQLite stores.

Each attack must be detected (an Undecryptable or IdentityChanged event, or a
refusal raised to the app) or be provably harmless: no plaintext reaches an
app altered or attributed to another sender, and no message reaches an app
twice. "Nothing more arrived" is checked with a sentinel message sent after
the attack: envelopes to one device are processed in order, so anything the
attack produced would come before it.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from hushchat.protocol.account import Account
from hushchat.protocol.client_core import (
    ENVELOPE_DIRECT,
    ENVELOPE_GROUP,
    Address,
    ClientCore,
    GroupUpdated,
    IdentityChanged,
    MessageReceived,
    Undecryptable,
)
from hushchat.protocol.consts import MAX_ONE_TIME_PREKEYS, PREKEY_BATCH_SIZE, PROTOCOL_VERSION
from hushchat.protocol.content import DeliveryReceipt, RetryRequest
from hushchat.protocol.devices import DeviceEntry, DeviceList, SignedDeviceList
from hushchat.protocol.encoding import pack
from hushchat.protocol.errors import (
    BadSignature,
    DuplicateDeviceKey,
    RemoteProtocolError,
    UntrustedIdentity,
)
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.protocol.primitives import SeededRandom
from hushchat.transport.client.client import (
    Client,
    ClientEvent,
    Connected,
    Disconnected,
    MessageSent,
    SendFailed,
    Status,
    open_client,
)
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import serve_relay
from hushchat.transport.wire.errors import DeviceListMismatch, DeviceMismatch
from hushchat.transport.wire.frames import (
    Accepted,
    Ack,
    Auth,
    BundleFrame,
    DeviceListFrame,
    EnvelopePush,
    ErrorFrame,
    FetchBundle,
    FetchDeviceList,
    Ok,
    PreKeyCountsFrame,
    PreKeysLow,
    RelayFrame,
    decode_relay_frame,
    decode_request,
    encode_body,
)
from hushchat.transport.wire.framing import FrameDecoder, encode_frame
from hushchat.transport.wire.limits import RECEIVE_CHUNK_SIZE
from hushchat.transport.wire.records import Envelope
from tests.support.misattribution import (
    MALLORY_5,
    Proof,
    consented,
    copied,
    forged,
    mallory_list,
    publish,
)
from tests.support.relay import connected

TIMEOUT = 20
# Request ids the proxy uses for its own requests upstream (their replies are swallowed).
PROXY_REQUEST_IDS = 0xFFFF_0000

EnvelopeHook = Callable[["Link", Envelope], Awaitable[list[Envelope]]]


class Link:
    """One client connection through the proxy, and the device it authenticated as."""

    def __init__(self, proxy: HostileRelay, client: trio.abc.Stream, upstream: trio.abc.Stream):
        self.proxy = proxy
        self.client, self.upstream = client, upstream
        self.to_client, self.to_relay = trio.StrictFIFOLock(), trio.StrictFIFOLock()
        self.address: Address | None = None
        self._auth: dict[int, Address] = {}
        self._lists: dict[int, str] = {}
        self._bundles: dict[int, Address] = {}
        self._own_ids: set[int] = set()
        self._next_id = PROXY_REQUEST_IDS

    async def close(self) -> None:
        """Cut the connection (the client reconnects)."""
        await trio.aclose_forcefully(self.client)

    async def push(self, envelope: Envelope) -> None:
        """Deliver an envelope to the client as if the relay had pushed it."""
        await self.push_frame(EnvelopePush(envelope))

    async def push_frame(self, frame: RelayFrame) -> None:
        """Send the client any frame as if the relay had sent it."""
        await self._send(self.client, self.to_client, encode_body(frame))

    async def delete_at_relay(self, guid: bytes) -> None:
        """Acknowledge an envelope upstream ourselves: the relay deletes it."""
        request_id, self._next_id = self._next_id, self._next_id + 1
        self._own_ids.add(request_id)
        await self._send(self.upstream, self.to_relay, encode_body(Ack(request_id, (guid,))))

    @staticmethod
    async def _send(stream: trio.abc.Stream, lock: trio.StrictFIFOLock, body: bytes) -> None:
        async with lock:
            await stream.send_all(encode_frame(body))

    async def client_to_relay(self) -> None:
        async for body in _bodies(self.client):
            self.proxy.wire.append(body)
            request = decode_request(body)
            if isinstance(request, Auth):
                self._auth[request.request_id] = Address(request.user_id, request.device_id)
            elif isinstance(request, FetchDeviceList):
                self._lists[request.request_id] = request.user_id
            elif isinstance(request, FetchBundle):
                address = Address(request.user_id, request.device_id)
                self._bundles[request.request_id] = address
            await self._send(self.upstream, self.to_relay, body)

    async def relay_to_client(self) -> None:
        async for body in _bodies(self.upstream):
            self.proxy.wire.append(body)
            frame = decode_relay_frame(body)
            for out in await self._tamper(frame):
                await self._send(self.client, self.to_client, encode_body(out))

    async def _tamper(self, frame: RelayFrame) -> list[RelayFrame]:
        proxy = self.proxy
        request_id = getattr(frame, "request_id", None)
        if request_id in self._own_ids:
            return []  # the reply to our own ACK
        if isinstance(frame, Ok) and request_id in self._auth:
            self.address = self._auth[request_id]
            proxy.links[self.address] = self
        if isinstance(frame, EnvelopePush):
            assert self.address is not None
            proxy.seen.append((self.address, frame.envelope))
            return [EnvelopePush(e) for e in await proxy.envelope_hook(self, frame.envelope)]
        if isinstance(frame, BundleFrame) and request_id in self._bundles:
            bundle = proxy.bundle_hook(self._bundles[frame.request_id], frame.bundle)
            return [dataclasses.replace(frame, bundle=bundle)]
        if isinstance(frame, DeviceListFrame) and request_id in self._lists:
            signed = proxy.device_list_hook(self._lists[frame.request_id], frame.signed_device_list)
            return [dataclasses.replace(frame, signed_device_list=signed)]
        return proxy.frame_hook(frame)


async def _bodies(stream: trio.abc.Stream) -> AsyncIterator[bytes]:
    decoder = FrameDecoder()
    while True:
        while (body := decoder.next_frame()) is not None:
            yield body
        data = await stream.receive_some(RECEIVE_CHUNK_SIZE)
        if not data:
            return
        decoder.receive_data(data)


async def _pass_envelope(link: Link, envelope: Envelope) -> list[Envelope]:
    return [envelope]


class HostileRelay:
    """A TCP proxy in front of a relay that tampers with what flows through it."""

    def __init__(self, relay_port: int) -> None:
        self.relay_port = relay_port
        self.port = 0
        self.links: dict[Address, Link] = {}
        self.seen: list[tuple[Address, Envelope]] = []  # (recipient, envelope) as pushed
        self.wire: list[bytes] = []  # every frame body, both ways, as the relay sees it
        self.envelope_hook: EnvelopeHook = _pass_envelope
        self.bundle_hook: Callable[[Address, bytes], bytes] = lambda address, data: data
        self.device_list_hook: Callable[[str, bytes], bytes] = lambda user_id, data: data
        # Any other frame the relay sends a client: what the client gets instead.
        self.frame_hook: Callable[[RelayFrame], list[RelayFrame]] = lambda frame: [frame]

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, client: trio.abc.Stream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.relay_port)
        link = Link(self, client, upstream)
        try:
            async with trio.open_nursery() as nursery:

                async def pump(direction: Callable[[], Awaitable[None]]) -> None:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await direction()
                    nursery.cancel_scope.cancel()  # one side gone: close both

                nursery.start_soon(pump, link.client_to_relay)
                nursery.start_soon(pump, link.relay_to_client)
        finally:
            if link.address is not None and self.links.get(link.address) is link:
                del self.links[link.address]
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(upstream)

    def envelopes_to(self, address: Address, **match: Any) -> list[Envelope]:
        return [
            e
            for to, e in self.seen
            if to == address and all(getattr(e, k) == v for k, v in match.items())
        ]

    async def link(self, address: Address) -> Link:
        with trio.fail_after(TIMEOUT):
            while address not in self.links:
                await trio.sleep(0.01)
        return self.links[address]


# ------------------------------------------------------------------ fixtures and helpers


@dataclasses.dataclass
class Setup:
    tmp_path: Path
    proxy: HostileRelay
    nursery: trio.Nursery


@pytest.fixture
async def setup(nursery: trio.Nursery, tmp_path: Path) -> Setup:
    config = RelayConfig(db_path=str(tmp_path / "relay.db"), port=0)
    relay_port: int = await nursery.start(serve_relay, config)
    proxy = HostileRelay(relay_port)
    await nursery.start(proxy.serve)
    return Setup(tmp_path, proxy, nursery)


@asynccontextmanager
async def client(setup: Setup, name: str, **options: Any) -> AsyncIterator[Client]:
    store = ClientStore.open(str(setup.tmp_path / f"{name}.db"))
    try:
        async with open_client(
            store,
            "127.0.0.1",
            setup.proxy.port,
            user_id=name,
            reconnect_first_delay=0.05,
            **options,
        ) as c:
            yield c
    finally:
        store.close()


async def events_until(c: Client, done: Callable[[ClientEvent], bool]) -> list[ClientEvent]:
    """The client's events up to and including the first for which ``done`` holds."""
    seen: list[ClientEvent] = []
    with trio.fail_after(TIMEOUT):
        async for event in c.events():
            seen.append(event)
            if done(event):
                return seen
    raise AssertionError("event stream ended")


def body_is(body: bytes) -> Callable[[ClientEvent], bool]:
    return lambda e: isinstance(e, MessageReceived) and e.body == body


def received(events: list[ClientEvent]) -> list[tuple[str, bytes]]:
    return [(e.sender.user_id, e.body) for e in events if isinstance(e, MessageReceived)]


def undecryptable(events: list[ClientEvent]) -> list[Undecryptable]:
    return [e for e in events if isinstance(e, Undecryptable)]


async def converse(alice: Client, bob: Client) -> None:
    """A first message each way, each confirmed: both sides hold an acknowledged session,
    and nothing is in flight (no delivery receipt either)."""
    await alice.send_direct("bob", b"hello bob")
    await events_until(bob, body_is(b"hello bob"))
    await bob.send_direct("alice", b"hello alice")
    await events_until(alice, body_is(b"hello alice"))
    with trio.fail_after(TIMEOUT):
        while alice.awaiting_receipts() or bob.awaiting_receipts():
            await trio.sleep(0.01)


ALICE, BOB, CAROL = Address("alice", 1), Address("bob", 1), Address("carol", 1)


# ------------------------------------------------------------------ envelopes


async def test_dropped_duplicated_reordered_and_altered_envelopes(setup: Setup) -> None:
    """Each body reaches the app once, intact; a dropped one is missing, an altered one reported."""
    proxy = setup.proxy
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await converse(alice, bob)
        first = len(proxy.envelopes_to(BOB, sender_user="alice"))
        held: list[Envelope] = []

        async def tamper(link: Link, envelope: Envelope) -> list[Envelope]:
            if link.address != BOB or envelope.sender_user != "alice":
                return [envelope]
            index = len(proxy.envelopes_to(BOB, sender_user="alice")) - first - 1
            if index == 0:  # m0: held back, delivered after m1
                held.append(envelope)
                return []
            if index == 1:
                return [envelope, *held]
            if index == 2:  # m2: dropped, and deleted at the relay
                await link.delete_at_relay(envelope.guid)
                return []
            if index == 3:  # m3: three times, with its guid and with a fresh one
                fresh = dataclasses.replace(envelope, guid=secrets.token_bytes(16))
                return [envelope, envelope, fresh]
            if index == 4:  # m4: one bit of the ciphertext flipped
                payload = bytearray(envelope.payload)
                payload[-40] ^= 0x01
                return [dataclasses.replace(envelope, payload=bytes(payload))]
            return [envelope]

        proxy.envelope_hook = tamper
        for index in range(6):
            await alice.send_direct("bob", b"m%d" % index)
        events = await events_until(bob, body_is(b"m5"))
        assert received(events) == [("alice", b"m%d" % i) for i in (1, 0, 3, 5)]
        [altered] = undecryptable(events)
        assert altered.sender == Address("alice", 1) and altered.reason == "BAD_MAC"
    # After a restart nothing comes again: everything was acknowledged (m2 by the proxy).
    proxy.envelope_hook = _pass_envelope
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await alice.send_direct("bob", b"sentinel")
        events = await events_until(bob, body_is(b"sentinel"))
        assert received(events) == [("alice", b"sentinel")]
        assert undecryptable(events) == []


async def test_an_envelope_that_does_not_open_is_reported_once_however_often_it_comes(
    setup: Setup,
) -> None:
    """The relay pushes one envelope again (our acknowledgement was lost, or it is
    hostile), with its guid. One that opens the ratchet drops as a duplicate; one that
    does not (altered on the way) only the guid remembered as processed recognises. Its
    Undecryptable must reach the app once, not once per delivery: a relay must not be
    able to make one bad envelope look like many."""
    proxy = setup.proxy
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await converse(alice, bob)
        altered: list[Envelope] = []

        async def alter_and_repeat(link: Link, envelope: Envelope) -> list[Envelope]:
            if link.address != BOB or envelope.sender_user != "alice" or altered:
                return [envelope]
            payload = bytearray(envelope.payload)
            payload[-40] ^= 0x01
            altered.append(dataclasses.replace(envelope, payload=bytes(payload)))
            return altered * 3

        proxy.envelope_hook = alter_and_repeat
        await alice.send_direct("bob", b"altered")
        await alice.send_direct("bob", b"sentinel")
        events = await events_until(bob, body_is(b"sentinel"))
        assert [e.reason for e in undecryptable(events)] == ["BAD_MAC"]
        assert received(events) == [("alice", b"sentinel")]


async def replay_everything(proxy: HostileRelay, to: Address) -> int:
    """Push every envelope ``to`` ever got again: with its own guid and with a fresh one."""
    link = await proxy.link(to)
    old = proxy.envelopes_to(to)
    for envelope in old:
        await link.push(envelope)
        await link.push(dataclasses.replace(envelope, guid=secrets.token_bytes(16)))
    return len(old)


async def test_replays_never_reach_the_app_twice(setup: Setup) -> None:
    """The initial message (its one-time prekey used up), ratchet messages, group traffic."""
    proxy = setup.proxy
    async with (
        client(setup, "alice") as alice,
        client(setup, "bob") as bob,
        client(setup, "carol") as carol,
    ):
        await converse(alice, bob)  # alice's first envelope to bob is the initial message
        await alice.send_direct("bob", b"a ratchet message")
        await events_until(bob, body_is(b"a ratchet message"))
        group_id = await alice.create_group("g", ["bob", "carol"])
        await events_until(bob, lambda e: isinstance(e, GroupUpdated))
        await alice.send_group(group_id, b"to the group")
        await events_until(bob, body_is(b"to the group"))
        await carol.send_group(group_id, b"from carol")
        await events_until(bob, body_is(b"from carol"))

        kinds = {e.kind for e in proxy.envelopes_to(BOB)}
        assert kinds == {ENVELOPE_DIRECT, ENVELOPE_GROUP}
        assert await replay_everything(proxy, BOB) >= 6
        await alice.send_direct("bob", b"sentinel 1")
        events = await events_until(bob, body_is(b"sentinel 1"))
        assert received(events) == [("alice", b"sentinel 1")]
        assert undecryptable(events) == []  # duplicates are dropped silently
    # The same after bob's restart (state reloaded from his store).
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await replay_everything(proxy, BOB)
        await alice.send_direct("bob", b"sentinel 2")
        events = await events_until(bob, body_is(b"sentinel 2"))
        assert received(events) == [("alice", b"sentinel 2")]
        assert undecryptable(events) == []


async def test_the_relay_reads_no_message_and_no_group_title(setup: Setup) -> None:
    """Everything the relay sees, every frame both ways, holds none of what the users
    wrote: one-to-one texts (initial and ratchet messages), a group's title, its
    members' group messages and a title change (spec 9.2)."""
    proxy = setup.proxy
    secrets_written = [
        b"initial: the key is under the third stone",
        b"ratchet: the meeting moved to nine",
        b"group: bring the documents",
        b"from carol: I have the documents",
    ]
    async with (
        client(setup, "alice") as alice,
        client(setup, "bob") as bob,
        client(setup, "carol") as carol,
    ):
        await alice.send_direct("bob", secrets_written[0])
        await events_until(bob, body_is(secrets_written[0]))
        await bob.send_direct("alice", secrets_written[1])
        await events_until(alice, body_is(secrets_written[1]))
        group_id = await alice.create_group("the old mill plan", ["bob", "carol"])
        await events_until(carol, lambda e: isinstance(e, GroupUpdated))
        await alice.send_group(group_id, secrets_written[2])
        await events_until(carol, body_is(secrets_written[2]))
        await carol.send_group(group_id, secrets_written[3])
        await events_until(bob, body_is(secrets_written[3]))
        await alice.set_title(group_id, "the new mill plan")
        await events_until(bob, lambda e: isinstance(e, GroupUpdated))
    seen = b"".join(proxy.wire)
    assert len(proxy.wire) > 20
    for written in [*secrets_written, b"the old mill plan", b"the new mill plan"]:
        assert written not in seen
        assert written[8:24] not in seen  # nor a part of it


async def test_a_swapped_sender_is_detected(setup: Setup) -> None:
    """An initial message, a ratchet message and a group message restamped as from carol."""
    proxy = setup.proxy
    async with (
        client(setup, "alice") as alice,
        client(setup, "bob") as bob,
        client(setup, "carol") as carol,
    ):
        await carol.send_direct("bob", b"hello from carol")
        await events_until(bob, body_is(b"hello from carol"))
        group_id = await carol.create_group("g", ["alice", "bob"])
        await events_until(bob, lambda e: isinstance(e, GroupUpdated))
        await events_until(alice, lambda e: isinstance(e, GroupUpdated))
        await carol.send_group(group_id, b"carol's sender key is known")
        await events_until(bob, body_is(b"carol's sender key is known"))

        async def as_carol(link: Link, envelope: Envelope) -> list[Envelope]:
            if link.address == BOB and envelope.sender_user == "alice":
                return [dataclasses.replace(envelope, sender_user="carol", sender_device=1)]
            return [envelope]

        proxy.envelope_hook = as_carol
        await alice.send_direct("bob", b"first contact")  # a PreKeyMessage
        await bob.send_direct("alice", b"bob to alice")  # alice's session is answered...
        await events_until(alice, body_is(b"bob to alice"))
        await alice.send_direct("bob", b"a ratchet message")  # ...so this is a RatchetMessage
        await alice.send_group(group_id, b"to the group")  # her sender key, then the message
        with trio.fail_after(TIMEOUT):
            while len(proxy.envelopes_to(BOB, sender_user="alice")) < 4:
                await trio.sleep(0.01)
        proxy.envelope_hook = _pass_envelope
        await alice.send_direct("bob", b"sentinel")
        events = await events_until(bob, body_is(b"sentinel"))
        # Nothing of alice's reached the app as carol's (or at all); each was reported.
        assert received(events) == [("alice", b"sentinel")]
        reported = undecryptable(events)
        assert reported and {e.sender for e in reported} == {CAROL}
        assert "UNTRUSTED_IDENTITY" in {e.reason for e in reported}


async def test_stripped_and_forged_group_changes_are_detected(setup: Setup) -> None:
    """A member whose welcome is withheld learns it from the group's traffic; forgeries fail."""
    proxy = setup.proxy
    async with (
        client(setup, "alice") as alice,
        client(setup, "bob") as bob,
        client(setup, "carol") as carol,
    ):
        await converse(alice, bob)
        await alice.send_direct("carol", b"hello carol")
        await events_until(carol, body_is(b"hello carol"))
        stripped: list[Envelope] = []

        async def strip(link: Link, envelope: Envelope) -> list[Envelope]:
            if not stripped and link.address == CAROL and envelope.sender_user == "alice":
                stripped.append(envelope)  # the create and carol's welcome
                await link.delete_at_relay(envelope.guid)
                return []
            return [envelope]

        proxy.envelope_hook = strip
        group_id = await alice.create_group("g", ["bob", "carol"])
        await events_until(bob, lambda e: isinstance(e, GroupUpdated))
        with trio.fail_after(TIMEOUT):
            while not stripped:
                await trio.sleep(0.01)
        await alice.send_group(group_id, b"to the group")
        await events_until(bob, body_is(b"to the group"))
        # Alice's sender key and then her message: both for a group carol does not hold.
        events = await events_until(carol, lambda e: isinstance(e, Undecryptable))
        events += await events_until(carol, lambda e: isinstance(e, Undecryptable))
        assert received(events) == []
        assert (
            undecryptable(events)
            == [Undecryptable(Address("alice", 1), "UNKNOWN_GROUP", group_id)] * 2
        )

        # Forged changes: bob's copy of the create (encrypted for bob), a made-up
        # direct envelope and made-up group messages, all "from alice".
        link = await proxy.link(CAROL)
        control_for_bob = proxy.envelopes_to(BOB, sender_user="alice")[-2]
        forged = SeededRandom(b"forged").random_bytes(200)
        group_junk = pack([PROTOCOL_VERSION, group_id, 1, 0, bytes(16)]) + bytes(64)
        for kind, payload in [
            (ENVELOPE_DIRECT, control_for_bob.payload),
            (ENVELOPE_DIRECT, forged),
            (ENVELOPE_GROUP, forged),
            (ENVELOPE_GROUP, group_junk),
        ]:
            await link.push(Envelope(secrets.token_bytes(16), 0, "alice", 1, kind, payload))
        await alice.send_direct("carol", b"sentinel")
        events = await events_until(carol, body_is(b"sentinel"))
        assert received(events) == [("alice", b"sentinel")]
        assert len(undecryptable(events)) == 4
        assert group_id not in carol.core.group_ids


# ------------------------------------------------------------------ bundles and device lists


def mallory_bundle(real: bytes) -> bytes:
    """A valid bundle for the same device under mallory's identity."""
    mallory = Account.create(now=0, one_time_prekeys=1, rng=SeededRandom(b"mallory"))
    bundle = PreKeyBundle.decode(real)
    return mallory.bundle(bundle.user_id, bundle.device_id).encode()


def substituted_signed_prekey(real: bytes) -> bytes:
    """The real bundle with mallory's signed prekey (and mallory's signature over it)."""
    mallory = Account.create(now=0, one_time_prekeys=0, rng=SeededRandom(b"mallory spk"))
    bundle = PreKeyBundle.decode(real)
    other = mallory.bundle(bundle.user_id, bundle.device_id, one_time=False)
    return dataclasses.replace(bundle, signed_prekey=other.signed_prekey).encode()


def flipped_signed_prekey(real: bytes) -> bytes:
    bundle = PreKeyBundle.decode(real)
    public = bytearray(bundle.signed_prekey.public)
    public[0] ^= 0x40
    spk = dataclasses.replace(bundle.signed_prekey, public=bytes(public))
    return dataclasses.replace(bundle, signed_prekey=spk).encode()


@pytest.mark.parametrize(
    ("substitute", "error"),
    [
        (flipped_signed_prekey, BadSignature),
        (substituted_signed_prekey, BadSignature),
        (mallory_bundle, UntrustedIdentity),
    ],
    ids=["altered-signed-prekey", "mallorys-signed-prekey", "mallorys-identity"],
)
async def test_a_substituted_bundle_is_refused(
    setup: Setup, substitute: Callable[[bytes], bytes], error: type[RemoteProtocolError]
) -> None:
    proxy = setup.proxy
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        proxy.bundle_hook = lambda address, data: substitute(data) if address == BOB else data
        with pytest.raises(error):
            await alice.send_direct("bob", b"never encrypted")
        assert alice.store.outbox() == []
        assert alice.core.devices_without_session(["bob"], now=alice.now()) == [BOB]
        proxy.bundle_hook = lambda address, data: data
        await alice.send_direct("bob", b"to the real bob")
        events = await events_until(bob, body_is(b"to the real bob"))
        assert received(events) == [("alice", b"to the real bob")]
        assert undecryptable(events) == []


async def test_a_device_list_with_another_identity_raises_identity_changed(setup: Setup) -> None:
    proxy = setup.proxy
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await converse(alice, bob)
        mallory = IdentityKeyPair(bytes(32))
        held = alice.core.device_list("bob")
        assert held is not None
        forged = DeviceList(
            "bob",
            mallory.public.ed25519,
            held.counter + 1,
            (
                DeviceEntry.prove(
                    IdentityKeyPair(bytes(range(32))), "bob", 1, mallory.public.ed25519
                ),
            ),
        )
        forged_bytes = forged.sign(mallory).encode()
        assert SignedDeviceList.decode(forged_bytes).device_list.user_id == "bob"
        proxy.device_list_hook = lambda user_id, data: forged_bytes if user_id == "bob" else data
        await alice.refresh_device_list("bob")
        events = await events_until(alice, lambda e: isinstance(e, IdentityChanged))
        change = events[-1]
        assert isinstance(change, IdentityChanged)
        assert (change.user_id, change.new_identity) == ("bob", mallory.public.ed25519)
        # Until alice confirms, she keeps the identity she knew: bob still gets her messages.
        assert alice.core.device_list("bob") == held
        await alice.send_direct("bob", b"still to the real bob")
        events = await events_until(bob, body_is(b"still to the real bob"))
        assert received(events) == [("alice", b"still to the real bob")]


async def test_a_bad_own_device_list_makes_the_client_reconnect(setup: Setup) -> None:
    """A relay serving our own list garbled on connect costs a reconnect, never the client."""
    proxy = setup.proxy
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        garbled = b"\x92\xc4\x01x\xc4\x01y"
        proxy.device_list_hook = lambda user_id, data: garbled if user_id == "alice" else data
        await (await proxy.link(ALICE)).close()
        await events_until(alice, lambda e: isinstance(e, Disconnected) and e.reason == "MALFORMED")
        proxy.device_list_hook = lambda user_id, data: data
        await events_until(alice, lambda e: isinstance(e, Connected))
        await alice.send_direct("bob", b"after the reconnect")
        events = await events_until(bob, body_is(b"after the reconnect"))
        assert received(events) == [("alice", b"after the reconnect")]


async def test_another_users_list_served_as_our_own_is_refused(setup: Setup) -> None:
    """On connecting, alice's client takes her own device list from the relay. It serves
    zed's instead (validly signed, a user alice never met): the connection is dropped
    as a protocol violation, and alice keeps no list of zed."""
    proxy = setup.proxy
    zed = ClientCore.create_primary("zed", 1, now=0, rng=SeededRandom(b"zed")).own_device_list
    assert zed is not None
    async with client(setup, "alice") as alice:
        proxy.device_list_hook = lambda user_id, data: zed.encode() if user_id == "alice" else data
        await (await proxy.link(ALICE)).close()
        await events_until(
            alice,
            lambda e: isinstance(e, Disconnected) and e.reason == "RELAY_PROTOCOL_VIOLATION",
        )
        assert alice.core.device_list("zed") is None
        proxy.device_list_hook = lambda user_id, data: data
        await events_until(alice, lambda e: isinstance(e, Connected))


async def test_another_users_device_list_is_refused(setup: Setup) -> None:
    """Asked for bob's list, the relay serves carol's (validly signed): a remote error."""
    proxy = setup.proxy
    async with (
        client(setup, "alice") as alice,
        client(setup, "bob") as bob,
        client(setup, "carol") as carol,
    ):
        own = carol.core.own_device_list
        assert own is not None
        proxy.device_list_hook = lambda user_id, data: own.encode() if user_id == "bob" else data
        with pytest.raises(RemoteProtocolError):
            await alice.send_direct("bob", b"never sent")
        assert alice.core.device_list("bob") is None and alice.store.outbox() == []
        proxy.device_list_hook = lambda user_id, data: data
        await alice.send_direct("bob", b"to the real bob")
        events = await events_until(bob, body_is(b"to the real bob"))
        assert received(events) == [("alice", b"to the real bob")]


# Mallory's list names alice's device key as mallory.5 (tests/support/misattribution.py);
# the proxy serves it to bob and restamps alice's envelopes as mallory.5's. Against the
# code before device proofs and user-bound sessions (protocol version 1), bob's app got
# alice's words as a MessageReceived from mallory.5.
# ------------------------------------------------------------------ device list mismatches


@pytest.mark.parametrize("named_as", ["zed", "bob"], ids=["a user not named", "under bob"])
async def test_a_device_list_mismatch_cannot_slip_in_a_list_of_a_user_the_send_did_not_name(
    setup: Setup, named_as: str
) -> None:
    """The relay answers alice's send to bob with DEVICE_LIST_MISMATCH carrying a valid
    list of a user alice never asked about (made up by the relay), named as that user or
    as bob: a mismatch can only be about the users the send names (spec 07 section 7.8).
    Alice keeps no list of that user, as when a fetch is answered with another user's
    list, and the send fails (RELAY_PROTOCOL_VIOLATION) instead of going elsewhere."""
    proxy = setup.proxy
    async with client(setup, "bob"):
        pass
    zed = ClientCore.create_primary("zed", 1, now=0, rng=SeededRandom(b"zed")).own_device_list
    assert zed is not None
    lied: list[Accepted] = []

    def mismatch(frame: RelayFrame) -> list[RelayFrame]:
        if not isinstance(frame, Accepted) or lied:
            return [frame]
        lied.append(frame)
        error = DeviceListMismatch(
            "recipient devices differ",
            mismatches=[DeviceMismatch(named_as, zed.encode(), (), (1,))],
        )
        return [ErrorFrame.from_error(frame.request_id, error)]

    async with client(setup, "alice") as alice:
        proxy.frame_hook = mismatch
        await alice.send_direct("bob", b"for bob")
        events = await events_until(alice, lambda e: isinstance(e, SendFailed | MessageSent))
        assert lied
        assert alice.core.device_list("zed") is None
        assert isinstance(events[-1], SendFailed)
        assert events[-1].reason == "RELAY_PROTOCOL_VIOLATION"
        assert alice.core.device_list("bob") is not None


# ------------------------------------------------------------------ made-up senders

SYBILS = 4


async def test_envelopes_stamped_as_from_users_bob_never_met_leave_no_device_list(
    setup: Setup,
) -> None:
    """The relay stamps envelopes with senders bob never met: users it registered itself
    (a relay can register any, with valid lists). To read each, bob fetches the sender's
    list, the envelope does not open, and bob keeps none of those lists, in memory or
    in his store (spec 11 section 11.2). Before, he kept every list so fetched: the
    relay could grow his state without bound."""
    proxy = setup.proxy
    sybils = [
        ClientCore.create_primary(f"sybil{i}", 1, now=0, rng=SeededRandom(b"sybil%d" % i))
        for i in range(SYBILS)
    ]
    for sybil in sybils:
        signed = sybil.own_device_list
        assert signed is not None
        await publish(proxy.relay_port, signed.encode())
    names = {sybil.user_id for sybil in sybils}
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await converse(alice, bob)
        link = await proxy.link(BOB)
        for name in sorted(names):
            for kind in (ENVELOPE_DIRECT, ENVELOPE_GROUP):
                payload = secrets.token_bytes(200)
                await link.push(Envelope(secrets.token_bytes(16), 0, name, 1, kind, payload))
        # Alice's own words restamped as a sybil's, so that the envelope is well formed.
        sybil_of_alice = sorted(names)[0]

        async def as_a_sybil(link: Link, envelope: Envelope) -> list[Envelope]:
            if link.address == BOB and envelope.sender_user == "alice":
                return [dataclasses.replace(envelope, sender_user=sybil_of_alice)]
            return [envelope]

        proxy.envelope_hook = as_a_sybil
        await alice.send_direct("bob", b"restamped")
        with trio.fail_after(TIMEOUT):
            while not proxy.envelopes_to(BOB, sender_user="alice"):
                await trio.sleep(0.01)
        proxy.envelope_hook = _pass_envelope
        await alice.send_direct("bob", b"sentinel")
        events = await events_until(bob, body_is(b"sentinel"))
        assert received(events) == [("alice", b"sentinel")]
        assert {e.sender.user_id for e in undecryptable(events)} == names
        assert [name for name in names if bob.core.device_list(name) is not None] == []
        kept = [
            key
            for key, _ in bob.store.records()
            if key.user_id in names or (key.address is not None and key.address.user_id in names)
        ]
        assert kept == []
        assert bob.core.device_list("alice") is not None


async def test_sybils_that_send_real_initial_messages_are_kept_and_may_show_nothing(
    setup: Setup,
) -> None:
    """What spec 11 section 11.2 leaves open (spec 09 section 9.6): a user the relay
    registered with keys of its own sends bob a real initial message. It opens, so bob
    keeps the user's list and the session, and the app need hear nothing: a delivery
    receipt for no message of bob's, a retry request for a group he does not hold."""
    proxy = setup.proxy
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await converse(alice, bob)
        link = await proxy.link(BOB)
        for name, content in (
            ("sybil-receipt", DeliveryReceipt((secrets.token_bytes(16),)).encode()),
            ("sybil-retry", RetryRequest(secrets.token_bytes(16), 1).encode()),
        ):
            sybil = ClientCore.create_primary(
                name, 1, now=bob.now(), rng=SeededRandom(name.encode())
            )
            signed = sybil.own_device_list
            assert signed is not None
            await publish(proxy.relay_port, signed.encode())
            async with connected(proxy.relay_port) as connection:
                await connection.authenticate(name, 1, sybil.account.identity)
                sybil.process_device_list(await connection.fetch_device_list("bob"))
                sybil.process_bundle(await connection.fetch_bundle("bob", 1), now=bob.now())
            [send] = sybil._sessions.encrypt_for([BOB], content, bob.now())
            [(_, payload)] = send.payloads
            await link.push(Envelope(secrets.token_bytes(16), 0, name, 1, ENVELOPE_DIRECT, payload))
        await alice.send_direct("bob", b"sentinel")
        events = await events_until(bob, body_is(b"sentinel"))
        assert [e for e in events if getattr(e, "sender", BOB).user_id.startswith("sybil")] == []
        kept = {key.user_id for key, _ in bob.store.records() if key.user_id is not None}
        assert {"sybil-receipt", "sybil-retry"} <= kept
        for name in ("sybil-receipt", "sybil-retry"):
            assert bob.core.device_list(name) is not None
            assert any(key.address == Address(name, 1) for key, _ in bob.store.records())


# ------------------------------------------------------------------ prekeys


def _stock_always_empty(frame: RelayFrame) -> list[RelayFrame]:
    """Every upload's reply says the relay holds no one-time prekey (a refusal included)."""
    if isinstance(frame, PreKeyCountsFrame):
        return [dataclasses.replace(frame, one_time=0, one_time_kem=0)]
    if isinstance(frame, ErrorFrame) and frame.code == "PREKEY_STOCK_FULL":
        assert frame.request_id is not None
        return [PreKeyCountsFrame(frame.request_id, 0, 0)]
    return [frame]


async def test_a_relay_that_keeps_asking_for_prekeys_cannot_grow_the_account_without_bound(
    setup: Setup,
) -> None:
    """The relay says PREKEYS_LOW again and again, and answers every upload with an empty
    stock: each time the client makes a batch of one-time prekey pairs and publishes it.
    It keeps at most MAX_ONE_TIME_PREKEYS of each kind, the oldest deleted first (spec 02
    section 2.2); before that bound it kept every batch."""
    proxy = setup.proxy
    proxy.frame_hook = _stock_always_empty
    batches = MAX_ONE_TIME_PREKEYS // PREKEY_BATCH_SIZE + 5
    async with client(setup, "alice") as alice:
        account = alice.core.account
        for _ in range(batches):
            published = alice._published
            link = await proxy.link(ALICE)
            await link.push_frame(PreKeysLow(0, 0))
            with trio.fail_after(TIMEOUT):
                while alice._published == published:
                    await trio.sleep(0.01)
        assert alice._published >= 2 * (batches * PREKEY_BATCH_SIZE)
        assert account.one_time_prekey_count == MAX_ONE_TIME_PREKEYS
        assert len(account.prekey_upload().one_time_kem_prekeys) == MAX_ONE_TIME_PREKEYS


async def test_a_relay_that_closes_again_and_again_cannot_pile_up_events_the_app_does_not_read(
    setup: Setup,
) -> None:
    """Bob's app does not read for a while, so his client takes no more mail than its
    event queue and one envelope's events (the rest waits at the relay). The relay
    pushes a window of envelopes (forged: each is an Undecryptable event), then breaks
    the connection, again and again. What the client had not taken when the connection
    closed must stay at the relay: before, it took the rest of the window at each close,
    and the events waiting in memory for the app grew with every connection."""
    queue_size, pushed, closes = 2, 40, 4
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await converse(alice, bob)
    async with client(setup, "bob", event_queue_size=queue_size) as bob:
        for _ in range(closes):
            link = await setup.proxy.link(BOB)
            for _ in range(pushed):
                payload = secrets.token_bytes(200)
                await link.push(Envelope(secrets.token_bytes(16), 0, "alice", 1, 1, payload))
            await link.push_frame(Ok(PROXY_REQUEST_IDS))  # a reply to no request: closes
            with trio.fail_after(TIMEOUT):
                while setup.proxy.links.get(BOB) is link or bob.status is not Status.READY:
                    await trio.sleep(0.01)
        waiting = [
            event for _, event in bob._backlog if not isinstance(event, Connected | Disconnected)
        ]
        assert len(waiting) <= 1, len(waiting)


# ------------------------------------------------------------------ another user's device key


async def restamp_alice_as_mallory(proxy_link: Link, envelope: Envelope) -> list[Envelope]:
    if proxy_link.address == BOB and envelope.sender_user == "alice":
        return [dataclasses.replace(envelope, sender_user="mallory", sender_device=5)]
    return [envelope]


def from_mallory_5(event: ClientEvent) -> bool:
    return getattr(event, "sender", None) == MALLORY_5


@pytest.mark.parametrize(
    "proof", [forged, copied, consented], ids=["forged", "copied", "consented"]
)
async def test_a_hostile_relay_cannot_present_alice_as_mallory(
    setup: Setup,
    proof: Proof,
) -> None:
    """The proxy serves bob mallory's list naming alice's key, and restamps alice's mail."""
    proxy = setup.proxy
    # Mallory is registered at the relay with her own device only.
    await publish(proxy.relay_port, mallory_list())
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        alice_device = alice.core.account.identity
        naming = (alice_device, alice.core.device_entry, proof)
        served = mallory_list(naming=naming, counter=1)
        proxy.device_list_hook = lambda user_id, data: served if user_id == "mallory" else data
        proxy.envelope_hook = restamp_alice_as_mallory
        await alice.send_direct("bob", b"alice's words")
        events = await events_until(bob, from_mallory_5)
        # Nothing of alice's reached bob's app as mallory's: it was reported instead.
        assert received(events) == []
        [reported] = events[-1:]
        assert isinstance(reported, Undecryptable)
        # Refused with the list (bob holds no valid list naming mallory.5), or, for a
        # list bob had to accept, by the session: alice bound herself, not mallory.
        assert reported.reason == ("BAD_MAC" if proof is consented else "UNKNOWN_DEVICE")
        # Nor does bob keep the list: the envelope it was fetched for did not open.
        assert bob.core.device_list("mallory") is None
        proxy.envelope_hook = _pass_envelope
        await alice.send_direct("bob", b"sentinel")
        events = await events_until(bob, body_is(b"sentinel"))
        assert received(events) == [("alice", b"sentinel")]
        assert alice.safety_number("bob").digits == bob.safety_number("alice").digits


async def test_a_client_that_knows_alice_refuses_her_key_under_mallory(
    setup: Setup,
) -> None:
    """Even a list whose proofs verify (the device agreed to both) is refused beside alice's."""
    proxy = setup.proxy
    await publish(proxy.relay_port, mallory_list())
    async with client(setup, "alice") as alice, client(setup, "bob") as bob:
        await alice.send_direct("bob", b"bob now holds alice's list")
        await events_until(bob, body_is(b"bob now holds alice's list"))
        with trio.fail_after(TIMEOUT):  # bob's delivery receipt has left his outbox
            while alice.awaiting_receipts():
                await trio.sleep(0.01)
        naming = (alice.core.account.identity, alice.core.device_entry, consented)
        served = mallory_list(naming=naming, counter=1)
        proxy.device_list_hook = lambda user_id, data: served if user_id == "mallory" else data
        with pytest.raises(DuplicateDeviceKey):
            await bob.send_direct("mallory", b"never sent")
        assert bob.core.device_list("mallory") is None and bob.store.outbox() == []
        proxy.envelope_hook = restamp_alice_as_mallory
        await alice.send_direct("bob", b"alice's words")
        events = await events_until(bob, from_mallory_5)
        assert received(events) == []
        assert events[-1] == Undecryptable(MALLORY_5, "UNKNOWN_DEVICE")
