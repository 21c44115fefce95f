"""In-place migration of a relay database from schema 1 (mail in clear) to schema 2 (sealed).

Schema 1 kept each queued envelope's payload, sender, kind, time, recipient,
guid and expiry in clear, and a count of queued envelopes per device. The
migration runs in the caller's transaction, so a relay that stops half-way
leaves the database as it was. It keeps the directory and every envelope
not yet expired, with its ``seq`` (a connected device's position) and its
guid, and seals each under the epoch of its ``server_ts`` (never earlier
than the oldest epoch whose keys exist, and never earlier than the envelope
before it, so a mailbox's epochs grow with ``seq``); a payload gets the id
schema 2 gives new ones, the ``seq`` of its first delivery. Expired
envelopes are dropped. The old tables are dropped with ``secure_delete``
on, which overwrites their pages; the caller truncates the WAL afterwards.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator

from .atrest import KeyChain
from .rows import (
    DeliveryContent,
    MailboxContent,
    PayloadContent,
    seal_delivery,
    seal_mailbox,
    seal_payload,
)
from .schema import QUEUE_SCHEMA, SEALED_SCHEMA_VERSION, set_meta


def migrate_unsealed(conn: sqlite3.Connection, chain: KeyChain, now: int) -> int:
    """Convert a schema-1 database in the open transaction; how many envelopes were kept."""
    payloads = {
        row[0]: PayloadContent(row[1], row[2], row[3], row[4], bytes(row[5]))
        for row in conn.execute(
            "SELECT id, sender_user, sender_device, kind, server_ts, data FROM payloads"
        )
    }
    deliveries = conn.execute(
        "SELECT seq, user_id, device_id, guid, payload_id, expires_at FROM deliveries "
        "WHERE expires_at > ? ORDER BY seq",
        (now,),
    ).fetchall()
    (last_seq,) = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM deliveries").fetchone()
    for statement in (
        "DROP TRIGGER IF EXISTS deliveries_counted",
        "DROP TRIGGER IF EXISTS deliveries_removed",
        "DROP TABLE deliveries",
        "DROP TABLE payloads",
        "ALTER TABLE devices DROP COLUMN queued",
    ):
        conn.execute(statement)
    for statement in _statements(QUEUE_SCHEMA):
        conn.execute(statement)

    epoch = chain.held_epoch  # grows with seq, as new mail's does
    renumbered: dict[int, tuple[int, int]] = {}  # old payload id -> (new id, epoch)
    queued: Counter[tuple[str, int]] = Counter()
    for seq, user_id, device_id, guid, old_id, expires_at in deliveries:
        payload = payloads[old_id]
        if old_id not in renumbered:
            # As for new mail: a payload's id is the seq of its first delivery.
            epoch = max(epoch, chain.epoch_of(payload.server_ts))
            renumbered[old_id] = (seq, epoch)
            keys = chain.keys(epoch)
            assert keys is not None  # not before the held epoch
            conn.execute(
                "INSERT INTO payloads (id, epoch, sealed) VALUES (?, ?, ?)",
                (seq, epoch, seal_payload(keys, seq, payload)),
            )
        payload_id, payload_epoch = renumbered[old_id]
        keys = chain.keys(payload_epoch)
        assert keys is not None
        mailbox = keys.index(user_id, device_id)
        content = DeliveryContent(user_id, device_id, bytes(guid), payload.server_ts, expires_at)
        sealed = seal_delivery(keys, seq, mailbox, payload_id, content)
        conn.execute(
            "INSERT INTO deliveries (seq, epoch, mailbox, payload_id, sealed) "
            "VALUES (?, ?, ?, ?, ?)",
            (seq, payload_epoch, mailbox, payload_id, sealed),
        )
        queued[(user_id, device_id)] += 1
    # seq never goes back, also past the envelopes dropped at the end of the queue.
    conn.execute(
        "INSERT OR REPLACE INTO sqlite_sequence (name, seq) VALUES ('deliveries', ?)", (last_seq,)
    )

    current = max(epoch, chain.epoch_of(now))
    keys = chain.keys(current)
    assert keys is not None
    for (user_id, device_id), count in queued.items():
        mailbox = keys.index(user_id, device_id)
        owner = seal_mailbox(keys, mailbox, MailboxContent(user_id, device_id))
        conn.execute(
            "INSERT INTO mailboxes (mailbox, epoch, queued, noticed, sealed) "
            "VALUES (?, ?, ?, 0, ?)",
            (mailbox, current, count, owner),
        )
    set_meta(conn, "epoch", current)
    conn.execute(f"PRAGMA user_version = {SEALED_SCHEMA_VERSION}")
    return len(deliveries)


def _statements(script: str) -> Iterator[str]:
    """The statements of ``script`` one by one (executescript would commit the transaction)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement.strip()
            statement = ""
