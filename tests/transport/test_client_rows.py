"""Inbox and outbox rows: versioned layouts, pinned bytes, and the first client's rows migrated."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hushchat.protocol import client_core as core
from hushchat.protocol import group
from hushchat.protocol.encoding import pack
from hushchat.protocol.errors import StateError, UnknownStateVersion
from hushchat.transport.client import ClientStore, rows
from hushchat.transport.client.store import STORE_VERSION

A = core.Address


# Every event and send type (with and without its optional fields): the row
# the first client's encoder wrote for it (class names and field order,
# captured from that encoder), and its versioned row.
ROWS: list[tuple[core.Event | core.Send, str, str]] = [
    (
        core.MessageReceived(A("alice", 1), b"\x01" * 16, 1_700_000_000, b"hello", None),
        "93a164af4d65737361676552656365697665649593a164a7416464726573739292a176a5616c69636592"
        "a1760192a176c4100101010101010101010101010101010192a176ce6553f10092a176c40568656c6c6f"
        "92a176c0",
        "97010192a5616c69636501c41001010101010101010101010101010101ce6553f100c40568656c6c6fc0",
    ),
    (
        core.MessageReceived(
            A("alice", 2), b"\x02" * 16, 1_700_000_001, b"to the group", b"\n" * 16
        ),
        "93a164af4d65737361676552656365697665649593a164a7416464726573739292a176a5616c69636592"
        "a1760292a176c4100202020202020202020202020202020292a176ce6553f10192a176c40c746f207468"
        "652067726f757092a176c4100a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",
        "97010192a5616c69636502c41002020202020202020202020202020202ce6553f101c40c746f20746865"
        "2067726f7570c4100a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a",
    ),
    (
        core.MessageSentByOtherDevice(A("bob", 2), "carol", b"\x03" * 16, 1_700_000_002, b"copy"),
        "93a164b84d65737361676553656e7442794f746865724465766963659593a164a7416464726573739292"
        "a176a3626f6292a1760292a176a56361726f6c92a176c4100303030303030303030303030303030392a1"
        "76ce6553f10292a176c404636f7079",
        "97010292a3626f6202a56361726f6cc41003030303030303030303030303030303ce6553f102c404636f7079",
    ),
    (
        core.DeviceAdded(A("carol", 3)),
        "93a164ab44657669636541646465649193a164a7416464726573739292a176a56361726f6c92a17603",
        "93010392a56361726f6c03",
    ),
    (
        core.DeviceRemoved(A("carol", 2)),
        "93a164ad44657669636552656d6f7665649193a164a7416464726573739292a176a56361726f6c92a17602",
        "93010492a56361726f6c02",
    ),
    (
        core.IdentityChanged("dave", b"\x04" * 32, b"\x05" * 32),
        "93a164af4964656e746974794368616e6765649392a176a46461766592a176c420040404040404040404"
        "040404040404040404040404040404040404040404040492a176c4200505050505050505050505050505"
        "050505050505050505050505050505050505",
        "950105a464617665c4200404040404040404040404040404040404040404040404040404040404040404"
        "c4200505050505050505050505050505050505050505050505050505050505050505",
    ),
    (
        core.Undecryptable(A("erin", 1), "BAD_MAC"),
        "93a164ad556e6465637279707461626c659493a164a7416464726573739292a176a46572696e92a17601"
        "92a176a74241445f4d414392a176c092a176c2",
        "96010692a46572696e01a74241445f4d4143c0c2",
    ),
    (
        core.Undecryptable(A("erin", 1), "NO_SENDER_KEY", b"\x0b" * 16, True),
        "93a164ad556e6465637279707461626c659493a164a7416464726573739292a176a46572696e92a17601"
        "92a176ad4e4f5f53454e4445525f4b455992a176c4100b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b92a176c3",
        "96010692a46572696e01ad4e4f5f53454e4445525f4b4559c4100b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0bc3",
    ),
    (
        core.GroupUpdated(
            b"\x0c" * 16,
            A("alice", 1),
            (
                group.MemberAdded("bob", b"\x06" * 32, False),
                group.MemberRemoved("carol"),
                group.AdminChanged("bob", True),
                group.TitleChanged("friends"),
            ),
            False,
        ),
        "93a164ac47726f7570557064617465649492a176c4100c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c93a164a7"
        "416464726573739292a176a5616c69636592a1760192a1749493a164ab4d656d62657241646465649392"
        "a176a3626f6292a176c42006060606060606060606060606060606060606060606060606060606060606"
        "0692a176c293a164ad4d656d62657252656d6f7665649192a176a56361726f6c93a164ac41646d696e43"
        "68616e6765649292a176a3626f6292a176c393a164ac5469746c654368616e6765649192a176a7667269"
        "656e647392a176c2",
        "960107c4100c0c0c0c0c0c0c0c0c0c0c0c0c0c0c0c92a5616c69636501949401a3626f62c42006060606"
        "06060606060606060606060606060606060606060606060606060606c29202a56361726f6c9303a3626f"
        "62c39204a7667269656e6473c2",
    ),
    (
        core.GroupUpdated(b"\x0d" * 16, A("alice", 1), (), True),
        "93a164ac47726f7570557064617465649492a176c4100d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d93a164a7"
        "416464726573739292a176a5616c69636592a1760192a1749092a176c3",
        "960107c4100d0d0d0d0d0d0d0d0d0d0d0d0d0d0d0d92a5616c6963650190c3",
    ),
    (
        core.RetryRequested(A("frank", 4), b"\x0e" * 16),
        "93a164ae52657472795265717565737465649293a164a7416464726573739292a176a56672616e6b92a1"
        "760492a176c4100e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e",
        "94010892a56672616e6b04c4100e0e0e0e0e0e0e0e0e0e0e0e0e0e0e0e",
    ),
    (
        core.DirectSend("bob", ((1, b"payload one"), (2, b"payload two")), b"content"),
        "93a164aa44697265637453656e649392a176a3626f6292a1749292a1749292a1760192a176c40b706179"
        "6c6f6164206f6e6592a1749292a1760292a176c40b7061796c6f61642074776f92a176c407636f6e7465"
        "6e74",
        "950101a3626f62929201c40b7061796c6f6164206f6e659202c40b7061796c6f61642074776fc407636f"
        "6e74656e74",
    ),
    (
        core.DirectSend("bob", ((1, b"p"),)),
        "93a164aa44697265637453656e649392a176a3626f6292a1749192a1749292a1760192a176c4017092a1"
        "76c400",
        "950101a3626f62919201c40170c400",
    ),
    (
        core.GroupSend(b"\x0f" * 16, b"group payload", (A("alice", 2), A("bob", 1))),
        "93a164a947726f757053656e649392a176c4100f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f92a176c40d6772"
        "6f7570207061796c6f616492a1749293a164a7416464726573739292a176a5616c69636592a1760293a1"
        "64a7416464726573739292a176a3626f6292a17601",
        "950102c4100f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0fc40d67726f7570207061796c6f61649292a5616c69"
        "63650292a3626f6201",
    ),
]
SENDS = [
    (item, old, new)
    for item, old, new in ROWS
    if isinstance(item, core.DirectSend | core.GroupSend)
]
EVENTS = [(item, old, new) for item, old, new in ROWS if (item, old, new) not in SENDS]

# The first client's store, as it created it (no user_version: 0).
FIRST_SCHEMA = """
CREATE TABLE records (key BLOB PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, send BLOB NOT NULL);
CREATE TABLE inbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event BLOB NOT NULL);
CREATE TABLE processed (guid BLOB PRIMARY KEY, at INTEGER NOT NULL);
"""


def encode(item: core.Event | core.Send) -> bytes:
    if isinstance(item, core.DirectSend | core.GroupSend):
        return rows.encode_send(item)
    return rows.encode_event(item)


def test_every_event_and_send_type_is_pinned() -> None:
    pinned = {type(item) for item, _, _ in ROWS}
    assert pinned == {*get_args(core.Event), *get_args(core.Send)}
    changes = {
        type(c) for item, _, _ in ROWS if isinstance(item, core.GroupUpdated) for c in item.changes
    }
    assert changes == set(get_args(group.GroupEvent))


@pytest.mark.parametrize(
    ("item", "new"), [(i, n) for i, _, n in ROWS], ids=lambda v: type(v).__name__
)
def test_rows_have_the_pinned_versioned_layouts(item: core.Event | core.Send, new: str) -> None:
    assert encode(item).hex() == new
    decode = (
        rows.decode_send
        if isinstance(item, core.DirectSend | core.GroupSend)
        else rows.decode_event
    )
    assert decode(bytes.fromhex(new)) == item


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


def stored(path: Path, table: str, column: str) -> list[bytes]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute(f"SELECT {column} FROM {table} ORDER BY id")]
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


def test_a_first_client_row_that_does_not_decode_stays_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "first.db"
    corrupt = ROWS[0][1][:-4]  # truncated
    event_in_outbox = EVENTS[0][1]
    first_client_store(path, [SENDS[0][1], corrupt, event_in_outbox], [EVENTS[1][1]])
    store = ClientStore.open(str(path))
    try:
        assert [event for _, event in store.inbox()] == [EVENTS[1][0]]
        with pytest.raises(StateError):
            store.outbox()
    finally:
        store.close()
    outbox = [row.hex() for row in stored(path, "outbox", "send")]
    assert outbox == [SENDS[0][2], corrupt, event_in_outbox]


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
        [rows.ROW_VERSION, 3, "bob", [[1, b"p"]], b""],  # unknown tag
        [rows.ROW_VERSION, 1, "bob", [[1, b"p"]] * 9, b""],  # more payloads than devices
        [rows.ROW_VERSION, 1, "bob", [[1]], b""],
        [rows.ROW_VERSION, 2, b"\x0f" * 16, b"p", [["a", 1, 2]]],
        [rows.ROW_VERSION, 2, b"\x0f" * 16, b"p"],
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
