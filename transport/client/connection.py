"""A client's low-level connection to a relay.

:func:`connect_relay` opens TCP (optionally TLS), speaks HELLO and yields a
:class:`RelayConnection`; the connection is closed when the block exits::

    async with connect_relay("relay.example", 7443, ssl_context=ctx) as relay:
        await relay.authenticate(user_id, device_id, device_identity)
        async for item in relay:          # Envelope, QueueEmpty, PreKeysLow, MailExpired
            if isinstance(item, Envelope):
                ...                       # decrypt and persist first
                await relay.ack(item.guid)

:meth:`RelayConnection.receive_batch` takes whatever has arrived at once, and
one ``ack(*guids)`` acknowledges it all in one round trip.

Structure (trio-websocket's bridge): a background reader task decodes
frames, routes each reply to the request waiting for it (by request id)
and puts pushes into a bounded memory channel. When the channel is full
the reader stops reading, so a slow consumer pushes back on the relay,
which stops at its in-flight window; size the channel above that window
(the default does). A frame goes straight to the socket when it takes it
at once, as the relay writes (transport/streams.py); otherwise the rest is
written under a :class:`trio.StrictFIFOLock`, so requests may be issued
concurrently from several tasks.

Every request waits at most ``request_timeout``; then it raises
RelayTimeout and the connection is closed, since whether the request took
effect is unknown (a resent send may arrive twice; the protocol core
detects duplicates). A relay refusal raises the
:class:`~hushchat.transport.wire.errors.RelayError` subclass for its code; a closed
connection raises ConnectionClosed; a relay that breaks the protocol closes
the connection with RelayProtocolViolation as the cause.
This layer keeps no sessions and no state beyond the connection; the
client library builds those on top.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import trio

from hushchat.protocol.devices import check_user_id
from hushchat.protocol.encoding import UINT32_MAX
from hushchat.protocol.errors import DecodeError, InvalidArgument, InvalidState, ProtocolError
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic

from ..streams import direct_socket, write_at_once
from ..wire.auth import sign_auth
from ..wire.errors import (
    ConnectFailed,
    ConnectionClosed,
    ConnectionFailure,
    ConnectionRefused,
    ConnectTimeout,
    HostUnreachable,
    RelayError,
    RelayNameMismatch,
    RelayProtocolViolation,
    RelayTimeout,
    TlsFailed,
    UnexpectedFrame,
    UnknownHost,
    UnsupportedVersion,
    format_address,
    relay_error_from_wire,
)
from ..wire.frames import (
    Accepted,
    Ack,
    Auth,
    BundleFrame,
    DeviceListFrame,
    EnvelopePush,
    ErrorFrame,
    FetchBundle,
    FetchDeviceList,
    Hello,
    MailExpired,
    Ok,
    Ping,
    PreKeyCountsFrame,
    PreKeysLow,
    PublishDeviceList,
    QueueEmpty,
    RelayFrame,
    Request,
    SendChange,
    SendDirect,
    SendGroup,
    UploadPreKeys,
    Welcome,
    decode_relay_frame,
    encode_body,
)
from ..wire.framing import FrameDecoder, encode_frame
from ..wire.limits import (
    CLIENT_CONNECT_TIMEOUT,
    CLIENT_INCOMING_QUEUE_SIZE,
    CLIENT_KEEPALIVE,
    CLIENT_REQUEST_TIMEOUT,
    MAX_FRAME_SIZE,
    MAX_IN_FLIGHT,
    RECEIVE_CHUNK_SIZE,
    RELAY_PROTOCOL_VERSION,
)
from ..wire.records import GUID_SIZE, RECEIPT_SIZE, Envelope, PreKeyCounts
from ..wire.states import ConnectionState, check_request, state_after_error, state_after_success

logger = logging.getLogger("hushchat.client")

Incoming = Envelope | QueueEmpty | PreKeysLow | MailExpired
"""What a connection yields: an envelope to process and acknowledge, or a notice."""

R = TypeVar("R", bound=RelayFrame)
T = TypeVar("T")

# Channel slots kept for notices beside the envelope window: QUEUE_EMPTY
# and MAIL_EXPIRED (once per connection each) and PREKEYS_LOW (once until
# the next upload).
NOTICE_SLOTS = 3


@dataclass(frozen=True, slots=True)
class SendResult:
    """What the relay did with a send.

    ``server_ts``: when it accepted it (ms since the epoch). ``mailbox_full``:
    the (user_id, device_id) it named whose mailboxes were full, in the order
    the send named them; the send was stored for every other device named.
    """

    server_ts: int
    mailbox_full: tuple[tuple[str, int], ...] = ()


def already_queued(channel: trio.MemoryReceiveChannel[T]) -> list[T]:
    """What ``channel`` holds now, taken without waiting (nothing if it is closed)."""
    items = []
    while True:
        try:
            items.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return items


def _named_devices(request: Request) -> list[tuple[str, int]]:
    """The devices a send may name as full: a group change (all or nothing) none."""
    if isinstance(request, SendDirect):
        return [(request.user_id, device_id) for device_id, _ in request.messages]
    if isinstance(request, SendGroup):
        return list(request.recipients)
    return []


def _check_accepted(reply: Accepted, request: Request) -> None:
    """DecodeError unless ``reply`` names only devices its send named (and may), once."""
    full = reply.mailbox_full
    if len(set(full)) != len(full) or not set(full) <= set(_named_devices(request)):
        raise DecodeError("ACCEPTED names a full mailbox the send did not name")


@dataclass(slots=True)
class _Pending:
    """A request waiting for its reply; the reader fills ``reply`` and sets ``done``."""

    request: Request
    expect: type[object]
    done: trio.Event = field(default_factory=trio.Event)
    reply: RelayFrame | None = None
    error: RelayError | None = None


class RelayConnection:
    """One connection to a relay. Obtain it from :func:`connect_relay`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        request_timeout: float = CLIENT_REQUEST_TIMEOUT,
        incoming_queue_size: int = CLIENT_INCOMING_QUEUE_SIZE,
        max_frame_size: int = MAX_FRAME_SIZE,
    ) -> None:
        self._stream = stream
        self._request_timeout = request_timeout
        self._max_frame_size = max_frame_size
        self._decoder = FrameDecoder(max_frame_size=max_frame_size)
        self._write_lock = trio.StrictFIFOLock()
        self._write_broken = False
        # A plain TCP stream's socket, written directly while it takes frames at once.
        self._socket = direct_socket(stream)
        self._next_request_id = 0
        self._pending: dict[int, _Pending] = {}
        if incoming_queue_size <= NOTICE_SLOTS:
            raise InvalidArgument(f"incoming_queue_size must exceed {NOTICE_SLOTS}")
        # The relay is asked never to have more envelopes unacknowledged than
        # fit beside the notices, so a client that acknowledges what it took
        # never finds the channel full, and the reader never stalls replies.
        self._window = incoming_queue_size - NOTICE_SLOTS
        self._incoming_send, self._incoming = trio.open_memory_channel[Incoming](
            incoming_queue_size
        )
        self._state = ConnectionState.AWAIT_HELLO
        self._gone = trio.Event()  # set once the connection is closed (see wait_closed)
        self._closed_locally = False
        self._close_reason: RelayError | None = None
        self._violation: RelayProtocolViolation | None = None
        self._challenge = b""
        self.relay_name = ""
        """The name the relay announced in WELCOME (and that AUTH signs)."""
        self.user_id: str | None = None
        self.device_id: int | None = None

    # ---------------------------------------------------------------- state

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def close_reason(self) -> RelayError | None:
        """The relay's final error (e.g. Superseded, IdleTimeout), if it sent one."""
        return self._close_reason

    def check_open(self) -> None:
        """Raise ConnectionClosed, with the relay's reason, once the connection is closed.

        What :meth:`receive` would raise after the envelopes already pushed, for a
        caller that leaves those at the relay (unacknowledged, they come again).
        """
        if self._state is ConnectionState.CLOSED:
            raise self._closed_error()

    def _closed_error(self) -> ConnectionClosed:
        reason = self._close_reason
        message = "connection closed" if reason is None else f"closed by relay: {reason.wire_code}"
        error = ConnectionClosed(message, reason=reason)
        error.__cause__ = self._violation
        return error

    # ---------------------------------------------------------------- requests

    async def upload_device_list(
        self, signed_device_list: bytes, *, invite: str | None = None
    ) -> None:
        """Publish a SignedDeviceList (its ``encode()`` bytes).

        Before authentication this registers a new user (the first list
        binds its user identity at the relay), with ``invite``, the token
        the relay's operator issued, where the relay registers by invitation
        (RegistrationClosed, InviteRefused otherwise); afterwards it replaces
        the own user's list (counter must grow). Removed devices lose their
        mail.
        """
        await self._request(lambda rid: PublishDeviceList(rid, signed_device_list, invite), Ok)

    async def authenticate(
        self, user_id: str, device_id: int, device_identity: IdentityKeyPair
    ) -> None:
        """Prove possession of the device identity key; then mail starts to arrive."""
        check_user_id(user_id)
        signature = sign_auth(device_identity, self.relay_name, self._challenge, user_id, device_id)
        await self._request(lambda rid: Auth(rid, user_id, device_id, signature), Ok)
        self.user_id, self.device_id = user_id, device_id

    async def fetch_device_list(self, user_id: str) -> bytes:
        """A user's current signed device list (verify it with SignedDeviceList.decode)."""
        check_user_id(user_id)
        reply = await self._request(lambda rid: FetchDeviceList(rid, user_id), DeviceListFrame)
        return reply.signed_device_list

    async def upload_prekeys(
        self,
        *,
        signed_prekey: SignedPreKeyPublic | None = None,
        last_resort_kem: KemPreKeyPublic | None = None,
        one_time: Sequence[OneTimePreKeyPublic] = (),
        one_time_kem: Sequence[KemPreKeyPublic] = (),
    ) -> PreKeyCounts:
        """Replace the signed and last-resort prekeys (if given), add one-time ones.

        Returns the one-time stock after the upload (an empty upload just
        reads it). Every signature is checked by the relay.
        """
        reply = await self._request(
            lambda rid: UploadPreKeys(
                rid, signed_prekey, last_resort_kem, tuple(one_time), tuple(one_time_kem)
            ),
            PreKeyCountsFrame,
        )
        return PreKeyCounts(reply.one_time, reply.one_time_kem)

    async def fetch_bundle(self, user_id: str, device_id: int) -> bytes:
        """A device's PreKeyBundle bytes (takes one of its one-time prekeys)."""
        check_user_id(user_id)
        reply = await self._request(lambda rid: FetchBundle(rid, user_id, device_id), BundleFrame)
        return reply.bundle

    async def send_direct(
        self, user_id: str, messages: Sequence[tuple[int, bytes]], *, resend: bool = False
    ) -> SendResult:
        """Queue one payload per current device of ``user_id``.

        For one's own user, name every other own device. DeviceListMismatch
        carries the current list if the devices named are not exactly those.
        The result names the devices whose mailboxes were full: the relay
        stored the send for the others. Send those devices' payloads again
        later with ``resend=True``, which may name some of a user's devices
        only (MailboxFull, naming them all, if none had room).
        """
        check_user_id(user_id)
        reply = await self._request(
            lambda rid: SendDirect(rid, user_id, tuple(messages), resend), Accepted
        )
        return SendResult(reply.server_ts, reply.mailbox_full)

    async def send_group(
        self, payload: bytes, recipients: Sequence[tuple[str, int]], *, resend: bool = False
    ) -> SendResult:
        """Queue one group payload for many (user_id, device_id); stored once.

        As :meth:`send_direct`: the result names the full mailboxes, and
        ``resend=True`` sends again to some of the devices.
        """
        reply = await self._request(
            lambda rid: SendGroup(rid, payload, tuple(recipients), resend), Accepted
        )
        return SendResult(reply.server_ts, reply.mailbox_full)

    async def send_change(
        self, receipt: bytes, messages: Sequence[tuple[str, Sequence[tuple[int, bytes]]]]
    ) -> int:
        """Queue a group change: per user, one payload per current device, in one commit.

        The relay also queues ``receipt`` (16 bytes) in our own mailbox, at
        the change's place in its order (a RECEIPT envelope from ourselves).
        DeviceListMismatch as for :meth:`send_direct`. Server timestamp (ms).
        """
        if len(receipt) != RECEIPT_SIZE:
            raise InvalidArgument(f"a receipt is {RECEIPT_SIZE} bytes")
        for user_id, _ in messages:
            check_user_id(user_id)
        frozen = tuple((user_id, tuple(payloads)) for user_id, payloads in messages)
        reply = await self._request(lambda rid: SendChange(rid, receipt, frozen), Accepted)
        return reply.server_ts

    async def ack(self, *guids: bytes) -> None:
        """These envelopes are processed (and persisted): the relay deletes them.

        One frame and one round trip for up to MAX_IN_FLIGHT of them (more
        take more frames): acknowledge together what was processed together
        (see :meth:`receive_batch`).
        """
        if not guids:
            raise InvalidArgument("acknowledge at least one envelope")
        if any(len(guid) != GUID_SIZE for guid in guids):
            raise InvalidArgument(f"an envelope guid is {GUID_SIZE} bytes")
        if len(set(guids)) != len(guids):
            raise InvalidArgument("a guid is named twice")
        for start in range(0, len(guids), MAX_IN_FLIGHT):
            part = guids[start : start + MAX_IN_FLIGHT]
            await self._request(partial(Ack, guids=part), Ok)

    async def ping(self) -> None:
        """A round trip; keeps the connection from the relay's idle timeout."""
        await self._request(Ping, Ok)

    async def _request(
        self,
        make: Callable[[int], Request],
        expect: type[R],
        *,
        timeout: float | None = None,
    ) -> R:
        request = make(self._new_request_id())
        if self._state is ConnectionState.CLOSED:
            raise self._closed_error()
        try:
            check_request(self._state, request.TYPE)
        except UnexpectedFrame as exc:
            raise InvalidState(exc.message) from None
        pending = _Pending(request, expect)
        self._pending[request.request_id] = pending
        try:
            with trio.fail_after(self._request_timeout if timeout is None else timeout):
                await self._write(request)
                await pending.done.wait()
        except trio.TooSlowError:
            # Whether the request took effect is unknown, and so is the
            # connection's state (a late OK to AUTH would start pushes): close.
            await trio.aclose_forcefully(self._stream)
            raise RelayTimeout(f"no reply to {request.TYPE.name} in time") from None
        finally:
            del self._pending[request.request_id]
        if pending.error is not None:
            raise pending.error
        reply = pending.reply
        if reply is None:
            raise self._closed_error()
        assert isinstance(reply, expect)  # checked by the reader
        return reply

    def _new_request_id(self) -> int:
        request_id = self._next_request_id
        if request_id > UINT32_MAX:
            raise InvalidState("request ids exhausted on this connection; reconnect")
        self._next_request_id += 1
        return request_id

    async def _write(self, request: Request) -> None:
        try:
            data = encode_frame(encode_body(request), max_frame_size=self._max_frame_size)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"{request.TYPE.name}: arguments do not encode") from exc
        # A caller already cancelled writes nothing, as trio's send_all would not;
        # this checkpoint never lets another task run unless it raises.
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._socket is not None and not self._write_lock.locked() and not self._write_broken:
            # Most frames fit the socket buffer at once (transport/streams.py);
            # send_all writes the rest, if any, or reports the socket broken.
            written = write_at_once(self._socket, data)
            if written == len(data):
                return
            data = data[written:]
            self._write_lock.acquire_nowait()  # free: nothing ran since it was checked
        else:
            await self._write_lock.acquire()
        try:
            if self._write_broken:
                raise self._closed_error()
            self._write_broken = True
            try:
                await self._stream.send_all(data)
                self._write_broken = False
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._closed_error() from exc
            finally:
                if self._write_broken:
                    # Interrupted mid-frame (timeout or broken): the stream is unusable.
                    await trio.aclose_forcefully(self._stream)
        finally:
            self._write_lock.release()

    # ---------------------------------------------------------------- incoming

    async def receive(self) -> Incoming:
        """The next envelope or notice; ConnectionClosed once the connection is gone."""
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._closed_error() from None

    async def receive_batch(self) -> list[Incoming]:
        """The next envelope or notice and whatever else has already arrived.

        Waits like :meth:`receive` for the first; never more than the window
        and the notices.
        """
        return [await self.receive(), *already_queued(self._incoming)]

    async def batches(self) -> AsyncIterator[list[Incoming]]:
        """:meth:`receive_batch` until the connection closes, ending as iteration does."""
        while True:
            try:
                batch = await self.receive_batch()
            except ConnectionClosed:
                if self._closed_locally:
                    return
                raise
            yield batch

    def __aiter__(self) -> AsyncIterator[Incoming]:
        return self

    async def __anext__(self) -> Incoming:
        """Iteration ends when :meth:`aclose` was called; other closes raise ConnectionClosed."""
        try:
            return await self.receive()
        except ConnectionClosed:
            if self._closed_locally:
                raise StopAsyncIteration from None
            raise

    async def _read_frames(self) -> None:
        try:
            while True:
                body = self._decoder.next_frame()
                if body is None:
                    data = await self._stream.receive_some(RECEIVE_CHUNK_SIZE)
                    if not data:
                        return
                    self._decoder.receive_data(data)
                    continue
                await self._dispatch(decode_relay_frame(body, max_frame_size=self._max_frame_size))
        except (RelayError, ProtocolError) as exc:
            # RelayError: a frame too large, or of a type a relay never sends.
            self._violation = RelayProtocolViolation(f"relay sent a bad frame: {exc.message}")
            self._violation.__cause__ = exc
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._finish()
            # A writer blocked on a dead stream is released by closing it.
            await trio.aclose_forcefully(self._stream)

    async def _dispatch(self, frame: RelayFrame) -> None:
        if isinstance(frame, EnvelopePush | QueueEmpty | PreKeysLow | MailExpired):
            if self._state is not ConnectionState.AUTHENTICATED:
                raise DecodeError(f"{frame.TYPE.name} pushed before authentication")
            item = frame.envelope if isinstance(frame, EnvelopePush) else frame
            try:
                # The relay keeps to the window, which leaves room (__init__): no
                # pass through the scheduler per push. Only a relay that breaks
                # the window, or notices piling up, find it full and wait.
                self._incoming_send.send_nowait(item)
            except trio.WouldBlock:
                await self._incoming_send.send(item)
            return
        if isinstance(frame, ErrorFrame) and frame.request_id is None:
            self._close_reason = relay_error_from_wire(frame.code, frame.message, frame.detail)
            return
        pending = self._pending.get(frame.request_id) if frame.request_id is not None else None
        if pending is None:
            if frame.request_id is None or frame.request_id >= self._next_request_id:
                raise DecodeError(f"reply to request {frame.request_id}, never sent")
            return  # its request timed out and is gone
        if isinstance(frame, ErrorFrame):
            pending.error = relay_error_from_wire(frame.code, frame.message, frame.detail)
            self._state = state_after_error(self._state, pending.error)
        elif isinstance(frame, pending.expect):
            if isinstance(frame, Accepted):
                _check_accepted(frame, pending.request)
            self._state = state_after_success(self._state, pending.request.TYPE)
        else:
            raise DecodeError(f"{frame.TYPE.name} is no reply to {pending.request.TYPE.name}")
        pending.reply = frame
        pending.done.set()

    def _finish(self) -> None:
        self._state = ConnectionState.CLOSED
        self._gone.set()
        for pending in self._pending.values():
            pending.done.set()
        self._incoming_send.close()

    # ---------------------------------------------------------------- lifecycle

    async def _hello(self, timeout: float, expected_relay_name: str) -> None:
        try:
            welcome = await self._request(
                lambda rid: Hello(rid, RELAY_PROTOCOL_VERSION, self._window),
                Welcome,
                timeout=timeout,
            )
        except RelayTimeout:
            raise ConnectTimeout(f"no answer to HELLO within {timeout:g} s") from None
        except UnsupportedVersion as refusal:
            spoken = ", ".join(map(str, refusal.supported)) or "none"
            raise UnsupportedVersion(
                f"the relay speaks relay protocol version {spoken}, "
                f"this client {RELAY_PROTOCOL_VERSION}",
                supported=refusal.supported,
            ) from refusal
        if welcome.version != RELAY_PROTOCOL_VERSION:
            raise RelayProtocolViolation(f"relay answered with version {welcome.version}")
        if welcome.relay_name != expected_relay_name:
            # Compared before anything is signed: a relay passing on another
            # relay's challenge would have us sign a login to that relay.
            raise RelayNameMismatch(
                f"relay calls itself {welcome.relay_name!r}, expected {expected_relay_name!r}"
            )
        self.relay_name, self._challenge = welcome.relay_name, welcome.challenge

    async def _keep_alive(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            try:
                await self.ping()
            except (ConnectionFailure, InvalidState):
                return  # the connection is closed (a ping timeout closes it)

    async def wait_closed(self) -> None:
        """Return once the connection is closed, by either side or by its failure."""
        await self._gone.wait()

    async def aclose(self) -> None:
        """Close the connection (idempotent); pending requests raise ConnectionClosed."""
        self._closed_locally = True
        await trio.aclose_forcefully(self._stream)


@asynccontextmanager
async def connect_relay(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    expected_relay_name: str | None = None,
    connect_timeout: float = CLIENT_CONNECT_TIMEOUT,
    request_timeout: float = CLIENT_REQUEST_TIMEOUT,
    incoming_queue_size: int = CLIENT_INCOMING_QUEUE_SIZE,
    max_frame_size: int = MAX_FRAME_SIZE,
    keepalive_interval: float | None = CLIENT_KEEPALIVE,
) -> AsyncIterator[RelayConnection]:
    """Connect to a relay, say HELLO, and yield the connection; close it on exit.

    ``ssl_context`` enables TLS (``server_hostname`` defaults to ``host``).
    ``expected_relay_name`` is the relay we mean; the name the relay
    announces must equal it (RelayNameMismatch otherwise, before anything is
    signed), since authentication signatures name the relay and a relay could
    otherwise pass another relay's challenge on to us and our signature back
    (spec 7.4). It defaults to the name we dial: ``server_hostname`` for TLS,
    else ``host``. ``connect_timeout``
    covers TCP, TLS and HELLO; ``request_timeout`` each later request.
    ``keepalive_interval`` (None: off) pings to stay under the relay's idle
    timeout and to notice a dead relay. ``incoming_queue_size`` bounds the
    envelopes and notices buffered before the reader stops reading.

    A connection that cannot be opened raises the subclass of
    :class:`~hushchat.transport.wire.errors.ConnectFailed` that says why
    (UnknownHost, ConnectionRefused, HostUnreachable, TlsFailed), or
    ConnectTimeout; its message names the address.
    """
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
            if ssl_context is not None:
                tls = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
                stream = tls
                # Handshake before the reader starts, so no two tasks race to do it.
                await tls.do_handshake()
    except BaseException as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        failure = _connect_failure(exc, host, port, connect_timeout)
        if failure is None:
            raise
        logger.info("cannot connect: %s (%s)", failure, failure.code)
        raise failure from exc
    logger.debug("connected to %s", format_address(host, port))
    async with open_relay_connection(
        stream,
        expected_relay_name=expected_relay_name or server_hostname or host,
        connect_timeout=connect_timeout,
        request_timeout=request_timeout,
        incoming_queue_size=incoming_queue_size,
        max_frame_size=max_frame_size,
        keepalive_interval=keepalive_interval,
    ) as connection:
        yield connection


# errno values of a connection that found no route to its host.
_UNREACHABLE = frozenset(
    {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN, errno.EADDRNOTAVAIL}
)


def _connect_failure(
    exc: BaseException, host: str, port: int, timeout: float
) -> ConnectionFailure | None:
    """The ConnectionFailure subclass that says why opening a connection failed, if it did."""
    where = format_address(host, port)
    if isinstance(exc, trio.TooSlowError):
        return ConnectTimeout(f"{where} did not answer within {timeout:g} s")
    if isinstance(exc, socket.gaierror):
        return UnknownHost(f"unknown host {host!r} ({exc.strerror})")
    if isinstance(exc, OSError):
        # trio raises one OSError for all the addresses it tried, caused by a
        # group of each attempt's error: refused if every attempt was.
        causes = [exc]
        if isinstance(exc.__cause__, BaseExceptionGroup):
            causes = [e for e in exc.__cause__.exceptions if isinstance(e, OSError)] or causes
        numbers = {e.errno for e in causes}
        if numbers == {errno.ECONNREFUSED}:
            return ConnectionRefused(f"nothing listens at {where} (connection refused)")
        if numbers and numbers <= _UNREACHABLE | {errno.ECONNREFUSED}:
            return HostUnreachable(f"{where} is unreachable (no route to the host)")
        reason = next((e.strerror for e in causes if e.strerror), str(exc))
        return ConnectFailed(f"cannot connect to {where}: {reason}")
    if isinstance(exc, trio.BrokenResourceError):
        if isinstance(exc.__cause__, ssl.SSLError):
            reason = getattr(exc.__cause__, "reason", None) or str(exc.__cause__)
            return TlsFailed(f"TLS with {where} failed: {reason}")
        return ConnectFailed(f"{where} closed the connection during the TLS handshake")
    return None


@asynccontextmanager
async def open_relay_connection(
    stream: trio.abc.Stream,
    *,
    expected_relay_name: str,
    connect_timeout: float = CLIENT_CONNECT_TIMEOUT,
    request_timeout: float = CLIENT_REQUEST_TIMEOUT,
    incoming_queue_size: int = CLIENT_INCOMING_QUEUE_SIZE,
    max_frame_size: int = MAX_FRAME_SIZE,
    keepalive_interval: float | None = CLIENT_KEEPALIVE,
) -> AsyncIterator[RelayConnection]:
    """As :func:`connect_relay`, over an already open stream (closed on exit).

    For other transports (a proxy, a Unix socket) and for in-memory tests.
    There is no dialled name to default to: ``expected_relay_name`` is the
    name of the relay the stream leads to.
    """
    connection = RelayConnection(
        stream,
        request_timeout=request_timeout,
        incoming_queue_size=incoming_queue_size,
        max_frame_size=max_frame_size,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection._read_frames)
            try:
                await connection._hello(connect_timeout, expected_relay_name)
                if keepalive_interval is not None:
                    nursery.start_soon(connection._keep_alive, keepalive_interval)
                yield connection
            finally:
                await connection.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if (error := callers_error(group)) is not None:
            raise error from None
        raise


def callers_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error of the caller's block in a group from a connection's nursery.

    The reader and keepalive never raise, so an exception other than
    Cancelled is the caller's own. Cancelled beside it (the caller's scope
    was cancelled meanwhile) comes again at the caller's next checkpoint, as
    cancellation in trio is level-triggered: the error comes out alone, as
    the caller's except clauses expect.
    """
    _, own = group.split(trio.Cancelled)
    if own is not None and len(own.exceptions) == 1:
        return own.exceptions[0]
    return None
