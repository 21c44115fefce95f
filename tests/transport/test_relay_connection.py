"""The client's RelayConnection: misuse, timeouts, a misbehaving relay, closing, TLS."""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from hushchat.protocol.encoding import UINT32_MAX
from hushchat.protocol.errors import InvalidArgument, InvalidState
from hushchat.transport.client.connection import (
    RelayConnection,
    SendResult,
    callers_error,
    connect_relay,
    open_relay_connection,
)
from hushchat.transport.streams import write_at_once
from hushchat.transport.wire.errors import (
    ConnectFailed,
    ConnectionClosed,
    ConnectionFailure,
    ConnectionRefused,
    ConnectTimeout,
    HostUnreachable,
    IdleTimeout,
    RateLimited,
    RelayError,
    RelayNameMismatch,
    RelayProtocolViolation,
    RelayTimeout,
    TlsFailed,
    UnknownHost,
    UnsupportedVersion,
    format_address,
)
from hushchat.transport.wire.frames import (
    Accepted,
    BadRequest,
    DeviceListFrame,
    EnvelopePush,
    ErrorFrame,
    Hello,
    Ok,
    Ping,
    QueueEmpty,
    RelayFrame,
    Welcome,
    decode_request,
    encode_body,
)
from hushchat.transport.wire.limits import RELAY_PROTOCOL_VERSION
from hushchat.transport.wire.records import Envelope
from tests.support.relay import (
    RawClient,
    connected,
    envelopes_until_empty,
    next_envelope,
    register,
    relay_config,
    running_relay,
    self_signed,
)
from tests.support.users import make_user

# ------------------------------------------------------------------ a scripted fake relay

Script = Callable[[RawClient], Awaitable[None]]


async def welcome(relay: RawClient, name: str = "fake") -> None:
    request = decode_request(await relay.receive_body() or b"")
    assert isinstance(request, Hello)
    await relay.send_body(
        encode_body(Welcome(request.request_id, RELAY_PROTOCOL_VERSION, name, bytes(32)))
    )


async def next_request_id(relay: RawClient) -> int:
    request = decode_request(await relay.receive_body() or b"")
    assert not isinstance(request, BadRequest), request
    return request.request_id


@asynccontextmanager
async def fake_relay(script: Script, **kwargs: object) -> AsyncIterator[RelayConnection]:
    """A connection to a relay whose side is ``script`` (run after it answered HELLO)."""
    client, server = trio.testing.memory_stream_pair()
    relay = RawClient(server)
    kwargs.setdefault("keepalive_interval", None)
    kwargs.setdefault("expected_relay_name", "fake")
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            await welcome(relay)
            await script(relay)

        nursery.start_soon(run)
        async with open_relay_connection(client, **kwargs) as connection:  # type: ignore[arg-type]
            yield connection
        nursery.cancel_scope.cancel()


async def silent(relay: RawClient) -> None:
    await trio.sleep_forever()


async def test_the_caller_s_error_comes_out_alone_beside_cancellations() -> None:
    # The block fails just as an outer scope is cancelled: the connection's
    # tasks end Cancelled beside the error, and the caller (the client's
    # reconnect loop) must still get its own error, not a group.
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            cancelled = exc
            raise
    own = ConnectionClosed("the caller's own")
    assert callers_error(BaseExceptionGroup("", [own, cancelled, cancelled])) is own
    assert callers_error(BaseExceptionGroup("", [own])) is own
    assert callers_error(BaseExceptionGroup("", [cancelled, cancelled])) is None
    assert callers_error(BaseExceptionGroup("", [own, ValueError()])) is None


async def send(relay: RawClient, frame: RelayFrame) -> None:
    await relay.send_body(encode_body(frame))


# ------------------------------------------------------------------ misuse and timeouts


async def test_calls_before_authentication_fail_locally() -> None:
    async def answer_pings(relay: RawClient) -> None:
        while (body := await relay.receive_body()) is not None:
            request = decode_request(body)
            assert isinstance(request, Ping)
            await send(relay, Ok(request.request_id))

    async with fake_relay(answer_pings) as connection:
        for call in (
            connection.send_direct("bob", [(1, b"x")]),
            connection.fetch_bundle("bob", 1),
            connection.ack(bytes(16)),
        ):
            with pytest.raises(InvalidState):
                await call
        await connection.ping()  # nothing was sent: the relay would have closed
        for bad in ([b"short"], [], [bytes(16), bytes(16)]):
            with pytest.raises(InvalidArgument):
                await connection.ack(*bad)
        with pytest.raises(InvalidArgument):
            await connection.fetch_device_list("")


async def test_request_ids_last_to_the_largest_the_wire_carries() -> None:
    """Request ids are uint32: the last one is UINT32_MAX, then the connection is spent
    (InvalidState: reconnect) rather than wrapping round to an id still in use."""

    async def answer(relay: RawClient) -> None:
        await send(relay, Ok(await next_request_id(relay)))
        await trio.sleep_forever()

    async with fake_relay(answer) as connection:
        connection._next_request_id = UINT32_MAX
        await connection.ping()
        with pytest.raises(InvalidState):
            await connection.ping()


async def test_request_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with fake_relay(silent, request_timeout=7) as connection:
        start = trio.current_time()
        with pytest.raises(RelayTimeout):
            await connection.ping()
        assert trio.current_time() - start == pytest.approx(7)
        with pytest.raises(ConnectionClosed):  # its state is unknown now: closed
            await connection.ping()


async def test_hello_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client, _server = trio.testing.memory_stream_pair()
    with pytest.raises(RelayTimeout):
        async with open_relay_connection(client, expected_relay_name="r", connect_timeout=3):
            pass


async def test_wrong_relay_name_is_refused() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(welcome, RawClient(server), "relay-b")
        with pytest.raises(RelayNameMismatch):
            async with open_relay_connection(client, expected_relay_name="relay-a"):
                pass


# ------------------------------------------------------------------ a misbehaving relay


@pytest.mark.parametrize(
    "reply",
    [
        lambda rid: b"\xc1",  # not msgpack
        lambda rid: encode_body(DeviceListFrame(rid, b"x")),  # wrong reply type
        lambda rid: encode_body(Ok(rid + 5)),  # a request never made
        lambda rid: encode_body(Ok(rid + 1)),  # the next request, not made yet
        lambda rid: encode_body(QueueEmpty()),  # a push before authentication
        lambda rid: encode_body(Ping(rid)),  # a client frame
        lambda rid: encode_body(ErrorFrame(rid, "RATE_LIMITED", "x", "not a number")),
    ],
)
async def test_protocol_violations_close_the_connection(reply: Callable[[int], bytes]) -> None:
    async def misbehave(relay: RawClient) -> None:
        await relay.send_body(reply(await next_request_id(relay)))
        await trio.sleep_forever()

    async with fake_relay(misbehave) as connection:
        with pytest.raises(ConnectionClosed) as info:
            await connection.ping()
        assert isinstance(info.value.__cause__, RelayProtocolViolation)
        with pytest.raises(ConnectionClosed):
            await connection.receive()


async def test_relay_errors_raise_typed_exceptions() -> None:
    async def refuse(relay: RawClient) -> None:
        await send(relay, Ok(await next_request_id(relay)))  # AUTH
        rid = await next_request_id(relay)
        await send(relay, ErrorFrame(rid, "RATE_LIMITED", "slow down", 1234))
        rid = await next_request_id(relay)
        await send(relay, ErrorFrame(rid, "FROM_THE_FUTURE", "new", [1]))
        rid = await next_request_id(relay)
        await send(relay, Ok(rid))

    async with fake_relay(refuse) as connection:
        await connection.authenticate("alice", 1, make_user("alice").devices[1].identity)
        with pytest.raises(RateLimited) as info:
            await connection.ping()
        assert info.value.retry_after_ms == 1234
        with pytest.raises(RelayError) as unknown:
            await connection.ping()
        assert unknown.value.wire_code == "FROM_THE_FUTURE"
        await connection.ping()  # the connection survives both


@pytest.mark.parametrize(
    "full",
    [(("carol", 1),), (("bob", 1), ("bob", 1))],
    ids=["a device not named", "a device twice"],
)
async def test_accepted_naming_what_the_send_did_not_is_a_violation(
    full: tuple[tuple[str, int], ...],
) -> None:
    async def misreport(relay: RawClient) -> None:
        await send(relay, Ok(await next_request_id(relay)))  # AUTH
        await send(relay, Accepted(await next_request_id(relay), 5, (("bob", 2),)))
        await send(relay, Accepted(await next_request_id(relay), 5, full))
        await trio.sleep_forever()

    async with fake_relay(misreport) as connection:
        await connection.authenticate("alice", 1, make_user("alice").devices[1].identity)
        result = await connection.send_direct("bob", [(1, b"x"), (2, b"y")])
        assert result == SendResult(5, (("bob", 2),))
        with pytest.raises(ConnectionClosed) as info:
            await connection.send_group(b"x", [("bob", 1), ("bob", 2)])
        assert isinstance(info.value.__cause__, RelayProtocolViolation)


async def test_a_relay_of_another_version_is_named_in_the_error() -> None:
    async def old_relay(relay: RawClient) -> None:
        request = decode_request(await relay.receive_body() or b"")
        assert isinstance(request, Hello)
        refusal = UnsupportedVersion("version 3 is not spoken", supported=[2])
        await send(relay, ErrorFrame.from_error(request.request_id, refusal))

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(old_relay, RawClient(server))
        with pytest.raises(UnsupportedVersion) as info:
            async with open_relay_connection(
                client, expected_relay_name="fake", keepalive_interval=None
            ):
                pass
    assert info.value.supported == (2,)
    assert str(info.value) == (
        f"the relay speaks relay protocol version 2, this client {RELAY_PROTOCOL_VERSION}"
    )


async def test_a_welcome_in_another_version_is_a_violation() -> None:
    """A relay that answers our HELLO in a version we did not offer speaks frames we
    cannot trust to mean what we read: nothing is signed for it."""

    async def other_version(relay: RawClient) -> None:
        request = decode_request(await relay.receive_body() or b"")
        assert isinstance(request, Hello)
        answer = Welcome(request.request_id, RELAY_PROTOCOL_VERSION + 1, "fake", bytes(32))
        await send(relay, answer)
        await trio.sleep_forever()

    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_version, RawClient(server))
        with pytest.raises(RelayProtocolViolation, match="version"):
            async with open_relay_connection(
                client, expected_relay_name="fake", keepalive_interval=None
            ):
                pass
        nursery.cancel_scope.cancel()


async def test_errors_before_authentication_close_the_connection() -> None:
    async def refuse(relay: RawClient) -> None:
        rid = await next_request_id(relay)
        await send(relay, ErrorFrame(rid, "FORBIDDEN", "no"))
        await trio.sleep_forever()

    async with fake_relay(refuse) as connection:
        with pytest.raises(RelayError):
            await connection.upload_device_list(b"list")
        with pytest.raises(ConnectionClosed):
            await connection.ping()


async def test_close_reason_reaches_the_reader() -> None:
    async def close_idle(relay: RawClient) -> None:
        await send(relay, Ok(await next_request_id(relay)))  # AUTH
        await send(relay, EnvelopePush(Envelope(bytes(16), 1, "a", 1, 1, b"p")))
        await send(relay, ErrorFrame(None, "IDLE_TIMEOUT", "idle"))
        await relay.stream.aclose()

    alice = make_user("alice")
    async with fake_relay(close_idle) as connection:
        await connection.authenticate("alice", 1, alice.devices[1].identity)
        assert isinstance(await connection.receive(), Envelope)  # queued mail still arrives
        with pytest.raises(ConnectionClosed) as info:
            async for _ in connection:
                pass
        assert isinstance(info.value.reason, IdleTimeout)
        assert isinstance(connection.close_reason, IdleTimeout)


async def test_iteration_ends_after_local_close() -> None:
    async def authenticate(relay: RawClient) -> None:
        await send(relay, Ok(await next_request_id(relay)))
        await trio.sleep_forever()

    alice = make_user("alice")
    async with fake_relay(authenticate) as connection:
        await connection.authenticate("alice", 1, alice.devices[1].identity)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.aclose)
            async for _ in connection:
                pytest.fail("nothing was sent")
        with pytest.raises(ConnectionClosed):
            await connection.ping()


async def test_exceptions_from_the_block_are_not_wrapped() -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(welcome, RawClient(server))
        with pytest.raises(KeyError):
            async with open_relay_connection(
                client, expected_relay_name="fake", keepalive_interval=None
            ):
                raise KeyError("mine")


# ------------------------------------------------------------------ against a real relay


async def test_idle_connections_are_closed_and_keepalive_prevents_it() -> None:
    alice = make_user("alice", [1, 2])
    async with running_relay(relay_config(idle_timeout=0.3)) as port:
        await register(port, alice)
        start = trio.current_time()
        async with (
            connected(port, alice.devices[1], keepalive_interval=0.05) as alive,
            connected(port, alice.devices[2]) as idle,
        ):
            with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
                while True:
                    await idle.receive()
            assert isinstance(info.value.reason, IdleTimeout)
            assert trio.current_time() - start >= 0.3
            await trio.sleep(0.5)
            await alive.ping()


async def test_small_incoming_queue_still_delivers_everything_in_order() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            for index in range(20):
                await sender.send_direct("bob", [(1, bytes([index]))])
        async with connected(port, bob.devices[1], incoming_queue_size=4) as receiver:
            got = await envelopes_until_empty(receiver, acknowledge=True)
            assert [e.payload for e in got] == [bytes([i]) for i in range(20)]


async def test_requests_from_many_tasks_stay_whole_frames_when_written_in_parts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A frame the socket does not take at once is finished by trio under the write
    lock, taken before any other task runs: concurrent requests never interleave."""
    partial: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:  # a socket that takes 1,000 bytes at a time
        written = real_write(fd, data[:1000])
        if written < len(data):
            partial.append(written)
        return written

    alice, bob = make_user("alice"), make_user("bob")
    payloads = {
        (task, index): bytes([task, index]) * 10_000 for task in range(4) for index in range(5)
    }
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            monkeypatch.setattr(os, "write", write)

            async def send(task: int) -> None:
                for index in range(5):
                    await sender.send_direct("bob", [(1, payloads[task, index])])
                    await sender.ping()

            async with trio.open_nursery() as nursery:
                for task in range(4):
                    nursery.start_soon(send, task)
            monkeypatch.setattr(os, "write", real_write)
        assert partial, "every frame fitted at once: the test shows nothing"
        async with connected(port, bob.devices[1]) as receiver:
            got = await envelopes_until_empty(receiver, acknowledge=True)
            assert sorted(e.payload for e in got) == sorted(payloads.values())


async def test_a_request_cancelled_while_the_rest_of_its_frame_waits_closes_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The socket took part of the frame at once and the relay reads no more; the caller
    gives up (an outer cancel, not the request's own timeout). Half a frame is on the wire,
    so the connection is closed: nothing else may follow it, and what waits on it ends."""
    direct: list[int] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        written = real_write(fd, data)
        direct.append(written)
        return written

    async def authenticate_then_stop_reading(relay: RawClient) -> None:
        await welcome(relay)
        await send(relay, Ok(await next_request_id(relay)))
        await trio.sleep_forever()

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    alice = make_user("alice")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(authenticate_then_stop_reading, RawClient(server))
        async with open_relay_connection(
            client, expected_relay_name="fake", keepalive_interval=None
        ) as connection:
            await connection.authenticate("alice", 1, alice.devices[1].identity)
            monkeypatch.setattr(os, "write", write)
            with trio.CancelScope() as give_up:
                async with trio.open_nursery() as inner:
                    inner.start_soon(connection.send_direct, "bob", [(1, bytes(1_000_000))])
                    await trio.testing.wait_all_tasks_blocked()
                    give_up.cancel()
            monkeypatch.setattr(os, "write", real_write)
            assert direct and 0 < direct[0] < 1_000_000, direct  # part written directly
            with trio.fail_after(5), pytest.raises(ConnectionClosed):
                await connection.receive()
            with pytest.raises(ConnectionClosed):
                await connection.ping()
        nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_a_closed_socket_is_never_written_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its descriptor number may already belong to another file."""

    def write(fd: int, data: bytes) -> int:
        pytest.fail(f"wrote to descriptor {fd}, closed")

    sock = trio.socket.socket()
    sock.close()
    monkeypatch.setattr(os, "write", write)
    assert write_at_once(sock, b"frame") == 0


async def test_a_request_made_in_a_cancelled_scope_is_never_written() -> None:
    """Cancelled means it did not happen: a send whose caller is already cancelled (an app
    giving up, a client shutting down) must not reach the relay, even on the direct path."""
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            with trio.CancelScope() as scope:
                scope.cancel()
                await sender.send_direct("bob", [(1, b"cancelled before it began")])
            assert scope.cancelled_caught
            await sender.send_direct("bob", [(1, b"sent")])
        async with connected(port, bob.devices[1]) as receiver:
            got = await envelopes_until_empty(receiver, acknowledge=True)
            assert [e.payload for e in got] == [b"sent"]


async def test_pushes_beyond_the_window_wait_for_room_and_none_is_lost() -> None:
    """A relay that ignores the window fills the channel: the reader then waits for room
    (no push dropped, none reordered), and replies flow again once the app reads."""
    count = 40

    async def flood(relay: RawClient) -> None:
        await send(relay, Ok(await next_request_id(relay)))  # AUTH
        for index in range(count):
            envelope = Envelope(index.to_bytes(16, "big"), 1, "a", 1, 1, bytes([index]))
            await send(relay, EnvelopePush(envelope))
        await send(relay, Ok(await next_request_id(relay)))  # the PING
        await trio.sleep_forever()

    alice = make_user("alice")
    async with fake_relay(flood, incoming_queue_size=4) as connection:
        await connection.authenticate("alice", 1, alice.devices[1].identity)
        await trio.testing.wait_all_tasks_blocked()
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.ping)
            with trio.fail_after(5):
                while len(got) < count:
                    item = await connection.receive()
                    assert isinstance(item, Envelope)
                    got.append(item.payload)
        assert got == [bytes([i]) for i in range(count)]


async def test_connecting_to_nothing_fails_cleanly() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with pytest.raises(ConnectionRefused):
        async with connect_relay("127.0.0.1", port):
            pass


async def test_the_window_follows_the_incoming_queue() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    async with running_relay(relay_config()) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            for index in range(5):
                await sender.send_direct("bob", [(1, bytes([index]))])
        async with connected(port, bob.devices[1], incoming_queue_size=5) as receiver:
            first, _ = [await next_envelope(receiver) for _ in range(2)]
            with trio.move_on_after(0.2):
                pytest.fail(f"pushed beyond a window of 2: {await next_envelope(receiver)}")
            await receiver.ack(first.guid)
            assert (await next_envelope(receiver)).payload == b"\x02"
    with pytest.raises(InvalidArgument):
        RelayConnection(trio.testing.memory_stream_pair()[0], incoming_queue_size=3)


async def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    alice = make_user("alice")
    async with running_relay(relay_config(ssl_context=server_context, name="localhost")) as port:
        async with connected(
            port, ssl_context=trusting, server_hostname="localhost", expected_relay_name="localhost"
        ) as connection:
            await connection.upload_device_list(alice.signed_list())
            await connection.authenticate("alice", 1, alice.devices[1].identity)
            await connection.ping()
        with pytest.raises(TlsFailed) as info:  # a client that does not trust the certificate
            async with connected(port, ssl_context=ssl.create_default_context()):
                pass
        assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        with pytest.raises((ConnectionClosed, RelayTimeout)):  # plaintext to a TLS relay
            async with connected(port, connect_timeout=1):
                pass


# ------------------------------------------------------------------ why a connection failed


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    with socket.socket(family) as probe:
        probe.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_nothing_listening_is_connection_refused(host: str) -> None:
    port = free_port(socket.AF_INET6 if host == "::1" else socket.AF_INET)
    with pytest.raises(ConnectionRefused) as info:
        async with connect_relay(host, port):
            pass
    where = format_address(host, port)
    assert str(info.value) == f"nothing listens at {where} (connection refused)"
    assert isinstance(info.value, ConnectFailed | ConnectionFailure)


def test_ipv6_addresses_are_bracketed() -> None:
    assert format_address("::1", 7443) == "[::1]:7443"
    assert format_address("relay.example", 7443) == "relay.example:7443"


async def test_an_unknown_host_is_named() -> None:
    with pytest.raises(UnknownHost, match=r"unknown host 'nosuch\.invalid'"):
        async with connect_relay("nosuch.invalid", 7400):
            pass


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        (errno.ENETUNREACH, HostUnreachable),
        (errno.EHOSTUNREACH, HostUnreachable),
        (errno.EACCES, ConnectFailed),
    ],
)
async def test_no_route_is_host_unreachable(
    monkeypatch: pytest.MonkeyPatch, number: int, expected: type[ConnectFailed]
) -> None:
    # No route can be made on loopback: the error trio raises for one is played here.
    async def unreachable(host: str, port: int) -> trio.SocketStream:
        attempt = OSError(number, os.strerror(number))
        raise OSError(f"all attempts to connect to {host}:{port} failed") from ExceptionGroup(
            "attempts", [attempt]
        )

    monkeypatch.setattr(trio, "open_tcp_stream", unreachable)
    with pytest.raises(ConnectFailed) as info:
        async with connect_relay("2001:db8::1", 7443):
            pass
    assert type(info.value) is expected
    assert "[2001:db8::1]:7443" in str(info.value)


async def test_a_silent_listener_is_a_connect_timeout() -> None:
    with socket.socket() as silent:  # accepts (the kernel does) but never answers HELLO
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(ConnectTimeout, match=r"no answer to HELLO within 0.2 s"):
            async with connect_relay("127.0.0.1", port, connect_timeout=0.2):
                pass
