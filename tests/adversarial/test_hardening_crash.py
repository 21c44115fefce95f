"""Crashes: ``kill -9`` of the relay under load, of a client between receiving and
acknowledging, and of a process in the middle of saving client state.

Every process killed here is a real subprocess, killed with SIGKILL at a
point the test chooses (or at random, for the relay and the store writer):

* relay: every send the relay answered ACCEPTED before it died is delivered
  after a restart on the same database (and nothing else, and once);
* client: killed after it received an envelope and before it acknowledged
  it (before its commit, after the commit with the event not yet read, or
  with the event read and done), the message reaches the app exactly once
  after the restart;
* store writer: two devices exchanging messages and saving after each step
  are killed mid-write again and again; every time the stores pass SQLite's
  integrity check, load, hold each message once in order, and the two
  devices go on talking.

The default run does a few rounds; ``pytest -m slow`` runs many more
(HUSHCHAT_CRASH_ROUNDS, default 20).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from hushchat.protocol.client_core import ENVELOPE_DIRECT, ClientCore, DirectSend, MessageReceived
from hushchat.protocol.errors import ProtocolError
from hushchat.transport.client.client import open_client
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import serve_relay
from hushchat.transport.wire.errors import TransportError
from tests.support.children import RELAY_COMMAND, REPO, STARTED, child_env
from tests.support.relay import connected, envelopes_until_empty, register
from tests.support.users import make_user

TIMEOUT = 30
SLOW_ROUNDS = int(os.environ.get("HUSHCHAT_CRASH_ROUNDS", "20"))


class Child:
    """A subprocess whose stdout is read line by line."""

    def __init__(self, process: trio.Process, log: Path) -> None:
        self.process = process
        self.log = log
        self._buffer = b""

    @classmethod
    async def start(cls, args: list[str], log: Path) -> Child:
        with log.open("ab") as stderr:
            process = await trio.lowlevel.open_process(
                args, stdout=subprocess.PIPE, stderr=stderr, env=child_env(), cwd=str(REPO)
            )
        STARTED.append(process)
        return cls(process, log)

    async def line(self, *, source: str = "stdout") -> str:
        """The next line of output (AssertionError, with the child's log, if it ends)."""
        stream = self.process.stdout
        assert stream is not None
        with trio.fail_after(TIMEOUT):
            while b"\n" not in self._buffer:
                data = await stream.receive_some(4096)
                if not data:
                    raise AssertionError(f"child ended early:\n{self.log.read_text()}")
                self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    async def expect(self, prefix: str) -> str:
        while not (line := await self.line()).startswith(prefix):
            pass
        return line

    async def kill(self) -> None:
        """kill -9, and reap it."""
        self.process.send_signal(signal.SIGKILL)
        with trio.fail_after(TIMEOUT):
            assert await self.process.wait() == -signal.SIGKILL


# ------------------------------------------------------------------ the relay


class RelayProcess:
    """``python -m hushchat.transport.cli relay`` on a database file; its port from its log."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.port = 0
        self.process: trio.Process | None = None

    async def start(self) -> int:
        args = [*RELAY_COMMAND, "--port", "0", "--db", str(self.db)]
        log = self.db.with_suffix(".log")
        log.write_bytes(b"")
        with log.open("ab") as stderr:
            self.process = await trio.lowlevel.open_process(
                args, stderr=stderr, env=child_env(), cwd=str(REPO)
            )
        STARTED.append(self.process)
        with trio.fail_after(TIMEOUT):
            while b"listening on" not in (text := log.read_bytes()) or not text.endswith(b"\n"):
                assert self.process.poll() is None, f"relay ended early: {text.decode()}"
                await trio.sleep(0.02)
        line = text.split(b"listening on", 1)[1].split(b"\n")[0]
        self.port = int(line.rsplit(b" port ", 1)[1])
        return self.port

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        with trio.fail_after(TIMEOUT):
            assert await self.process.wait() == -signal.SIGKILL


# Accepted sends before each kill, so that a kill lands in the middle of real load.
MIN_ACCEPTED_PER_ROUND = 100


async def test_kill_9_relay_under_load_loses_nothing_it_accepted(tmp_path: Path) -> None:
    await relay_kill_rounds(tmp_path, rounds=1)


@pytest.mark.slow
async def test_kill_9_relay_under_load_many_times(tmp_path: Path) -> None:
    await relay_kill_rounds(tmp_path, rounds=SLOW_ROUNDS)


async def relay_kill_rounds(tmp_path: Path, *, rounds: int) -> None:
    """Senders send as fast as the relay accepts; the relay is killed at a random moment."""
    relay = RelayProcess(tmp_path / "relay.db")
    bob = make_user("bob")
    senders = [make_user(f"sender{i}") for i in range(4)]
    rng = random.Random(1)
    load = Load()
    delivered: list[bytes] = []
    drains: list[list[bytes]] = []
    repeated = 0
    port = await relay.start()
    await register(port, bob, *senders)
    for round_ in range(rounds):
        async with trio.open_nursery() as nursery:
            for index, sender in enumerate(senders):
                tag = b"round %d sender %d" % (round_, index)
                nursery.start_soon(load.send_until_killed, port, sender, tag)
            # Kill at a random moment once this round's load means something: after
            # a count of accepted sends, not a time, which a loaded machine stretches.
            with trio.fail_after(120):
                while len(load.accepted) <= MIN_ACCEPTED_PER_ROUND * (round_ + 1):
                    await trio.sleep(0.01)
            await trio.sleep(rng.random() * 0.5)
            await relay.kill()
        port = await relay.start()
        drained = await drain(port, bob)
        assert len(drained) == len(set(drained)), "an envelope came twice on one connection"
        # The OK to an ACK promises no durability (spec 07, 7.8): a kill before the
        # deletion's commit brings envelopes of the drain just before it again, and
        # nothing older.
        again = set(drained) & set(delivered)
        assert again <= set(drains[-1] if drains else ()), "an acknowledged envelope came back"
        repeated += len(again)
        drains.append(drained)
        delivered += [payload for payload in drained if payload not in again]
    await relay.kill()
    print(
        f"relay kill -9: {rounds} kills under load; {len(load.accepted)} sends accepted, "
        f"{len(load.attempted) - len(load.accepted)} cut off by a kill; "
        f"{len(delivered)} delivered, {len(load.accepted - set(delivered))} accepted ones lost, "
        f"{repeated} acknowledged just before a kill came again"
    )
    assert len(load.accepted) > MIN_ACCEPTED_PER_ROUND * rounds
    assert load.accepted <= set(delivered), "an accepted send was lost"
    assert set(delivered) <= load.attempted
    assert len(delivered) == len(set(delivered))


class Load:
    """Sends, each with a unique payload: attempted, and accepted (ACCEPTED came back)."""

    def __init__(self) -> None:
        self.attempted: set[bytes] = set()
        self.accepted: set[bytes] = set()

    async def send_until_killed(self, port: int, sender: Any, tag: bytes) -> None:
        with suppress(TransportError, OSError):
            async with connected(port, sender.devices[1], request_timeout=5) as connection:
                for n in range(10**6):
                    payload = tag + b" message %d" % n
                    self.attempted.add(payload)
                    await connection.send_direct("bob", [(1, payload)])
                    self.accepted.add(payload)


async def drain(port: int, user: Any) -> list[bytes]:
    """Every envelope queued for the user's device 1, acknowledged."""
    async with connected(port, user.devices[1]) as connection:
        envelopes = await envelopes_until_empty(connection, acknowledge=True, timeout=TIMEOUT)
    return [e.payload for e in envelopes]


# ------------------------------------------------------------------ a client


CLIENT = """
import os, sys, time, trio
from hushchat.protocol.client_core import MessageReceived
from hushchat.transport.client import store as client_store
from hushchat.transport.client import connection
from hushchat.transport.client.client import open_client
from hushchat.transport.client.store import ClientStore

store_path, port, out_path, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

if crash == "before-commit":
    real_commit = ClientStore.commit
    def commit(self, changes, **kwargs):
        if kwargs.get("processed") is not None:
            print("AT-CRASH-POINT", flush=True)
            time.sleep(3600)  # in the store's worker thread, before anything is written
        return real_commit(self, changes, **kwargs)
    ClientStore.commit = commit
if crash in ("before-ack", "before-ack-unread"):
    async def ack(self, *guids):
        print("AT-CRASH-POINT", guids[0].hex(), flush=True)
        await trio.sleep_forever()
    connection.RelayConnection.ack = ack

async def main():
    store = ClientStore.open(store_path)
    async with open_client(store, "127.0.0.1", port, user_id="bob",
                           reconnect_first_delay=0.05) as client:
        print("READY", flush=True)
        if crash == "before-ack-unread":
            await trio.sleep_forever()  # the app reads nothing
        async for event in client.events():
            if isinstance(event, MessageReceived):
                with open(out_path, "ab") as out:
                    out.write(event.body + b"\\n")
                    out.flush()
                    os.fsync(out.fileno())
                print("HANDLED", event.body.decode(), flush=True)

trio.run(main)
"""


def inbox_rows(store: Path) -> int:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COUNT(*) FROM inbox").fetchone()[0])


@asynccontextmanager
async def in_process_relay(tmp_path: Path) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        config = RelayConfig(db_path=str(tmp_path / "relay.db"), port=0)
        port: int = await nursery.start(serve_relay, config)
        yield port
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("crash", ["before-commit", "before-ack-unread", "before-ack"])
async def test_kill_9_client_between_receive_and_ack(tmp_path: Path, crash: str) -> None:
    """The message reaches the app once: before the commit, with the event unread, or handled."""
    store, out, log = tmp_path / "bob.db", tmp_path / "handled.txt", tmp_path / "bob.log"

    async def bob(mode: str) -> Child:
        child = await Child.start(
            [sys.executable, "-c", CLIENT, str(store), str(port), str(out), mode], log
        )
        await child.expect("READY")
        return child

    async with in_process_relay(tmp_path) as port:
        await (await bob("none")).kill()  # registered, prekeys published
        alice_store = ClientStore.open(str(tmp_path / "alice.db"))
        try:
            async with open_client(alice_store, "127.0.0.1", port, user_id="alice") as alice:
                child = await bob(crash)
                await alice.send_direct("bob", b"exactly once")
                waiting = {"AT-CRASH-POINT"}
                if crash == "before-ack":
                    waiting.add("HANDLED exactly once")  # the two come in either order
                while waiting:
                    line = await child.line()
                    waiting = {w for w in waiting if not line.startswith(w)}
                if crash == "before-ack":
                    # The app asked for the next event, so the library deleted this one.
                    with trio.fail_after(TIMEOUT):
                        while inbox_rows(store):
                            await trio.sleep(0.01)
                await child.kill()
                child = await bob("none")
                await alice.send_direct("bob", b"after the restart")
                await child.expect("HANDLED after the restart")
                await child.kill()
        finally:
            alice_store.close()
    assert out.read_bytes() == b"exactly once\nafter the restart\n"


# ------------------------------------------------------------------ a store being written


WRITER = """
import hashlib, sys, time
from hushchat.protocol.client_core import ENVELOPE_DIRECT, Address, ClientCore
from hushchat.transport.client.store import ClientStore

now = int(time.time())
alice_store, bob_store = ClientStore.open(sys.argv[1]), ClientStore.open(sys.argv[2])
if alice_store.has_state():
    alice = ClientCore.load(alice_store.records())
    bob = ClientCore.load(bob_store.records())
else:
    alice = ClientCore.create_primary("alice", 1, now=now)
    bob = ClientCore.create_primary("bob", 1, now=now)
    for me, other in ((alice, bob), (bob, alice)):
        me.process_device_list(other.own_device_list.encode())
    alice.process_bundle(bob.account.bundle("bob", 1).encode(), now=now)
    bob.process_bundle(alice.account.bundle("alice", 1).encode(), now=now)
    alice_store.commit(alice.take_changes())
    bob_store.commit(bob.take_changes())
peers = {"alice": (alice, alice_store), "bob": (bob, bob_store)}

def deliver(sender):
    # Each send in the sender's outbox, processed by the other side (once, by guid).
    core, store = peers[sender]
    for row_id, send in store.outbox():
        other, other_store = peers[send.recipient_user]
        for _, payload in send.payloads:
            guid = hashlib.sha256(payload).digest()[:16]
            if not other_store.was_processed(guid):
                outcome = other.receive(Address(sender, 1), ENVELOPE_DIRECT, payload, now=now)
                other_store.commit(other.take_changes(), sends=list(outcome.sends),
                                   events=outcome.events, processed=(guid, now))
        store.commit({}, sent=[row_id])

deliver("alice")  # what the last run saved but did not deliver
deliver("bob")
n = sum(e.body.startswith(b"a->b") for _, e in bob_store.inbox())
print("STARTED", flush=True)
while True:
    deliver("alice")
    deliver("bob")
    _, sends = alice.send_direct("bob", b"a->b %d" % n, now=now)
    alice_store.commit(alice.take_changes(), sends=sends)
    if n % 3 == 0:
        deliver("alice")
        _, sends = bob.send_direct("alice", b"b->a %d" % n, now=now)
        bob_store.commit(bob.take_changes(), sends=sends)
    n += 1
"""


async def writer_kill_rounds(tmp_path: Path, *, rounds: int) -> None:
    alice_path, bob_path = tmp_path / "alice.db", tmp_path / "bob.db"
    rng = random.Random(2)
    for _ in range(rounds):
        child = await Child.start(
            [sys.executable, "-c", WRITER, str(alice_path), str(bob_path)], tmp_path / "w.log"
        )
        await child.expect("STARTED")
        await trio.sleep(0.2 + rng.random() * 0.6)
        await child.kill()
        check_stores(alice_path, bob_path)
    bodies = [b for b in received_bodies(bob_path) if b.startswith(b"a->b")]
    print(
        f"store kill -9: {rounds} kills while saving; {len(bodies)} messages saved in order, "
        f"each once; both stores intact and loadable after every kill"
    )
    assert len(bodies) > 5 * rounds, "too few saves between kills to mean anything"


def check_stores(alice_path: Path, bob_path: Path) -> None:
    """Both stores are intact, load, and hold each delivered message once, in order."""
    for path in (alice_path, bob_path):
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    alice_store, bob_store = ClientStore.open(str(alice_path)), ClientStore.open(str(bob_path))
    try:
        cores = {}
        for name, store in (("alice", alice_store), ("bob", bob_store)):
            store.outbox()  # every stored send decodes
            cores[name] = ClientCore.load(store.records())
        bodies = received_bodies(bob_path, bob_store)
        numbers = [int(b.split()[1]) for b in bodies if b.startswith(b"a->b")]
        assert numbers == list(range(len(numbers))), "a message was lost or came twice"
        # The two loaded devices go on talking (on copies: the writer goes on next round).
        alice, bob = cores["alice"], cores["bob"]
        now = int(time.time())
        for sender, receiver in ((alice, bob), (bob, alice)):
            for _, send in (alice_store if sender is alice else bob_store).outbox():
                assert isinstance(send, DirectSend)
                for _, payload in send.payloads:  # pending: delivered now (a repeat is dropped)
                    receiver.receive(sender.address, ENVELOPE_DIRECT, payload, now=now)
            _, [send] = sender.send_direct(receiver.user_id, b"after the crash", now=now)
            [(_, payload)] = send.payloads
            outcome = receiver.receive(sender.address, ENVELOPE_DIRECT, payload, now=now)
            assert [e.body for e in outcome.events if isinstance(e, MessageReceived)] == [
                b"after the crash"
            ], outcome
    finally:
        alice_store.close()
        bob_store.close()


def received_bodies(bob_path: Path, store: ClientStore | None = None) -> list[bytes]:
    own = store is None
    store = store or ClientStore.open(str(bob_path))
    try:
        return [e.body for _, e in store.inbox() if isinstance(e, MessageReceived)]
    finally:
        if own:
            store.close()


async def test_kill_9_while_saving_never_corrupts_the_store(tmp_path: Path) -> None:
    await writer_kill_rounds(tmp_path, rounds=2)


@pytest.mark.slow
async def test_kill_9_while_saving_many_times(tmp_path: Path) -> None:
    await writer_kill_rounds(tmp_path, rounds=SLOW_ROUNDS)


def test_a_corrupt_store_is_refused_with_a_state_error(tmp_path: Path) -> None:
    """What a kill cannot do, a flipped byte does: the load says so (never a crash)."""
    path = tmp_path / "c.db"
    store = ClientStore.open(str(path))
    core = ClientCore.create_primary("carol", 1, now=0)
    store.commit(core.take_changes())
    store.close()
    with sqlite3.connect(path) as db:
        (key, value), *_ = db.execute("SELECT key, value FROM records").fetchall()
        db.execute("UPDATE records SET value = ? WHERE key = ?", (value[:-1], key))
    store = ClientStore.open(str(path))
    try:
        with pytest.raises(ProtocolError):
            ClientCore.load(store.records())
    finally:
        store.close()
