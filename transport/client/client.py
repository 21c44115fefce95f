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
* every message the app sends goes into the outbox at once: encrypted with
  the new state in one transaction if the sessions it needs exist, else as
  a queued message that the client encrypts as soon as the relay can give
  it the device lists and prekey bundles it needs. One task per connection
  (the flusher) sends the outbox in order, one destination (a user, a
  group) never holding up another: a send refused for a stale device list
  is rebuilt for the current devices, one refused for the relay's rate is
  paced as the relay says (within RATE_LIMITED_MIN_WAIT and the backoff's
  cap), one for a full mailbox waits and goes again;
* a group change of ours that lost its epoch to another, and needs sessions
  with members who joined meanwhile, is proposed again once it has them;
  what the relay refuses it meanwhile (a bundle not there yet, its rate)
  makes it wait with the outbox's backoff, never ends the connection;
* a dropped connection is re-established with exponential backoff and
  jitter, growing across refused logins as across failed connects, trying
  each address the relay may be at (``relays``, or what ``resolver`` says
  now) in turn, the one that last worked first; a relay
  that no longer knows this device (it lost its database) gets it
  registered again, with the signed device list the device holds unchanged,
  and its prekeys uploaded again.

Locks: the core's state is one sequence of changes, as the ratchets
require, so every change to it and its commit happen under one lock, which
is never held while waiting on the network; so a send made during an outage
never holds up the reconnect.
"""

from __future__ import annotations

import collections
import logging
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from typing import TypeVar

import trio

from hushchat.protocol import client_core as core
from hushchat.protocol.client_core import (
    Address,
    ChangeSend,
    ClientCore,
    DeliveryConfirmed,
    DeviceListNeeded,
    DirectSend,
    GroupSend,
    MessageReceived,
    MissingSessions,
)
from hushchat.protocol.client_core.arguments import (
    check_device_id,
    check_direct_body,
    check_group_body,
    check_group_id,
    check_members,
    check_title,
    check_user_id,
)
from hushchat.protocol.consts import (
    MAX_RECEIPT_MESSAGE_IDS,
    PREKEY_BATCH_SIZE,
    PREKEY_LOW_WATERMARK,
    SIGNED_PREKEY_ROTATION_AGE,
)
from hushchat.protocol.content import MESSAGE_ID_SIZE
from hushchat.protocol.devices import DeviceEntry, SignedDeviceList
from hushchat.protocol.errors import (
    InvalidArgument,
    InvalidState,
    LocalProtocolError,
    RemoteProtocolError,
)
from hushchat.protocol.fingerprint import SafetyNumber
from hushchat.protocol.group import GroupState
from hushchat.protocol.primitives import SYSTEM_RANDOM, RandomSource

from ..wire.errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionFailure,
    ConnectTimeout,
    DeviceListMismatch,
    DeviceListRejected,
    Forbidden,
    InternalError,
    InviteRefused,
    MailboxFull,
    PreKeyIdInUse,
    RateLimited,
    RegistrationClosed,
    RelayError,
    RelayNameMismatch,
    RelayProtocolViolation,
    RelayTimeout,
    StorageFull,
    TransportError,
    UnknownUser,
)
from ..wire.frames import MailExpired as MailExpiredNotice
from ..wire.frames import PreKeysLow
from ..wire.limits import CLIENT_REQUEST_TIMEOUT, MAX_IN_FLIGHT, MAX_PREKEYS_PER_UPLOAD
from ..wire.records import Envelope
from .connection import RelayConnection, already_queued, connect_relay
from .events import (
    ClientEvent,
    Connected,
    Disconnected,
    MailExpired,
    MessageDelivered,
    MessageNotDelivered,
    MessagePending,
    MessageSent,
    OutboxItem,
    QueuedMessage,
    QueuedReceipt,
    Reregistered,
    Resend,
    SendFailed,
    Status,
    StoredEvent,
    StoredItemSetAside,
    UnknownToRelay,
)
from .store import ClientStore, StoreFailed

__all__ = [
    "Client",
    "ClientEvent",
    "Connected",
    "Disconnected",
    "MailExpired",
    "MessageDelivered",
    "MessageNotDelivered",
    "MessagePending",
    "MessageSent",
    "Reregistered",
    "SendDropped",
    "SendFailed",
    "Status",
    "StoredItemSetAside",
    "UnknownToRelay",
    "load_or_create_core",
    "open_client",
]

logger = logging.getLogger("hushchat.client")

# Reconnect backoff, as gRPC's connection backoff: each failed attempt (a
# refused login included) multiplies the delay by RECONNECT_MULTIPLIER up to
# the cap, and each wait is the delay times a random factor within
# RECONNECT_JITTER of 1, so a relay restart is not met by every client at the
# same instant. A factor of 2 waited up to 6 s after a 4 s outage, so 50
# clients took up to 10 s to be back; 1.6 makes that about 4 s.
RECONNECT_FIRST_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
RECONNECT_MULTIPLIER = 1.6
RECONNECT_JITTER = 0.2
# How long an operation that needs the relay (a group change, linking a
# device) waits for a connection before giving up. Messages never wait.
READY_TIMEOUT = 30.0
# Events buffered for the app before the receive loop waits for it to read.
# No other task waits for the app: what they produce meanwhile waits behind the
# queue, in order (Client._backlog), since the app may be waiting for them. Nor
# does the receive loop while an app call waits for mail (Client._mail_awaited).
EVENT_QUEUE_SIZE = 256
# Events that may wait behind a full queue while the receive loop takes mail for an
# app call waiting for it: room for the mail ahead of what the call waits for, and
# the memory of one more default queue at most. Beyond, the loop waits for the app
# again and the call times out (RelayTimeout), rather than a flood of mail filling
# memory for as long as the call may wait.
MAX_BACKLOG_FOR_AWAITED_MAIL = EVENT_QUEUE_SIZE
# Sends refused for a stale device list are rebuilt and retried this often.
MAX_SEND_ATTEMPTS = 3
# An operation whose device lists or sessions changed between preparing and
# encrypting prepares again this often.
MAX_PREPARE_ATTEMPTS = 3
# A destination refused for a reason that passes (a full mailbox, the relay's
# own failure, no prekeys yet) is tried again after this delay, doubling up
# to the cap while the refusal lasts.
RETRY_FIRST_DELAY = 2.0
RETRY_MAX_DELAY = 300.0
# A relay refusing for its rate limit (RATE_LIMITED) says how many milliseconds
# until a retry succeeds; an honest one says the time its token bucket needs,
# rounded up, so never 0. The client waits what it says, but at least this the
# first time a call is refused, and at least the backoff above when the same
# request is refused again or retried in the background; never more than
# RETRY_MAX_DELAY. Else a relay saying 0 (hostile or broken) is asked again at
# once for as long as it says so, and one saying 2^64 ms parks the request for
# good. This floor costs an honest relay's send pacing no throughput: its
# bucket refills while the client waits (a send rate "N/period" regains N per
# period, 60 per second by default), so the client sends what it regained at
# once; only the first send after the wait may leave this much later.
RATE_LIMITED_MIN_WAIT = 0.1
# Processed envelope guids are remembered this long: the relay's default
# retention (72 h, after which it never delivers an envelope again) and a day
# for the difference between its clock and ours (spec 07, 7.8 "Retention").
PROCESSED_MEMORY = 4 * 24 * 3600
# How often the guids older than that are deleted.
PRUNE_INTERVAL = 3600
# How long after sending a message its recipients' devices have to confirm it
# (delivery receipts) before the missing ones are reported: the relay's
# default retention (72 h), the epoch its expiry is rounded up to (1 h), and
# an hour for the difference between clocks (spec 07, 7.14).
DELIVERY_DEADLINE = 74 * 3600
# Confirmations for messages whose acceptance by the relay is not recorded yet
# (the receipt overtook it), kept until it is; the oldest goes first (a receipt
# that came after its deadline, or for nothing we sent, is never claimed).
MAX_EARLY_RECEIPTS = 1000

_T = TypeVar("_T")

RelayAddress = tuple[str, int]
"""A relay's host and port."""
Resolver = Callable[[], Awaitable[Sequence[RelayAddress]]]
"""Where the relay is now: called before each round of connection attempts."""


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
        processed_memory: int = PROCESSED_MEMORY,
        relays: Sequence[RelayAddress] = (),
        resolver: Resolver | None = None,
        delivery_deadline: int = DELIVERY_DEADLINE,
    ) -> None:
        self.store = store
        self.core = device
        self._addresses = [_check_address((host, port)), *map(_check_address, relays)]
        self._resolver = resolver
        self._relay: RelayAddress = self._addresses[0]
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
        self._processed_memory = processed_memory
        self._delivery_deadline = delivery_deadline
        # Messages awaiting delivery receipts: their deadline, the devices yet to confirm.
        self._deliveries: dict[bytes, tuple[int, frozenset[Address]]] = {}
        self._early_receipts: dict[bytes, set[Address]] = {}
        # The receipts rows of the outbox as the current flush pass read it.
        self._pass_receipts: list[tuple[int, OutboxItem]] = []
        self._pruned_at = -math.inf
        # Held for every change to the core and its commit; never across a network wait.
        self._lock = trio.Lock()
        # Held while fetching what a send needs, so two tasks never fetch the
        # same prekey bundle (each fetch spends one of the peer's one-time keys).
        self._prepare_lock = trio.Lock()
        self._store_lock = trio.Lock()
        self._connection: RelayConnection | None = None
        self._ready = trio.Event()
        # Set (and replaced) each time an envelope was processed: a change
        # waiting for our previous one of its group looks again then.
        self._processed = trio.Event()
        self._status = Status.CONNECTING
        self._published = _stored_int(store, core.RecordKey.PUBLISHED_PREKEYS)
        self._registered = _stored_int(store, core.RecordKey.REGISTERED_DEVICE_LIST)
        self._unknown_to_relay = False
        # The relay refused our first registration because it holds the user
        # (FORBIDDEN, which ends the connection): ours, registered by a start that
        # died before recording it, or another identity's. The next login tells.
        self._user_exists = False
        self._user_id_taken = False  # another identity's: no retry changes it
        self._handed: int | None = None  # inbox row of the event the app holds
        self._taken: list[int] = []  # inbox rows the app is done with, still stored
        self._events_in, self._events_out = trio.open_memory_channel[
            tuple[int | None, ClientEvent]
        ](event_queue_size)
        # Events for the app while its queue is full, in order; the app's reading moves
        # them on. Only the receive loop waits for it to be empty: any other task
        # may be one that the app waits for (a flush pass its send waits for, the
        # prepare lock), and an app that reads and sends from one task would wait
        # for good. So it holds the stored events not taken before this run, then
        # at most one envelope's (up to MAX_BACKLOG_FOR_AWAITED_MAIL while an app
        # call waits for mail), and what the outbox and the app's own calls
        # produced since the app last read (notices of the connection folded).
        self._backlog: collections.deque[tuple[int | None, ClientEvent]] = collections.deque()
        # Set (and replaced) when a receive loop waiting for the app may look again:
        # the app took an event, an app call waits for mail, the connection closed.
        self._may_receive = trio.Event()
        # The stored events go to the app's queue once per Client: they stay queued
        # across runs (a run queued again would hand each twice).
        self._inbox_queued = False
        self._running = False
        # App calls waiting for incoming mail (a group change for our previous one's
        # receipt): the receive loop takes mail meanwhile even if the app's queue is
        # full, as the app may be the one waiting (MAX_BACKLOG_FOR_AWAITED_MAIL).
        self._mail_awaited = 0
        # The outbox, as the flusher sees it: the app message each row carries.
        self._outbox_messages: dict[int, bytes | None] = {}
        self._wake = trio.Event()
        self._passes_started = self._passes_finished = 0
        self._progress = trio.Event()
        # Destinations refused for a reason that passes: when to try again, and why.
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        self._retry_reason: dict[str, str] = {}
        self._reported_pending: set[bytes] = set()
        # Our changes that lost their epoch and wait for what the relay refused them
        # (a bundle, a list), by group: when to propose each again, and the wait.
        self._change_retries: dict[bytes, tuple[float, float]] = {}
        self._change_retry_scheduled = trio.Event()
        self._retry_lock = trio.Lock()  # one proposer of waiting changes at a time

    # ------------------------------------------------------------ app API

    @property
    def address(self) -> Address:
        """This device: its user id and device id (``alice.1``)."""
        return self.core.address

    @property
    def relay(self) -> RelayAddress:
        """The address of the relay connected to, or last tried."""
        return self._relay

    @property
    def status(self) -> Status:
        """Where the client stands with its relay (it changes by itself)."""
        return self._status

    def now(self) -> int:
        """The time the protocol is given, in whole seconds (from the ``clock``)."""
        return int(self._clock())

    def pending_messages(self) -> list[bytes]:
        """The ids of the app's messages the outbox still holds, oldest first."""
        seen: dict[bytes, None] = {}
        for message_id in self._outbox_messages.values():
            if message_id is not None:
                seen[message_id] = None
        return list(seen)

    def awaiting_receipts(self) -> list[bytes]:
        """The ids of the app's messages sent whose delivery receipts have not all come."""
        return list(self._deliveries)

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Events in order.

        A stored event is deleted when the app asks for the next event (from
        this iterator or a later one) or leaves :func:`open_client`'s block
        normally; one the app was handed when its process died comes again
        after a restart. So finish with an event before asking for the next.
        """
        while True:
            await self._take_handed()
            if self._backlog and not self._events_out.statistics().current_buffer_used:
                # An unbuffered queue (event_queue_size 0) takes nothing while no one
                # waits in receive(): what waits is the next event.
                await trio.lowlevel.checkpoint_if_cancelled()
                row_id, event = self._backlog.popleft()
                await trio.lowlevel.cancel_shielded_checkpoint()
            else:
                try:
                    row_id, event = await self._events_out.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
            self._fill_queue()
            self._wake_receive_loop()
            self._handed = row_id
            yield event

    async def _take_handed(self) -> None:
        """Delete the stored event last handed to the app: it is done with it.

        If the store cannot write now (a full disk), the deletion waits for
        the next one: the app reads on, and an event is at worst handed again
        after a restart.
        """
        if self._handed is not None:
            self._taken.append(self._handed)
            self._handed = None
        if self._taken:
            with suppress(StoreFailed):
                await self._commit({}, taken=self._taken)
                self._taken = []

    async def send_direct(self, to_user: str, body: bytes) -> bytes:
        """Send a one-to-one message to every device of ``to_user``; its message id.

        The message is in the outbox when this returns. Connected, it was
        sent (or is waiting for a reason that passes, as a full mailbox);
        otherwise it goes after the reconnect, in order, and a
        :class:`MessagePending` event says so. :class:`MessageSent` or
        :class:`SendFailed` follow. Raises only before anything is stored:
        for a bad argument, and, connected, for a user the relay does not
        know (UnknownUser) or a device list or bundle that does not verify.
        """
        check_user_id(to_user)
        check_direct_body(body)
        if to_user == self.core.user_id:
            raise InvalidArgument("send to yourself through your other devices' copies")
        message = QueuedMessage(self._new_message_id(), self.now(), body, to_user=to_user)
        return await self._send_message(message)

    async def send_group(self, group_id: bytes, body: bytes) -> bytes:
        """Send one group message (one encryption, fanned out by the relay); its id.

        As :meth:`send_direct`; InvalidArgument if we hold no such group or
        are not a member.
        """
        check_group_id(group_id)
        sent_at = self.now()
        check_group_body(body, sent_at)
        if self.core.group(group_id).member(self.core.user_id) is None:
            raise InvalidArgument("not a member of this group")
        message = QueuedMessage(self._new_message_id(), sent_at, body, group_id=group_id)
        return await self._send_message(message)

    async def create_group(self, title: str, members: Iterable[str]) -> bytes:
        """Create a group (we are its admin) with these users; its id.

        Needs the relay (RelayTimeout after ``ready_timeout`` without one).
        """
        check_title(title)
        users = check_members(members)
        group_id: bytes = await self._change(
            users, lambda now: self.core.create_group(title, users, now=now)
        )
        return group_id

    async def reinit_group(self, group_id: bytes) -> bytes:
        """(Admin.) Continue the group in a new one with the members we hold; its id.

        For when members ended on different branches of the group (a hostile
        relay's doing, spec/12-groups.md section 12.9): every member that holds
        us as an admin of it moves to the new group (``GroupReplaced``).
        """
        check_group_id(group_id)
        users = list(self.core.group(group_id).user_ids)
        new_group_id: bytes = await self._change(
            users, lambda now: self.core.reinit_group(group_id, now=now)
        )
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
        check_group_id(group_id)
        check_user_id(user_id)
        await self._change_group(
            group_id, [user_id], lambda now: self.core.add_member(group_id, user_id, now=now)
        )

    async def remove_member(self, group_id: bytes, user_id: str) -> None:
        """(A group admin.) Remove ``user_id``; the remaining members rotate their sender keys.

        Members, the removed one included, see a ``GroupUpdated`` with a
        ``MemberRemoved``; the removed member cannot read what follows. It
        takes effect as :meth:`add_member` says.
        """
        check_group_id(group_id)
        check_user_id(user_id)
        await self._change_group(
            group_id, [], lambda now: self.core.remove_member(group_id, user_id, now=now)
        )

    async def leave_group(self, group_id: bytes) -> None:
        """Leave the group: the others see us removed and rotate their sender keys.

        The group is forgotten here once the change took effect (as
        :meth:`add_member` says); its title stays known to the app only if it
        kept it.
        """
        check_group_id(group_id)
        await self._change_group(group_id, [], lambda now: self.core.leave_group(group_id, now=now))

    async def set_admin(self, group_id: bytes, user_id: str, admin: bool) -> None:
        """(A group admin.) Promote (``admin=True``) or demote a member (see :meth:`add_member`)."""
        check_group_id(group_id)
        check_user_id(user_id)
        await self._change_group(
            group_id, [], lambda now: self.core.set_admin(group_id, user_id, admin, now=now)
        )

    async def set_title(self, group_id: bytes, title: str) -> None:
        """(A group admin.) Rename the group (see :meth:`add_member`)."""
        check_group_id(group_id)
        check_title(title)
        await self._change_group(
            group_id, [], lambda now: self.core.set_title(group_id, title, now=now)
        )

    async def _change_group(
        self, group_id: bytes, new_users: list[str], change: Callable[[int], list[core.Send]]
    ) -> None:
        """A change of a held group, once our previous one of it took effect (or failed).

        Waits (no lock held) at most ``ready_timeout`` for that: RelayTimeout.
        """
        with trio.move_on_after(self._ready_timeout):
            while self.core.has_pending_change(group_id):
                self._mail_awaited += 1
                self._wake_receive_loop()
                try:
                    await self._processed.wait()  # our previous change's receipt, or its rival
                finally:
                    self._mail_awaited -= 1
        if self.core.has_pending_change(group_id):
            raise RelayTimeout("our previous change of this group has not taken effect yet")
        users = [*self.core.group(group_id).user_ids, *new_users]
        await self._change(users, lambda now: (None, change(now)))

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
        check_user_id(user_id)
        async with self._lock:
            outcome = self.core.confirm_identity(user_id)
            _, ids = await self._commit(self.core.take_changes(), events=outcome.events)
        self._deliver_events(list(outcome.events), ids)

    async def link_device(self, entry: DeviceEntry) -> None:
        """(Primary device.) Add a device of ours and publish the new signed device list.

        ``entry`` is the new device's ``ClientCore.device_entry``: its key and
        its proof that it belongs to our user. The new list is stored first:
        if the relay cannot be reached now (the error is raised), it is
        published on the next connection.
        """
        if not isinstance(entry, DeviceEntry):
            raise InvalidArgument("a device's entry is a DeviceEntry (its device_entry)")
        connection = await self._wait_ready()
        # No send prepares meanwhile: it would ask the relay for the new device's
        # keys before the relay holds the list that names it.
        async with self._prepare_lock:
            async with self._lock:
                self.core.link_device(entry)
                await self._commit(self.core.take_changes())
            await self._publish_own_list(connection)

    async def unlink_device(self, device_id: int) -> None:
        """(Primary device.) Remove a device of ours: publish a signed list without it.

        The relay deletes its mail and closes its connection; our contacts
        see a ``DeviceRemoved`` and stop encrypting to it. Published as
        :meth:`link_device`."""
        check_device_id(device_id)
        connection = await self._wait_ready()
        async with self._prepare_lock:
            async with self._lock:
                self.core.unlink_device(device_id)
                await self._commit(self.core.take_changes())
            await self._publish_own_list(connection)

    async def refresh_device_list(self, user_id: str) -> None:
        """Fetch a user's device list now (otherwise fetched when first needed)."""
        check_user_id(user_id)
        connection = await self._wait_ready()
        await self._fetch_device_list(connection, user_id)

    # ------------------------------------------------------------ sending messages

    def _new_message_id(self) -> bytes:
        return self._rng.random_bytes(MESSAGE_ID_SIZE)

    async def _send_message(self, message: QueuedMessage) -> bytes:
        """Store ``message`` in the outbox (encrypted if it can be now) and have it sent."""
        connection = self._connection
        if connection is not None:
            # Fetch what it needs now, so that a user the relay does not know is
            # said at once, and nothing is stored for it.
            try:
                async with self._prepare_lock:
                    await self._prepare_message(connection, message)
            except UnknownUser:
                raise
            except (ConnectionFailure, RelayError):
                pass  # queued as it is; the flusher prepares it again later
        async with self._lock:
            items: list[OutboxItem] = [message]
            # Else encrypted later, once the relay gave what it needs.
            with suppress(MissingSessions, DeviceListNeeded):
                items = list(self._encrypt(message))
            await self._commit(self.core.take_changes(), sends=items)
        self._wake.set()
        connection = self._connection
        if connection is None:
            self._notify(MessagePending(message.message_id, "NOT_CONNECTED"))
            self._reported_pending.add(message.message_id)
        else:
            await self._wait_for_flush(connection)
        return message.message_id

    def _encrypt(self, message: QueuedMessage) -> list[core.Send]:
        """The sends of a queued message (the core's state moves on); the caller commits."""
        now = self.now()
        if message.group_id is None:
            assert message.to_user is not None
            _, direct = self.core.send_direct(
                message.to_user,
                message.body,
                now=now,
                message_id=message.message_id,
                sent_at=message.sent_at,
            )
            return list(direct)
        _, sends = self.core.send_group(
            message.group_id,
            message.body,
            now=now,
            message_id=message.message_id,
            sent_at=message.sent_at,
        )
        return sends

    async def _prepare_message(self, connection: RelayConnection, message: QueuedMessage) -> None:
        if message.group_id is None:
            assert message.to_user is not None
            await self._prepare(connection, [message.to_user])
        else:
            await self._prepare_group(connection, message.group_id)

    async def _change(
        self, users: list[str], change: Callable[[int], tuple[_T, list[core.Send]]]
    ) -> _T:
        """A group change: prepare for ``users`` (over the relay), change, store, send.

        A fetch the relay refuses for its rate limits is asked again when the
        relay says (at least RATE_LIMITED_MIN_WAIT, then the backoff if refused
        again), if that is within ``ready_timeout`` of the call; a longer wait
        is the app's to decide (RateLimited, nothing changed).
        """
        deadline = trio.current_time() + self._ready_timeout
        attempt = 0
        waited = 0.0  # for the relay's rate limit, last time (0: not yet)
        while attempt < MAX_PREPARE_ATTEMPTS:
            connection = await self._wait_ready()
            try:
                async with self._prepare_lock:
                    await self._prepare(connection, users)
            except RateLimited as limited:
                floor = _next_backoff(waited) if waited else RATE_LIMITED_MIN_WAIT
                waited = _rate_limited_wait(limited, floor)
                if trio.current_time() + waited > deadline:
                    raise
                await trio.sleep(waited)
                continue
            attempt += 1
            async with self._lock:
                try:
                    result, sends = change(self.now())
                except (MissingSessions, DeviceListNeeded):
                    if attempt == MAX_PREPARE_ATTEMPTS:
                        raise
                    continue  # a list or a session changed meanwhile: prepare again
                await self._commit(self.core.take_changes(), sends=sends)
            self._wake.set()
            await self._wait_for_flush(connection)
            return result
        raise AssertionError("unreachable")

    async def _wait_ready(self) -> RelayConnection:
        """The connection, waiting for it at most ``ready_timeout`` (no lock held)."""
        with trio.move_on_after(self._ready_timeout):
            while True:
                await self._ready.wait()
                if self._connection is not None:
                    return self._connection
                await trio.sleep(0)
        raise RelayTimeout("not connected to the relay")

    async def _wait_for_flush(self, connection: RelayConnection) -> None:
        """Until the flusher has been through the outbox as it is now, or the connection ends."""
        target = self._passes_started + 1
        while self._passes_finished < target and self._connection is connection:
            await self._progress.wait()

    # ------------------------------------------------------------ preparing sends

    async def _fetch_device_list(self, connection: RelayConnection, user_id: str) -> None:
        data = await connection.fetch_device_list(user_id)
        if SignedDeviceList.decode(data).device_list.user_id != user_id:
            raise RelayProtocolViolation(f"the relay served another user's list for {user_id!r}")
        async with self._lock:
            outcome = self.core.process_device_list(data)
            _, ids = await self._commit(self.core.take_changes(), events=outcome.events)
        self._deliver_events(list(outcome.events), ids)

    async def _prepare(self, connection: RelayConnection, user_ids: Iterable[str]) -> None:
        """Device lists and sessions for these users' devices and our own."""
        users = {*user_ids, self.core.user_id}
        for user_id in sorted(users):
            if self.core.device_list(user_id) is None:
                await self._fetch_device_list(connection, user_id)
        await self._start_sessions(
            connection, self.core.devices_without_session(sorted(users), now=self.now())
        )

    async def _prepare_group(self, connection: RelayConnection, group_id: bytes) -> None:
        for user_id in self.core.group(group_id).user_ids:
            if self.core.device_list(user_id) is None:
                await self._fetch_device_list(connection, user_id)
        await self._start_sessions(connection, self.core.group_send_needs(group_id, now=self.now()))

    async def _start_sessions(
        self, connection: RelayConnection, addresses: Iterable[Address]
    ) -> None:
        """Fetch these devices' bundles (network), then start the sessions (one commit)."""
        bundles = [await connection.fetch_bundle(a.user_id, a.device_id) for a in addresses]
        if not bundles:
            return
        async with self._lock:
            try:
                for bundle in bundles:
                    self.core.process_bundle(bundle, now=self.now())
            finally:
                # What was processed before a bad bundle stands (the bundles are spent).
                await self._commit(self.core.take_changes())

    # ------------------------------------------------------------ the outbox

    async def _flusher(self, connection: RelayConnection) -> None:
        """Send the outbox, pass after pass, while the connection lasts."""
        while True:
            self._wake = trio.Event()
            self._passes_started += 1
            try:
                retry_at = await self._flush_pass(connection)
            finally:
                self._passes_finished += 1
                self._progress.set()
                self._progress = trio.Event()
            with trio.move_on_at(retry_at):
                await self._wake.wait()

    async def _flush_pass(self, connection: RelayConnection) -> float:
        """One pass over the outbox, in order; when a destination refused for now is due."""
        blocked: set[str] = set()
        retry_at = math.inf
        outbox = self.store.outbox()
        await self._set_aside_unreadable()
        self._pass_receipts = [(r, i) for r, i in outbox if isinstance(i, QueuedReceipt)]
        # What full mailboxes refused that waits for its devices' retry, by user: it
        # goes before anything newer to that user (the device may have room again).
        missed: dict[str, dict[int, Resend]] = {}
        order = {row_id: index for index, (row_id, _) in enumerate(outbox)}
        resent: set[int] = set()
        for row_id, item in outbox:
            if row_id not in self._outbox_messages:
                continue  # gone during this pass (merged into a receipt, or failed with another)
            destinations = self._destinations(item)
            now = trio.current_time()
            due = [self._retry_at[d] for d in destinations if self._retry_at.get(d, 0) > now]
            if due or destinations & blocked:
                # An earlier row for one of its destinations waits: so does this one.
                if isinstance(item, Resend) and not destinations & blocked:
                    for user, _ in _named(item.send):
                        missed.setdefault(user, {})[row_id] = item
                blocked |= destinations
                retry_at = min(retry_at, *due) if due else retry_at
                reasons = [self._retry_reason[d] for d in destinations if d in self._retry_reason]
                self._report_pending(item, reasons[0] if reasons else "WAITING")
                continue
            if missed and not isinstance(item, Resend):
                users = {d[2:] for d in destinations if d.startswith("u:")}
                earlier: dict[int, Resend] = {}
                for user in users & missed.keys():
                    earlier.update(missed.pop(user))
                for early_id in sorted(earlier, key=order.__getitem__):
                    if early_id not in self._outbox_messages or early_id in resent:
                        continue  # gone, or tried in this pass (for another of its users)
                    resent.add(early_id)
                    early = earlier[early_id]
                    if await self._deliver(connection, early_id, early) is not None:
                        blocked |= self._destinations(early)
            delay = await self._deliver(connection, row_id, item)
            if delay is not None:
                blocked |= destinations
                retry_at = min(retry_at, trio.current_time() + delay)
        await self._expire_deliveries()
        # Rows left for full mailboxes wait on their own devices' retry times, and the
        # next delivery deadline is met even if nothing else happens.
        now = trio.current_time()
        wake = [retry_at, *(t for t in self._retry_at.values() if t > now)]
        if self._deliveries:
            deadline = min(deadline for deadline, _ in self._deliveries.values())
            wake.append(now + max(0, deadline - self.now()) + 1)
        return min(wake)

    def _destinations(self, item: OutboxItem) -> set[str]:
        """Who a row goes to: rows for the same user or group leave in order.

        What full mailboxes refused goes to those devices alone: it waits on
        them only, never on their user or group.
        """
        if isinstance(item, Resend):
            return {_device_destination(user, device) for user, device in _named(item.send)}
        if isinstance(item, DirectSend):
            return {"u:" + item.recipient_user}
        if isinstance(item, GroupSend):
            return {"g:" + item.group_id.hex(), *("u:" + a.user_id for a in item.recipients)}
        if isinstance(item, ChangeSend):
            return {"g:" + item.group_id.hex(), *("u:" + p.recipient_user for p in item.parts)}
        if isinstance(item, QueuedReceipt):
            return {"u:" + item.to_user}
        if item.group_id is None:
            assert item.to_user is not None
            return {"u:" + item.to_user}
        destinations = {"g:" + item.group_id.hex()}
        with suppress(InvalidArgument):  # the group is gone: the row fails in its turn
            destinations.update("u:" + u for u in self.core.group(item.group_id).user_ids)
        return destinations

    async def _deliver(
        self, connection: RelayConnection, row_id: int, item: OutboxItem
    ) -> float | None:
        """Send one row; None if it is done, else seconds before its destinations retry."""
        if isinstance(item, QueuedMessage):
            return await self._send_queued(connection, row_id, item)
        if isinstance(item, QueuedReceipt):
            return await self._send_receipts(connection, row_id, item)
        return await self._send_one(connection, row_id, item)

    async def _send_queued(
        self, connection: RelayConnection, row_id: int, message: QueuedMessage
    ) -> float | None:
        """Encrypt a queued message in its place in the outbox, and send it."""
        try:
            async with self._prepare_lock:
                await self._prepare_message(connection, message)
        except (RelayError, RemoteProtocolError, LocalProtocolError) as refusal:
            return await self._preparation_refused(row_id, message, refusal)
        async with self._lock:
            try:
                sends = self._encrypt(message)
            except (MissingSessions, DeviceListNeeded):
                return self._refused(message, "PREPARING")  # changed meanwhile
            except LocalProtocolError as failure:
                refused: LocalProtocolError | None = failure
            else:
                refused = None
        if refused is not None:
            await self._fail(row_id, message, refused.code)
            return None
        return await self._replace(connection, row_id, sends, 1)

    async def _preparation_refused(
        self,
        row_id: int,
        item: QueuedMessage | QueuedReceipt,
        refusal: RelayError | RemoteProtocolError | LocalProtocolError,
    ) -> float | None:
        """What becomes of a row whose device lists or sessions could not be prepared:
        None if it failed for good, else seconds before its destinations retry."""
        if isinstance(refusal, RateLimited):
            return self._refused(item, "RATE_LIMITED", refusal)
        if isinstance(refusal, UnknownUser | RemoteProtocolError | LocalProtocolError):
            # The relay does not know the user, serves what does not verify, or
            # the group is gone: nothing to send it to.
            await self._fail(row_id, item, refusal.code)
            return None
        # No prekeys yet, the relay's own failure, a device it does not list
        # yet: it may pass; try again later.
        return self._refused(item, refusal.code)

    async def _send_receipts(
        self, connection: RelayConnection, row_id: int, receipt: QueuedReceipt
    ) -> float | None:
        """Confirm to a user the messages of its we received: this row's and the later
        receipt rows for it in this pass, in one DeliveryReceipt."""
        ids, merged = list(receipt.message_ids), []
        for other_id, other in self._pass_receipts:
            if (
                other_id != row_id
                and isinstance(other, QueuedReceipt)
                and other.to_user == receipt.to_user
                and other_id in self._outbox_messages
                and len(ids) + len(other.message_ids) <= MAX_RECEIPT_MESSAGE_IDS
            ):
                ids += other.message_ids
                merged.append(other_id)
        try:
            async with self._prepare_lock:
                await self._prepare(connection, [receipt.to_user])
        except (RelayError, RemoteProtocolError, LocalProtocolError) as refusal:
            return await self._preparation_refused(row_id, receipt, refusal)
        async with self._lock:
            try:
                sends: list[core.Send] = list(
                    self.core.send_receipt(receipt.to_user, ids, now=self.now())
                )
            except (MissingSessions, DeviceListNeeded):
                return self._refused(receipt, "PREPARING")  # changed meanwhile
        return await self._replace(connection, row_id, sends, 1, also=merged)

    async def _send_one(
        self,
        connection: RelayConnection,
        row_id: int,
        send: core.Send | Resend,
        attempt: int = 1,
    ) -> float | None:
        """Send an encrypted row; None if it left the outbox, else seconds before a retry."""
        limited_before = False
        while True:
            try:
                full: Sequence[tuple[str, int]] = ()
                if isinstance(send, ChangeSend):
                    parts = [(part.recipient_user, part.payloads) for part in send.parts]
                    await connection.send_change(send.receipt, parts)
                else:
                    full = await _send_payloads(connection, send)
            except InvalidArgument:
                # No frame carries it: more than one frame holds (first messages to
                # many devices of a full group), or it names a user id stored before
                # U+0000 was refused (spec/11-devices.md section 11.1). It can never
                # be sent, and would hold up the outbox.
                await self._fail(row_id, send, SendDropped.code)
                return None
            except RateLimited as limited:
                # The relay paces sends per connection and says when the next one
                # succeeds: wait that long, then send it again. Refused again after
                # that wait (no honest relay does), or told to wait longer than a
                # call waits for the relay, the row waits in the outbox instead, as
                # for a refusal that passes: the flusher goes on, the call returns.
                wait = _rate_limited_wait(limited, RATE_LIMITED_MIN_WAIT)
                if limited_before or wait > self._ready_timeout:
                    return self._refused(send, "RATE_LIMITED", limited)
                limited_before = True
                await trio.sleep(wait)
                continue
            except DeviceListMismatch as mismatch:
                if isinstance(send, Resend):
                    return await self._resend_to_listed(connection, row_id, send, mismatch, attempt)
                if attempt >= MAX_SEND_ATTEMPTS:
                    # Still refused after rebuilding (say, a changed identity awaits the
                    # user's confirmation, so the list we hold stays old): retrying cannot
                    # help, and a stuck send would block the outbox behind it.
                    await self._fail(row_id, send, SendDropped.code)
                    return None
                return await self._resend(connection, row_id, send, mismatch, attempt)
            except MailboxFull as refused:
                if isinstance(send, ChangeSend | Resend):
                    # A change reaches every device or none; what full mailboxes
                    # refused before is still refused: both wait.
                    return self._refused(send, refused.code)
                # No device had room: nothing was stored, all of them wait.
                await self._keep_for_full(row_id, send, refused.devices)
                return None
            except (InternalError, StorageFull) as passing:
                return self._refused(send, passing.code)
            except UnknownUser as unknown:
                if isinstance(send, ChangeSend):
                    # A member's user is gone from the relay: the others still get the change.
                    rest = tuple(p for p in send.parts if p.recipient_user != unknown.user_id)
                    return await self._replace(
                        connection, row_id, [ChangeSend(send.group_id, send.receipt, rest)], attempt
                    )
                await self._fail(row_id, send, unknown.code)
                return None
            except RelayError as refusal:
                # The user is gone, or the send cannot be carried: it never will be.
                await self._fail(row_id, send, refusal.code)
                return None
            if full:
                assert not isinstance(send, ChangeSend)
                await self._keep_for_full(row_id, send, full)
                return None
            await self._sent(row_id, send)
            return None

    async def _keep_for_full(
        self,
        row_id: int,
        send: DirectSend | GroupSend | Resend,
        full: Sequence[tuple[str, int]],
    ) -> None:
        """The relay stored ``send`` for every device it named but the ``full`` ones: what
        they missed stays in the row's place, to go again to them alone (``resend``).

        Their retry waits on them only; the row's user and group flow on. The
        message is expected to be confirmed by every device it named.
        """
        inner = send.send if isinstance(send, Resend) else send
        rest = Resend(_only_devices(inner, full))
        position = self.store.position_of(row_id)
        async with self._lock:
            deliveries = self._expect_receipts(inner)
            await self._commit(
                {}, sends=[rest], position=position, sent=[row_id], deliveries=deliveries
            )
            self._apply_deliveries(deliveries)
        if not isinstance(send, Resend):
            self._flowing(self._destinations(send))
        now = trio.current_time()
        if all(self._retry_at.get(d, 0) > now for d in self._destinations(rest)):
            # Those devices wait already: another message for them keeps their time.
            self._report_pending(rest, MailboxFull.code)
        else:
            self._refused(rest, MailboxFull.code)

    async def _resend_to_listed(
        self,
        connection: RelayConnection,
        row_id: int,
        send: Resend,
        mismatch: DeviceListMismatch,
        attempt: int,
    ) -> float | None:
        """A resend naming devices their user no longer lists: it goes on to the others.

        A resend may name some of a user's devices, never one it does not list
        (spec 07, 7.8); a device listed since never had the message.
        """
        if attempt >= MAX_SEND_ATTEMPTS:
            await self._fail(row_id, send, SendDropped.code)
            return None
        gone = {(m.user_id, device) for m in mismatch.mismatches for device in m.unknown}
        async with self._lock:
            try:
                events = self._hold_mismatched_lists(send.send, mismatch)
            except RemoteProtocolError as failure:
                refused: RemoteProtocolError | None = failure
            else:
                refused = None
            if refused is None:
                keep = [a for a in _named(send.send) if a not in gone]
                rest = [Resend(_only_devices(send.send, keep))] if keep else []
                position = self.store.position_of(row_id)
                new_ids, ids = await self._commit(
                    self.core.take_changes(),
                    events=events,
                    sends=rest,
                    position=position,
                    sent=[row_id],
                )
        if refused is not None:
            await self._fail(row_id, send, refused.code)
            return None
        self._deliver_events(events, ids)
        if not rest:
            await self._sent_everywhere(send)
            return None
        return await self._send_one(connection, new_ids[0], rest[0], attempt + 1)

    async def _resend(
        self,
        connection: RelayConnection,
        row_id: int,
        send: core.Send,
        mismatch: DeviceListMismatch,
        attempt: int,
    ) -> float | None:
        """A send refused for a stale device list, rebuilt for the current one, in its place."""
        try:
            async with self._prepare_lock:
                replacements = await self._rebuild(connection, send, mismatch)
        except RemoteProtocolError as failure:
            await self._fail(row_id, send, failure.code)
            return None
        except RateLimited as limited:
            return self._refused(send, "RATE_LIMITED", limited)
        except RelayError as passing:  # a bundle it cannot give yet: later
            return self._refused(send, passing.code)
        return await self._replace(connection, row_id, replacements, attempt + 1)

    async def _replace(
        self,
        connection: RelayConnection,
        row_id: int,
        sends: list[core.Send],
        attempt: int,
        also: Sequence[int] = (),
    ) -> float | None:
        """Put ``sends`` where row ``row_id`` was (with the core's changes; rows ``also``
        leave too); send them."""
        position = self.store.position_of(row_id)
        async with self._lock:
            new_ids, _ = await self._commit(
                self.core.take_changes(), sends=sends, position=position, sent=[row_id, *also]
            )
        for new_id, new_send in zip(new_ids, sends, strict=True):
            delay = await self._send_one(connection, new_id, new_send, attempt)
            if delay is not None:
                return delay
        return None

    def _hold_mismatched_lists(
        self, send: core.Send, mismatch: DeviceListMismatch
    ) -> list[core.Event]:
        """Take the device lists a DEVICE_LIST_MISMATCH sent back for ``send`` (under
        ``_lock``); their events. RelayProtocolViolation, holding none, if one is not of
        a user the send names (_check_mismatch); RemoteProtocolError if one does not
        verify."""
        _check_mismatch(send, mismatch)
        events: list[core.Event] = []
        for item in mismatch.mismatches:
            events.extend(self.core.process_device_list(item.signed_device_list).events)
        return events

    async def _rebuild(
        self, connection: RelayConnection, send: core.Send, mismatch: DeviceListMismatch
    ) -> list[core.Send]:
        """The sends that replace a refused one (the caller commits them with the state)."""
        async with self._lock:
            events = self._hold_mismatched_lists(send, mismatch)
            _, ids = await self._commit(self.core.take_changes(), events=events)
        self._deliver_events(events, ids)
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
            async with self._lock:
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
            async with self._lock:
                resent = self.core.resend_change(send, now=self.now())
            return [] if resent is None else [resent]
        await self._start_sessions(
            connection, self.core.group_send_needs(send.group_id, now=self.now())
        )
        async with self._lock:
            return self.core.resend_group(send, now=self.now())

    def _refused(self, item: OutboxItem, reason: str, limited: RateLimited | None = None) -> float:
        """A refusal that passes: the row's destinations wait a growing backoff, or as
        long as the relay's rate limit says if that is longer (``limited``)."""
        destinations = self._destinations(item)
        delay = _next_backoff(
            max((self._retry_delay.get(d, 0.0) for d in destinations), default=0.0)
        )
        if limited is not None:
            delay = _rate_limited_wait(limited, delay)
        now = trio.current_time()
        for destination in destinations:
            self._retry_at[destination] = now + delay
            self._retry_delay[destination] = delay
            self._retry_reason[destination] = reason
        self._report_pending(item, reason)
        return delay

    def _report_pending(self, item: OutboxItem, reason: str) -> None:
        message_id = _message_of(item)
        if message_id is not None and message_id not in self._reported_pending:
            self._reported_pending.add(message_id)
            self._notify(MessagePending(message_id, reason))

    async def _sent(self, row_id: int, send: core.Send | Resend) -> None:
        """The relay accepted a row: it leaves the outbox, and its destinations flow again.

        The devices it went to (other users') are expected to confirm its
        message with delivery receipts.
        """
        async with self._lock:
            deliveries = self._expect_receipts(send.send if isinstance(send, Resend) else send)
            await self._commit({}, sent=[row_id], deliveries=deliveries)
            self._apply_deliveries(deliveries)
        self._flowing(self._destinations(send))
        await self._sent_everywhere(send)

    def _flowing(self, destinations: Iterable[str]) -> None:
        """These destinations took a send: no backoff for them any more."""
        for destination in destinations:
            self._retry_delay.pop(destination, None)
            self._retry_reason.pop(destination, None)

    async def _sent_everywhere(self, send: OutboxItem) -> None:
        """MessageSent, once no row of the message is left in the outbox."""
        message_id = _message_of(send)
        if message_id is not None and message_id not in self._outbox_messages.values():
            self._reported_pending.discard(message_id)
            self._notify(MessageSent(message_id))

    def _device_reads(self, device: Address) -> None:
        """A receipt from ``device``: it reads its mail, so its mailbox has room again.

        What full mailboxes refused it goes now rather than at its backoff.
        """
        destination = _device_destination(device.user_id, device.device_id)
        if self._retry_at.pop(destination, None) is not None:
            self._retry_delay.pop(destination, None)
            self._wake.set()

    # ------------------------------------------------------------ delivery receipts

    def _expect_receipts(
        self, send: core.Send
    ) -> dict[bytes, tuple[int, frozenset[Address]] | None]:
        """(Under the lock.) The delivery to track once the relay accepted ``send``."""
        message_id = _message_of(send)
        own = self.core.user_id
        if message_id is None:
            return {}
        if isinstance(send, DirectSend):
            devices = frozenset(
                Address(send.recipient_user, device_id)
                for device_id, _ in send.payloads
                if send.recipient_user != own
            )
        elif isinstance(send, GroupSend):
            devices = frozenset(a for a in send.recipients if a.user_id != own)
        else:
            return {}
        devices -= self._early_receipts.pop(message_id, set())
        # The relay's retention starts when it stores the message for a device: what
        # full mailboxes refused and took later has its time from then.
        fresh = self.now() + self._delivery_deadline
        deadline, expected = self._deliveries.get(message_id, (fresh, frozenset()))
        if not devices and not expected:
            return {}
        if devices:
            deadline = max(deadline, fresh)
        return {message_id: (deadline, expected | devices)}

    def _confirm(
        self,
        confirmed: DeliveryConfirmed,
        deliveries: dict[bytes, tuple[int, frozenset[Address]] | None],
    ) -> list[StoredEvent]:
        """(Under the lock.) A device's receipt: the deliveries it completes (events) and the
        rows to change (into ``deliveries``)."""
        delivered: list[StoredEvent] = []
        for message_id in confirmed.message_ids:
            tracked = deliveries.get(message_id, self._deliveries.get(message_id))
            if tracked is None:
                if message_id not in deliveries:
                    if len(self._early_receipts) >= MAX_EARLY_RECEIPTS:
                        # The oldest is a late or stray receipt, not one overtaking an ACCEPTED.
                        del self._early_receipts[next(iter(self._early_receipts))]
                    self._early_receipts.setdefault(message_id, set()).add(confirmed.device)
                continue
            deadline, devices = tracked
            devices -= {confirmed.device}
            if devices:
                deliveries[message_id] = (deadline, devices)
            else:
                deliveries[message_id] = None
                delivered.append(MessageDelivered(message_id))
        return delivered

    def _apply_deliveries(
        self, deliveries: Mapping[bytes, tuple[int, frozenset[Address]] | None]
    ) -> None:
        """The committed delivery changes, in memory too."""
        for message_id, tracked in deliveries.items():
            if tracked is None:
                self._deliveries.pop(message_id, None)
            else:
                self._deliveries[message_id] = tracked

    def _receipts_for(self, events: Iterable[core.Event]) -> list[QueuedReceipt]:
        """The receipts owed for messages just received from other users, one per user."""
        by_user: dict[str, list[bytes]] = {}
        for event in events:
            if isinstance(event, MessageReceived) and event.sender.user_id != self.core.user_id:
                by_user.setdefault(event.sender.user_id, []).append(event.message_id)
        return [QueuedReceipt(user, tuple(ids)) for user, ids in by_user.items()]

    async def _expire_deliveries(self) -> None:
        """Report the messages whose deadline passed with devices that never confirmed."""
        now = self.now()
        if not any(deadline <= now for deadline, _ in self._deliveries.values()):
            return
        async with self._lock:
            due = {m: t for m, t in self._deliveries.items() if t[0] <= now}
            events: list[StoredEvent] = [
                MessageNotDelivered(message_id, tuple(sorted(devices)))
                for message_id, (_, devices) in due.items()
            ]
            cleared: dict[bytes, tuple[int, frozenset[Address]] | None] = dict.fromkeys(due)
            _, ids = await self._commit({}, events=events, deliveries=cleared)
            self._apply_deliveries(cleared)
        self._deliver_events(events, ids)

    async def _fail(self, row_id: int, item: OutboxItem, reason: str) -> None:
        """A row that can never be sent leaves the outbox; its message failed (stored event).

        A change of a group of ours is abandoned (the core's GroupChangeFailed).
        """
        message_id = _message_of(item)
        events: list[StoredEvent] = []
        if message_id is not None:
            events.append(SendFailed(message_id, reason))
        if isinstance(item, QueuedReceipt):
            # Best effort: the sender learns of it by the missing receipt.
            logger.debug("a delivery receipt could not be sent (%s)", reason)
            await self._commit({}, sent=[row_id])
            return
        if isinstance(item, Resend):
            # The other devices have the message; these are reported at its
            # delivery deadline (MessageNotDelivered).
            logger.warning("a send to full mailboxes could not be sent again (%s)", reason)
            await self._commit({}, sent=[row_id])
            await self._sent_everywhere(item)
            return
        others = [r for r, m in self._outbox_messages.items() if m == message_id and r != row_id]
        sent = [row_id, *(others if message_id is not None else [])]
        logger.warning("a send could not be delivered and left the outbox (%s)", reason)
        async with self._lock:
            if isinstance(item, ChangeSend):
                events.extend(self.core.abandon_change(item).events)
            _, ids = await self._commit(self.core.take_changes(), sent=sent, events=events)
        if message_id is not None:
            self._reported_pending.discard(message_id)
        self._deliver_events(events, ids)

    # ------------------------------------------------------------ persistence

    async def _commit(
        self,
        changes: dict[core.RecordKey, bytes | None],
        *,
        sends: Sequence[OutboxItem] = (),
        position: int | None = None,
        events: Iterable[StoredEvent] = (),
        processed: tuple[bytes, int] | None = None,
        sent: Iterable[int] = (),
        taken: Iterable[int] = (),
        deliveries: Mapping[bytes, tuple[int, frozenset[Address]] | None] | None = None,
    ) -> tuple[list[int], list[int]]:
        """One store transaction, off the event loop's thread; new outbox and inbox row ids.

        If it fails (StoreFailed: a full disk, say), nothing was stored, so
        the core goes back to what the store holds: a state change that was
        not persisted must not be used (a message key spent in memory only
        would make the message undecryptable when it comes again).
        """
        events = list(events)
        sent = list(sent)
        # One at a time: the app's events() and the receive loop both commit, and
        # two threads on one SQLite connection cannot both open a transaction.
        async with self._store_lock:
            try:
                new_ids, inbox_ids = await trio.to_thread.run_sync(
                    lambda: self.store.commit(
                        changes,
                        sends=sends,
                        position=position,
                        events=events,
                        processed=processed,
                        sent=sent,
                        taken=list(taken),
                        deliveries={
                            message_id: None if tracked is None else _sorted(tracked)
                            for message_id, tracked in (deliveries or {}).items()
                        },
                    )
                )
            except BaseException:
                if changes:
                    self._reload_core()
                raise
        for row_id in sent:
            self._outbox_messages.pop(row_id, None)
        for row_id, item in zip(new_ids, sends, strict=True):
            self._outbox_messages[row_id] = _message_of(item)
        return new_ids, inbox_ids

    def _reload_core(self) -> None:
        """The core as the store holds it (after a commit that failed)."""
        self.core = ClientCore.load(
            self.store.records(),
            rng=self._rng,
            sender_key_max_age=self.core.sender_key_max_age,
            sender_key_max_messages=self.core.sender_key_max_messages,
            max_sender_key_records=self.core.max_sender_key_records,
            max_groups=self.core.max_groups,
        )
        self._published = _stored_int(self.store, core.RecordKey.PUBLISHED_PREKEYS)
        self._registered = _stored_int(self.store, core.RecordKey.REGISTERED_DEVICE_LIST)

    async def _set_aside_unreadable(self) -> None:
        """Move the rows the store could not read out of the way, and say so (once each)."""
        if not self.store.has_unreadable:
            return
        logger.warning("stored rows could not be read and were set aside")
        async with self._store_lock:
            ids = await trio.to_thread.run_sync(self.store.set_aside)
        stored = dict(self.store.inbox())
        self._deliver_events([stored[i] for i in ids if i in stored], ids)

    def _deliver_events(self, events: Sequence[StoredEvent], ids: list[int]) -> None:
        """Hand stored events (``ids``: their inbox rows) to the app; never waits."""
        self._queue_events(zip(ids, events, strict=True))

    def _queue_events(self, items: Iterable[tuple[int | None, ClientEvent]]) -> None:
        """Queue events for the app, behind those waiting for room; never waits."""
        self._backlog.extend(items)
        self._fill_queue()

    def _queue_status(self, event: Connected | Disconnected) -> None:
        """Queue a notice that the connection came or went, after what waits for the app.

        An outage is a round of attempts every ``reconnect_max_delay`` for as
        long as it lasts, each a Disconnected: while the app does not read,
        the notices waiting in a row are folded, so at most three wait there.
        Of two alike the later stands for both; of went, came, went, came the
        first and the last stay. The app still learns that the connection went,
        and where it stands now.
        """
        self._queue_events([(None, event)])
        waiting = self._backlog
        if len(waiting) >= 2 and type(waiting[-2][1]) is type(event) and waiting[-2][0] is None:
            del waiting[-2]
        if len(waiting) >= 4 and all(
            waiting[i][0] is None and isinstance(waiting[i][1], Connected | Disconnected)
            for i in range(-4, 0)
        ):
            del waiting[-3]
            del waiting[-2]

    def _fill_queue(self) -> None:
        """Move the waiting events into the app's queue, as many as it has room for."""
        while self._backlog:
            try:
                self._events_in.send_nowait(self._backlog[0])
            except trio.WouldBlock:
                return
            self._backlog.popleft()

    async def _wait_for_the_app(self, connection: RelayConnection) -> None:
        """Until no event waits for room in the app's queue (the receive loop's pace), or
        an app call waits for mail (while fewer than MAX_BACKLOG_FOR_AWAITED_MAIL events
        wait). ConnectionClosed if the connection closes meanwhile: what was pushed and
        not taken stays at the relay, unacknowledged, for the next connection (taken
        now, a relay that closes again and again would add a window of events per
        connection, however long the app does not read)."""
        while self._backlog:
            connection.check_open()
            if self._mail_awaited and len(self._backlog) < MAX_BACKLOG_FOR_AWAITED_MAIL:
                return
            await self._may_receive.wait()

    def _wake_receive_loop(self) -> None:
        self._may_receive.set()
        self._may_receive = trio.Event()

    async def _wake_receive_loop_on_close(self, connection: RelayConnection) -> None:
        await connection.wait_closed()
        self._wake_receive_loop()

    def _notify(self, event: ClientEvent) -> None:
        """A notice for the app (not stored); dropped if the app lets its queue fill up."""
        if not self._backlog:
            with suppress(trio.WouldBlock):
                self._events_in.send_nowait((None, event))

    # ------------------------------------------------------------ receiving

    async def _process(self, connection: RelayConnection, envelope: Envelope) -> None:
        """Persist what an envelope produces (the caller acknowledges it afterwards)."""
        if self.store.was_processed(envelope.guid):
            return  # our acknowledgement was lost: acknowledged again
        sender = Address(envelope.sender_user, envelope.sender_device)
        sender_list = None
        if not self.core.knows_device(sender):
            # Without a valid list naming the sender, the core reports the
            # envelope as from an unknown device, and it is acknowledged. The
            # core keeps a first list of a user only if the envelope opens.
            with suppress(RelayError):
                sender_list = await connection.fetch_device_list(sender.user_id)
        async with self._lock:
            outcome = self.core.receive(
                sender, envelope.kind, envelope.payload, now=self.now(), sender_list=sender_list
            )
            events: list[StoredEvent] = []
            deliveries: dict[bytes, tuple[int, frozenset[Address]] | None] = {}
            for event in outcome.events:
                if isinstance(event, DeliveryConfirmed):
                    events += self._confirm(event, deliveries)
                    self._device_reads(event.device)
                else:
                    events.append(event)
            sends: list[OutboxItem] = [*outcome.sends, *self._receipts_for(outcome.events)]
            _, ids = await self._commit(
                self.core.take_changes(),
                sends=sends,
                events=events,
                processed=(envelope.guid, self.now()),
                deliveries=deliveries,
            )
            self._apply_deliveries(deliveries)
            self._processed.set()
            self._processed = trio.Event()
        # Persisted (the inbox holds the events until the app takes them), so the
        # app may see them and the relay may forget the envelope, in that order:
        # if the acknowledgement is lost, the redelivery is recognised by guid.
        self._deliver_events(events, ids)
        retried = await self._retry_waiting_changes(connection)
        if sends or retried:
            self._wake.set()

    async def _retry_waiting_changes(self, connection: RelayConnection) -> bool:
        """A change of ours that lost its epoch and needs sessions with devices that joined
        meanwhile: fetch their bundles and propose it again. Whether any was.

        What the relay refuses (a bundle it cannot give yet, its rate limit, a
        bundle that does not verify) leaves the change waiting, proposed again
        after the outbox's backoff (or when a rate-limiting relay says, if that is
        longer): it never ends the connection, which would end it again at every
        reconnect, before any mail is read.
        """
        delivered: list[tuple[list[StoredEvent], list[int]]] = []
        async with self._retry_lock:
            waiting = self.core.waiting_changes()
            for group_id in [g for g in self._change_retries if g not in waiting]:
                del self._change_retries[group_id]  # proposed, settled or dropped since
            for group_id in waiting:
                if self._change_retries.get(group_id, (-math.inf, 0.0))[0] > trio.current_time():
                    continue  # refused lately: its backoff runs (_retry_changes_when_due)
                try:
                    async with self._prepare_lock:
                        await self._prepare(connection, self.core.change_needs(group_id))
                    async with self._lock:
                        if group_id not in self.core.waiting_changes():
                            continue  # settled by mail that came while we fetched
                        outcome = self.core.retry_change(group_id, now=self.now())
                        _, ids = await self._commit(
                            self.core.take_changes(),
                            sends=list(outcome.sends),
                            events=outcome.events,
                        )
                except (
                    RelayError,
                    RemoteProtocolError,
                    MissingSessions,
                    DeviceListNeeded,
                ) as refused:
                    self._change_refused(group_id, refused)
                    continue
                self._change_retries.pop(group_id, None)
                delivered.append((list(outcome.events), ids))
        for events, ids in delivered:
            self._deliver_events(events, ids)
        return bool(delivered)

    def _change_refused(
        self, group_id: bytes, refused: RelayError | RemoteProtocolError | InvalidState
    ) -> None:
        """Our waiting change of ``group_id`` could not be proposed again: when to try next."""
        delay = _next_backoff(self._change_retries.get(group_id, (0.0, 0.0))[1])
        if isinstance(refused, RateLimited):
            # When the relay says, but never sooner than the backoff: no caller waits.
            delay = _rate_limited_wait(refused, delay)
        logger.info("a group change of ours waits %.1f s: %s", delay, refused.code)
        self._change_retries[group_id] = (trio.current_time() + delay, delay)
        self._change_retry_scheduled.set()

    async def _retry_changes_when_due(self, connection: RelayConnection) -> None:
        """Propose a refused waiting change again when its backoff ends (mail that
        arrives meanwhile may have done it already)."""
        while True:
            self._change_retry_scheduled = trio.Event()
            due = min((at for at, _ in self._change_retries.values()), default=math.inf)
            with trio.move_on_at(due):
                await self._change_retry_scheduled.wait()
                continue  # a new refusal: its time may come first
            if await self._retry_waiting_changes(connection):
                self._wake.set()

    async def _receive(
        self, connection: RelayConnection, acknowledge: trio.MemorySendChannel[list[bytes]]
    ) -> None:
        async for batch in connection.batches():
            # What arrived together is acknowledged together (by _acknowledger),
            # once each envelope's outcome is persisted.
            processed = []
            for item in batch:
                # The app reads what came before first (it may be slow: the mail waits
                # at the relay meanwhile).
                await self._wait_for_the_app(connection)
                if isinstance(item, Envelope):
                    await self._process(connection, item)
                    processed.append(item.guid)
                elif isinstance(item, PreKeysLow):
                    await self._replenish_prekeys(connection)
                elif isinstance(item, MailExpiredNotice):
                    expired = MailExpired(item.count, item.first_ts, item.last_ts)
                    self._queue_events([(None, expired)])
            if processed:
                # At most the relay's window is pushed unacknowledged: never waits.
                await acknowledge.send(processed)

    async def _acknowledger(
        self, connection: RelayConnection, processed: trio.MemoryReceiveChannel[list[bytes]]
    ) -> None:
        """Acknowledge what :meth:`_receive` processed, in one ACK for all that was
        processed while the last ACK waited for its reply: the relay answers a
        connection's requests in order, so that reply can wait for the commit of a
        send of ours before it, and receiving must not wait with it."""
        async for guids in processed:
            for more in already_queued(processed):
                guids += more
            # A relay may push one envelope twice (a duplicate is dropped by guid):
            # each guid is acknowledged once, as the relay requires.
            await connection.ack(*dict.fromkeys(guids))
            await self._prune()

    async def _prune(self) -> None:
        """Forget, once every PRUNE_INTERVAL, the guids the relay can no longer deliver again.

        An envelope expires ``retention`` after the relay accepted it, and
        the relay never pushes an expired one. So a guid processed more than
        ``processed_memory`` ago (at least the relay's retention, plus the
        difference between the two clocks) cannot come again from an honest
        relay; what a hostile relay replays later still meets the ratchets,
        which refuse a message whose key is spent (DUPLICATE_MESSAGE).
        """
        await self._expire_deliveries()
        now = self.now()
        if now - self._pruned_at < PRUNE_INTERVAL:
            return
        self._pruned_at = now
        cutoff = now - self._processed_memory
        if cutoff <= 0:
            return
        async with self._store_lock:
            with suppress(StoreFailed):  # not urgent: the next prune does it
                await trio.to_thread.run_sync(self.store.forget_processed_before, cutoff)

    # ------------------------------------------------------------ the device at the relay

    async def _replenish_prekeys(self, connection: RelayConnection) -> None:
        """Publish the current signed keys and every one-time key the relay lacks.

        One-time key ids only grow, so "lacks" means "newer than the highest
        id published". A stock below the low watermark gets a new batch.
        Every new key is stored before it is published: a key the relay hands
        out must be one we can still answer.
        """
        async with self._lock:
            account = self.core.account
            before = account.to_bytes()
            now = self.now()
            # Prune first: a replaced signed prekey is deleted once the current one
            # is older than the grace period (spec 2.2). Pruning right after a
            # rotation would find the new key too young and keep every old one.
            account.prune(now=now)
            if now - account.signed_prekey_age_start > SIGNED_PREKEY_ROTATION_AGE:
                account.rotate_signed_prekey(now=now, rng=self._rng)
            if account.to_bytes() != before:
                await self._commit_account()
        stock = await connection.upload_prekeys()
        upload = self.core.account.prekey_upload()
        fresh = [k for k in upload.one_time_prekeys if k.key_id > self._published]
        if stock.one_time + len(fresh) < PREKEY_LOW_WATERMARK:
            async with self._lock:
                self.core.account.generate_one_time_prekeys(PREKEY_BATCH_SIZE, rng=self._rng)
                await self._commit_account()
        upload = self.core.account.prekey_upload()
        fresh = [k for k in upload.one_time_prekeys if k.key_id > self._published]
        fresh_kem = [k for k in upload.one_time_kem_prekeys if k.key_id > self._published]
        first = True
        while first or fresh or fresh_kem:
            part, fresh = fresh[:MAX_PREKEYS_PER_UPLOAD], fresh[MAX_PREKEYS_PER_UPLOAD:]
            part_kem = fresh_kem[:MAX_PREKEYS_PER_UPLOAD]
            fresh_kem = fresh_kem[MAX_PREKEYS_PER_UPLOAD:]
            # PreKeyIdInUse: published before a crash kept us from storing that.
            with suppress(PreKeyIdInUse):
                await connection.upload_prekeys(
                    signed_prekey=upload.signed_prekey if first else None,
                    last_resort_kem=upload.last_resort_kem_prekey if first else None,
                    one_time=part,
                    one_time_kem=part_kem,
                )
            first = False
            published = max(
                [self._published, *(k.key_id for k in part), *(k.key_id for k in part_kem)]
            )
            if published != self._published:
                self._published = published
                await self._commit({core.RecordKey.PUBLISHED_PREKEYS: published.to_bytes(4, "big")})

    async def _commit_account(self) -> None:
        """(Under the lock.) Store the account as it is now, with the core's other changes."""
        changes = self.core.take_changes()
        changes[core.RecordKey.ACCOUNT] = self.core.account.to_bytes()
        await self._commit(changes)

    async def _sync_new_device(self, connection: RelayConnection) -> None:
        """(A linked device, once.) Ask our other devices for the groups they hold."""
        if self.core.holds_user_identity or self.store.record(core.RecordKey.SYNCED) is not None:
            return
        others = [a for a in self.core.devices_of(self.core.user_id) if a != self.address]
        async with self._prepare_lock:
            await self._start_sessions(
                connection,
                [a for a in self.core.devices_without_session([], now=self.now()) if a in others],
            )
        async with self._lock:
            sends = self.core.request_sync(now=self.now())
            changes = self.core.take_changes()
            changes[core.RecordKey.SYNCED] = b"\x01"
            await self._commit(changes, sends=sends)

    async def _login(self, connection: RelayConnection) -> bool:
        """Register if needed, then authenticate; whether we registered again.

        A new user's first device registers its user with the first list. If
        the relay holds the user already (Forbidden), the next login tells
        whose it is: ours, registered by a start that died before recording
        it, or another identity's (AUTH_FAILED), which no retry changes: it
        raises Forbidden, and :meth:`_connect` gives up. A device whose login
        the relay refused last time (it lost its database) registers its
        user again with the signed list it holds, exactly as the user
        identity signed it: peers see nothing new. If the relay still knows
        the user (Forbidden), it does not know this device: the login is
        refused again.
        """
        own = self.core.own_device_list
        reregistered = False
        first = self.core.holds_user_identity and self._registered == 0
        probing = first and self._user_exists
        if own is not None and (first or self._unknown_to_relay) and not probing:
            try:
                # The invitation (where the relay asks for one) is for the first
                # registration only: it is single-use.
                invite = self._invite if first else None
                await connection.upload_device_list(own.encode(), invite=invite)
            except Forbidden:
                if first:
                    self._user_exists = True
                    raise
            except (DeviceListRejected, RegistrationClosed, InviteRefused):
                if first:
                    raise
            else:
                reregistered = not first
                await self._set_registered(own.device_list.counter)
        try:
            await connection.authenticate(
                self.core.user_id, self.core.device_id, self.core.account.identity
            )
        except AuthenticationFailed:
            if not probing:
                raise
            self._user_id_taken = True
            raise Forbidden(
                f"the relay holds the user {self.core.user_id!r} for another identity"
            ) from None
        if probing and own is not None:
            await self._set_registered(own.device_list.counter)  # the user was ours
        if reregistered:
            # The relay lost our prekeys with the rest: every one-time key we
            # hold goes up again (those it handed out before went with its mail).
            self._published = 0
            await self._commit({core.RecordKey.PUBLISHED_PREKEYS: bytes(4)})
        return reregistered

    async def _set_registered(self, counter: int) -> None:
        self._registered = counter + 1  # stored +1 so that 0 means "never"
        record = self._registered.to_bytes(8, "big")
        await self._commit({core.RecordKey.REGISTERED_DEVICE_LIST: record})

    async def _publish_own_list(self, connection: RelayConnection) -> None:
        """(Authenticated.) Publish our own device list if the relay has an older one."""
        own = self.core.own_device_list
        if own is None or not self.core.holds_user_identity:
            return
        if own.device_list.counter + 1 > self._registered:
            await connection.upload_device_list(own.encode())
            await self._set_registered(own.device_list.counter)

    async def _check_own_list(self, connection: RelayConnection) -> None:
        """Take our own list from the relay, or give it ours if it holds an older one.

        An older one: our primary changed the list while it could not reach
        the relay, or the relay lost its database and the list came back
        from a device that held an older one. Any device of the user may
        publish the list the user identity signed.
        """
        own = self.core.own_device_list
        data = await connection.fetch_device_list(self.core.user_id)
        held = SignedDeviceList.decode(data).device_list
        if held.user_id != self.core.user_id:
            raise RelayProtocolViolation("the relay served another user's list for ours")
        if own is not None and held.counter < own.device_list.counter:
            await connection.upload_device_list(own.encode())
            if self.core.holds_user_identity:
                await self._set_registered(own.device_list.counter)
            return
        async with self._lock:
            outcome = self.core.process_device_list(data)
            _, ids = await self._commit(self.core.take_changes(), events=outcome.events)
        self._deliver_events(list(outcome.events), ids)

    # ------------------------------------------------------------ connections

    async def _session(
        self, connection: RelayConnection, task_status: trio.TaskStatus[None]
    ) -> None:
        """One connection's life: log in, stock prekeys, then send and receive."""
        reregistered = await self._login(connection)
        self._unknown_to_relay = False
        await self._check_own_list(connection)
        await self._replenish_prekeys(connection)
        await self._sync_new_device(connection)
        self._connection = connection
        self._status = Status.READY
        self._ready.set()
        task_status.started()
        if reregistered:
            logger.warning("registered again at a relay that had lost this device")
            self._notify(Reregistered())
        self._queue_status(Connected())
        if await self._retry_waiting_changes(connection):
            self._wake.set()
        await self._prune()
        acknowledge, processed = trio.open_memory_channel[list[bytes]](MAX_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._flusher, connection)
            nursery.start_soon(self._acknowledger, connection, processed)
            nursery.start_soon(self._retry_changes_when_due, connection)
            nursery.start_soon(self._wake_receive_loop_on_close, connection)
            await self._receive(connection, acknowledge)
            nursery.cancel_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected (reconnecting with backoff) until cancelled.

        ``task_status.started()`` fires once the first connection is ready.
        The backoff grows from ``reconnect_first_delay`` to
        ``reconnect_max_delay`` (RECONNECT_MULTIPLIER, RECONNECT_JITTER) after
        every attempt that did not make the client ready, a refused login
        included; a connection that became ready starts it over.

        A run stopped may be started again (the events stored and not taken are
        handed once); two at a time are InvalidArgument.
        """
        if self._running:
            raise InvalidArgument("the client is already running")
        self._running = True
        try:
            await self._run(task_status)
        finally:
            self._running = False

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        await self._commit(self.core.take_changes())  # a new device's first records
        self._outbox_messages = {row_id: _message_of(item) for row_id, item in self.store.outbox()}
        self._deliveries = {
            message_id: (deadline, frozenset(devices))
            for message_id, (deadline, devices) in self.store.deliveries().items()
        }
        if not self._inbox_queued:
            self._inbox_queued = True
            self._queue_events(self.store.inbox())
        delay = self._first_delay
        self._started = False
        while True:
            was_ready = newly_unknown = False
            reason = "no relay address"
            for address in await self._relay_addresses():
                status = task_status if not self._started else trio.TASK_STATUS_IGNORED
                reason, unreachable, was_ready, newly_unknown = await self._connect(address, status)
                if not unreachable:
                    break  # it answered: the backoff applies before any next attempt
            if was_ready:
                delay = self._first_delay
            if not self._unknown_to_relay or newly_unknown:
                self._queue_status(Disconnected(reason))
            await trio.sleep(jittered(delay, self._rng))
            delay = min(delay * RECONNECT_MULTIPLIER, self._max_delay)

    async def _relay_addresses(self) -> list[RelayAddress]:
        """Where to try, in order: the resolver's answer (else the addresses given), the
        address that last worked first."""
        addresses = self._addresses
        if self._resolver is not None:
            try:
                answer = [_check_address(address) for address in await self._resolver()]
            except Exception as exc:  # an app's resolver may fail in any way: carry on
                logger.warning("the relay resolver failed (%s); trying the known addresses", exc)
            else:
                addresses = answer or addresses
        return sorted(addresses, key=lambda address: address != self._relay)

    async def _connect(
        self, address: RelayAddress, status: trio.TaskStatus[None]
    ) -> tuple[str, bool, bool, bool]:
        """One connection to ``address``, to its end.

        Why it ended; whether the relay could not be reached there at all (the
        next address is then tried at once); whether it had become ready; and
        whether its login was refused for the first time.
        """
        self._relay = address
        reason, unreachable, newly_unknown = "relay closed the connection", False, False
        try:
            async with connect_relay(
                *address,
                ssl_context=self._ssl_context,
                expected_relay_name=self.relay_name,
                request_timeout=self._request_timeout,
            ) as connection:
                await _unwrapped(self._session(connection, status))
        except (ConnectFailed, ConnectTimeout) as failure:
            reason, unreachable = failure.code, True
        except AuthenticationFailed as refused:
            reason = refused.code
            newly_unknown = not self._unknown_to_relay
            if newly_unknown:
                logger.warning("the relay refused this device's login (%s)", reason)
                self._unknown_to_relay = True
                self._notify(UnknownToRelay(reason))
        except (RelayNameMismatch, RegistrationClosed, InviteRefused):
            # Not the relay we mean (or one relaying another's challenge), or one
            # that will not register us: no retry changes it. The app hears of it
            # from open_client.
            raise
        except Forbidden as refused:
            if self._user_id_taken:
                raise  # our user id is another identity's (_login): as above
            reason = refused.code
        except (TransportError, OSError, RemoteProtocolError) as exc:
            # RemoteProtocolError: the relay served something that does not
            # verify (our own device list, a bundle to sync with): drop this
            # connection and try again, as for any transport failure.
            reason = getattr(exc, "code", type(exc).__name__)
        finally:
            was_ready = self._status is Status.READY
            self._started = self._started or was_ready
            self._connection = None
            self._ready = trio.Event()
            self._progress.set()  # sends waiting on this connection's flusher return
            self._progress = trio.Event()
            self._status = Status.UNKNOWN_TO_RELAY if self._unknown_to_relay else Status.CONNECTING
        return reason, unreachable, was_ready, newly_unknown


async def _unwrapped(work: Awaitable[None]) -> None:
    """Await ``work``; an exception group from its nurseries comes out as its one real error.

    The flusher, the receive loop and the acknowledger run in one nursery: when
    the connection fails, each may raise, or one raises and the others are cancelled. The
    reconnect loop (and the app) expect one error: see :func:`_real_error`.
    """
    try:
        await work
    except BaseExceptionGroup as group:
        error = _real_error(group)
        if error is None:
            raise
        raise error from error.__cause__


def _real_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The error ``group`` (nested groups flattened) stands for; None if all are trio.Cancelled.

    A KeyboardInterrupt or SystemExit, if there is one, else the first that is
    not a cancellation. trio raises a Ctrl-C in whichever task runs when it
    comes, so it can come beside a connection's error: that error, taken for an
    outage, would have the client connect again and the app run on.
    """
    errors = [error for error in _leaves(group) if not isinstance(error, trio.Cancelled)]
    errors.sort(key=lambda error: isinstance(error, Exception))  # stable: the first of each kind
    return errors[0] if errors else None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterable[BaseException]:
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            yield from _leaves(error)
        else:
            yield error


def _check_address(address: object) -> RelayAddress:
    if (
        not isinstance(address, tuple)
        or len(address) != 2
        or not isinstance(address[0], str)
        or not address[0]
        or isinstance(address[1], bool)
        or not isinstance(address[1], int)
        or not 0 < address[1] < 65536
    ):
        raise InvalidArgument("a relay address is (host, port), a port from 1 to 65535")
    return address[0], address[1]


def _next_backoff(previous: float) -> float:
    """The wait after one more refusal, the last wait having been ``previous`` (0: none)."""
    return min(max(RETRY_FIRST_DELAY, previous * 2), RETRY_MAX_DELAY)


def _rate_limited_wait(limited: RateLimited, floor: float) -> float:
    """How long to wait before asking again a relay that refused for its rate limit:
    what it says, but at least ``floor`` and at most RETRY_MAX_DELAY.

    ``floor`` is RATE_LIMITED_MIN_WAIT for a call's first refusal, else the
    backoff (_next_backoff): see RATE_LIMITED_MIN_WAIT.
    """
    return min(max(limited.retry_after_ms / 1000, floor), RETRY_MAX_DELAY)


def jittered(delay: float, rng: RandomSource) -> float:
    """``delay`` times a random factor within RECONNECT_JITTER of 1."""
    spread = int.from_bytes(rng.random_bytes(2), "big") / 65535 * 2 - 1
    return delay * (1 + RECONNECT_JITTER * spread)


def _device_destination(user_id: str, device_id: int) -> str:
    return f"d:{device_id}:{user_id}"


def _check_mismatch(send: core.Send, mismatch: DeviceListMismatch) -> None:
    """RelayProtocolViolation unless each list the relay sent back is that of a user the
    send names, under that user's id: the relay checks only the users a send names (spec
    07, 7.8), and a list of anyone else would be held as if we had asked for it."""
    if isinstance(send, DirectSend):
        named = {send.recipient_user}
    elif isinstance(send, ChangeSend):
        named = {part.recipient_user for part in send.parts}
    else:
        named = {address.user_id for address in send.recipients}
    for item in mismatch.mismatches:
        listed = SignedDeviceList.decode(item.signed_device_list).device_list.user_id
        if item.user_id not in named or listed != item.user_id:
            raise RelayProtocolViolation("a device list of a user the send does not name")


def _named(send: DirectSend | GroupSend) -> list[tuple[str, int]]:
    """The (user_id, device_id) a send names, in its order."""
    if isinstance(send, DirectSend):
        return [(send.recipient_user, device_id) for device_id, _ in send.payloads]
    return [(a.user_id, a.device_id) for a in send.recipients]


def _only_devices(
    send: DirectSend | GroupSend, devices: Iterable[tuple[str, int]]
) -> DirectSend | GroupSend:
    """``send`` naming only ``devices`` (of those it names)."""
    keep = set(devices)
    if isinstance(send, DirectSend):
        payloads = tuple(
            (device_id, payload)
            for device_id, payload in send.payloads
            if (send.recipient_user, device_id) in keep
        )
        return replace(send, payloads=payloads)
    recipients = tuple(a for a in send.recipients if (a.user_id, a.device_id) in keep)
    return replace(send, recipients=recipients)


async def _send_payloads(
    connection: RelayConnection, send: DirectSend | GroupSend | Resend
) -> tuple[tuple[str, int], ...]:
    """Send a direct or group send (again, for a Resend); the devices whose mailboxes were full."""
    resend = isinstance(send, Resend)
    inner = send.send if isinstance(send, Resend) else send
    if isinstance(inner, DirectSend):
        result = await connection.send_direct(inner.recipient_user, inner.payloads, resend=resend)
    else:
        recipients = [(a.user_id, a.device_id) for a in inner.recipients]
        result = await connection.send_group(inner.payload, recipients, resend=resend)
    return result.mailbox_full


def _message_of(item: OutboxItem) -> bytes | None:
    """The app's message an outbox row carries (a group change or a receipt carries none)."""
    return None if isinstance(item, ChangeSend | QueuedReceipt) else item.message_id


def _sorted(tracked: tuple[int, frozenset[Address]]) -> tuple[int, tuple[Address, ...]]:
    deadline, devices = tracked
    return deadline, tuple(sorted(devices))


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
    """The device in ``store``, or a new user's first device (then ``user_id`` is needed).

    A record that does not load is set aside (reported by a StoredItemSetAside
    event): the device goes on without it. Without its identity (the meta and
    account records) it cannot: StateError.
    """
    if store.has_state():
        device, corrupt = ClientCore.load_salvaging(store.records(), rng=rng)
        if corrupt:
            logger.warning("%d stored records could not be read and were set aside", len(corrupt))
            store.set_aside_records(corrupt)
        return device
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
    processed_memory: int = PROCESSED_MEMORY,
    relays: Sequence[RelayAddress] = (),
    resolver: Resolver | None = None,
    delivery_deadline: int = DELIVERY_DEADLINE,
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
    InviteRefused from this function, and Forbidden if it holds the user id
    for another identity. ``clock`` gives the time in seconds (the
    protocol's ``now``) and ``rng`` every random draw, from loading or
    creating the device on. ``request_timeout`` bounds each request to the
    relay, ``ready_timeout`` how long an operation that needs the relay
    waits for a connection (then RelayTimeout). ``event_queue_size`` events
    are buffered for :meth:`Client.events` before the client stops reading
    mail until the app reads (nothing else waits for it: the app may send
    from the task that reads). After a dropped connection the client reconnects after
    ``reconnect_first_delay`` seconds, growing up to ``reconnect_max_delay``.
    The guid of each envelope processed is kept ``processed_memory`` seconds,
    to recognise it if it comes again: at least the relay's retention.

    ``relays``: more addresses the relay may be at, tried in turn after
    ``host``/``port`` when it cannot be reached there (one that answers ends
    the round); ``resolver``: an async function giving the addresses to try
    now, called before each round (``host``/``port`` and ``relays`` serve
    when it fails). Either way the address that last worked comes first.

    Each device a message went to confirms it with a delivery receipt
    (MessageDelivered once all did); one that has not within
    ``delivery_deadline`` seconds is reported (MessageNotDelivered): at least
    the relay's retention.

    Errors come out as the library's own exceptions (never an exception
    group): those of the block as they were raised, and a failure of the
    client itself (its store failing, say) as that error.
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
        processed_memory=processed_memory,
        relays=relays,
        resolver=resolver,
        delivery_deadline=delivery_deadline,
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
        error = _real_error(group)
        if error is None:
            raise
        raise error from error.__cause__
