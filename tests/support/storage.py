"""Rows for the relay's storage, written straight into a database (no relay, no checks).

No tests here; the storage and group-commit tests import it.
"""

from __future__ import annotations

import secrets

from hushchat.protocol.prekeys import KemPreKeyPublic, OneTimePreKeyPublic, SignedPreKeyPublic
from hushchat.transport.relay.storage.interface import Delivery, EnvelopeBatch, StoredDeviceList
from hushchat.transport.relay.storage.sqlite import SqliteDatabase
from hushchat.transport.wire.records import EnvelopeKind

# Stands in for every signature: storage keeps signatures, it never checks them.
SIGNATURE = b"\x05" * 64


def device_list(user_id: str, counter: int, *devices: tuple[int, bytes]) -> StoredDeviceList:
    """``user_id``'s list of ``devices`` (device id, identity key) at ``counter``."""
    return StoredDeviceList(user_id, b"U" * 32, counter, f"{user_id}#{counter}".encode(), devices)


def register_devices(db: SqliteDatabase, user_id: str, *device_ids: int) -> None:
    """``user_id``'s first list (counter 0); device ``d`` has the key ``bytes([d]) * 32``."""
    db.store_device_list(
        device_list(user_id, 0, *((d, bytes([d]) * 32) for d in device_ids)), previous_counter=None
    )


def upload_prekeys(
    db: SqliteDatabase, user_id: str, device_id: int, *, one_time: int, kem: int
) -> None:
    """A signed prekey, a last-resort KEM key, and one-time keys numbered from 1."""
    db.store_prekeys(
        user_id,
        device_id,
        signed_prekey=SignedPreKeyPublic(1, b"S" * 32, SIGNATURE),
        last_resort_kem=KemPreKeyPublic(999, b"L" * 1184, SIGNATURE),
        one_time=[OneTimePreKeyPublic(i, bytes([i % 256]) * 32) for i in range(1, one_time + 1)],
        one_time_kem=[
            KemPreKeyPublic(i, bytes([i % 256]) * 1184, SIGNATURE) for i in range(1, kem + 1)
        ],
        max_stored=1000,
    )


def batch(
    deliveries: list[tuple[str, int]],
    payloads: tuple[bytes, ...],
    *,
    counters: dict[str, int],
    server_ts: int = 1000,
    expires_at: int = 2000,
    kind: EnvelopeKind = EnvelopeKind.DIRECT,
) -> EnvelopeBatch:
    """A send from alice's device 1: delivery ``i`` carries payload ``i`` (or the last one)."""
    return EnvelopeBatch(
        sender_user="alice",
        sender_device=1,
        server_ts=server_ts,
        expires_at=expires_at,
        payloads=tuple((kind, payload) for payload in payloads),
        deliveries=tuple(
            Delivery(u, d, secrets.token_bytes(16), min(i, len(payloads) - 1))
            for i, (u, d) in enumerate(deliveries)
        ),
        device_list_counters=counters,
    )
