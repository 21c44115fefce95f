"""Hostile and broken clients: bad frames, wrong order, slow and idle peers.

The relay runs on in-memory streams (trio.testing), so timeouts are tested
on a virtual clock (autojump_clock) in tests that never wait on a storage
thread: while a thread runs, every task looks blocked and the clock would
jump to the next deadline.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from hushchat.protocol.encoding import pack
from hushchat.transport.relay.server import Relay
from hushchat.transport.relay.storage.interface import StoredDeviceList
from hushchat.transport.relay.storage.sqlite import SqliteStorage
from hushchat.transport.wire.auth import sign_auth
from hushchat.transport.wire.frames import (
    Auth,
    ErrorFrame,
    FrameType,
    Hello,
    Ok,
    Ping,
    PreKeysLow,
    QueueEmpty,
    RelayFrame,
    Welcome,
    decode_relay_frame,
    encode_body,
)
from hushchat.transport.wire.framing import encode_frame
from hushchat.transport.wire.limits import RELAY_PROTOCOL_VERSION
from hushchat.transport.wire.records import Envelope
from tests.support.relay import RawClient, memory_connection, relay_config
from tests.support.users import make_user


@asynccontextmanager
async def memory_relay(**overrides: Any) -> AsyncIterator[Relay]:
    storage = await SqliteStorage.open(":memory:")
    try:
        yield Relay(relay_config(**overrides), storage)
    finally:
        await storage.aclose()


@asynccontextmanager
async def raw_connection(relay: Relay) -> AsyncIterator[RawClient]:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay.handle_connection, server)
        yield RawClient(client)
        nursery.cancel_scope.cancel()


async def receive(client: RawClient) -> RelayFrame | None:
    body = await client.receive_body()
    return None if body is None else decode_relay_frame(body)


async def expect_error(client: RawClient, code: str, request_id: int | None) -> ErrorFrame:
    """The next frame but the pushes a new connection gets whenever its delivery task
    runs (PREKEYS_LOW, QUEUE_EMPTY): the error ``code`` for ``request_id``."""
    with trio.fail_after(60):
        while isinstance(frame := await receive(client), (PreKeysLow, QueueEmpty)):
            pass
    assert isinstance(frame, ErrorFrame), frame
    assert (frame.code, frame.request_id) == (code, request_id)
    return frame


async def expect_closed(client: RawClient) -> None:
    with trio.fail_after(60):
        assert await receive(client) is None


async def hello(client: RawClient) -> Welcome:
    await client.send_body(encode_body(Hello(0, RELAY_PROTOCOL_VERSION, 10)))
    frame = await receive(client)
    assert isinstance(frame, Welcome)
    return frame


async def authenticated(relay: Relay, client: RawClient, device: Any) -> None:
    welcome = await hello(client)
    signature = sign_auth(
        device.identity, welcome.relay_name, welcome.challenge, device.user_id, device.device_id
    )
    await client.send_body(encode_body(Auth(1, device.user_id, device.device_id, signature)))
    assert await receive(client) == Ok(1)


# ------------------------------------------------------------------ before authentication


@pytest.mark.parametrize(
    ("body", "code", "request_id"),
    [
        (b"\xc1", "BAD_FRAME", None),  # not msgpack
        (b"", "BAD_FRAME", None),
        (pack([FrameType.PING]), "BAD_FRAME", None),  # no request id
        (pack([77, 5]), "UNKNOWN_FRAME", 5),
        (encode_body(Welcome(6, 1, "x", bytes(32))), "UNKNOWN_FRAME", 6),  # a relay frame
        (encode_body(Ping(7)), "UNEXPECTED_FRAME", 7),  # before HELLO
        (encode_body(Auth(8, "alice", 1, bytes(64))), "UNEXPECTED_FRAME", 8),
        (encode_body(Hello(9, RELAY_PROTOCOL_VERSION + 1, 10)), "UNSUPPORTED_VERSION", 9),
        (pack([FrameType.HELLO, 9, RELAY_PROTOCOL_VERSION, 0]), "BAD_FRAME", 9),  # window 0
    ],
)
async def test_bad_first_frames_are_answered_then_closed(
    body: bytes, code: str, request_id: int | None
) -> None:
    async with memory_relay() as relay, raw_connection(relay) as client:
        await client.send_body(body)
        error = await expect_error(client, code, request_id)
        if code == "UNSUPPORTED_VERSION":
            assert error.detail == [RELAY_PROTOCOL_VERSION]
        await expect_closed(client)


async def test_a_client_of_relay_protocol_5_is_told_to_update() -> None:
    # Version 5's HELLO, as an old client sends it: the window follows the version.
    async with memory_relay() as relay, raw_connection(relay) as client:
        await client.send_body(pack([FrameType.HELLO, 0, 5, 114]))
        error = await expect_error(client, "UNSUPPORTED_VERSION", 0)
        assert error.detail == [RELAY_PROTOCOL_VERSION] == [6]
        assert error.message == (
            "relay protocol version 5 is not spoken here: this relay speaks version 6; "
            "update the client"
        )
        await expect_closed(client)


async def test_out_of_order_after_hello_closes() -> None:
    async with memory_relay() as relay, raw_connection(relay) as client:
        await hello(client)
        await client.send_body(encode_body(Hello(1, RELAY_PROTOCOL_VERSION, 10)))
        await expect_error(client, "UNEXPECTED_FRAME", 1)
        await expect_closed(client)
    async with memory_relay() as relay, raw_connection(relay) as client:
        await hello(client)
        await client.send_body(pack([FrameType.SEND_DIRECT, 2, "bob", [[1, b"x"]], False]))
        await expect_error(client, "UNEXPECTED_FRAME", 2)
        await expect_closed(client)


async def test_oversized_frame_is_refused_from_its_prefix() -> None:
    async with (
        memory_relay(max_frame_size=1000, max_payload_size=500) as relay,
        raw_connection(relay) as client,
    ):
        await client.stream.send_all((1001).to_bytes(4, "big"))  # no body follows
        await expect_error(client, "FRAME_TOO_LARGE", None)
        await expect_closed(client)


# ------------------------------------------------------------------ after authentication


async def test_bad_frames_after_authentication_keep_the_connection() -> None:
    alice = make_user("alice")
    async with memory_relay(max_frame_size=5000, max_payload_size=100) as relay:
        async with memory_connection(relay) as registrar:
            await registrar.upload_device_list(alice.signed_list())
        async with raw_connection(relay) as client:
            await authenticated(relay, client, alice.devices[1])
            for body, code, request_id in [
                (b"\xc1", "BAD_FRAME", None),
                (pack([FrameType.PING, 3, "extra"]), "BAD_FRAME", 3),
                (pack([99, 4]), "UNKNOWN_FRAME", 4),
                (encode_body(Hello(5, RELAY_PROTOCOL_VERSION, 10)), "UNEXPECTED_FRAME", 5),
                (encode_body(Auth(6, "alice", 1, bytes(64))), "UNEXPECTED_FRAME", 6),
                (
                    pack([FrameType.SEND_GROUP, 7, b"x" * 101, [["alice", 1]], False]),
                    "PAYLOAD_TOO_LARGE",
                    7,
                ),
            ]:
                await client.send_body(body)
                while not isinstance(frame := await receive(client), ErrorFrame):
                    pass  # skip pushes (QUEUE_EMPTY, PREKEYS_LOW)
                assert isinstance(frame, ErrorFrame)
                assert (frame.code, frame.request_id) == (code, request_id)
            await client.send_body(encode_body(Ping(10)))
            while (frame := await receive(client)) != Ok(10):
                assert not isinstance(frame, ErrorFrame)
            # An oversized frame still ends the connection: the stream cannot resync.
            await client.stream.send_all((5001).to_bytes(4, "big"))
            await expect_error(client, "FRAME_TOO_LARGE", None)
            await expect_closed(client)


async def test_misbehaving_connections_do_not_disturb_others() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with memory_relay() as relay:
        async with memory_connection(relay) as registrar:
            await registrar.upload_device_list(alice.signed_list())
        async with memory_connection(relay) as registrar:
            await registrar.upload_device_list(bob.signed_list())
        async with memory_connection(relay, bob.devices[1]) as bystander:
            for raw in (
                encode_frame(b"\xc1"),
                encode_frame(pack([42, 1])),
                b"\xff\xff\xff\xff",
                encode_frame(encode_body(Hello(1, RELAY_PROTOCOL_VERSION, 10)))[
                    :-1
                ],  # then hang up mid-frame
            ):
                async with raw_connection(relay) as client:
                    await client.stream.send_all(raw)
                    await client.stream.aclose()
            await bystander.ping()
            async with memory_connection(relay, alice.devices[1]) as sender:
                await sender.send_direct("bob", [(1, b"still works")])
            with trio.fail_after(5):
                while not isinstance(item := await bystander.receive(), Envelope):
                    pass
            assert item.payload == b"still works"


async def test_closed_connections_leave_the_registry() -> None:
    alice, bob = make_user("alice"), make_user("bob", [1, 2])
    async with memory_relay() as relay:
        for user in (alice, bob):
            async with memory_connection(relay) as registrar:
                await registrar.upload_device_list(user.signed_list())
        async with (
            memory_connection(relay, alice.devices[1]),
            memory_connection(relay, bob.devices[2]) as leaving,
        ):
            assert relay.connected_devices == {("alice", 1), ("bob", 2)}
            bob.remove_device(2)
            await leaving.upload_device_list(bob.signed_list())  # closed after the reply
            with trio.fail_after(5):
                while relay.connected_devices != {("alice", 1)}:
                    await trio.sleep(0.01)
        with trio.fail_after(5):
            while relay.connected_devices:
                await trio.sleep(0.01)


class BrokenStorage:
    """Storage whose lookups fail: the relay must answer INTERNAL_ERROR, not crash."""

    def __init__(self, inner: SqliteStorage) -> None:
        self._inner = inner

    async def device_lists(self, user_ids: Any) -> dict[str, StoredDeviceList]:
        raise RuntimeError("disk on fire")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


async def test_internal_errors_cost_one_request(caplog: pytest.LogCaptureFixture) -> None:
    alice = make_user("alice")
    storage = await SqliteStorage.open(":memory:")
    relay = Relay(relay_config(), BrokenStorage(storage))
    try:
        async with raw_connection(relay) as client:
            welcome = await hello(client)
            signature = sign_auth(
                alice.devices[1].identity, welcome.relay_name, welcome.challenge, "alice", 1
            )
            await client.send_body(encode_body(Auth(1, "alice", 1, signature)))
            await expect_error(client, "INTERNAL_ERROR", 1)
            await expect_closed(client)
        async with raw_connection(relay) as client:
            await hello(client)  # the relay still serves
    finally:
        await storage.aclose()
    assert "disk on fire" in caplog.text


class UnreadableMailboxes(BrokenStorage):
    """Storage whose mailboxes cannot be read: the delivery task fails."""

    async def device_lists(self, user_ids: Any) -> dict[str, StoredDeviceList]:
        return await self._inner.device_lists(user_ids)

    async def pending(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("mailbox unreadable")


async def test_a_failing_delivery_task_ends_only_its_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice = make_user("alice")
    storage = await SqliteStorage.open(":memory:")
    relay = Relay(relay_config(), UnreadableMailboxes(storage))
    try:
        async with memory_connection(relay) as registrar:
            await registrar.upload_device_list(alice.signed_list())
        async with raw_connection(relay) as client:
            await authenticated(relay, client, alice.devices[1])
            with trio.fail_after(5):
                while await receive(client) is not None:
                    pass  # a PREKEYS_LOW may come first; then the connection ends
        async with raw_connection(relay) as client:
            await hello(client)  # the relay still serves
    finally:
        await storage.aclose()
    assert "mailbox unreadable" in caplog.text


class GatedMailboxes(BrokenStorage):
    """Storage whose next read of one mailbox waits until the test lets it go."""

    def __init__(self, inner: SqliteStorage, user_id: str, device_id: int) -> None:
        super().__init__(inner)
        self.gated = (user_id, device_id)
        self.reading = trio.Event()
        self.proceed = trio.Event()

    async def device_lists(self, user_ids: Any) -> dict[str, StoredDeviceList]:
        return await self._inner.device_lists(user_ids)

    async def pending(self, user_id: str, device_id: int, **kwargs: Any) -> Any:
        if (user_id, device_id) == self.gated and not self.reading.is_set():
            self.reading.set()
            await self.proceed.wait()
        return await self._inner.pending(user_id, device_id, **kwargs)


async def test_mail_committed_while_the_mailbox_is_read_is_pushed_once() -> None:
    # The connection hands new mail to its delivery task at commit; mail
    # committed while that task reads the mailbox is both handed over and
    # found by the read, and must be pushed once.
    alice, bob = make_user("alice"), make_user("bob")
    storage = await SqliteStorage.open(":memory:")
    gated = GatedMailboxes(storage, "bob", 1)
    relay = Relay(relay_config(), gated)
    try:
        async with memory_connection(relay) as registrar:
            await registrar.upload_device_list(alice.signed_list())
            await registrar.upload_device_list(bob.signed_list())
        async with memory_connection(relay, alice.devices[1]) as sender:
            async with trio.open_nursery() as nursery:
                got: list[Any] = []

                async def bob_reads() -> None:
                    async with memory_connection(relay, bob.devices[1]) as receiver:
                        with trio.fail_after(5):
                            while not any(isinstance(item, QueueEmpty) for item in got):
                                got.extend(await receiver.receive_batch())
                        with trio.move_on_after(0.3):
                            got.extend(await receiver.receive_batch())

                nursery.start_soon(bob_reads)
                with trio.fail_after(5):
                    await gated.reading.wait()
                await sender.send_direct("bob", [(1, b"during the read")])
                gated.proceed.set()
            envelopes = [item.payload for item in got if isinstance(item, Envelope)]
            assert envelopes == [b"during the read"]
    finally:
        await storage.aclose()


async def test_a_device_that_does_not_acknowledge_holds_at_most_a_window_at_the_relay() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with memory_relay(max_in_flight=3) as relay:
        async with memory_connection(relay) as registrar:
            await registrar.upload_device_list(alice.signed_list())
            await registrar.upload_device_list(bob.signed_list())
        async with (
            memory_connection(relay, bob.devices[1]),
            memory_connection(relay, alice.devices[1]) as sender,
        ):
            session = relay.session_of("bob", 1)
            assert session is not None
            for index in range(10):
                await sender.send_direct("bob", [(1, bytes([index]))])
                await trio.testing.wait_all_tasks_blocked()
                # Pushed and not acknowledged, or handed over to push: a window.
                assert len(session._in_flight) + len(session._handed) <= 3
            assert len(session._in_flight) == 3


# ------------------------------------------------------------------ timeouts (virtual clock)


async def test_unauthenticated_connection_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_relay(auth_timeout=30) as relay, raw_connection(relay) as client:
        start = trio.current_time()
        await hello(client)
        await expect_error(client, "AUTH_TIMEOUT", None)
        await expect_closed(client)
        assert trio.current_time() - start == pytest.approx(30)


async def test_silent_connection_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_relay(auth_timeout=30) as relay, raw_connection(relay) as client:
        start = trio.current_time()
        await expect_error(client, "AUTH_TIMEOUT", None)
        assert trio.current_time() - start == pytest.approx(30)


async def test_trickled_frame_times_out(autojump_clock: trio.testing.MockClock) -> None:
    # Slowloris: a byte every 3 s keeps the connection busy but never completes a frame.
    async with (
        memory_relay(auth_timeout=300, frame_timeout=10) as relay,
        raw_connection(relay) as client,
    ):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def trickle() -> None:
                for byte in encode_frame_bytes():
                    await client.stream.send_all(bytes([byte]))
                    await trio.sleep(3)

            nursery.start_soon(trickle)
            await expect_error(client, "FRAME_TIMEOUT", None)
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start == pytest.approx(10)


def encode_frame_bytes() -> bytes:
    body = encode_body(Hello(0, RELAY_PROTOCOL_VERSION, 10))
    return len(body).to_bytes(4, "big") + body


async def test_peer_that_does_not_read_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    async with memory_relay(auth_timeout=300, send_timeout=5) as relay:
        client, server = trio.testing.lockstep_stream_pair()  # writes wait for the reader
        ended: list[float] = []

        async def serve() -> None:
            await relay.handle_connection(server)
            ended.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            nursery.start_soon(serve)
            await client.send_all(encode_frame_bytes())  # HELLO; the WELCOME is never read
            await trio.sleep(60)
            assert ended and ended[0] - start == pytest.approx(5)
            while await client.receive_some(100):  # what was in the pipe, then the close
                pass
