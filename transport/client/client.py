"""The client library an app embeds: hushchat over a relay, on trio.

::

    store = ClientStore.open("alice.db")
    async with open_client(store, "127.0.0.1", 7443, user_id="alice") as client:
        await client.send_direct("bob", b"hi")
        async for event in client.events():
            ...

:func:`open_client` loads the device from its store (or creates a new user
with ``user_id``), connects, registers and authenticates the device, keeps
its prekeys stocked, sends what the outbox still holds, and returns once the
client is ready. Inside, a :class:`~hushchat.protocol.client_core.ClientCore` does
all protocol work; this module does only I/O around it:

* every incoming envelope is processed, its state changes and resulting
  events persisted in one transaction, and only then acknowledged (what
  arrived together in one ACK); so a crash between decrypt and save loses
  neither the message nor its keys, and a redelivered envelope (lost
  acknowledgement) is recognised by guid;
* every send is encrypted, persisted to the outbox with the new state, and
  then sent; a restarted client sends what is pending; a send refused for a
  stale device list is rebuilt for the current devices and sent again;
* a dropped connection is re-established with exponential backoff; every
  network wait has a timeout (the connection's request timeout, and
  ``ready_timeout`` for operations that wait for a connection).

Operations run one at a time (a lock around the core): the core's state is
a single sequence of changes, as the ratchets require.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from hushchat.protocol import client_core as core
from hushchat.protocol.client_core import Address, ChangeSend, ClientCore, DirectSend, Outcome
from hushchat.protocol.client_core.arguments import (
    check_direct_body,
    check_group_body,
    check_group_id,
    check_user_id,
)
from hushchat.protocol.consts import (
    PREKEY_BATCH_SIZE,
    PREKEY_LOW_WATERMARK,
    SIGNED_PREKEY_ROTATION_AGE,
)
from hushchat.protocol.devices import DeviceEntry, SignedDeviceList
from hushchat.protocol.errors import InvalidArgument, RemoteProtocolError
from hushchat.protocol.fingerprint import SafetyNumber
from hushchat.protocol.group import GroupState
from hushchat.protocol.primitives import SYSTEM_RANDOM, RandomSource

from ..wire.errors import (
    DeviceListMismatch,
    InviteRefused,
    MailboxFull,
    RegistrationClosed,
    RelayError,
    RelayNameMismatch,
    RelayProtocolViolation,
    RelayTimeout,
    TransportError,
    UnknownUser,
)
from ..wire.frames import MailExpired as MailExpiredNotice
from ..wire.frames import PreKeysLow
from ..wire.limits import CLIENT_REQUEST_TIMEOUT
from ..wire.records import Envelope
from .connection import RelayConnection, callers_error, connect_relay
from .store import ClientStore

# Reconnect backoff: doubles from the first delay up to the cap, with jitter,
# so a relay restart is not met by every client at the same instant.
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
# How long an operation waits for a connection before giving up.
READY_TIMEOUT = 30.0
# Events buffered for the app before the receive loop waits for it to read.
EVENT_QUEUE_SIZE = 256
# Sends refused for a stale device list are rebuilt and retried this often.
MAX_SEND_ATTEMPTS = 3
# Processed envelope guids are remembered this long (the relay keeps nothing longer).
PROCESSED_MEMORY = 4 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Connected:
    """The client is connected and authenticated (again)."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection dropped; the client reconnects by itself."""

    reason: str


@dataclass(frozen=True, slots=True)
class MailExpired:
    """The relay deleted mail for this device before the device took it.

    ``count`` envelopes that the relay accepted from ``first_ts`` to
    ``last_ts`` (milliseconds since the Unix epoch) expired unread: their
    senders' messages will not arrive. ``count`` None: the relay lost the
    keys of its queue at ``last_ts``, and whatever waited for this device
    since ``first_ts`` is gone, how much is unknown. Senders are not told by
    the relay; an app may say so to its user, or ask its contacts to resend.
    """

    count: int | None
    first_ts: int
    last_ts: int


ClientEvent = core.Event | Connected | Disconnected | MailExpired


class SendDropped(TransportError):
    """A send kept being refused for its recipients' device lists; it left the outbox unsent."""

    code = "SEND_DROPPED"


class Client:
    """One device connected to a relay. Obtain it from :func:`open_client`.

    Or build it and start :meth:`run` in a nursery yourself (``await
    nursery.start(client.run)``), to handle a failed first connection: the
    arguments are :func:`open_client`'s, with the device's ``device`` (a
    :class:`~hushchat.protocol.client_core.ClientCore`, from
    :func:`load_or_create_core`) required.
    """

    def __init__(
        self,
        store: ClientStore,
        device: ClientCore,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        expected_relay_name: str | None = None,
        invite: str | None = None,
        clock: Callable[[], float] = time.time,
        rng: RandomSource = SYSTEM_RANDOM,
        request_timeout: float = CLIENT_REQUEST_TIMEOUT,
        ready_timeout: float = READY_TIMEOUT,
        event_queue_size: int = EVENT_QUEUE_SIZE,
        reconnect_first_delay: float = RECONNECT_FIRST_DELAY,
        reconnect_max_delay: float = RECONNECT_MAX_DELAY,
    ) -> None:
        self.store = store
        self.core = device
        self._host, self._port = host, port
        self._ssl_context = ssl_context
        # The relay we mean: what it must call itself before we sign a login (spec 7.4).
        self.relay_name = expected_relay_name or host
        # The invitation that registers our user, where the relay asks for one.
        self._invite = invite
        self._clock = clock
        self._rng = rng
        self._request_timeout = request_timeout
        self._ready_timeout = ready_timeout
        self._first_delay = reconnect_first_delay
        self._max_delay = reconnect_max_delay
        self._lock = trio.Lock()
        self._store_lock = trio.Lock()
        self._connection: RelayConnection | None = None
        self._ready = trio.Event()
        # Set (and replaced) each time an envelope was processed: a change
        # waiting for our previous one of its group looks again then.
        self._processed = trio.Event()
        self._published = _stored_int(store, core.RecordKey.PUBLISHED_PREKEYS)
        self._registered = _stored_int(store, core.RecordKey.REGISTERED_DEVICE_LIST)
        self._handed: int | None = None  # inbox row of the event the app holds
        self._events_in, self._events_out = trio.open_memory_channel[
            tuple[int | None, ClientEvent]
        ](event_queue_size)

    # ------------------------------------------------------------ app API

    @property
    def address(self) -> Address:
        """This device: its user id and device id (``alice.1``)."""
        return self.core.address

    def now(self) -> int:
        """The time the protocol is given, in whole seconds (from the ``clock``)."""
        return int(self._clock())

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Events in order.

        A stored event is deleted when the app asks for the next event (from
        this iterator or a later one) or leaves :func:`open_client`'s block
        normally; one the app was handed when its process died comes again
        after a restart. So finish with an event before asking for the next.
        """
        while True:
            await self._take_handed()
            try:
                row_id, event = await self._events_out.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            self._handed = row_id
            yield event

    async def _take_handed(self) -> None:
        """Delete the stored event last handed to the app: it is done with it."""
        if self._handed is not None:
            row_id, self._handed = self._handed, None
            await self._commit({}, taken=[row_id])

    async def send_direct(self, to_user: str, body: bytes) -> bytes:
        """Send a one-to-one message to every device of ``to_user``; its message id."""
        check_user_id(to_user)
        check_direct_body(body)
        async with self._lock:
            connection = await self._wait_ready()
            await self._prepare(connection, [to_user])
            message_id, sends = self.core.send_direct(to_user, body, now=self.now())
            await self._queue(sends)
        await self._flush()
        return message_id

    async def send_group(self, group_id: bytes, body: bytes) -> bytes:
        """Send one group message (one encryption, fanned out by the relay); its id."""
        check_group_id(group_id)
        check_group_body(body, self.now())
        async with self._lock:
            connection = await self._wait_ready()
            await self._prepare_group(connection, group_id)
            message_id, sends = self.core.send_group(group_id, body, now=self.now())
            await self._queue(sends)
        await self._flush()
        return message_id

    async def create_group(self, title: str, members: Iterable[str]) -> bytes:
        """Create a group (we are its admin) with these users; its id."""
        members = list(members)
        async with self._lock:
            connection = await self._wait_ready()
            await self._prepare(connection, members)
            group_id, sends = self.core.create_group(title, members, now=self.now())
            await self._queue(sends)
        await self._flush()
        return group_id

    async def reinit_group(self, group_id: bytes) -> bytes:
        """(Admin.) Continue the group in a new one with the members we hold; its id.

        For when members ended on different branches of the group (a hostile
        relay's doing, spec/12-groups.md section 12.9): every member that holds
        us as an admin of it moves to the new group (``GroupReplaced``).
        """
        async with self._lock:
            connection = await self._wait_ready()
            await self._prepare(connection, self.core.group(group_id).user_ids)
            new_group_id, sends = self.core.reinit_group(group_id, now=self.now())
            await self._queue(sends)
        await self._flush()
        return new_group_id

    async def add_member(self, group_id: bytes, user_id: str) -> None:
        """(A group admin.) Add ``user_id`` to the group; every member applies the signed change.

        Like every change of a group, it is sent at once and takes effect when
        the relay's receipt for it comes back (spec/12-groups.md, section
        12.4): a ``GroupUpdated`` from ourselves says so, and the new member's
        devices get the welcome then; members see a ``GroupUpdated`` with a
        ``MemberAdded``. If another change came first and this one is no
        longer allowed after it, a ``GroupChangeFailed`` instead (one still
        allowed is proposed again by itself). A second change of the same
        group waits for the first (at most ``ready_timeout``). A non-admin, or
        a user already a member, gets a LocalProtocolError and nothing is sent.
        """
        await self._change_group(
            group_id, [user_id], lambda now: self.core.add_member(group_id, user_id, now=now)
        )

    async def remove_member(self, group_id: bytes, user_id: str) -> None:
        """(A group admin.) Remove ``user_id``; the remaining members rotate their sender keys.

        Members, the removed one included, see a ``GroupUpdated`` with a
        ``MemberRemoved``; the removed member cannot read what follows. It
        takes effect as :meth:`add_member` says.
        """
        await self._change_group(
            group_id, [], lambda now: self.core.remove_member(group_id, user_id, now=now)
        )

    async def leave_group(self, group_id: bytes) -> None:
        """Leave the group: the others see us removed and rotate their sender keys.

        The group is forgotten here once the change took effect (as
        :meth:`add_member` says); its title stays known to the app only if it
        kept it.
        """
        await self._change_group(group_id, [], lambda now: self.core.leave_group(group_id, now=now))

    async def set_admin(self, group_id: bytes, user_id: str, admin: bool) -> None:
        """(A group admin.) Promote (``admin=True``) or demote a member (see :meth:`add_member`)."""
        await self._change_group(
            group_id, [], lambda now: self.core.set_admin(group_id, user_id, admin, now=now)
        )

    async def set_title(self, group_id: bytes, title: str) -> None:
        """(A group admin.) Rename the group (see :meth:`add_member`)."""
        await self._change_group(
            group_id, [], lambda now: self.core.set_title(group_id, title, now=now)
        )

    async def _change_group(
        self, group_id: bytes, new_users: list[str], change: Callable[[int], list[core.Send]]
    ) -> None:
        queued = False
        with trio.move_on_after(self._ready_timeout):
            while not queued:
                async with self._lock:
                    processed = self._processed
                    if not self.core.has_pending_change(group_id):
                        connection = await self._wait_ready()
                        users = [*self.core.group(group_id).user_ids, *new_users]
                        await self._prepare(connection, users)
                        await self._queue(change(self.now()))
                        queued = True
                if not queued:
                    await processed.wait()  # our previous change's receipt, or its rival
        if not queued:
            raise RelayTimeout("our previous change of this group has not taken effect yet")
        await self._flush()

    def group(self, group_id: bytes) -> GroupState:
        """A held group's current state: ``title``, ``user_ids``, ``admins``, ``epoch``...

        InvalidArgument for a group this device does not hold (never joined,
        left, or removed from); ``client.core.group_ids`` lists the held ones.
        """
        return self.core.group(group_id)

    def safety_number(self, user_id: str, *, pending: bool = False) -> SafetyNumber:
        """The safety number with ``user_id`` (``pending``: with an unconfirmed new identity)."""
        return self.core.safety_number(user_id, pending=pending)

    def pending_identity(self, user_id: str) -> core.IdentityChanged | None:
        """The identity change of ``user_id`` waiting for :meth:`confirm_identity`, if any."""
        return self.core.pending_identity(user_id)

    async def confirm_identity(self, user_id: str) -> None:
        """Accept a changed identity the app's user has confirmed."""
        async with self._lock:
            outcome = self.core.confirm_identity(user_id)
            _, ids = await self._commit(self.core.take_changes(), events=outcome.events)
        await self._deliver_events(list(outcome.events), ids)

    async def link_device(self, entry: DeviceEntry) -> None:
        """(Primary device.) Add a device of ours and publish the new signed device list.

        ``entry`` is the new device's ``ClientCore.device_entry``: its key and
        its proof that it belongs to our user.
        """
        async with self._lock:
            connection = await self._wait_ready()
            signed = self.core.link_device(entry)
            await connection.upload_device_list(signed.encode())
            await self._commit(self.core.take_changes())

    async def unlink_device(self, device_id: int) -> None:
        """(Primary device.) Remove a device of ours: publish a signed list without it.

        The relay deletes its mail and closes its connection; our contacts
        see a ``DeviceRemoved`` and stop encrypting to it.
        """
        async with self._lock:
            connection = await self._wait_ready()
            signed = self.core.unlink_device(device_id)
            await connection.upload_device_list(signed.encode())
            await self._commit(self.core.take_changes())

    async def refresh_device_list(self, user_id: str) -> None:
        """Fetch a user's device list now (otherwise fetched when first needed)."""
        async with self._lock:
            connection = await self._wait_ready()
            await self._fetch_device_list(connection, user_id)

    # ------------------------------------------------------------ preparing sends

    async def _wait_ready(self) -> RelayConnection:
        with trio.move_on_after(self._ready_timeout):
            while True:
                await self._ready.wait()
                if self._connection is not None:
                    return self._connection
                await trio.sleep(0)
        raise RelayTimeout("not connected to the relay")

    async def _fetch_device_list(self, connection: RelayConnection, user_id: str) -> None:
        data = await connection.fetch_device_list(user_id)
        if SignedDeviceList.decode(data).device_list.user_id != user_id:
            raise RelayProtocolViolation(f"the relay served another user's list for {user_id!r}")
        outcome = self.core.process_device_list(data)
        _, ids = await self._commit(self.core.take_changes(), events=outcome.events)
        await self._deliver_events(list(outcome.events), ids)

    async def _prepare(self, connection: RelayConnection, user_ids: Iterable[str]) -> None:
        """Device lists and sessions for these users' devices and our own."""
        for user_id in {*user_ids, self.core.user_id}:
            if self.core.device_list(user_id) is None:
                await self._fetch_device_list(connection, user_id)
        await self._start_sessions(
            connection, self.core.devices_without_session(user_ids, now=self.now())
        )

    async def _prepare_group(self, connection: RelayConnection, group_id: bytes) -> None:
        users = self.core.group(group_id).user_ids
        for user_id in users:
            if self.core.device_list(user_id) is None:
                await self._fetch_device_list(connection, user_id)
        await self._start_sessions(connection, self.core.group_send_needs(group_id, now=self.now()))

    async def _start_sessions(
        self, connection: RelayConnection, addresses: Iterable[Address]
    ) -> None:
        for address in addresses:
            bundle = await connection.fetch_bundle(address.user_id, address.device_id)
            self.core.process_bundle(bundle, now=self.now())
        await self._commit(self.core.take_changes())

    # ------------------------------------------------------------ outbox

    async def _queue(self, sends: Iterable[core.Send]) -> None:
        await self._commit(self.core.take_changes(), sends=list(sends))

    async def _flush(self) -> None:
        """Send the outbox in order; what the relay accepted leaves it."""
        async with self._lock:
            connection = self._connection
            if connection is None:
                return  # the next connection flushes it
            for row_id, send in self.store.outbox():
                await self._send_one(connection, row_id, send)

    async def _send_one(
        self, connection: RelayConnection, row_id: int, send: core.Send, attempt: int = 1
    ) -> None:
        try:
            if isinstance(send, DirectSend):
                full = (
                    await connection.send_direct(send.recipient_user, send.payloads)
                ).mailbox_full
            elif isinstance(send, ChangeSend):
                parts = [(part.recipient_user, part.payloads) for part in send.parts]
                try:
                    await connection.send_change(send.receipt, parts)
                except InvalidArgument:
                    # More than one frame holds (first messages to many devices of a
                    # full group): it can never be sent, and would hold up the outbox.
                    await self._drop(row_id, send)
                    raise SendDropped("a group change too big for a frame was dropped") from None
                full = ()  # a change is stored for every device, or refused whole
            else:
                recipients = [(a.user_id, a.device_id) for a in send.recipients]
                full = (await connection.send_group(send.payload, recipients)).mailbox_full
            if full:
                # The row stays and goes again whole: the devices that took it
                # drop the second copy as a duplicate.
                raise MailboxFull("recipient mailboxes are full", devices=full)
        except DeviceListMismatch as mismatch:
            if attempt >= MAX_SEND_ATTEMPTS:
                # Still refused after rebuilding (say, a changed identity awaits the
                # user's confirmation, so the list we hold stays old): retrying cannot
                # help, and a stuck send would block the outbox behind it.
                await self._drop(row_id, send)
                raise SendDropped(
                    "a send kept being refused for its device list; it was dropped"
                ) from None
            replacements = await self._rebuild(connection, send, mismatch)
            new_ids, _ = await self._commit(
                self.core.take_changes(), sends=replacements, sent=[row_id]
            )
            for new_id, new_send in zip(new_ids, replacements, strict=True):
                await self._send_one(connection, new_id, new_send, attempt + 1)
        except UnknownUser as unknown:
            if isinstance(send, ChangeSend):
                # A member's user is gone from the relay: the others still get the change.
                rest = tuple(p for p in send.parts if p.recipient_user != unknown.user_id)
                resend = ChangeSend(send.group_id, send.receipt, rest)
                (new_id,), _ = await self._commit({}, sends=[resend], sent=[row_id])
                await self._send_one(connection, new_id, resend, attempt)
            else:
                await self._commit({}, sent=[row_id])  # the user is gone: nothing to deliver
        else:
            await self._commit({}, sent=[row_id])

    async def _drop(self, row_id: int, send: core.Send) -> None:
        """Take a send out of the outbox unsent; a change of ours then fails (an event)."""
        outcome = self.core.abandon_change(send) if isinstance(send, ChangeSend) else Outcome()
        _, ids = await self._commit(self.core.take_changes(), events=outcome.events, sent=[row_id])
        await self._deliver_events(list(outcome.events), ids)

    async def _rebuild(
        self, connection: RelayConnection, send: core.Send, mismatch: DeviceListMismatch
    ) -> list[core.Send]:
        events: list[core.Event] = []
        for item in mismatch.mismatches:
            events.extend(self.core.process_device_list(item.signed_device_list).events)
        _, ids = await self._commit(self.core.take_changes(), events=events)
        await self._deliver_events(events, ids)
        if isinstance(send, DirectSend):
            await self._start_sessions(
                connection,
                [
                    a
                    for a in self.core.devices_without_session(
                        [send.recipient_user], now=self.now()
                    )
                    if a.user_id == send.recipient_user
                ],
            )
            return [self.core.resend_direct(send, now=self.now())]
        if isinstance(send, ChangeSend):
            users = [part.recipient_user for part in send.parts]
            await self._start_sessions(
                connection,
                [
                    a
                    for a in self.core.devices_without_session(users, now=self.now())
                    if a.user_id in users
                ],
            )
            resent = self.core.resend_change(send, now=self.now())
            return [] if resent is None else [resent]
        await self._start_sessions(
            connection, self.core.group_send_needs(send.group_id, now=self.now())
        )
        return self.core.resend_group(send, now=self.now())

    # ------------------------------------------------------------ persistence

    async def _commit(
        self,
        changes: dict[core.RecordKey, bytes | None],
        *,
        sends: list[core.Send] | None = None,
        events: Iterable[core.Event] = (),
        processed: tuple[bytes, int] | None = None,
        sent: Iterable[int] = (),
        taken: Iterable[int] = (),
    ) -> tuple[list[int], list[int]]:
        """One store transaction, off the event loop's thread; new outbox and inbox row ids."""
        events = list(events)
        # One at a time: the app's events() and the receive loop both commit, and
        # two threads on one SQLite connection cannot both open a transaction.
        async with self._store_lock:
            return await trio.to_thread.run_sync(
                lambda: self.store.commit(
                    changes,
                    sends=sends or [],
                    events=events,
                    processed=processed,
                    sent=list(sent),
                    taken=list(taken),
                )
            )

    async def _deliver_events(self, events: list[core.Event], ids: list[int]) -> None:
        """Hand stored events (``ids``: their inbox rows) to the app."""
        for row_id, event in zip(ids, events, strict=True):
            await self._events_in.send((row_id, event))

    # ------------------------------------------------------------ receiving

    async def _process(self, connection: RelayConnection, envelope: Envelope) -> None:
        """Persist what an envelope produces (the caller acknowledges it afterwards)."""
        if self.store.was_processed(envelope.guid):
            return  # our acknowledgement was lost: acknowledged again
        async with self._lock:
            sender = Address(envelope.sender_user, envelope.sender_device)
            if not self.core.knows_device(sender):
                # Without a valid list naming the sender, the core reports the
                # envelope as from an unknown device, and it is acknowledged.
                with contextlib.suppress(RemoteProtocolError, RelayError):
                    await self._fetch_device_list(connection, sender.user_id)
            outcome: Outcome = self.core.receive(
                sender, envelope.kind, envelope.payload, now=self.now()
            )
            _, ids = await self._commit(
                self.core.take_changes(),
                sends=list(outcome.sends),
                events=outcome.events,
                processed=(envelope.guid, self.now()),
            )
            self._processed.set()
            self._processed = trio.Event()
        # Persisted (the inbox holds the events until the app takes them), so the
        # app may see them and the relay may forget the envelope, in that order:
        # if the acknowledgement is lost, the redelivery is recognised by guid.
        await self._deliver_events(list(outcome.events), ids)
        retried = await self._retry_waiting_changes(connection)
        if outcome.sends or retried:
            await self._flush()

    async def _retry_waiting_changes(self, connection: RelayConnection) -> bool:
        """A change of ours that lost its epoch and needs sessions with devices that joined
        meanwhile: fetch their bundles and propose it again. Whether any was."""
        delivered: list[tuple[list[core.Event], list[int]]] = []
        async with self._lock:
            for group_id in self.core.waiting_changes():
                await self._prepare(connection, self.core.change_needs(group_id))
                outcome = self.core.retry_change(group_id, now=self.now())
                _, ids = await self._commit(
                    self.core.take_changes(), sends=list(outcome.sends), events=outcome.events
                )
                delivered.append((list(outcome.events), ids))
        for events, ids in delivered:
            await self._deliver_events(events, ids)
        return bool(delivered)

    async def _replenish_prekeys(self, connection: RelayConnection) -> None:
        """Publish the current signed keys and every one-time key the relay lacks.

        One-time key ids only grow, so "lacks" means "newer than the highest
        id published". A stock below the low watermark gets a new batch.
        """
        async with self._lock:
            account = self.core.account
            now = self.now()
            # Prune first: a replaced signed prekey is deleted once the current one
            # is older than the grace period (spec 2.2). Pruning right after a
            # rotation would find the new key too young and keep every old one.
            account.prune(now=now)
            if now - account.signed_prekey_age_start > SIGNED_PREKEY_ROTATION_AGE:
                account.rotate_signed_prekey(now=now, rng=self._rng)
            stock = await connection.upload_prekeys()
            upload = account.prekey_upload()
            fresh = [k for k in upload.one_time_prekeys if k.key_id > self._published]
            if stock.one_time + len(fresh) < PREKEY_LOW_WATERMARK:
                account.generate_one_time_prekeys(PREKEY_BATCH_SIZE, rng=self._rng)
                upload = account.prekey_upload()
                fresh = [k for k in upload.one_time_prekeys if k.key_id > self._published]
            fresh_kem = [k for k in upload.one_time_kem_prekeys if k.key_id > self._published]
            await connection.upload_prekeys(
                signed_prekey=upload.signed_prekey,
                last_resort_kem=upload.last_resort_kem_prekey,
                one_time=fresh,
                one_time_kem=fresh_kem,
            )
            self._published = max(
                [self._published, *(k.key_id for k in fresh), *(k.key_id for k in fresh_kem)]
            )
            changes = self.core.take_changes()
            changes[core.RecordKey.ACCOUNT] = account.to_bytes()
            changes[core.RecordKey.PUBLISHED_PREKEYS] = self._published.to_bytes(4, "big")
            await self._commit(changes)

    async def _sync_new_device(self, connection: RelayConnection) -> None:
        """(A linked device, once.) Ask our other devices for the groups they hold."""
        if self.core.holds_user_identity or self.store.record(core.RecordKey.SYNCED) is not None:
            return
        async with self._lock:
            others = [a for a in self.core.devices_of(self.core.user_id) if a != self.address]
            await self._start_sessions(
                connection,
                [a for a in self.core.devices_without_session([], now=self.now()) if a in others],
            )
            sends = self.core.request_sync(now=self.now())
            changes = self.core.take_changes()
            changes[core.RecordKey.SYNCED] = b"\x01"
            await self._commit(changes, sends=sends)

    async def _register(self, connection: RelayConnection) -> None:
        """(Primary device.) Publish our device list if the relay has not seen this one."""
        own = self.core.own_device_list
        if not self.core.holds_user_identity or own is None:
            return
        counter = own.device_list.counter + 1  # stored +1 so that 0 means "never"
        if counter > self._registered:
            # The invitation (where the relay asks for one) is for registering only.
            invite = self._invite if self._registered == 0 else None
            await connection.upload_device_list(own.encode(), invite=invite)
            self._registered = counter
            await self._commit({core.RecordKey.REGISTERED_DEVICE_LIST: counter.to_bytes(8, "big")})

    async def _session(
        self, connection: RelayConnection, task_status: trio.TaskStatus[None]
    ) -> None:
        """One connection's life: register, authenticate, stock prekeys, flush, receive."""
        await self._register(connection)
        await connection.authenticate(
            self.core.user_id, self.core.device_id, self.core.account.identity
        )
        await self._fetch_device_list(connection, self.core.user_id)
        await self._replenish_prekeys(connection)
        await self._sync_new_device(connection)
        self._connection = connection
        self._ready.set()
        task_status.started()
        await self._events_in.send((None, Connected()))
        await self._retry_waiting_changes(connection)
        await self._flush()
        async for batch in connection.batches():
            # What arrived together is acknowledged together: one round trip,
            # once each envelope's outcome is persisted.
            processed = []
            for item in batch:
                if isinstance(item, Envelope):
                    await self._process(connection, item)
                    processed.append(item.guid)
                elif isinstance(item, PreKeysLow):
                    await self._replenish_prekeys(connection)
                elif isinstance(item, MailExpiredNotice):
                    expired = MailExpired(item.count, item.first_ts, item.last_ts)
                    await self._events_in.send((None, expired))
            if processed:
                # A relay may push one envelope twice (a duplicate is dropped by guid):
                # each guid is acknowledged once, as the relay requires.
                await connection.ack(*dict.fromkeys(processed))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected (reconnecting with backoff) until cancelled.

        ``task_status.started()`` fires once the first connection is ready.
        """
        await self._commit(self.core.take_changes())  # a new device's first records
        for row_id, event in self.store.inbox():
            await self._events_in.send((row_id, event))
        delay = self._first_delay
        started = False
        while True:
            try:
                async with connect_relay(
                    self._host,
                    self._port,
                    ssl_context=self._ssl_context,
                    expected_relay_name=self.relay_name,
                    request_timeout=self._request_timeout,
                ) as connection:
                    delay = self._first_delay
                    status = task_status if not started else trio.TASK_STATUS_IGNORED
                    started = True
                    await self._session(connection, status)
                reason = "relay closed the connection"
            except (RelayNameMismatch, RegistrationClosed, InviteRefused):
                # Not the relay we mean (or one relaying another's challenge), or
                # one that will not register us: no retry changes it. The app
                # hears of it from open_client.
                raise
            except (TransportError, OSError, RemoteProtocolError) as exc:
                # RemoteProtocolError: the relay served something that does not
                # verify (our own device list, a bundle to sync with): drop this
                # connection and try again, as for any transport failure.
                reason = getattr(exc, "code", type(exc).__name__)
            finally:
                self._connection = None
                self._ready = trio.Event()
            await self._events_in.send((None, Disconnected(reason)))
            jitter = 0.5 + int.from_bytes(self._rng.random_bytes(2), "big") / 65536
            await trio.sleep(delay * jitter)
            delay = min(delay * 2, self._max_delay)


def _stored_int(store: ClientStore, key: core.RecordKey) -> int:
    stored = store.record(key)
    return 0 if stored is None else int.from_bytes(stored, "big")


def load_or_create_core(
    store: ClientStore,
    *,
    user_id: str | None = None,
    device_id: int = 1,
    now: int | None = None,
    rng: RandomSource = SYSTEM_RANDOM,
) -> ClientCore:
    """The device in ``store``, or a new user's first device (then ``user_id`` is needed)."""
    if store.has_state():
        return ClientCore.load(store.records(), rng=rng)
    if user_id is None:
        raise InvalidArgument("a new store needs a user id")
    return ClientCore.create_primary(
        user_id, device_id, now=int(time.time()) if now is None else now, rng=rng
    )


@asynccontextmanager
async def open_client(
    store: ClientStore,
    host: str,
    port: int,
    *,
    device: ClientCore | None = None,
    user_id: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    expected_relay_name: str | None = None,
    invite: str | None = None,
    clock: Callable[[], float] = time.time,
    rng: RandomSource = SYSTEM_RANDOM,
    request_timeout: float = CLIENT_REQUEST_TIMEOUT,
    ready_timeout: float = READY_TIMEOUT,
    event_queue_size: int = EVENT_QUEUE_SIZE,
    reconnect_first_delay: float = RECONNECT_FIRST_DELAY,
    reconnect_max_delay: float = RECONNECT_MAX_DELAY,
) -> AsyncIterator[Client]:
    """Connect a device and keep it connected for the duration of the block.

    The device is ``device``, else the one in ``store``, else a new user
    ``user_id`` (its first device). Returns once connected, registered and
    authenticated; the block's exit disconnects.

    ``ssl_context`` enables TLS. ``expected_relay_name`` is the relay we
    mean, which it must call itself in its WELCOME before the device signs a
    login (spec 7.4); it defaults to ``host``, the name we dial (the TLS
    server name too). A relay calling itself otherwise raises
    RelayNameMismatch from this function (or out of its block, on a
    reconnect): it is not retried. ``invite`` is the invitation token that
    registers a new user at a relay that registers by invitation (spec 7.6);
    a relay that refuses to register the user raises RegistrationClosed or
    InviteRefused from this function. ``clock`` gives the time in seconds (the
    protocol's ``now``) and ``rng`` every random draw, from loading or
    creating the device on. ``request_timeout`` bounds each request to the
    relay, ``ready_timeout`` how long an operation waits for a connection
    (then RelayTimeout). ``event_queue_size`` events are buffered for
    :meth:`Client.events` before the client waits for the app to read.
    After a dropped connection the client reconnects after
    ``reconnect_first_delay`` seconds, doubling up to ``reconnect_max_delay``.
    """
    if device is None:
        device = load_or_create_core(store, user_id=user_id, now=int(clock()), rng=rng)
    client = Client(
        store,
        device,
        host,
        port,
        ssl_context=ssl_context,
        expected_relay_name=expected_relay_name,
        invite=invite,
        clock=clock,
        rng=rng,
        request_timeout=request_timeout,
        ready_timeout=ready_timeout,
        event_queue_size=event_queue_size,
        reconnect_first_delay=reconnect_first_delay,
        reconnect_max_delay=reconnect_max_delay,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
                await client._take_handed()  # a normal exit: the app is done with it
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The client's own fatal error (RelayNameMismatch), or the app's, comes out
        # alone, not in a group beside the cancellations it caused.
        if (error := callers_error(group)) is not None:
            raise error from None
        raise
