"""One client connection at the relay: read frames, answer requests, push mail.

Two tasks per authenticated connection, as trio-websocket's bridge: the
reader (this module's :meth:`RelaySession.run`) decodes frames and handles
requests one at a time, in order; the delivery task pushes envelopes and
notices. It reads the mailbox on connecting and when more mail came than it
could keep; otherwise a send's commit hands it the new envelopes, in commit
order, and they are pushed without another read. Both write through one
:class:`trio.StrictFIFOLock`, so frames never interleave (a write the
socket takes at once skips the lock's wait). An acknowledgement is answered
at once; a short-lived task per acknowledgement deletes its envelopes, so
the deletions of a connection share commits.
Every wait has a deadline (auth, idle, frame, send); every failure ends
this connection only.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from typing import TYPE_CHECKING

import trio

from hushchat.protocol.consts import PROTOCOL_VERSION
from hushchat.protocol.devices import DeviceList, SignedDeviceList, check_update
from hushchat.protocol.encoding import pack
from hushchat.protocol.errors import ProtocolError, StaleChange
from hushchat.protocol.keys import encode_mlkem768, encode_x25519, verify_prekey_signature
from hushchat.protocol.primitives import check_x25519_not_small_order, mlkem768_public_key

from ..streams import direct_socket, write_at_once
from ..wire.auth import AUTH_CHALLENGE_SIZE, verify_auth
from ..wire.errors import (
    AuthenticationFailed,
    AuthTimeout,
    DeviceListMismatch,
    DeviceListRejected,
    DeviceMismatch,
    DeviceRemoved,
    Forbidden,
    FrameTimeout,
    FrameTooLarge,
    IdleTimeout,
    InternalError,
    InviteRefused,
    NoPreKeys,
    PreKeysRejected,
    RateLimited,
    RegistrationClosed,
    RelayError,
    StorageFull,
    UnknownDevice,
    UnknownUser,
    UnsupportedVersion,
)
from ..wire.frames import (
    Accepted,
    Ack,
    Auth,
    BadRequest,
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
    decode_request,
    encode_body,
)
from ..wire.framing import FrameDecoder, encode_frame
from ..wire.limits import DELIVERY_BATCH_SIZE, RECEIVE_CHUNK_SIZE, RELAY_PROTOCOL_VERSION
from ..wire.records import GUID_SIZE, Envelope, EnvelopeKind, PreKeyCounts
from ..wire.states import ConnectionState, check_request, state_after_error, state_after_success
from .config import Registration
from .invites import token_hash
from .ratelimit import TokenBucket
from .storage.interface import (
    Delivery,
    EnvelopeBatch,
    MailboxPosition,
    QueuedEnvelope,
    StorageConflict,
    StoredDeviceList,
)

if TYPE_CHECKING:
    from .server import Relay

logger = logging.getLogger("hushchat.relay")

# Random bytes naming a connection to the relays sharing a database: a
# notice that a device's connection was superseded closes that one only,
# never a newer one of the same device.
CONNECTION_ID_SIZE = 8

# Attempts at a send whose recipients' device lists change between the check
# and the commit (each attempt re-reads them); more means someone is
# changing lists in a loop.
_SEND_ATTEMPTS = 3

# Seconds before a connection reads its mailbox again after the read failed on
# a full disk: often enough that mail flows again soon after space returns,
# rarely enough that connections waiting cost the writer next to nothing.
STORAGE_RETRY_INTERVAL = 1.0


class RelaySession:
    """The relay's side of one connection. Created and run by :class:`~.server.Relay`."""

    def __init__(self, relay: Relay, stream: trio.abc.Stream) -> None:
        self._relay = relay
        self._limits = relay.config.limits
        self._stream = stream
        # Anonymous peers get small frames only; AUTH raises the limit.
        self._decoder = FrameDecoder(
            max_frame_size=min(
                self._limits.max_unauthenticated_frame_size, self._limits.max_frame_size
            )
        )
        self._write_lock = trio.StrictFIFOLock()
        self._write_broken = False  # a write was interrupted: the stream is unusable
        # A plain TCP stream's socket, written directly while it takes frames at once.
        self._socket = direct_socket(stream)
        self._state = ConnectionState.AWAIT_HELLO
        self._challenge = secrets.token_bytes(AUTH_CHALLENGE_SIZE)
        self._cancel_scope = trio.CancelScope()
        self._close_error: RelayError | None = None  # pushed (request id nil) on close
        self.user_id = ""
        self.device_id = 0
        self._identity = b""
        # Names this connection to the relays sharing the database (cluster only).
        self.connection_id = secrets.token_bytes(CONNECTION_ID_SIZE)
        # Delivery state (AUTHENTICATED only).
        self._wake = trio.Event()
        self._unread = True  # the mailbox may hold envelopes not pushed yet
        # New envelopes handed over at commit while the mailbox was read up to
        # date: pushed without reading it again. With the envelopes in flight
        # they never exceed the window, so a reader that stalls holds no more
        # of the relay's memory than the window did before.
        self._handed: deque[QueuedEnvelope] = deque()
        # (epoch, seq) of the last envelope pushed: the mailbox is read after it.
        self._position = (0, 0)
        self._in_flight: dict[bytes, int] = {}  # guid -> seq, pushed and not acknowledged
        self._deletions = trio.Semaphore(self._limits.max_in_flight)  # acknowledged, not deleted
        self._window = self._limits.max_in_flight
        self._low_counts: PreKeyCounts | None = None
        self._low_notified = False
        self._send_bucket = TokenBucket(self._limits.send_rate, trio.current_time())
        self._frame_bucket = TokenBucket(self._limits.frame_rate, trio.current_time())
        self._nursery: trio.Nursery | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.user_id, self.device_id)

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Serve the connection until it closes, times out or is closed by the relay."""
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await self._read_loop()
                    nursery.cancel_scope.cancel()
            if self._close_error is not None and not self._write_broken:
                logger.debug("closing connection: %s", self._close_error.wire_code)
                with trio.move_on_after(self._limits.close_timeout):
                    await self._send(ErrorFrame.from_error(None, self._close_error))
        finally:
            self._relay.detach(self)
            with trio.CancelScope(shield=True):
                await self._relay.withdraw(self)

    def close(self, error: RelayError) -> None:
        """End this connection from elsewhere, telling the client ``error`` (best effort)."""
        self._close_error = error
        self._cancel_scope.cancel()

    def follows(self, position: MailboxPosition) -> bool:
        """Whether this connection has everything of its mailbox before ``position``.

        Relays sharing a database: true if it read (or was handed) the mail of
        ``position``'s epoch up to at least ``position.previous``; nothing
        another relay committed before that send is then unseen.
        """
        if self._unread or position.previous is None:
            return False
        last = self._handed[-1] if self._handed else None
        epoch, seq = (last.epoch, last.seq) if last is not None else self._position
        return position.epoch == epoch and position.previous <= seq

    def mail_waiting(self) -> None:
        """Mail for this device committed that this relay did not see: read the mailbox."""
        self._handed.clear()
        self._unread = True
        self._wake.set()

    def hand_over(self, queued: QueuedEnvelope) -> None:
        """An envelope for this device committed; called in commit order.

        Kept to push while everything before it was read and the window has
        room for it; otherwise the next mailbox read finds it.
        """
        if not self._unread and len(self._handed) + len(self._in_flight) < self._window:
            self._handed.append(queued)
        else:
            self._handed.clear()
            self._unread = True
        self._wake.set()

    def prekeys_low(self, counts: PreKeyCounts) -> None:
        """Another connection took this device's prekeys and the stock is low."""
        if not self._low_notified:
            self._low_counts = counts
            self._wake.set()

    async def _send(self, *frames: RelayFrame) -> None:
        """Write ``frames`` in order, in one write (pushes of a batch cost one syscall)."""
        max_size = self._limits.max_frame_size
        data = b"".join(
            encode_frame(encode_body(frame), max_frame_size=max_size) for frame in frames
        )
        if self._socket is not None and not self._write_lock.locked() and not self._write_broken:
            # Most writes fit the socket buffer at once (transport/streams.py);
            # send_all writes the rest, if any, or reports the socket broken.
            written = write_at_once(self._socket, data)
            if written == len(data):
                return
            self._write_lock.acquire_nowait()  # free: nothing ran since it was checked
            try:
                await self._write(data[written:])
            finally:
                self._write_lock.release()
        else:
            async with self._write_lock:
                await self._write(data)
        if self._write_broken:
            await self._broken()

    async def _write(self, data: bytes) -> None:
        """``send_all`` within the send timeout; the write lock is held."""
        if self._write_broken:
            return
        self._write_broken = True  # until send_all completes
        with trio.move_on_after(self._limits.send_timeout) as timeout:
            try:
                await self._stream.send_all(data)
                self._write_broken = False
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        if self._write_broken:
            reason = "send timeout" if timeout.cancelled_caught else "broken"
            logger.debug("connection dropped: %s", reason)

    async def _broken(self) -> None:
        # The peer is gone or does not read, or a frame was cut short: the
        # stream is unusable, so the connection ends (nothing more is sent).
        self._cancel_scope.cancel()
        await trio.lowlevel.checkpoint()

    # ---------------------------------------------------------------- reading

    async def _read_loop(self) -> None:
        opened = trio.current_time()
        auth_deadline = opened + self._limits.auth_timeout
        last_frame = opened
        frame_deadline: float | None = None
        fresh = False  # the decoder's next frame came with the last read
        while self._state is not ConnectionState.CLOSED:
            try:
                body = self._decoder.next_frame()
            except FrameTooLarge as too_large:
                await self._refuse(None, too_large)
                return
            if body is not None:
                if not fresh:
                    # Several frames in one read: let other connections run between them
                    # (a reply may be written without a checkpoint).
                    await trio.lowlevel.checkpoint()
                fresh = False
                await self._pace()
                last_frame = trio.current_time()
                frame_deadline = None
                await self._handle(body)
                continue
            if self._decoder.in_frame and frame_deadline is None:
                frame_deadline = trio.current_time() + self._limits.frame_timeout
            deadline, expired = self._deadline(auth_deadline, last_frame, frame_deadline)
            with trio.move_on_at(deadline) as timeout:
                try:
                    data = await self._stream.receive_some(RECEIVE_CHUNK_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if timeout.cancelled_caught:
                self._close_error = expired
                return
            if not data:
                return  # the client closed its side
            self._decoder.receive_data(data)
            fresh = True

    async def _pace(self) -> None:
        """Hold the connection to its frame rate: above it, read nothing until under it."""
        while (wait := self._frame_bucket.take(trio.current_time())) > 0:
            await trio.sleep(wait)

    def _deadline(
        self, auth_deadline: float, last_frame: float, frame_deadline: float | None
    ) -> tuple[float, RelayError]:
        error: RelayError
        if self._state is ConnectionState.AUTHENTICATED:
            deadline, error = last_frame + self._limits.idle_timeout, IdleTimeout("idle")
        else:
            deadline, error = auth_deadline, AuthTimeout("not authenticated in time")
        if frame_deadline is not None and frame_deadline < deadline:
            return frame_deadline, FrameTimeout("frame not completed in time")
        return deadline, error

    async def _handle(self, body: bytes) -> None:
        request = decode_request(body, self._relay.request_limits)
        if isinstance(request, BadRequest):
            await self._refuse(request.request_id, request.error)
            return
        try:
            check_request(self._state, request.TYPE)
            reply = await self._dispatch(request)
        except RelayError as error:
            await self._refuse(request.request_id, error)
            return
        except Exception:
            self._relay.internal_error(request.TYPE.name)
            await self._refuse(request.request_id, InternalError("internal error"))
            return
        self._state = state_after_success(self._state, request.TYPE)
        await self._send(reply)
        if isinstance(request, Auth):
            await self._start_delivery()
        elif isinstance(request, Ack):
            await self._start_deletion(request.guids)
        if self._close_error is not None:
            self._state = ConnectionState.CLOSED

    async def _refuse(self, request_id: int | None, error: RelayError) -> None:
        logger.debug("refused request: %s", error.wire_code)
        await self._send(ErrorFrame.from_error(request_id, error))
        self._state = state_after_error(self._state, error)

    async def _dispatch(self, request: Request) -> RelayFrame:
        match request:
            case Hello():
                return self._hello(request)
            case Auth():
                return await self._auth(request)
            case PublishDeviceList():
                return await self._publish_device_list(request)
            case FetchDeviceList():
                stored = await self._device_list(request.user_id)
                return DeviceListFrame(request.request_id, stored.signed)
            case UploadPreKeys():
                return await self._upload_prekeys(request)
            case FetchBundle():
                return await self._fetch_bundle(request)
            case SendDirect():
                return await self._send_direct(request)
            case SendGroup():
                return await self._send_group(request)
            case SendChange():
                return await self._send_change(request)
            case Ack():
                return Ok(request.request_id)  # the deletion follows the reply (_start_deletion)
            case Ping():
                return Ok(request.request_id)

    # ---------------------------------------------------------------- handshake

    def _hello(self, request: Hello) -> RelayFrame:
        if request.version != RELAY_PROTOCOL_VERSION:
            newer = request.version > RELAY_PROTOCOL_VERSION
            raise UnsupportedVersion(
                f"relay protocol version {request.version} is not spoken here: this relay "
                f"speaks version {RELAY_PROTOCOL_VERSION}; update the "
                + ("relay" if newer else "client"),
                supported=[RELAY_PROTOCOL_VERSION],
            )
        self._window = min(request.window, self._limits.max_in_flight)
        return Welcome(
            request.request_id, RELAY_PROTOCOL_VERSION, self._relay.config.name, self._challenge
        )

    async def _auth(self, request: Auth) -> RelayFrame:
        stored = (await self._relay.storage.device_lists([request.user_id])).get(request.user_id)
        identity = None if stored is None else stored.device_identity(request.device_id)
        if identity is None:
            self._relay.login_refused(
                request.user_id,
                request.device_id,
                "the user is not registered"
                if stored is None
                else "the device is not in its user's list",
            )
            raise AuthenticationFailed("unknown user or device")
        try:
            verify_auth(
                identity,
                request.signature,
                self._relay.config.name,
                self._challenge,
                request.user_id,
                request.device_id,
            )
        except ProtocolError:
            self._relay.login_refused(
                request.user_id, request.device_id, "the signature does not verify"
            )
            raise AuthenticationFailed("signature does not verify") from None
        self.user_id, self.device_id, self._identity = request.user_id, request.device_id, identity
        self._decoder.max_frame_size = self._limits.max_frame_size
        # Other relays sharing the database route this device's mail here from
        # now on, before this connection's first mailbox read.
        await self._relay.announce(self)
        self._relay.attach(self)
        # Who connects is for DEBUG only: INFO never names a user (README, Logging).
        logger.debug("device %s.%d authenticated", self.user_id, self.device_id)
        return Ok(request.request_id)

    async def _start_delivery(self) -> None:
        try:
            counts = await self._relay.storage.prekey_counts(self.user_id, self.device_id)
        except StorageFull:
            pass  # the stock is checked again at the next fetch of this device's bundle
        else:
            if self._relay.is_low(counts):
                self._low_counts = counts
        assert self._nursery is not None
        self._nursery.start_soon(self._deliver)

    # ---------------------------------------------------------------- device lists

    async def _device_list(self, user_id: str) -> StoredDeviceList:
        stored = (await self._relay.storage.device_lists([user_id])).get(user_id)
        if stored is None:
            raise UnknownUser("no such user", user_id=user_id)
        return stored

    async def _publish_device_list(self, request: PublishDeviceList) -> RelayFrame:
        try:
            new = SignedDeviceList.decode(request.signed_device_list).device_list
        except ProtocolError as exc:
            raise DeviceListRejected(exc.message, cause=exc.code) from None
        authenticated = self._state is ConnectionState.AUTHENTICATED
        if authenticated and new.user_id != self.user_id:
            raise Forbidden("a device publishes only its own user's device list")
        current = (await self._relay.storage.device_lists([new.user_id])).get(new.user_id)
        invite_hash = None
        if current is None:
            invite_hash = self._registration_invite(request)
        else:
            if not authenticated:
                raise Forbidden("user exists: authenticate as one of its devices to update")
            try:
                # Against what is stored, not a decode of it: a list of an older
                # protocol version (kept from before an upgrade) no longer decodes.
                check_update(current, new)
            except ProtocolError as exc:
                raise DeviceListRejected(exc.message, cause=exc.code) from None
        stored = _stored_list(new, request.signed_device_list)
        try:
            removed = await self._relay.storage.store_device_list(
                stored,
                previous_counter=None if current is None else current.counter,
                invite_hash=invite_hash,
                now=self._relay.config.clock(),
            )
        except StorageConflict:
            raise DeviceListRejected("the list changed meanwhile", cause=StaleChange.code) from None
        self._relay.remember(stored)
        for device_id in removed:
            if (new.user_id, device_id) == self.key and authenticated:
                self._close_error = DeviceRemoved("this device was removed")
            else:
                self._relay.close_device(new.user_id, device_id, DeviceRemoved("device removed"))
        return Ok(request.request_id)

    def _registration_invite(self, request: PublishDeviceList) -> bytes | None:
        """Whether a new user may register (spec 7.6); the invitation to spend, if any."""
        registration = self._relay.config.registration
        if registration is Registration.CLOSED:
            raise RegistrationClosed("this relay registers no new users")
        if registration is Registration.OPEN:
            return None
        if request.invite is None:
            raise InviteRefused("this relay registers new users by invitation")
        return token_hash(request.invite)

    # ---------------------------------------------------------------- prekeys

    async def _upload_prekeys(self, request: UploadPreKeys) -> RelayFrame:
        try:
            await trio.to_thread.run_sync(_verify_prekeys, self._identity, request)
        except ProtocolError as exc:
            raise PreKeysRejected(exc.message, cause=exc.code) from None
        counts = await self._relay.storage.store_prekeys(
            self.user_id,
            self.device_id,
            signed_prekey=request.signed_prekey,
            last_resort_kem=request.last_resort_kem,
            one_time=request.one_time,
            one_time_kem=request.one_time_kem,
            max_stored=self._limits.max_stored_prekeys,
        )
        self._low_notified = False
        self._low_counts = None
        return PreKeyCountsFrame(request.request_id, counts.one_time, counts.one_time_kem)

    async def _fetch_bundle(self, request: FetchBundle) -> RelayFrame:
        target = (request.user_id, request.device_id)
        stored = await self._device_list(request.user_id)
        if request.device_id not in stored.device_ids:
            raise UnknownDevice("no such device")
        relay, pair, now = self._relay, (self.key, target), trio.current_time()
        wait = relay.bundle_limiter.take(pair, now)
        if wait > 0:
            raise RateLimited("too many bundle fetches", retry_after_ms=math.ceil(wait * 1000))
        # Within the target's budget the bundle carries one-time prekeys; beyond
        # it, only the signed and last-resort keys (spec 7.7): no one is refused.
        # The budget is kept in the database, spent in the transaction that
        # takes the keys, so all the relays on one database share it.
        try:
            taken = await relay.storage.take_bundle(
                *target, budget=self._limits.one_time_prekey_budget, now=relay.config.clock()
            )
        except BaseException:
            relay.bundle_limiter.give_back(pair)
            raise
        if taken is None:
            relay.bundle_limiter.give_back(pair)  # a refusal changes nothing
            raise NoPreKeys("the device has no prekeys")
        self._relay.prekeys_taken(request.user_id, request.device_id, taken.remaining)
        bundle = pack(
            [
                PROTOCOL_VERSION,
                request.user_id,
                request.device_id,
                taken.identity,
                taken.signed_prekey.to_wire(),
                None if taken.one_time is None else taken.one_time.to_wire(),
                taken.kem.to_wire(),
                taken.kem_is_last_resort,
            ]
        )
        return BundleFrame(request.request_id, bundle)

    # ---------------------------------------------------------------- sends

    def _take_send_token(self) -> None:
        wait = self._send_bucket.take(trio.current_time())
        if wait > 0:
            raise RateLimited("too many sends", retry_after_ms=math.ceil(wait * 1000))

    def _mismatch(
        self, stored: StoredDeviceList, named: set[int], resend: bool
    ) -> DeviceMismatch | None:
        expected = set(stored.device_ids)
        if stored.user_id == self.user_id:
            expected.discard(self.device_id)  # one's own other devices, never oneself
        missing = set() if resend else expected - named  # a resend names those it retries
        unknown = named - expected
        if not missing and not unknown:
            return None
        return DeviceMismatch(
            stored.user_id, stored.signed, tuple(sorted(missing)), tuple(sorted(unknown))
        )

    async def _send_direct(self, request: SendDirect) -> RelayFrame:
        self._take_send_token()
        named = {request.user_id: {device_id for device_id, _ in request.messages}}
        guids = _guids(len(request.messages))
        deliveries = tuple(
            Delivery(request.user_id, device_id, next(guids), index)
            for index, (device_id, _) in enumerate(request.messages)
        )
        payloads = tuple((EnvelopeKind.DIRECT, payload) for _, payload in request.messages)
        with _token_back_on_failure(self._send_bucket.give_back):
            server_ts, full = await self._store(named, payloads, deliveries, resend=request.resend)
        return Accepted(request.request_id, server_ts, full)

    async def _send_group(self, request: SendGroup) -> RelayFrame:
        self._take_send_token()
        named: dict[str, set[int]] = {}
        for user_id, device_id in request.recipients:
            named.setdefault(user_id, set()).add(device_id)
        guids = _guids(len(request.recipients))
        deliveries = tuple(
            Delivery(user_id, device_id, next(guids), 0)
            for user_id, device_id in request.recipients
        )
        payloads = ((EnvelopeKind.GROUP, request.payload),)
        with _token_back_on_failure(self._send_bucket.give_back):
            server_ts, full = await self._store(named, payloads, deliveries, resend=request.resend)
        return Accepted(request.request_id, server_ts, full)

    async def _send_change(self, request: SendChange) -> RelayFrame:
        """A group change: every payload, and the receipt for ourselves, in one commit.

        All or nothing: every device meets the change at one place in the
        relay's order (spec/12-groups.md, section 12.4), so one full mailbox
        refuses it whole (MAILBOX_FULL), and its ACCEPTED names none.
        """
        self._take_send_token()
        named = {user_id: {d for d, _ in payloads} for user_id, payloads in request.messages}
        items = [
            (user_id, device_id, payload)
            for user_id, payloads in request.messages
            for device_id, payload in payloads
        ]
        guids = _guids(len(items) + 1)
        deliveries = tuple(
            Delivery(user_id, device_id, next(guids), index)
            for index, (user_id, device_id, _) in enumerate(items)
        )
        receipt = Delivery(self.user_id, self.device_id, next(guids), len(items))
        payloads = (
            *((EnvelopeKind.DIRECT, payload) for _, _, payload in items),
            (EnvelopeKind.RECEIPT, request.receipt),
        )
        with _token_back_on_failure(self._send_bucket.give_back):
            server_ts, _ = await self._store(
                named, payloads, (*deliveries, receipt), resend=False, all_or_nothing=True
            )
        return Accepted(request.request_id, server_ts)

    def _check_recipients(
        self, named: dict[str, set[int]], lists: dict[str, StoredDeviceList], resend: bool
    ) -> RelayError | None:
        """Why a send naming ``named`` is refused against ``lists``, or None."""
        for user_id in named:
            if user_id not in lists:
                return UnknownUser("no such user", user_id=user_id)
        mismatches = [
            m
            for user_id, ids in named.items()
            if (m := self._mismatch(lists[user_id], ids, resend))
        ]
        if mismatches:
            return DeviceListMismatch("recipient devices differ", mismatches=mismatches)
        return None

    async def _store(
        self,
        named: dict[str, set[int]],
        payloads: tuple[tuple[EnvelopeKind, bytes], ...],
        deliveries: tuple[Delivery, ...],
        *,
        resend: bool,
        all_or_nothing: bool = False,
    ) -> tuple[int, tuple[tuple[str, int], ...]]:
        """Check the named devices against the directory, then commit.

        Returns the server timestamp and the devices whose mailboxes were
        full (the send is stored for the others). The first check may use
        the relay's copy of the lists in memory: the commit compares each
        list's counter with the stored one, so a copy out of date costs a
        retry on what storage holds, and so does a refusal (nothing is
        refused on a copy).
        """
        storage = self._relay.storage
        cached = True
        for _ in range(_SEND_ATTEMPTS + 1):
            lists = await self._relay.device_lists(list(named), cached=cached)
            refusal = self._check_recipients(named, lists, resend)
            if refusal is not None:
                if cached:
                    cached = False
                    continue
                raise refusal
            server_ts = self._relay.config.clock()
            batch = EnvelopeBatch(
                sender_user=self.user_id,
                sender_device=self.device_id,
                server_ts=server_ts,
                expires_at=server_ts + 1000 * self._relay.config.retention_seconds,
                payloads=payloads,
                deliveries=deliveries,
                device_list_counters={u: lists[u].counter for u in named},
                all_or_nothing=all_or_nothing,
            )
            try:
                full = await storage.enqueue(
                    batch,
                    max_mailbox_size=self._limits.max_mailbox_size,
                    committed=partial(self._hand_over, batch),
                )
            except StorageConflict:
                cached = False
                continue
            return server_ts, full
        raise InternalError("recipient device lists keep changing; retry")

    def _hand_over(self, batch: EnvelopeBatch, positions: Sequence[MailboxPosition | None]) -> None:
        """Give a committed send's envelopes to their devices' connections.

        With relays sharing the database, another relay's send to the same
        device may have committed just before this one, its wake still on the
        way: handing this one over would put the connection's cursor past it.
        Then the connection reads its mailbox instead (MailboxPosition).
        """
        for delivery, position in zip(batch.deliveries, positions, strict=True):
            if position is None:
                continue  # the mailbox was full: not stored
            session = self._relay.session_of(delivery.user_id, delivery.device_id)
            shared = self._relay.cluster is not None
            if session is not None and shared and not session.follows(position):
                session.mail_waiting()
            elif session is not None:
                kind, payload = batch.payloads[delivery.payload_index]
                envelope = Envelope(
                    delivery.guid,
                    batch.server_ts,
                    batch.sender_user,
                    batch.sender_device,
                    kind,
                    payload,
                )
                epoch, seq = position
                session.hand_over(QueuedEnvelope(seq, envelope, epoch))

    # ---------------------------------------------------------------- delivery

    async def _start_deletion(self, guids: tuple[bytes, ...]) -> None:
        """Delete acknowledged envelopes, after the OK, without waiting for it (spec 7.8).

        The deletion commits with the next batch, together with the other
        acknowledgements that arrive meanwhile; the next request is read at
        once. If the relay stops before that commit, the envelope is pushed
        again, as any unacknowledged one, and the client recognises it by its
        guid. At most a window of ACKs is being deleted per connection. Only
        envelopes pushed on this connection are found by their guid (a row
        keeps its guid sealed); any other guid changes nothing.
        """
        seqs = tuple(self._in_flight[guid] for guid in guids if guid in self._in_flight)
        if not seqs:
            return
        try:
            self._deletions.acquire_nowait()
        except trio.WouldBlock:
            await self._deletions.acquire()
        assert self._nursery is not None
        self._nursery.start_soon(self._delete, guids, seqs)

    async def _delete(self, guids: tuple[bytes, ...], seqs: tuple[int, ...]) -> None:
        try:
            await self._acknowledge(seqs)
        except Exception:
            self._relay.acknowledgement_not_stored()
        finally:
            self._deletions.release()
        for guid in guids:
            self._in_flight.pop(guid, None)
        if self._unread or self._handed:  # mail held back by the window: there is room now
            self._wake.set()

    async def _acknowledge(self, seqs: tuple[int, ...]) -> None:
        storage = self._relay.storage
        try:
            try:
                await storage.acknowledge(self.user_id, self.device_id, seqs)
            except trio.Cancelled:
                # The connection closed before the deletion was queued (storage
                # busy): it was acknowledged, so it is deleted all the same.
                with trio.CancelScope(shield=True):
                    await storage.acknowledge(self.user_id, self.device_id, seqs)
                raise
        except StorageFull:
            # Acknowledged, so deleted even if the connection closes meanwhile.
            with trio.CancelScope(shield=True):
                deleted = len(seqs) > 1 and await self._acknowledge_one_by_one(seqs)
            if not deleted:
                logger.debug("acknowledgement not stored (disk full): the envelope will come again")

    async def _acknowledge_one_by_one(self, seqs: tuple[int, ...]) -> bool:
        """Delete the envelopes at ``seqs`` one per transaction; False if the disk is too full.

        Deleting takes room too: with secure delete every page freed is written
        to the WAL first. One envelope per transaction needs room for one
        envelope only, as the WAL starts over between transactions.
        """
        try:
            for seq in seqs:
                await self._relay.storage.acknowledge(self.user_id, self.device_id, (seq,))
        except StorageFull:
            return False
        return True

    async def _deliver(self) -> None:
        storage = self._relay.storage
        backlog_pushed = False
        try:
            notice = await storage.expiry_notice(self.user_id, self.device_id)
        except StorageFull:
            notice = None  # told at the device's next connection
        while True:
            self._wake = trio.Event()
            frames: list[RelayFrame] = []
            if self._low_counts is not None and not self._low_notified:
                counts, self._low_counts, self._low_notified = self._low_counts, None, True
                frames.append(PreKeysLow(counts.one_time, counts.one_time_kem))
            if notice is not None:
                frames.append(MailExpired(notice.count, notice.first_ts, notice.last_ts))
            room = self._window - len(self._in_flight)
            if room > 0 and self._unread:
                # Cleared before the read: mail committed after it is read is handed over.
                self._unread = False
                self._handed.clear()  # committed, so the read finds them
                limit = min(room, DELIVERY_BATCH_SIZE)
                try:
                    batch = await storage.pending(
                        self.user_id,
                        self.device_id,
                        after_epoch=self._position[0],
                        after_seq=self._position[1],
                        limit=limit,
                        now=self._relay.config.clock(),
                    )
                except StorageFull:
                    # The read shared a transaction that failed on a full disk: read
                    # again a little later (the connection stays).
                    self._unread = True
                    await trio.sleep(STORAGE_RETRY_INTERVAL)
                    continue
                if len(batch) == limit:
                    self._unread = True  # perhaps more than fitted
                    self._handed.clear()
                for queued in batch:
                    self._in_flight[queued.envelope.guid] = queued.seq
                    self._position = (queued.epoch, queued.seq)
                    frames.append(EnvelopePush(queued.envelope))
                newest = batch.newest_epoch
                if not self._unread and newest is not None and newest > self._position[0]:
                    # Read to its end: the connection has everything of the newest
                    # epoch there was (none), and the next send's envelope, of that
                    # epoch or a later one, is handed over if none lies before it.
                    self._position = (newest, 0)
                room -= len(batch)
                if not self._unread and not backlog_pushed:
                    backlog_pushed = True
                    frames.append(QueueEmpty())
            while room > 0 and self._handed:
                queued = self._handed.popleft()
                # Else the read above had it: committed before the read, or of an
                # epoch older than the newest it read to its end.
                if (queued.epoch, queued.seq) > self._position:
                    self._in_flight[queued.envelope.guid] = queued.seq
                    self._position = (queued.epoch, queued.seq)
                    frames.append(EnvelopePush(queued.envelope))
                    room -= 1
            if frames:
                await self._send(*frames)
            if notice is not None:  # pushed: the device knows
                with suppress(StorageFull):  # else told again next time
                    await storage.clear_expiry_notice(self.user_id, self.device_id, notice)
                notice = None
            if not ((self._unread or self._handed) and self._window > len(self._in_flight)):
                await self._wake.wait()


@contextmanager
def _token_back_on_failure(give_back: Callable[[], None]) -> Iterator[None]:
    """Give back the request's rate-limit token if the block fails: a refused request,
    or one that failed in storage, changes nothing (it was never answered with success).

    Cancelled included: a storage call is cancelled only before it was queued.
    """
    try:
        yield
    except BaseException:
        give_back()
        raise


def _guids(count: int) -> Iterator[bytes]:
    """``count`` random envelope guids from one CSPRNG read: one system call, not one per guid."""
    pool = secrets.token_bytes(GUID_SIZE * count)
    return (pool[i : i + GUID_SIZE] for i in range(0, len(pool), GUID_SIZE))


def _stored_list(new: DeviceList, signed: bytes) -> StoredDeviceList:
    return StoredDeviceList(
        new.user_id,
        new.user_identity,
        new.counter,
        signed,
        tuple((d.device_id, d.identity) for d in new.devices),
        PROTOCOL_VERSION,
    )


def _verify_prekeys(identity: bytes, request: UploadPreKeys) -> None:
    """Every key valid, every signature by the device identity (X3DH/PQXDH section 3.2).

    X25519 keys of small order are refused too: every initiator would refuse
    a bundle with one (all-zero DH), so storing one only makes handshakes fail.
    """
    if request.signed_prekey is not None:
        spk = request.signed_prekey
        check_x25519_not_small_order(spk.public)
        verify_prekey_signature(identity, encode_x25519(spk.public), spk.signature)
    for opk in request.one_time:
        check_x25519_not_small_order(opk.public)
    kems = request.one_time_kem
    if request.last_resort_kem is not None:
        kems = (request.last_resort_kem, *kems)
    for kem in kems:
        mlkem768_public_key(kem.public)
        verify_prekey_signature(identity, encode_mlkem768(kem.public), kem.signature)
