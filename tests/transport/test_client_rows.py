"""Inbox and outbox rows: versioned layouts, pinned bytes, and older clients' rows migrated."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hushchat.protocol import client_core as core
from hushchat.protocol import group
from hushchat.protocol.encoding import pack
from hushchat.protocol.errors import StateError, UnknownStateVersion
from hushchat.transport.client import ClientStore, rows
from hushchat.transport.client.events import (
    OutboxItem,
    QueuedMessage,
    QueuedReceipt,
    Resend,
    StoredEvent,
    StoredItemSetAside,
)
from hushchat.transport.client.store import STORE_VERSION
from tests.support.client_rows import CURRENT, NEW_ROWS, ROWS

CURRENT_HEX = {id(item): row for item, row in CURRENT}


def is_send(item: object) -> bool:
    return isinstance(
        item,
        core.DirectSend | core.GroupSend | core.ChangeSend | QueuedMessage | QueuedReceipt | Resend,
    )


SENDS = [(item, old, CURRENT_HEX[id(item)]) for item, old, _ in ROWS if is_send(item)]
EVENTS = [(item, old, CURRENT_HEX[id(item)]) for item, old, _ in ROWS if not is_send(item)]
SENDS_V1 = [row for row in ROWS if is_send(row[0])]
EVENTS_V1 = [row for row in ROWS if not is_send(row[0])]

# The first client's store, as it created it (no user_version: 0).
FIRST_SCHEMA = """
CREATE TABLE records (key BLOB PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, send BLOB NOT NULL);
CREATE TABLE inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL);
CREATE TABLE processed (guid BLOB PRIMARY KEY, at INTEGER NOT NULL);
"""


def encode(item: StoredEvent | OutboxItem) -> bytes:
    if isinstance(item, OutboxItem):
        return rows.encode_send(item)
    return rows.encode_event(item)


def test_every_event_and_send_type_is_pinned() -> None:
    pinned = {type(item) for item, _ in CURRENT}
    assert pinned == {*get_args(StoredEvent), *get_args(OutboxItem)}
    version_1 = {type(item) for item, _, _ in ROWS} | {type(item) for item, _ in NEW_ROWS}
    new_in_version_2 = {core.DeliveryConfirmed}
    assert version_1 == {*get_args(core.Event), *get_args(core.Send)} - new_in_version_2
    changes = {
        type(c) for item, _, _ in ROWS if isinstance(item, core.GroupUpdated) for c in item.changes
    }
    assert changes == set(get_args(group.GroupEvent))


@pytest.mark.parametrize(("item", "row"), CURRENT, ids=lambda v: type(v).__name__)
def test_rows_have_the_pinned_versioned_layouts(item: StoredEvent | OutboxItem, row: str) -> None:
    assert encode(item).hex() == row
    decode = rows.decode_send if is_send(item) else rows.decode_event
    assert decode(bytes.fromhex(row)) == item


@pytest.mark.parametrize(
    ("upgrade", "fields"),
    [
        (rows.upgrade_send, [1, 4, "bob", b"\x12" * 16, 1, b"later"]),  # no queued messages
        (rows.upgrade_event, [1, 12, b"\x14" * 16, "UNKNOWN_USER"]),  # no SendFailed
        (rows.upgrade_send, [1, 7, 1, "bob", [[2, b"p"]], b"c", None]),  # no Resend
    ],
)
def test_version_1_had_no_tags_of_version_2(
    upgrade: Callable[[bytes], bytes], fields: list[object]
) -> None:
    with pytest.raises(StateError):
        upgrade(pack(fields))


def test_only_a_direct_or_group_send_is_sent_again() -> None:
    change = [3, b"\x01" * 16, b"\x02" * 16, []]
    resend = [7, 1, "bob", [[2, b"p"]], b"c", None]
    for fields in ([2, 7, *change], [2, 7, *resend]):
        with pytest.raises(StateError):
            rows.decode_send(pack(fields))


@pytest.mark.parametrize(
    ("item", "old"),
    [*((i, v1) for i, _, v1 in ROWS), *NEW_ROWS],
    ids=lambda v: type(v).__name__,
)
def test_version_1_rows_are_rewritten_as_current_ones(
    item: core.Event | core.Send, old: str
) -> None:
    upgrade = rows.upgrade_send if is_send(item) else rows.upgrade_event
    assert upgrade(bytes.fromhex(old)).hex() == CURRENT_HEX[id(item)]
    decode = rows.decode_send if is_send(item) else rows.decode_event
    with pytest.raises(UnknownStateVersion):
        decode(bytes.fromhex(old))  # only the migration reads them


@pytest.mark.parametrize(
    ("item", "old"), [(i, o) for i, o, _ in ROWS], ids=lambda v: type(v).__name__
)
def test_the_first_clients_rows_decode_to_the_same_items(
    item: core.Event | core.Send, old: str
) -> None:
    assert rows.decode_unversioned(bytes.fromhex(old)) == item


def first_client_store(path: Path, sends: list[str], events: list[str]) -> None:
    db = sqlite3.connect(path)
    db.executescript(FIRST_SCHEMA)
    db.execute("INSERT INTO records (key, value) VALUES (?, ?)", (pack(["synced"]), b"\x01"))
    db.executemany("INSERT INTO outbox (send) VALUES (?)", [(bytes.fromhex(s),) for s in sends])
    db.executemany("INSERT INTO inbox (event) VALUES (?)", [(bytes.fromhex(e),) for e in events])
    db.commit()
    db.close()


def stored(path: Path, table: str, column: str) -> list[Any]:
    db = sqlite3.connect(path)
    try:
        found = db.execute(f"SELECT {column} FROM {table} ORDER BY id").fetchall()
        return [row[0] if len(row) == 1 else row for row in found]
    finally:
        db.close()


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
        return version
    finally:
        db.close()


def test_a_store_the_first_client_wrote_is_migrated_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "first.db"
    first_client_store(path, [old for _, old, _ in SENDS], [old for _, old, _ in EVENTS])
    assert user_version(path) == 0
    store = ClientStore.open(str(path))
    try:
        assert [send for _, send in store.outbox()] == [item for item, _, _ in SENDS]
        assert [event for _, event in store.inbox()] == [item for item, _, _ in EVENTS]
        assert store.records() == [(core.RecordKey.SYNCED, b"\x01")]
    finally:
        store.close()
    assert user_version(path) == STORE_VERSION
    assert [row.hex() for row in stored(path, "outbox", "send")] == [new for _, _, new in SENDS]
    assert [row.hex() for row in stored(path, "inbox", "event")] == [new for _, _, new in EVENTS]
    # Opening again changes nothing.
    ClientStore.open(str(path)).close()
    assert [row.hex() for row in stored(path, "inbox", "event")] == [new for _, _, new in EVENTS]


def test_a_version_1_store_is_migrated_when_opened(tmp_path: Path) -> None:
    """Rows rewritten as ROW_VERSION 2, the outbox ordered by a position (its row ids)."""
    path = tmp_path / "v1.db"
    first_client_store(path, [v1 for _, _, v1 in SENDS_V1], [v1 for _, _, v1 in EVENTS_V1])
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 1")
    db.close()
    store = ClientStore.open(str(path))
    try:
        assert [send for _, send in store.outbox()] == [item for item, _, _ in SENDS]
        assert [event for _, event in store.inbox()] == [item for item, _, _ in EVENTS]
        assert [store.position_of(row_id) for row_id, _ in store.outbox()] == [1, 2, 3]
    finally:
        store.close()
    assert user_version(path) == STORE_VERSION
    assert [row.hex() for row in stored(path, "outbox", "send")] == [new for _, _, new in SENDS]
    assert [row.hex() for row in stored(path, "inbox", "event")] == [new for _, _, new in EVENTS]


def test_a_first_client_row_that_does_not_decode_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "first.db"
    corrupt = ROWS[0][1][:-4]  # truncated
    event_in_outbox = EVENTS[0][1]
    first_client_store(path, [SENDS[0][1], corrupt, event_in_outbox], [EVENTS[1][1]])
    store = ClientStore.open(str(path))
    try:
        assert [event for _, event in store.inbox()] == [
            EVENTS[1][0],
            *[StoredItemSetAside("outbox", "", "CORRUPT_STATE")] * 2,
        ]
        assert [send for _, send in store.outbox()] == [SENDS[0][0]]
    finally:
        store.close()
    assert [row.hex() for row in stored(path, "outbox", "send")] == [SENDS[0][2]]
    aside = [(s, r, bytes(d)) for s, r, d in stored(path, "set_aside", "source, reason, data")]
    assert aside == [
        ("outbox", "CORRUPT_STATE", bytes.fromhex(corrupt)),
        ("outbox", "CORRUPT_STATE", bytes.fromhex(event_in_outbox)),
    ]


def test_a_store_a_newer_client_wrote_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    ClientStore.open(str(path)).close()
    assert user_version(path) == STORE_VERSION  # a new store starts at the current version
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {STORE_VERSION + 1}")
    db.close()
    with pytest.raises(UnknownStateVersion):
        ClientStore.open(str(path))
    assert user_version(path) == STORE_VERSION + 1
    with pytest.raises(UnknownStateVersion):
        ClientStore.open(str(path))  # the refusal released the store's lock


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ([rows.ROW_VERSION + 1, 3, ["carol", 3]], UnknownStateVersion),
        ([rows.ROW_VERSION, 11, b"\x14" * 16, "x" * 65], StateError),  # a reason too long
        ([0, 3, ["carol", 3]], UnknownStateVersion),
        ([rows.ROW_VERSION, 99, ["carol", 3]], StateError),  # unknown tag
        ([rows.ROW_VERSION, 3, ["carol", 3], 1], StateError),  # a field too many
        ([rows.ROW_VERSION, 3, ["carol"]], StateError),  # a bad address
        ([rows.ROW_VERSION, 3, ["carol", -1]], StateError),
        ([rows.ROW_VERSION, 8, ["frank", 4], b"short"], StateError),  # not a group id
        ([rows.ROW_VERSION, 7, b"\x0c" * 16, ["a", 1], [[9, "x"]], False], StateError),
        ([rows.ROW_VERSION, 1, ["a", 1], b"\x01" * 16, True, b"", None], StateError),
        (["d", "DeviceAdded", [["d", "Address", [["v", "carol"], ["v", 3]]]]], StateError),
    ],
)
def test_malformed_event_rows_are_state_errors(
    fields: list[object], error: type[StateError]
) -> None:
    with pytest.raises(error):
        rows.decode_event(pack(fields))


@pytest.mark.parametrize(
    "fields",
    [
        [rows.ROW_VERSION, 9, "bob", [[1, b"p"]], b"", None],  # unknown tag
        [rows.ROW_VERSION, 4, "bob", b"\x12" * 16, 1],
        [rows.ROW_VERSION, 5, b"short", b"\x12" * 16, 1, b"x"],
        [rows.ROW_VERSION, 1, "bob", [[1, b"p"]], b"", b"short id"],
        [rows.ROW_VERSION, 1, "bob", [[1, b"p"]] * 9, b"", None],  # more payloads than devices
        [rows.ROW_VERSION, 1, "bob", [[1]], b"", None],
        [rows.ROW_VERSION, 1, "bob", [[1, b"p"]], b""],  # no message id field
        [rows.ROW_VERSION, 2, b"\x0f" * 16, b"p", [["a", 1, 2]], None],
        [rows.ROW_VERSION, 2, b"\x0f" * 16, b"p", None],
    ],
)
def test_malformed_send_rows_are_state_errors(fields: list[object]) -> None:
    with pytest.raises(StateError):
        rows.decode_send(pack(fields))


@given(st.binary(max_size=200))
def test_any_bytes_are_a_row_that_encodes_back_or_a_state_error(data: bytes) -> None:
    with contextlib.suppress(StateError):
        assert rows.encode_event(rows.decode_event(data)) == data
    with contextlib.suppress(StateError):
        assert rows.encode_send(rows.decode_send(data)) == data
    with contextlib.suppress(StateError):
        rows.decode_unversioned(data)
