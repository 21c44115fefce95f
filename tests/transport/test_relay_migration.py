"""A relay upgraded in place: a schema-1 database (mail in clear) sealed, its mail and users kept.

``data/relay-schema1.sql`` is the SQL dump of a database written by the
schema-1 relay itself (main at 008e9fd, before sealing), through its real
protocol, at fixed times: alice, bob (devices 1 and 2) and carol
registered, bob.1's prekeys uploaded; at T0 - 73 h carol sent alice one
envelope (expired by now); at T0 alice sent bob.1 and bob.2 one-to-one
ciphertexts, and at T0 + 1 h one group ciphertext to bob.1, bob.2 and
carol.1; bob.2 then took and acknowledged its one-to-one envelope.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from hushchat.protocol.prekeys import PreKeyBundle
from hushchat.transport import cli
from hushchat.transport.relay.report import format_report, relay_report
from hushchat.transport.relay.storage import migration
from hushchat.transport.relay.storage.postgres import POSTGRES_SCHEMA_VERSION
from hushchat.transport.relay.storage.rows import seal_delivery
from hushchat.transport.relay.storage.schema import SCHEMA_VERSION
from hushchat.transport.relay.storage.sqlite import SqliteDatabase
from hushchat.transport.wire.limits import TARGET_ONE_TIME_CAPACITY
from hushchat.transport.wire.records import EnvelopeKind
from tests.support.postgres import back_to_schema_4
from tests.support.relay import (
    connected,
    envelopes_until_empty,
    make_prekeys,
    register,
    relay_config,
    running_relay,
)
from tests.support.users import User, make_user

SCHEMA_1 = Path(__file__).parent / "data" / "relay-schema1.sql"
T0 = 1_700_000_000_000
HOUR = 3_600_000


def schema_1_database(tmp_path: Path) -> Path:
    path = tmp_path / "relay.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA_1.read_text())
    return path


def schema_1_mail(path: Path) -> dict[tuple[str, int], list[tuple[int, bytes, bytes]]]:
    """Each device's (seq, guid, payload) as schema 1 stored them."""
    mail: dict[tuple[str, int], list[tuple[int, bytes, bytes]]] = {}
    with contextlib.closing(sqlite3.connect(path)) as db:
        for user_id, device_id, seq, guid, data in db.execute(
            "SELECT d.user_id, d.device_id, d.seq, d.guid, p.data FROM deliveries AS d "
            "JOIN payloads AS p ON p.id = d.payload_id ORDER BY d.seq"
        ):
            mail.setdefault((user_id, device_id), []).append((seq, guid, data))
    return mail


async def test_a_relay_upgraded_in_place_keeps_its_queued_mail_and_registrations(
    tmp_path: Path,
) -> None:
    path = schema_1_database(tmp_path)
    before = schema_1_mail(path)
    assert before[("alice", 1)][0][2] == b"schema 1: expired before the upgrade"
    alice, bob, carol = make_user("alice"), make_user("bob", (1, 2)), make_user("carol")
    config = relay_config(tmp_path, clock=lambda: T0 + 2 * HOUR)
    async with running_relay(config) as port:
        got = {}
        for device in (bob.devices[1], bob.devices[2], carol.devices[1], alice.devices[1]):
            # The registrations were kept: each device authenticates as before.
            async with connected(port, device) as connection:
                got[device.address] = await envelopes_until_empty(connection)
        async with connected(port, alice.devices[1]) as fetcher:
            bundle = await fetcher.fetch_bundle("bob", 1)  # bob.1's prekeys were kept
            assert len(bundle) > 1000
    assert got[("alice", 1)] == []  # it expired before the upgrade
    for address in (("bob", 1), ("bob", 2), ("carol", 1)):
        envelopes = got[address]
        # Same guids, payloads and order as schema 1 held them.
        assert [(e.guid, e.payload) for e in envelopes] == [
            (guid, data) for _, guid, data in before[address]
        ]
    direct, group = got[("bob", 1)]
    assert (direct.sender_user, direct.sender_device, direct.kind, direct.server_ts) == (
        "alice",
        1,
        EnvelopeKind.DIRECT,
        T0,
    )
    assert (group.kind, group.server_ts) == (EnvelopeKind.GROUP, T0 + HOUR)
    # Sealed: no payload and no recipient in clear any more, and the old tables are gone.
    contents = b"".join(p.read_bytes() for p in tmp_path.glob("relay.db*"))
    for mail in before.values():
        for _, guid, data in mail:
            assert data not in contents and guid not in contents
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        columns = {row[1] for row in db.execute("PRAGMA table_info(devices)")}
        assert columns == {"user_id", "device_id", "identity"}  # no per-device count
        # The lists kept are of protocol version 1 (no device proofs): schema 3.
        assert db.execute("SELECT user_id, protocol_version FROM users").fetchall() == [
            ("alice", 1),
            ("bob", 1),
            ("carol", 1),
        ]


def test_a_migration_that_fails_half_way_leaves_schema_1_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = schema_1_database(tmp_path)
    before = schema_1_mail(path)
    sealed = 0

    def failing(*args: object, **kwargs: object) -> bytes:
        nonlocal sealed
        sealed += 1
        if sealed == 2:
            raise OSError("the relay stopped")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    real = seal_delivery  # the function migration imported, replaced in its namespace
    monkeypatch.setattr(migration, "seal_delivery", failing)
    with pytest.raises(OSError):
        SqliteDatabase(str(path), clock=lambda: T0 + 2 * HOUR)
    assert schema_1_mail(path) == before
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    monkeypatch.setattr(migration, "seal_delivery", real)
    # The next start migrates it, with the key file the first one created.
    db = SqliteDatabase(str(path), clock=lambda: T0 + 2 * HOUR)
    queued = db.pending("carol", 1, after_seq=0, limit=9, now=T0 + 2 * HOUR)
    assert [q.envelope.payload for q in queued] == [b"schema 1: group"]
    db.close()


def test_the_report_of_a_schema_1_database_says_everything_is_readable(tmp_path: Path) -> None:
    path = schema_1_database(tmp_path)
    report = relay_report(str(path), f"{path}.keys", T0 + 2 * HOUR)
    assert (report.schema_version, report.users, report.envelopes) == (1, 3, 5)
    assert "predates sealing at rest: everything above is readable" in " ".join(
        format_report(report).split()
    )


# ------------------------------------------------------------------ hushchat relay migrate


async def queue_mail(config: Any, alice: User, bob: User) -> None:
    """alice registers bob and sends him two envelopes, which wait for him."""
    async with running_relay(config) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"queued 1")])
            await sender.send_direct("bob", [(1, b"queued 2")])


async def delivered(config: Any, bob: User) -> list[bytes]:
    async with running_relay(config) as port, connected(port, bob.devices[1]) as receiver:
        return [e.payload for e in await envelopes_until_empty(receiver)]


@pytest.mark.parametrize("backend", ["sqlite", "postgres", "postgres-4"])
async def test_migrate_keeps_the_queued_mail_of_the_previous_schema(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """From SQLite's previous schema; on PostgreSQL from schema 1 (the first) and from
    schema 4 (the queue in one table each, before its partitions by epoch)."""
    alice, bob = make_user("alice"), make_user("bob")
    if backend.startswith("postgres"):
        db = request.getfixturevalue("postgres_dsn")
        config = relay_config(tmp_path, db=db)
        argv = ["relay", "migrate", "--db", db]
    else:
        db = str(tmp_path / "relay.db")
        config = relay_config(tmp_path)
        argv = ["relay", "migrate", "--db", db]
    await queue_mail(config, alice, bob)
    # Back to the previous schema, as the relay before this one left it.
    if backend.startswith("postgres"):
        back_to_schema_4(db)
        previous, current = 4, POSTGRES_SCHEMA_VERSION
        if backend == "postgres":
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute("DROP TABLE presence")
                conn.execute("DROP TABLE one_time_budgets")
                conn.execute("DROP INDEX deliveries_epoch_mailbox")
                conn.execute("CREATE INDEX deliveries_mailbox ON deliveries (mailbox, seq)")
                conn.execute("CREATE INDEX deliveries_epoch ON deliveries (epoch)")
                conn.execute("UPDATE schema_version SET version = 1")
            previous = 1
    else:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:
            conn.execute("DROP TABLE invites")
            conn.execute("DROP TABLE one_time_budgets")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 2}")
        previous, current = SCHEMA_VERSION - 2, SCHEMA_VERSION
    assert cli.main(argv) == 0
    assert f"migrated from schema {previous} to {current}" in capsys.readouterr().out
    assert cli.main(argv) == 0
    assert f"schema {current}, nothing to migrate" in capsys.readouterr().out
    if backend.startswith("postgres"):  # the queued mail is in its epoch's partitions
        with psycopg.connect(db, autocommit=True) as conn:
            parts = conn.execute(
                "SELECT c.relname, i.inhparent::regclass::text FROM pg_inherits AS i "
                "JOIN pg_class AS c ON c.oid = i.inhrelid "
                "WHERE i.inhparent IN ('deliveries'::regclass, 'payloads'::regclass)"
            ).fetchall()
            ((epoch, queued),) = conn.execute(
                "SELECT epoch, COUNT(*) FROM deliveries GROUP BY epoch"
            ).fetchall()
            assert conn.execute(f"SELECT COUNT(*) FROM deliveries_{epoch}").fetchone() == (2,)
            assert conn.execute("SELECT epoch FROM epoch_starts").fetchall() == [(epoch,)]
        assert sorted(parts) == [
            (f"deliveries_{epoch}", "deliveries"),
            (f"payloads_{epoch}", "payloads"),
        ]
        assert queued == 2
    assert await delivered(config, bob) == [b"queued 1", b"queued 2"]
    # The one-time budget of a device is kept in the migrated database (spec 7.7).
    async with running_relay(config) as port:
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=2, one_time_kem=2))
        async with connected(port, alice.devices[1]) as fetcher:
            bundle = PreKeyBundle.decode(await fetcher.fetch_bundle("bob", 1))
    assert bundle.one_time_prekey is not None
    if backend.startswith("postgres"):
        with psycopg.connect(db, autocommit=True) as conn:
            rows = conn.execute("SELECT user_id, device_id, tokens FROM one_time_budgets")
            budgets = rows.fetchall()
    else:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            query = "SELECT user_id, device_id, tokens FROM one_time_budgets"
            budgets = conn.execute(query).fetchall()
    assert [(u, d) for u, d, _ in budgets] == [("bob", 1)]
    assert budgets[0][2] < TARGET_ONE_TIME_CAPACITY


async def test_migrate_refuses_a_newer_schema_and_a_missing_database(
    postgres_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    assert cli.main(["relay", "migrate", "--db", postgres_dsn]) == 1
    assert "schema version 99" in capsys.readouterr().err
    assert cli.main(["relay", "migrate", "--db", str(tmp_path / "none.db")]) == 1
    assert "no relay database" in capsys.readouterr().err
