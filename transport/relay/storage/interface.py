"""The relay's storage interface: a narrow typing.Protocol and the values it speaks.

The relay keeps only what delivery needs: each user's signed device list
(and its devices' identity keys, for authentication), each device's public
prekeys, and queued envelopes (opaque ciphertext with the sender the relay
stamped, a timestamp and an expiry). :class:`hushchat.transport.relay.storage.sqlite.SqliteStorage`
implements it on one SQLite file; another database can implement it for a
relay cluster. Every method is one atomic transaction; an implementation
may commit the transactions of concurrent calls together (group commit), as
long as each call returns only after its own transaction committed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic

from ...wire.errors import TransportError
from ...wire.records import Envelope, PreKeyCounts


class StorageConflict(TransportError):
    """A compare-and-set failed: the data changed since it was read; read again."""

    code = "STORAGE_CONFLICT"


@dataclass(frozen=True, slots=True)
class StoredDeviceList:
    """A user's current signed device list, with the parts the relay routes by."""

    user_id: str
    user_identity: bytes
    counter: int
    signed: bytes = field(repr=False)
    devices: tuple[tuple[int, bytes], ...] = field(repr=False)  # (device_id, identity)

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

    Each payload is stored once, however many deliveries name it (a group
    send has one payload and many deliveries). ``device_list_counters``
    are the recipients' device-list counters the sender was checked
    against; if any changed, nothing is stored (StorageConflict).
    """

    sender_user: str
    sender_device: int
    kind: int
    server_ts: int
    expires_at: int
    payloads: tuple[bytes, ...] = field(repr=False)
    deliveries: tuple[Delivery, ...]
    device_list_counters: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class QueuedEnvelope:
    """An envelope in a mailbox, with its position (``seq``) for in-order delivery."""

    seq: int
    envelope: Envelope


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
        self, new: StoredDeviceList, *, previous_counter: int | None
    ) -> tuple[int, ...]:
        """Replace a user's list if its stored counter is ``previous_counter``.

        ``previous_counter`` None means the user must not exist yet. Devices
        that leave the list, or whose identity changes, lose their mailbox
        and prekeys in the same transaction; their ids are returned.
        StorageConflict if the stored counter differs.
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

    async def take_bundle(self, user_id: str, device_id: int) -> TakenBundle | None:
        """Take (delete and return) one one-time prekey of each kind, if any.

        Falls back to the last-resort KEM prekey when no one-time KEM prekey
        is left. None, taking nothing, if the device has no signed prekey or
        no KEM prekey at all.
        """
        ...

    async def enqueue(
        self,
        batch: EnvelopeBatch,
        *,
        max_mailbox_size: int,
        committed: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        """Store a send. MailboxFull (naming the full devices), StorageConflict, or committed.

        ``committed``, if given, gets the deliveries' mailbox positions (their
        ``seq``, in ``batch.deliveries`` order) once the send committed, before
        this returns, and in commit order across all sends, so the relay can
        hand new envelopes to connected devices in the order it accepted them.
        """
        ...

    async def pending(
        self, user_id: str, device_id: int, *, after_seq: int, limit: int, now: int
    ) -> list[QueuedEnvelope]:
        """Unexpired envelopes for a device with ``seq > after_seq``, oldest first."""
        ...

    async def acknowledge(self, user_id: str, device_id: int, guids: Sequence[bytes]) -> int:
        """Delete the device's envelopes ``guids``; how many were there."""
        ...

    async def purge_expired(self, now: int) -> int:
        """Delete every envelope whose expiry is at or before ``now``; how many."""
        ...

    async def aclose(self) -> None: ...
