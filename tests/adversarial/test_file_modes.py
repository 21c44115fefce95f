"""Another local user reads the files we create: every one must be owner-only (0600).

The attacker is a user of the same machine with no more than the permissions
a file leaves it. A client store holds the device's private keys, its
sessions and the messages not yet handed to the app; while it is open (the
whole time an app runs, and after a crash) part of it lives in SQLite's
write-ahead log and shared-memory files, which SQLite creates with the
database file's permissions at the time. Whatever the umask (BRIEF rule 5).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hushchat.protocol.client_core import RecordKey
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.invites import issue_invites
from hushchat.transport.relay.storage.sqlite import SqliteDatabase
from tests.support.storage import register_devices


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    value: int = request.param
    previous = os.umask(value)
    try:
        yield value
    finally:
        os.umask(previous)


def modes(folder: Path) -> dict[str, str]:
    """Every file's permission bits under ``folder``, by name."""
    return {p.name: oct(p.stat().st_mode & 0o777) for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000], ids=["022", "002", "000"], indirect=True)
def test_an_open_client_store_leaves_nothing_readable_to_other_users(
    tmp_path: Path, umask: int
) -> None:
    store = ClientStore.open(str(tmp_path / "alice.db"))
    try:
        found = modes(tmp_path)
        # The write-ahead log holds the latest writes (keys, sessions, inbox) until a
        # checkpoint: it must exist here for the test to mean anything.
        assert "alice.db-wal" in found
        assert set(found.values()) == {"0o600"}, found
    finally:
        store.close()
    assert set(modes(tmp_path).values()) == {"0o600"}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000], ids=["022", "002", "000"], indirect=True)
def test_a_client_store_left_readable_by_an_older_client_is_made_private(
    tmp_path: Path, umask: int
) -> None:
    path = tmp_path / "alice.db"
    ClientStore.open(str(path)).close()
    for name in ("alice.db", "alice.db-wal", "alice.db-shm"):
        (tmp_path / name).touch()
        (tmp_path / name).chmod(0o644)
    store = ClientStore.open(str(path))
    try:
        assert set(modes(tmp_path).values()) == {"0o600"}
    finally:
        store.close()


def test_a_wal_left_readable_by_a_crash_is_made_private(tmp_path: Path) -> None:
    """An older client died with its WAL (the newest state: session keys) full, and left
    its files readable. Empty files, as above, SQLite replaces by itself; a WAL that
    holds transactions it keeps, with its mode, so the store must make it private."""
    crashed, left = tmp_path / "crashed", tmp_path / "left"
    crashed.mkdir()
    left.mkdir()
    store = ClientStore.open(str(crashed / "alice.db"))
    try:
        store.commit({RecordKey.SYNCED: b"\x01"})
        for name in ("alice.db", "alice.db-wal", "alice.db-shm"):  # as the crash left them
            (left / name).write_bytes((crashed / name).read_bytes())
            (left / name).chmod(0o644)
    finally:
        store.close()
    assert (left / "alice.db-wal").stat().st_size > 0
    store = ClientStore.open(str(left / "alice.db"))
    try:
        assert set(modes(left).values()) == {"0o600"}, modes(left)
        assert store.record(RecordKey.SYNCED) == b"\x01"
    finally:
        store.close()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000], ids=["022", "002", "000"], indirect=True)
def test_invitations_issued_into_a_new_relay_database_are_private(
    tmp_path: Path, umask: int
) -> None:
    issue_invites(str(tmp_path / "relay.db"), 2, lifetime_seconds=60)
    assert set(modes(tmp_path).values()) == {"0o600"}, modes(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o000], ids=["022", "002", "000"], indirect=True)
def test_a_running_relay_leaves_nothing_readable_to_other_users(tmp_path: Path, umask: int) -> None:
    """The relay's database, its WAL (the newest sealed mail) and its key file (which opens
    that mail), also after the key file moved on to a later epoch: all owner-only."""
    now = [1_700_000_000_000]
    db = SqliteDatabase(str(tmp_path / "relay.db"), retention_seconds=3600, clock=lambda: now[0])
    try:
        register_devices(db, "bob", 1)
        found = modes(tmp_path)
        assert {"relay.db", "relay.db-wal", "relay.db.keys"} <= found.keys(), found
        assert set(found.values()) == {"0o600"}, found
        now[0] += 2 * 3600 * 1000
        db.purge_expired(now[0])  # the epochs move on: the key file is written anew
        assert set(modes(tmp_path).values()) == {"0o600"}, modes(tmp_path)
    finally:
        db.close()
    assert set(modes(tmp_path).values()) == {"0o600"}, modes(tmp_path)
