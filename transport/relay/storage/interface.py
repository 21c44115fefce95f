"""The relay's storage interface: a narrow typing.Protocol and the values it speaks.

The relay keeps only what delivery needs: each user's signed device list
(and its devices' identity keys, for authentication), each device's public
prekeys, and queued envelopes (opaque ciphertext with the sender the relay
stamped, a timestamp and an expiry), the latter sealed at rest under keys
that cease to exist after the retention window (spec 07 section 7.13).
:class:`hushchat.transport.relay.storage.sqlite.SqliteStorage` implements it
on one SQLite file, :class:`hushchat.transport.relay.storage.postgres.PostgresStorage`
on a PostgreSQL database that several relay processes share (and
:class:`ClusterStorage`, which lets them push to each other's devices).
Every method is one atomic transaction; an implementation may commit the
transactions of concurrent calls together (group commit), as long as each
call returns only after its own transaction committed.

A device's mailbox is ordered by ``seq``, which only grows; each envelope
also belongs to an ``epoch`` (the period whose keys sealed it), which never
decreases as ``seq`` grows, so a reader resumes from (epoch, seq).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from hushchat.protocol.consts import PROTOCOL_VERSION
from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic

from ...wire.errors import TransportError
from ...wire.records import Envelope, PreKeyCounts
from ..ratelimit import RateLimit


class StorageConflict(TransportError):
    """A compare-and-set failed: the data changed since it was read; read again."""

    code = "STORAGE_CONFLICT"


class UnsuitableDatabase(TransportError):
    """The database cannot hold a relay's data as the protocol needs (a PostgreSQL
    database not in UTF8): the sentence says why and what to do. Nothing was stored."""

    code = "UNSUITABLE_DATABASE"


@dataclass(frozen=True, slots=True)
class StoredDeviceList:
    """A user's current signed device list, with the parts the relay routes by.

    ``protocol_version`` is the version of the list's format: lists stored
    before a relay was upgraded to protocol version 2 are of version 1, whose
    devices carry no proof that they belong to the user. Such a list still
    authenticates its devices (so the user can publish a list of the current
    version), but its device keys do not count as taken (a user may have
    listed another's key, which is what the proofs now prevent).
    """

    user_id: str
    user_identity: bytes
    counter: int
    signed: bytes = field(repr=False)
    devices: tuple[tuple[int, bytes], ...] = field(repr=False)  # (device_id, identity)
    protocol_version: int = PROTOCOL_VERSION

    def device_identity(self, device_id: int) -> bytes | None:
        for listed, identity in self.devices:
            if listed == device_id:
                return identity
        return None

    @property
    def device_ids(self) -> frozenset[int]:
        return frozenset(d for d, _ in self.devices)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One envelope to enqueue: ``payloads[payload_index]`` for (user_id, device_id)."""

    user_id: str
    device_id: int
    guid: bytes
    payload_index: int


@dataclass(frozen=True, slots=True)
class EnvelopeBatch:
    """Everything one send stores, atomically.

    Each payload (its envelope kind and bytes) is stored once, however many
    deliveries name it (a group send has one payload and many deliveries; a
    group change has one per device, and its receipt for the sender).
    ``device_list_counters`` are the recipients' device-list counters the
    sender was checked against; if any changed, nothing is stored
    (StorageConflict). A send is stored for the devices with room in their
    mailboxes; ``all_or_nothing`` (a group change, which every device must
    meet at one place in the relay's order) stores it for all or none.
    """

    sender_user: str
    sender_device: int
    server_ts: int
    expires_at: int
    payloads: tuple[tuple[int, bytes], ...] = field(repr=False)
    deliveries: tuple[Delivery, ...]
    device_list_counters: Mapping[str, int]
    all_or_nothing: bool = False


class MailboxPosition(tuple[int, int]):
    """Where a send was filed for one device: ``(epoch, seq)``, and what came before it.

    ``previous``, if the storage tells it, is the device's largest ``seq`` in
    ``epoch`` before this one (0: none). Relays sharing a database hand a
    committed envelope to the device's connection only if that connection
    has everything up to ``previous`` (else another relay's send to the
    device committed just before, and the connection reads its mailbox).
    None: the storage serialises every writer (SQLite), so nothing can.
    """

    previous: int | None

    def __new__(cls, epoch: int, seq: int, previous: int | None = None) -> MailboxPosition:
        position = super().__new__(cls, (epoch, seq))
        position.previous = previous
        return position

    @property
    def epoch(self) -> int:
        return self[0]

    @property
    def seq(self) -> int:
        return self[1]


@dataclass(frozen=True, slots=True)
class QueuedEnvelope:
    """An envelope in a mailbox, with its position (``epoch``, ``seq``) for in-order delivery."""

    seq: int
    envelope: Envelope
    epoch: int = 0


class MailboxRead(list[QueuedEnvelope]):
    """What a mailbox read found (:meth:`RelayStorage.pending`): the envelopes, oldest
    first, and the newest epoch when it read.

    ``newest_epoch``, if the storage tells it: a read that returned fewer
    envelopes than its limit read the mailbox to its end, through this
    epoch. Mail is only ever filed under the newest epoch, so every envelope
    the device gets later is of this epoch or a later one (what
    :class:`MailboxPosition` ``previous`` is checked against). None: not told.
    """

    newest_epoch: int | None

    def __init__(self, found: Iterable[QueuedEnvelope] = (), newest_epoch: int | None = None):
        super().__init__(found)
        self.newest_epoch = newest_epoch


@dataclass(frozen=True, slots=True)
class ExpiryNotice:
    """Mail for a device that was deleted unread: ``count`` envelopes accepted from
    ``first_ts`` to ``last_ts`` (ms). ``count`` None: the relay lost the keys to its
    queue at ``last_ts``, and how many of them were this device's is unknown."""

    count: int | None
    first_ts: int
    last_ts: int

    def merged(self, other: ExpiryNotice) -> ExpiryNotice:
        """One notice telling both."""
        count = None if self.count is None or other.count is None else self.count + other.count
        return ExpiryNotice(
            count, min(self.first_ts, other.first_ts), max(self.last_ts, other.last_ts)
        )


@dataclass(frozen=True, slots=True)
class TakenBundle:
    """What a bundle fetch took: keys for one PreKeyBundle, and the stock left after it."""

    identity: bytes
    signed_prekey: SignedPreKeyPublic
    one_time: OneTimePreKeyPublic | None
    kem: KemPreKeyPublic
    kem_is_last_resort: bool
    remaining: PreKeyCounts


class RelayStorage(Protocol):
    """Durable relay state. A returned value means the transaction committed."""

    async def device_lists(self, user_ids: Sequence[str]) -> dict[str, StoredDeviceList]:
        """The current lists of those of ``user_ids`` that are registered."""
        ...

    async def store_device_list(
        self,
        new: StoredDeviceList,
        *,
        previous_counter: int | None,
        invite_hash: bytes | None = None,
        now: int = 0,
    ) -> tuple[int, ...]:
        """Replace a user's list if its stored counter is ``previous_counter``.

        ``previous_counter`` None means the user must not exist yet. With
        ``invite_hash`` (a registration by invitation) the invitation of that
        SHA-256 is spent in the same transaction: InviteRefused if there is
        none unexpired at ``now`` (milliseconds), and nothing is stored. Devices
        that leave the list, or whose identity changes, lose their mailbox
        and prekeys in the same transaction; their ids are returned.
        StorageConflict if the stored counter differs; DeviceListRejected
        (DUPLICATE_DEVICE_KEY) if another user's list of the current protocol
        version names one of its device keys (spec/07 section 7.6).
        """
        ...

    async def store_prekeys(
        self,
        user_id: str,
        device_id: int,
        *,
        signed_prekey: SignedPreKeyPublic | None,
        last_resort_kem: KemPreKeyPublic | None,
        one_time: Sequence[OneTimePreKeyPublic],
        one_time_kem: Sequence[KemPreKeyPublic],
        max_stored: int,
    ) -> PreKeyCounts:
        """Replace the signed and last-resort prekeys (unless None) and add one-time ones.

        PreKeyIdInUse if a one-time id is already stored for the device (or
        repeated); PreKeyStockFull if the stock would exceed ``max_stored``.
        Nothing is stored on error.
        """
        ...

    async def prekey_counts(self, user_id: str, device_id: int) -> PreKeyCounts: ...

    async def take_bundle(
        self, user_id: str, device_id: int, *, budget: RateLimit | None = None, now: int = 0
    ) -> TakenBundle | None:
        """Take (delete and return) one one-time prekey of each kind, if any.

        ``budget`` (None: unlimited) bounds the one-time prekeys handed out for
        the device, by whoever fetches, as a token bucket stored with the
        keys (``now``: the relay's clock, ms): every relay process on the
        database spends the same one (spec 07 section 7.7). A bundle that
        takes a one-time key spends a token in the same transaction; with
        no token left nothing one-time is taken. Falls back to the
        last-resort KEM prekey when no one-time KEM prekey is left or
        taken. None, changing nothing, if the device has no signed prekey
        or no KEM prekey at all.
        """
        ...

    async def forget_full_budgets(self, budget: RateLimit, now: int) -> int:
        """Delete the one-time budgets (see :meth:`take_bundle`) that have regained their
        capacity by ``now`` (ms); how many. A full budget needs no row, and a row
        deleted says nothing of when the device's keys were last taken: in a copy
        of the database, a row is no older than the time the budget takes to refill.
        """
        ...

    async def enqueue(
        self,
        batch: EnvelopeBatch,
        *,
        max_mailbox_size: int,
        committed: Callable[[Sequence[MailboxPosition | None]], None] | None = None,
    ) -> tuple[tuple[str, int], ...]:
        """Store a send for every device with room; the devices without, in delivery order.

        A delivery to a device that already holds ``max_mailbox_size``
        envelopes is left out (a payload no delivery names is not stored),
        unless ``batch.all_or_nothing``: then one full device refuses the
        whole send. MailboxFull (naming the full devices) if nothing is
        stored for that reason, and StorageConflict if a device list changed.
        ``committed``, if given, gets the deliveries' mailbox positions
        (MailboxPosition, in ``batch.deliveries`` order, None for those left
        out) once the send committed, before this returns, and in commit order
        across all sends, so the relay can hand new envelopes to connected
        devices in the order it accepted them.
        """
        ...

    async def pending(
        self,
        user_id: str,
        device_id: int,
        *,
        after_seq: int,
        limit: int,
        now: int,
        after_epoch: int = 0,
    ) -> MailboxRead:
        """Unexpired envelopes for a device after position (``after_epoch``, ``after_seq``).

        Oldest first, at most ``limit``. An envelope whose row no longer opens
        (its keys are gone, or it was altered) is deleted instead, and told in
        the device's expiry notice.
        """
        ...

    async def acknowledge(self, user_id: str, device_id: int, seqs: Sequence[int]) -> int:
        """Delete the device's envelopes at ``seqs``; how many were there."""
        ...

    async def purge_expired(self, now: int) -> int:
        """Delete the envelopes of every epoch that left the retention window; how many.

        Each recipient with mail among them gets an expiry notice, and the
        keys of those epochs cease to exist (also when the deletion fails).
        Invitations whose expiry is at or before ``now`` are deleted too.
        """
        ...

    def next_purge(self, now: int) -> int:
        """When (ms) the next epoch leaves the retention window."""
        ...

    async def expiry_notice(self, user_id: str, device_id: int) -> ExpiryNotice | None:
        """What expired unread for the device and was not told yet."""
        ...

    async def clear_expiry_notice(self, user_id: str, device_id: int, notice: ExpiryNotice) -> None:
        """The device was told ``notice``: forget it, unless it grew meanwhile."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ClusterEvents:
    """What a relay does when another relay process sharing its database tells it something.

    Called in the relay's trio thread. ``mail``: these devices have new
    mail. ``superseded``: the device's connection of that id authenticated
    again on another relay. ``resynced``: the link to the database was lost
    and is back; notifications sent meanwhile are lost, so every connected
    device reads its mailbox again.
    """

    mail: Callable[[Sequence[tuple[str, int]]], None]
    superseded: Callable[[str, int, bytes], None]
    resynced: Callable[[], None]


class ClusterStorage(Protocol):
    """What several relay processes sharing one database need of it, besides RelayStorage."""

    async def attach(self, user_id: str, device_id: int, connection: bytes) -> None:
        """The device authenticated here as ``connection`` (random): this relay holds it.

        Sends committed after this returns wake this relay; the device's
        connection on another relay is told to close (``superseded``).
        """
        ...

    async def detach(self, user_id: str, device_id: int, connection: bytes) -> None:
        """The device's connection ``connection`` here ended."""
        ...

    async def listen(
        self, events: ClusterEvents, *, task_status: trio.TaskStatus[None] = ...
    ) -> None:
        """Hand this relay's notifications to ``events`` until cancelled."""
        ...
