"""The relay forgets provably: a seized disk, before and after the retention window.

Everything the relay stores about a queued envelope is sealed under keys of
its epoch, which cease to exist when the epoch leaves the retention window
(spec 07 section 7.13). These tests play the one who seizes the relay: they
copy its files (database, WAL, key file) during real traffic, let the
relay's clock run past the window, and try to open every row of every copy
with every key a key file can derive, and grep every byte for what should
not be there.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from hushchat.protocol.client_core import MessageReceived
from hushchat.transport.client.client import MessageSent
from hushchat.transport.relay.config import RelayLimits, wall_clock_ms
from hushchat.transport.relay.ratelimit import RateLimit
from hushchat.transport.relay.server import RelayStartError, serve_relay
from hushchat.transport.relay.storage.atrest import KeyChain, KeyState, read_key_file
from hushchat.transport.relay.storage.rows import (
    MailboxContent,
    open_delivery,
    open_mailbox,
    open_payload,
)
from hushchat.transport.relay.storage.sqlite import SqliteDatabase
from hushchat.transport.wire.frames import MailExpired, QueueEmpty
from hushchat.transport.wire.limits import EPOCHS_PER_RETENTION
from hushchat.transport.wire.records import Envelope
from tests.support.children import RELAY_COMMAND, STARTED
from tests.support.clients import Relay, client, next_matching
from tests.support.relay import (
    announced_port,
    connected,
    envelopes_until_empty,
    register,
    relay_config,
    running_relay,
)
from tests.support.storage import batch, copy_at_one_moment, register_devices
from tests.support.users import make_user

HOUR_MS = 3600 * 1000
RETENTION_SECONDS = 3600  # epochs of 50 s
EPOCH_MS = RETENTION_SECONDS * 1000 // EPOCHS_PER_RETENTION
WINDOW_MS = RETENTION_SECONDS * 1000
DIRECTORY_TABLES = {
    "users",
    "devices",
    # The index that finds a device key's owner (one device key, one user): its
    # entries carry the devices table's key, (user_id, device_id).
    "devices_identity",
    "signed_prekeys",
    "last_resort_kem_prekeys",
    "one_time_prekeys",
    "one_time_kem_prekeys",
    # A device's one-time budget, until it refills (spec 07 sections 7.7, 7.12):
    # named by the device, as its prekeys are.
    "one_time_budgets",
}


# ------------------------------------------------------------------ the one who seizes


def files_of(db: Path) -> list[Path]:
    return [p for p in (db, Path(f"{db}-wal"), Path(f"{db}.keys")) if p.exists()]


def opened_rows(db: Path, state: KeyState | None) -> list[object]:
    """Every queue row of ``db`` that opens under a key ``state`` can derive.

    Each row is tried under every epoch key the state derives, from its own
    epoch to the newest row's (the chain runs forwards without end), not
    only under the row's epoch: an attacker tries them all.
    """
    if state is None:
        return []
    chain = KeyChain(state)
    opened: list[object] = []
    with contextlib.closing(_readable_copy(db)) as conn:
        (newest,) = conn.execute(
            "SELECT MAX(epoch) FROM (SELECT epoch FROM deliveries UNION ALL "
            "SELECT epoch FROM payloads UNION ALL SELECT epoch FROM mailboxes)"
        ).fetchone()
        epochs = range(state.epoch, max(newest or 0, state.epoch) + 2)
        keys = [k for e in epochs if (k := chain.keys(e)) is not None]
        rows = conn.execute("SELECT seq, mailbox, payload_id, sealed FROM deliveries").fetchall()
        for seq, mailbox, payload_id, sealed in rows:
            opened += [d for k in keys if (d := open_delivery(k, seq, mailbox, payload_id, sealed))]
        for payload_id, sealed in conn.execute("SELECT id, sealed FROM payloads").fetchall():
            opened += [p for k in keys if (p := open_payload(k, payload_id, sealed))]
        for mailbox, sealed in conn.execute("SELECT mailbox, sealed FROM mailboxes").fetchall():
            opened += [m for k in keys if (m := open_mailbox(k, mailbox, sealed))]
    return opened


def queue_of(db: Path) -> str:
    """What a failed check was given: the rows of each queue table by epoch, the WAL's size."""
    with contextlib.closing(_readable_copy(db)) as conn:
        counts = {
            table: conn.execute(
                f"SELECT epoch, COUNT(*) FROM {table} GROUP BY epoch ORDER BY epoch"
            ).fetchall()
            for table in ("deliveries", "payloads", "mailboxes")
        }
    wal = Path(f"{db}-wal")
    return f"rows by epoch {counts}, WAL {wal.stat().st_size if wal.exists() else None} bytes"


def _readable_copy(db: Path) -> sqlite3.Connection:
    """A connection to a copy of ``db`` (and its WAL): reading a copy must not change it."""
    scratch = db.parent / f"read-{os.urandom(4).hex()}"
    scratch.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{db}{suffix}").exists():
            shutil.copy(f"{db}{suffix}", scratch / f"relay.db{suffix}")
    return sqlite3.connect(scratch / "relay.db")


def found_outside_the_directory(db: Path, needles: list[bytes]) -> list[tuple[str, bytes]]:
    """Each needle found anywhere in the seized files but in pages of the directory tables.

    The directory (user ids, device lists, prekeys) is public and kept in
    clear (spec 07 section 7.12); every other byte of the database, every
    byte of the WAL not in a directory page, and every byte of the key file
    must hold none of the needles.
    """
    with contextlib.closing(_readable_copy(db)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        owners = dict(
            (page, name) for name, page in conn.execute("SELECT name, pageno FROM dbstat")
        )
    found = []
    for path in files_of(db):
        data = path.read_bytes()
        for needle in needles:
            start = data.find(needle)
            while start != -1:
                if path.name == "relay.db":
                    page: int | None = start // page_size + 1
                elif path.name == "relay.db-wal":
                    frame, within = divmod(start - 32, 24 + page_size)
                    header = 32 + frame * (24 + page_size)
                    page = (
                        int.from_bytes(data[header : header + 4], "big") if within >= 24 else None
                    )
                else:
                    page = None  # the key file: nowhere is allowed
                if owners.get(page) not in DIRECTORY_TABLES:
                    found.append((path.name, needle))
                start = data.find(needle, start + 1)
    return found


async def purged(db: Path) -> None:
    """Wait for the relay's sweep to leave nothing queued."""
    with trio.fail_after(10):
        while True:
            with contextlib.closing(sqlite3.connect(db)) as conn:
                if conn.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,):
                    return
            await trio.sleep(0.02)


# ------------------------------------------------------------------ the evidence


async def test_a_seized_disk_reads_nothing_older_than_the_retention_window(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Real traffic (the client library: PQXDH, Double Ratchet, a group), carol away throughout."""
    now = [wall_clock_ms()]
    db = tmp_path / "relay.db"
    relay = Relay(
        nursery,
        str(db),
        clock=lambda: now[0],
        retention_seconds=RETENTION_SECONDS,
        limits=RelayLimits(sweep_interval=0.02),
    )
    await relay.start()
    people = tmp_path / "people"
    people.mkdir()
    async with client(people, relay, "carol"):
        pass  # registered, prekeys published; then away for good
    plaintexts: list[bytes] = []
    async with client(people, relay, "alice") as alice, client(people, relay, "bob") as bob:
        group_id = await alice.create_group("seized", ["bob", "carol"])

        async def talk(phase: str) -> None:
            for text in (f"{phase}: to carol alone", f"{phase}: to the group"):
                plaintexts.append(text.encode())
            # A send returns once queued in alice's outbox: the relay has stored both
            # (carol's copies too) only when alice is told each was sent.
            waiting = {
                await alice.send_direct("carol", plaintexts[-2]),
                await alice.send_group(group_id, plaintexts[-1]),
            }
            while waiting:
                waiting.discard((await next_matching(alice, MessageSent)).message_id)
            assert (await next_matching(bob, MessageReceived)).body == plaintexts[-1]

        await talk("before the window")
        early = copy_at_one_moment(db, tmp_path / "early")  # a backup made then: it holds that mail
        early_keys = read_key_file(f"{early}.keys")
        assert opened_rows(early, early_keys), f"nothing opens: {queue_of(early)}, {early_keys}"

        now[0] += WINDOW_MS + EPOCH_MS  # that mail's epoch leaves the window
        await purged(db)
        await talk("inside the window")
        seized_at = now[0]
        seized = copy_at_one_moment(db, tmp_path / "seized")  # the disk, taken now (T)

    # With the disk of T and its own key file: what is queued for carol is
    # readable (it is inside the window at T), and only that.
    readable = opened_rows(seized, read_key_file(f"{seized}.keys"))
    assert readable and {type(r).__name__ for r in readable} >= {"DeliveryContent"}
    payloads = {r.data for r in readable if type(r).__name__ == "PayloadContent"}  # type: ignore[attr-defined]
    assert payloads and not any(p in q for p in plaintexts for q in payloads)  # e2e ciphertext
    # The backup from before the window, with the key file of T: nothing opens.
    assert opened_rows(early, read_key_file(f"{seized}.keys")) == []

    now[0] += WINDOW_MS + EPOCH_MS  # the mail of T leaves the window too
    await purged(db)
    with trio.fail_after(5):
        while (read_key_file(f"{db}.keys") or KeyState.new(1, 0)).epoch * EPOCH_MS < now[
            0
        ] - WINDOW_MS - EPOCH_MS:
            await trio.sleep(0.02)
    current = read_key_file(f"{db}.keys")
    # The relay's key state of now opens nothing of either copy.
    for copy in (early, seized):
        assert opened_rows(copy, current) == [], copy
    # Of its own database, only expiry notices, kept to tell their devices: who received
    # how many envelopes, accepted when; no sender, no ciphertext, no group. (Carol's;
    # and alice's, if a delivery receipt bob sent reached the relay after she left.)
    left = opened_rows(db, current)
    assert all(isinstance(row, MailboxContent) for row in left), left
    (notice,) = [row for row in left if isinstance(row, MailboxContent) and row.user_id == "carol"]
    assert notice.notice is not None and notice.notice.first_ts == seized_at  # of T's mail

    # Every byte of the disk taken at T: no plaintext, no user id of a sender or
    # recipient of queued mail outside the public directory, no group id.
    needles = [*plaintexts, b"alice", b"bob", b"carol", group_id]
    assert found_outside_the_directory(seized, needles) == []
    assert found_outside_the_directory(db, needles) == []
    # The check can see: the directory does hold the user ids.
    assert b"carol" in seized.read_bytes() + Path(f"{seized}-wal").read_bytes()


async def test_no_envelope_is_lost_across_epoch_rollovers_under_load(tmp_path: Path) -> None:
    """Epochs of 1 s: the relay's clock crosses one every 40 sends; bob reads, carol waits."""
    now = [10**12]
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    fast = RateLimit(10_000, 10_000)  # the load is the point, not the limits
    config = relay_config(
        tmp_path,
        clock=lambda: now[0],
        retention_seconds=30,
        sweep_interval=0.01,
        send_rate=fast,
        frame_rate=fast,
    )
    sends = 600
    async with running_relay(config) as port:
        await register(port, alice, bob, carol)
        received: list[bytes] = []

        async def read(done: trio.Event) -> None:
            async with connected(port, bob.devices[1]) as reader:
                while len(received) < sends:
                    batch = [i for i in await reader.receive_batch() if isinstance(i, Envelope)]
                    received.extend(e.payload for e in batch)
                    if batch:
                        await reader.ack(*(e.guid for e in batch))
            done.set()

        async with trio.open_nursery() as nursery, connected(port, alice.devices[1]) as sender:
            done = trio.Event()
            nursery.start_soon(read, done)
            for index in range(sends):
                payload = b"%d" % index
                await sender.send_group(payload, [("bob", 1), ("carol", 1)])
                now[0] += 25  # 15 s of relay time in all: epochs and keys move under load
            with trio.fail_after(20):
                await done.wait()
        assert received == [b"%d" % i for i in range(sends)]  # each once, in order
        mail: list[Envelope] = []
        async with connected(port, carol.devices[1]) as late:
            with trio.fail_after(20):
                while True:  # her backlog, across 15 epochs, acknowledged as it comes
                    batch = await late.receive_batch()
                    arrived = [i for i in batch if isinstance(i, Envelope)]
                    mail.extend(arrived)
                    if arrived:
                        await late.ack(*(e.guid for e in arrived))
                    if any(isinstance(i, QueueEmpty) for i in batch):
                        break
        assert [e.payload for e in mail] == [b"%d" % i for i in range(sends)]
    keys = read_key_file(f"{tmp_path / 'relay.db'}.keys")
    assert keys is not None and keys.epoch > 10**12 // 1000 - 30  # keys moved on meanwhile


async def test_restart_keeps_the_mail_but_not_the_keys_of_expired_epochs(tmp_path: Path) -> None:
    now = [10**12]
    alice, bob = make_user("alice"), make_user("bob")
    config = relay_config(tmp_path, clock=lambda: now[0], retention_seconds=RETENTION_SECONDS)
    key_file = f"{tmp_path / 'relay.db'}.keys"
    async with running_relay(config) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"first")])
            await sender.send_direct("bob", [(1, b"second")])
    async with running_relay(config) as port, connected(port, bob.devices[1]) as receiver:
        assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"first", b"second"]
    before = read_key_file(key_file)
    now[0] += WINDOW_MS + EPOCH_MS  # the relay was stopped for longer than the retention
    async with running_relay(config) as port:
        after = read_key_file(key_file)
        # Before serving anything, the key file no longer derives that mail's keys.
        assert before is not None and after is not None and after.epoch > before.epoch
        assert KeyChain(after).keys(before.epoch) is None
        await purged(tmp_path / "relay.db")  # the first sweep, at once
        async with connected(port, bob.devices[1]) as receiver:
            with trio.fail_after(5):
                while not isinstance(item := await receiver.receive(), MailExpired):
                    assert not isinstance(item, Envelope)
            assert item == MailExpired(2, 10**12, 10**12)
            assert await envelopes_until_empty(receiver) == []


async def test_a_lost_key_file_stops_the_relay_until_reset_and_every_device_is_told(
    tmp_path: Path,
) -> None:
    now = [10**12]
    alice, bob = make_user("alice"), make_user("bob")
    config = relay_config(tmp_path, clock=lambda: now[0], retention_seconds=RETENTION_SECONDS)
    key_file = Path(f"{tmp_path / 'relay.db'}.keys")
    async with running_relay(config) as port:
        await register(port, alice, bob)
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"lost with the keys")])
    lost = read_key_file(str(key_file))
    key_file.unlink()
    with pytest.raises(RelayStartError, match=r"key file .* is missing"):
        await serve_relay(config)
    assert not key_file.exists()  # nothing was created, nothing discarded
    reset = relay_config(
        tmp_path, clock=lambda: now[0], retention_seconds=RETENTION_SECONDS, reset_keys=True
    )
    async with running_relay(reset) as port:
        for device in (bob.devices[1], alice.devices[1]):  # registrations were kept
            async with connected(port, device) as connection:
                with trio.fail_after(5):
                    while not isinstance(item := await connection.receive(), MailExpired):
                        assert not isinstance(item, Envelope)
                assert item == MailExpired(None, now[0] - WINDOW_MS, now[0])
                assert await envelopes_until_empty(connection) == []
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"under the new keys")])
    # A later start with the new key file needs no reset, and keeps the new mail.
    async with running_relay(config) as port, connected(port, bob.devices[1]) as receiver:
        assert [e.payload for e in await envelopes_until_empty(receiver)] == [b"under the new keys"]
    new = read_key_file(str(key_file))
    assert lost is not None and new is not None and new.chain_id != lost.chain_id


@contextlib.contextmanager
def _killed_on_exit(process: trio.Process) -> Iterator[trio.Process]:
    try:
        yield process
    finally:
        process.kill()


async def test_two_relay_processes_derive_the_same_keys(tmp_path: Path) -> None:
    """Two ``hushchat relay`` processes on one database, each with its own copy of the key file."""
    db = tmp_path / "relay.db"
    alice, bob = make_user("alice"), make_user("bob")

    async def start(key_file: Path) -> tuple[trio.Process, int]:
        argv = [*RELAY_COMMAND, "--port", "0", "--db", str(db), "--key-file", str(key_file)]
        process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
        STARTED.append(process)
        return process, await announced_port(process)

    first, first_port = await start(tmp_path / "first.keys")
    shutil.copy(tmp_path / "first.keys", tmp_path / "second.keys")  # as to another machine
    second, second_port = await start(tmp_path / "second.keys")
    with _killed_on_exit(first), _killed_on_exit(second):
        await register(first_port, alice, bob)
        async with connected(first_port, alice.devices[1]) as via_first:
            await via_first.send_direct("bob", [(1, b"sealed by the first")])
        async with connected(second_port, alice.devices[1]) as via_second:
            await via_second.send_direct("bob", [(1, b"sealed by the second")])
        async with connected(second_port, bob.devices[1]) as reader:
            mail = await envelopes_until_empty(reader)
            assert [e.payload for e in mail] == [b"sealed by the first", b"sealed by the second"]
            await reader.ack(mail[0].guid)
        async with connected(first_port, bob.devices[1]) as reader:
            (left,) = await envelopes_until_empty(reader)
            assert left.payload == b"sealed by the second"
        for process in (first, second):
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                assert await process.wait() == 0
    one, other = (
        read_key_file(str(tmp_path / "first.keys")),
        read_key_file(str(tmp_path / "second.keys")),
    )
    assert one is not None and other is not None and one.chain_id == other.chain_id
    epoch = max(one.epoch, other.epoch)
    a, b = KeyChain(one).keys(epoch), KeyChain(other).keys(epoch)
    assert a is not None and b is not None and a.index("bob", 1) == b.index("bob", 1)


def test_a_seized_disk_holds_no_acknowledged_envelope_after_the_next_sweep(
    tmp_path: Path,
) -> None:
    """Whoever seizes the running relay's disk with its key file, after bob acknowledged
    his mail and the relay swept, finds none of that mail's sealed bytes in any file: not
    in free pages (secure_delete) nor in old WAL frames (the sweep truncates the WAL), so
    the key file that still derives their epoch's keys opens nothing of them (07 section
    7.12). Before the sweep the WAL may still hold them: 9.8 says so."""
    folder = tmp_path / "relay"
    folder.mkdir()
    db = SqliteDatabase(str(folder / "relay.db"))
    register_devices(db, "alice", 1, key_base=0xA0)
    register_devices(db, "bob", 1)
    now = wall_clock_ms()
    for n in range(3):
        mail = batch(
            [("bob", 1)],
            (b"mail %d " % n * 40,),
            counters={"bob": 0},
            server_ts=now,
            expires_at=now + 3_600_000,
        )
        db.enqueue(mail, max_mailbox_size=10)
    with contextlib.closing(sqlite3.connect(folder / "relay.db")) as peek:
        sealed = [bytes(row[0]) for row in peek.execute("SELECT sealed FROM payloads")]
        sealed += [bytes(row[0]) for row in peek.execute("SELECT sealed FROM deliveries")]
    assert len(sealed) == 6
    queued = db.pending("bob", 1, after_seq=0, limit=10, now=now)
    assert db.acknowledge("bob", 1, [q.seq for q in queued]) == 3
    db.purge_expired(now)  # the sweep of the next epoch boundary; nothing has expired
    try:
        disk = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        found = [(name, s.hex()[:16]) for name, data in disk.items() for s in sealed if s in data]
        assert found == []
    finally:
        db.close()
