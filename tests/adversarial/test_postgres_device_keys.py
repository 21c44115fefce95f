"""A device key belongs to one user, on a relay cluster too: two users' lists naming one
device key, published at once through two relays sharing one PostgreSQL database.

Each relay checks that no other user lists the key, then stores the list. Two
relays checking at once, each before the other committed, would each find the
key free and both store it: mallory would hold alice's device key as her own
(test_device_binding.py plays what that lets a relay do). The relay takes a
lock per device key before it checks (postgres.py, _store_device_list), so the
second check waits for the first commit and sees it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from hushchat.protocol.errors import DuplicateDeviceKey
from hushchat.transport.relay.storage.postgres import PostgresDatabase
from hushchat.transport.relay.storage.writer import DatabaseCall
from hushchat.transport.wire.errors import DeviceListRejected
from tests.support.postgres import waiting_for_a_lock
from tests.support.storage import device_list

SHARED_KEY = bytes([0xA1]) * 32


@pytest.fixture
def relays(postgres_dsn: str, tmp_path: Path) -> Iterator[tuple[PostgresDatabase, ...]]:
    """Two relays' databases: one PostgreSQL database, one key file."""
    keys = str(tmp_path / "relay.keys")
    first = PostgresDatabase(postgres_dsn, key_file=keys)
    second = PostgresDatabase(postgres_dsn, key_file=keys)
    yield first, second
    second.close()
    first.close()


def test_two_users_listing_one_device_key_through_two_relays_at_once_get_one_list_stored(
    postgres_dsn: str, relays: tuple[PostgresDatabase, PostgresDatabase]
) -> None:
    """Alice registers through the first relay, whose transaction stays open after her
    list is stored; mallory registers through the second, naming alice's device key.
    Mallory's list is refused (DUPLICATE_DEVICE_KEY) and the key stays alice's alone."""
    first, second = relays
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        assert release.wait(10)

    alices = DatabaseCall(
        partial(first._store_device_list, device_list("alice", 0, (1, SHARED_KEY)), None, None, 0)
    )
    malloris = DatabaseCall(
        partial(
            second._store_device_list, device_list("mallory", 0, (5, SHARED_KEY)), None, None, 0
        )
    )
    threads = [threading.Thread(target=first.run_batch, args=([alices, DatabaseCall(hold)],))]
    threads[0].start()
    assert holding.wait(10)
    threads.append(threading.Thread(target=second.run_batch, args=([malloris],)))
    threads[1].start()
    # Until mallory's registration waits for alice's (or, unguarded, is done): then
    # alice's commits.
    pid = second._conn.raw.info.backend_pid
    deadline = time.monotonic() + 10
    while (
        threads[1].is_alive()
        and not waiting_for_a_lock(postgres_dsn, {pid})
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    release.set()
    for thread in threads:
        thread.join()
    assert alices.error is None
    assert isinstance(malloris.error, DeviceListRejected)
    assert malloris.error.cause == DuplicateDeviceKey.code
    lists = first.device_lists(["alice", "mallory"])
    assert set(lists) == {"alice"}
    owners = first._conn.execute(
        "SELECT user_id FROM devices WHERE identity = ?", (SHARED_KEY,)
    ).fetchall()
    assert [owner for (owner,) in owners] == ["alice"]
