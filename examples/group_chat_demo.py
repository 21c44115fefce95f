"""The scripted demo behind ``python examples/group_chat.py demo``.

A real relay on loopback and four people on the client library (alice, bob,
carol, dave; later alice's desktop too), narrated step by step: prekeys, a
one-to-one chat, a group, an offline member catching up, a second device, a
removal with sender-key rotation, the relay turning hostile (it alters a
group message, restamps a stranger's message as alice's, copies the group's
traffic to a device of its own, and tries to slip its operator's user into
the group: a change she signs as herself, one restamped as alice's, and a
replay of alice's genuine creation; the clients refuse all of it and the
member list stays as it was), safety numbers, mail that waits too long and
how the relay forgets it, and finally what the relay's SQLite file holds and
what it deleted.

Everything shown really happens over TCP. The relay is the real one
(:class:`hushchat.transport.relay.Relay` on
:class:`~hushchat.transport.relay.storage.SqliteStorage`);
the only addition is :class:`ObservedStorage`, which notes what the relay
stores and deletes so the demo can narrate it, and through which the
hostile step changes what the relay stores, as an operator who controls the
server can. It never sees plaintext either. mallory's client is the
library's, with one change: it sends a group change it signed though she is
no admin (:meth:`Demo._send_content`). The relay's clock is the wall
clock plus an offset, so that the demo can let 72 hours pass.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import sqlite3
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TextIO, TypeVar

import trio
from terminal import Palette

from hushchat.protocol.client_core import (
    ENVELOPE_DIRECT,
    ENVELOPE_GROUP,
    Address,
    ClientCore,
    DeviceAdded,
    GroupUpdated,
    MessageReceived,
    MessageSentByOtherDevice,
    Undecryptable,
)
from hushchat.protocol.content import GroupControl
from hushchat.protocol.group import AddMember, ControlMessage, GroupState, MemberRemoved
from hushchat.protocol.sender_keys import SenderKeyMessage
from hushchat.transport.client.client import (
    Client,
    ClientEvent,
    Connected,
    Disconnected,
    MailExpired,
    MessageDelivered,
    MessagePending,
    MessageSent,
    open_client,
)
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.config import RelayConfig, wall_clock_ms
from hushchat.transport.relay.report import relay_report
from hushchat.transport.relay.server import Relay
from hushchat.transport.relay.storage.atrest import KeyChain, read_key_file
from hushchat.transport.relay.storage.interface import Delivery, EnvelopeBatch, MailboxPosition
from hushchat.transport.relay.storage.rows import open_delivery
from hushchat.transport.relay.storage.sqlite import SqliteDatabase, SqliteStorage
from hushchat.transport.wire.limits import DEFAULT_RETENTION_SECONDS, EPOCHS_PER_RETENTION

HOST = "127.0.0.1"
# A step that takes longer than this is broken, not slow.
STEP_TIMEOUT = 15.0
GROUP_TITLE = "Weekend trip"
COLOURS = {"alice": "magenta", "bob": "cyan", "carol": "green", "dave": "yellow"}

E = TypeVar("E")
PayloadKey = tuple[int, int]  # (batch number, payload index in the batch)
# What a hostile relay does with a send: extra batches to store before it, and the
# send as it stores it.
Tampering = Callable[["EnvelopeBatch"], tuple[list["EnvelopeBatch"], "EnvelopeBatch"]]


def _is_group(batch: EnvelopeBatch) -> bool:
    """Whether ``batch`` is a group message (SEND_GROUP): one payload of the group kind."""
    return any(kind == ENVELOPE_GROUP for kind, _ in batch.payloads)


def sent_by(sender: Address) -> Callable[[Undecryptable], bool]:
    """For Person.expect: an Undecryptable from ``sender`` (bound now, not when called)."""
    return lambda event: event.sender == sender


class DemoFailed(Exception):
    """Something the demo shows did not happen as it should."""


class DemoClock:
    """The relay's clock: the wall clock, plus time the demo lets pass."""

    def __init__(self) -> None:
        self.offset = 0

    def ms(self) -> int:
        return wall_clock_ms() + self.offset


class ObservedStorage(SqliteStorage):
    """The relay's SQLite storage, noting what it stores and deletes (sizes, never contents)."""

    def __init__(self, database: SqliteDatabase) -> None:
        super().__init__(database)
        self.database = database
        self.batches: list[EnvelopeBatch] = []
        self._waiting: dict[int, tuple[Address, PayloadKey]] = {}  # seq -> recipient, payload
        self._references: dict[PayloadKey, int] = {}
        self.deleted_envelopes = 0
        self.deleted_payloads = 0
        self.deleted_bytes = 0
        self.tampering: Tampering | None = None  # the hostile step's, while it runs
        self.expired_envelopes = 0

    async def enqueue(
        self,
        batch: EnvelopeBatch,
        *,
        max_mailbox_size: int,
        committed: Callable[[Sequence[MailboxPosition | None]], None] | None = None,
    ) -> tuple[tuple[str, int], ...]:
        if self.tampering is not None:
            # Only for devices that are offline meanwhile: their connections
            # would be handed the send as the sender made it (``committed``).
            forged, batch = self.tampering(batch)
            for extra in forged:
                await super().enqueue(extra, max_mailbox_size=max_mailbox_size)
        positions: list[MailboxPosition | None] = []

        def noted(where: Sequence[MailboxPosition | None]) -> None:
            positions.extend(where)
            if committed is not None:
                committed(where)

        full = await super().enqueue(batch, max_mailbox_size=max_mailbox_size, committed=noted)
        number = len(self.batches)  # noted only once committed
        self.batches.append(batch)
        for delivery, position in zip(batch.deliveries, positions, strict=True):
            if position is None:
                continue  # its mailbox was full: not stored
            _, seq = position
            key = (number, delivery.payload_index)
            self._waiting[seq] = (Address(delivery.user_id, delivery.device_id), key)
            self._references[key] = self._references.get(key, 0) + 1
        return full

    async def acknowledge(self, user_id: str, device_id: int, seqs: Sequence[int]) -> int:
        deleted = await super().acknowledge(user_id, device_id, seqs)
        device = Address(user_id, device_id)
        for seq in seqs:
            waiting = self._waiting.get(seq)
            if waiting is None or waiting[0] != device:
                continue  # gone already, or not this device's: the storage kept it
            _, key = self._waiting.pop(seq)
            self.deleted_envelopes += 1
            self._references[key] -= 1
            if not self._references[key]:
                # The storage deletes a payload with its last delivery.
                del self._references[key]
                self.deleted_payloads += 1
                self.deleted_bytes += len(self.batches[key[0]].payloads[key[1]][1])
        return deleted

    async def purge_expired(self, now: int) -> int:
        purged = await super().purge_expired(now)
        self.expired_envelopes += purged
        return purged

    def mailbox(self, address: Address) -> list[int]:
        """Sizes of the envelopes waiting for a device."""
        return [
            len(self.batches[key[0]].payloads[key[1]][1])
            for recipient, key in self._waiting.values()
            if recipient == address
        ]

    @property
    def queued_envelopes(self) -> int:
        return sum(len(batch.deliveries) for batch in self.batches)


async def serve_observed_relay(
    storage: ObservedStorage,
    clock: DemoClock,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A relay on loopback (any free port) over ``storage``; reports its port."""
    # Named HOST (the default), as clients dial it.
    relay = Relay(RelayConfig(host=HOST, port=0, clock=clock.ms), storage)
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port: int = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, relay.handle_connection, listeners)
        task_status.started(port)


class Narrator:
    """Prints the story: section titles, who did what, and notes, wrapped to the terminal."""

    COLUMN = 12  # where the text starts, after the name of who acts

    def __init__(self, out: TextIO, palette: Palette, width: int = 100) -> None:
        self.out = out
        self.palette = palette
        self.width = width
        self.step = 0

    def _print(self, text: str = "") -> None:
        print(text, file=self.out)

    def section(self, title: str) -> None:
        self.step += 1
        self._print()
        self._print(self.palette.paint("bold", f"{self.step}. {title}"))

    def say(self, who: str, text: str, style: str = "") -> None:
        user = who.split(".")[0]
        name = self.palette.paint(COLOURS.get(user, "blue"), who)
        lines = textwrap.wrap(text, self.width - self.COLUMN, break_on_hyphens=False) or [""]
        padding = " " * max(1, self.COLUMN - 2 - len(who))
        self._print(f"  {name}{padding}{self.palette.paint(style, lines[0])}")
        for line in lines[1:]:
            self._print(" " * self.COLUMN + self.palette.paint(style, line))

    def note(self, text: str) -> None:
        for line in textwrap.wrap(text, self.width - 2, break_on_hyphens=False):
            self._print("  " + self.palette.paint("dim", line))


def quote(text: str | bytes) -> str:
    return '"' + (text.decode() if isinstance(text, bytes) else text) + '"'


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class Person:
    """One device on the client library, and the events it has not yet been asked about."""

    def __init__(self, user_id: str, device_id: int, workdir: str) -> None:
        self.user_id = user_id
        self.device_id = device_id
        self.label = f"{user_id}.{device_id}"
        self.store = ClientStore.open(os.path.join(workdir, f"{self.label}.db"))
        self._client: Client | None = None
        self._unseen: list[ClientEvent] = []
        self._arrived = trio.Event()
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    @property
    def client(self) -> Client:
        if self._client is None:
            raise DemoFailed(f"{self.label} is offline")
        return self._client

    @property
    def address(self) -> Address:
        return Address(self.user_id, self.device_id)

    @property
    def online(self) -> bool:
        return self._client is not None

    async def connect(
        self, nursery: trio.Nursery, port: int, core: ClientCore | None = None
    ) -> None:
        """Come online (a new user the first time); returns once connected."""
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()
        await nursery.start(self._run, port, core)

    async def _run(
        self, port: int, core: ClientCore | None, *, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            async with open_client(
                self.store, HOST, port, device=core, user_id=self.user_id
            ) as client:
                self._client = client
                with self._scope:
                    task_status.started()
                    async for event in client.events():
                        self._unseen.append(event)
                        self._arrived.set()
                        self._arrived = trio.Event()
        finally:
            self._client = None
            self._stopped.set()

    async def disconnect(self) -> None:
        """Close the app (its store stays, as on a phone that is switched off)."""
        self._scope.cancel()
        await self._stopped.wait()

    async def expect(self, kind: type[E], match: Callable[[E], bool] = lambda _: True) -> E:
        """The first unseen event of ``kind`` that ``match``es, waiting for it if needed."""
        with trio.move_on_after(STEP_TIMEOUT):
            while True:
                for index, event in enumerate(self._unseen):
                    if isinstance(event, kind) and match(event):
                        del self._unseen[index]
                        return event
                await self._arrived.wait()
        raise DemoFailed(f"{self.label} did not receive the expected {kind.__name__}")

    async def expect_message(self, body: bytes) -> MessageReceived:
        return await self.expect(MessageReceived, lambda e: e.body == body)


class Demo:
    def __init__(
        self,
        nursery: trio.Nursery,
        port: int,
        storage: ObservedStorage,
        workdir: str,
        narrator: Narrator,
        pause: float = 0.0,
        *,
        clock: DemoClock,
        db_path: str,
    ) -> None:
        self.nursery = nursery
        self.pause = pause
        self.port = port
        self.storage = storage
        self.clock = clock
        self.db_path = db_path
        self.workdir = workdir
        self.n = narrator
        self.people = {name: Person(name, 1, workdir) for name in COLOURS}
        self.mallory = Person("mallory", 1, workdir)
        self.desktop = Person("alice", 2, workdir)
        self.plaintexts: list[bytes] = [GROUP_TITLE.encode()]
        self._mark = 0
        self.group_id = b""
        self.creation_for_bob: EnvelopeBatch | None = None

    def close(self) -> None:
        for person in [*self.people.values(), self.desktop, self.mallory]:
            person.store.close()

    # ------------------------------------------------------------ helpers

    def said(self, text: str) -> bytes:
        """A message body; remembered, to look for it in the relay's file at the end."""
        body = text.encode()
        self.plaintexts.append(body)
        return body

    def relay_since_mark(self) -> list[EnvelopeBatch]:
        """What the relay stored since the last call, printed."""
        batches = self.storage.batches[self._mark :]
        self._mark = len(self.storage.batches)
        direct: list[str] = []
        for batch in batches:
            if not _is_group(batch):
                for delivery in batch.deliveries:
                    kind, payload = batch.payloads[delivery.payload_index]
                    if kind == ENVELOPE_DIRECT:
                        size = len(payload)
                        direct.append(f"{delivery.user_id}.{delivery.device_id} ({size:,} bytes)")
                continue
            if direct:
                self._say_direct(direct)
                direct = []
            if _is_group(batch):
                ((_, payload),) = batch.payloads
                targets = ", ".join(f"{d.user_id}.{d.device_id}" for d in batch.deliveries)
                self.n.say(
                    "relay",
                    f"stored 1 group ciphertext ({len(payload):,} bytes) once, "
                    f"queued it for {targets}",
                )
        if direct:
            self._say_direct(direct)
        return batches

    def _say_direct(self, targets: list[str]) -> None:
        kind = "a one-to-one ciphertext" if len(targets) == 1 else "one-to-one ciphertexts"
        self.n.say("relay", f"queued {kind} for {', '.join(targets)}")

    async def mailbox_drained(self, address: Address) -> None:
        with trio.move_on_after(STEP_TIMEOUT):
            while self.storage.mailbox(address):
                await trio.sleep(0.01)
            return
        raise DemoFailed(f"the relay still holds envelopes for {address}")

    async def show_read(self, reader: Person, body: bytes, *, where: str = "") -> MessageReceived:
        event = await reader.expect_message(body)
        place = f" in {where}" if where else ""
        self.n.say(reader.label, f"reads {quote(body)} from {event.sender}{place}")
        return event

    def group_batches(self, batches: Iterable[EnvelopeBatch]) -> list[EnvelopeBatch]:
        return [b for b in batches if _is_group(b)]

    # ------------------------------------------------------------ the story

    async def run(self) -> None:
        for step in (
            self.prekeys,
            self.one_to_one,
            self.create_group,
            self.group_messages,
            self.offline_member,
            self.second_device,
            self.remove_member,
            self.hostile_relay,
            self.safety_numbers,
            self.leave_mail_waiting,
            self.relay_forgets,
        ):
            await step()
            await trio.sleep(self.pause)

    async def prekeys(self) -> None:
        self.n.section("Each device creates its keys and publishes the public halves")
        for index, person in enumerate(self.people.values()):
            await person.connect(self.nursery, self.port)
            counts = await self.storage.prekey_counts(person.user_id, 1)
            if index == 0:
                self.n.say(
                    person.label,
                    f"registered (a device list signed by {person.user_id}'s identity key) and "
                    f"uploaded a signed prekey, a last-resort ML-KEM-768 prekey, "
                    f"{counts.one_time} one-time X25519 and {counts.one_time_kem} one-time "
                    "ML-KEM-768 prekeys",
                )
            else:
                self.n.say(
                    person.label,
                    f"did the same ({counts.one_time} + {counts.one_time_kem} one-time prekeys)",
                )
        self.n.note("Private keys never leave a device: each keeps them in its own SQLite store.")

    async def one_to_one(self) -> None:
        alice, bob = self.people["alice"], self.people["bob"]
        self.n.section("A one-to-one chat")
        hello = self.said("Hi Bob! Are you free this weekend?")
        self.n.say("alice", f"-> bob: {quote(hello)}")
        await alice.client.send_direct("bob", hello)
        left = await self.storage.prekey_counts("bob", 1)
        self.n.note(
            "alice's client fetched bob's signed device list and one prekey bundle for bob.1 "
            f"({left.one_time} one-time prekeys left), ran PQXDH (X25519 + ML-KEM-768) and "
            "encrypted with the Double Ratchet:"
        )
        self.relay_since_mark()
        await self.show_read(bob, hello)
        reply = self.said("Yes! I can bring the tent.")
        self.n.say("bob", f"-> alice: {quote(reply)}")
        await bob.client.send_direct("alice", reply)
        self.relay_since_mark()
        await self.show_read(alice, reply)
        self.n.note(
            "The first message carried the handshake (its ML-KEM ciphertext alone is "
            "1,088 bytes); replies carry only a ratchet header."
        )

    async def create_group(self) -> None:
        alice = self.people["alice"]
        self.n.section("A group")
        self.n.say("alice", f"creates {quote(GROUP_TITLE)} with bob, carol and dave")
        self.group_id = await alice.client.create_group(GROUP_TITLE, ["bob", "carol", "dave"])
        self.n.note(
            "The creation is signed by alice's device key; each member gets it with the group "
            "state (a welcome) one-to-one, after alice's client starts sessions with carol and "
            "dave from their bundles:"
        )
        created = self.relay_since_mark()
        # Kept, as a hostile relay keeps what it relays, to replay it later.
        self.creation_for_bob = next(
            b for b in created if any(d.user_id == "bob" for d in b.deliveries)
        )
        for name in ("bob", "carol", "dave"):
            event = await self.people[name].expect(
                GroupUpdated, lambda e: e.joined and e.group_id == self.group_id
            )
            state = self.people[name].client.group(self.group_id)
            self.n.say(
                name + ".1",
                f"joined {quote(state.title)} (added by {event.author.user_id}; members: "
                f"{', '.join(state.user_ids)}; admin: {', '.join(state.admins)})",
            )

    async def send_to_group(self, sender: str, text: str, readers: Sequence[Person]) -> bytes:
        body = self.said(text)
        self.n.say(sender, f"-> {GROUP_TITLE}: {quote(text)}")
        await self.people[sender].client.send_group(self.group_id, body)
        self.relay_since_mark()
        for reader in readers:
            await self.show_read(reader, body)
        return body

    async def group_messages(self) -> None:
        p = self.people
        self.n.section("Group messages: encrypted once, fanned out by the relay")
        self.n.note(
            "A member's first group message first sends its sender key to every other member's "
            "devices (one-to-one); the message itself is encrypted once for everyone:"
        )
        await self.send_to_group("alice", "Who's bringing the tent?", [p["bob"], p["carol"]])
        await p["dave"].expect_message(self.plaintexts[-1])
        await self.send_to_group("bob", "Me! It sleeps four.", [p["alice"], p["dave"]])
        await p["carol"].expect_message(self.plaintexts[-1])
        self.n.note("From now on each message is one upload; the relay copies it to each device:")
        await self.send_to_group("alice", "Perfect. We leave at 10.", [p["carol"]])
        for name in ("bob", "dave"):
            await p[name].expect_message(self.plaintexts[-1])

    async def offline_member(self) -> None:
        p = self.people
        dave = p["dave"]
        self.n.section("A member offline catches up")
        await dave.disconnect()
        self.n.say("dave", "goes offline")
        first = await self.send_to_group("carol", "I'll bring snacks.", [p["alice"]])
        await p["bob"].expect_message(first)
        second = await self.send_to_group("alice", "Dave, you're on maps.", [p["bob"]])
        await p["carol"].expect_message(second)
        waiting = self.storage.mailbox(dave.address)
        self.n.say(
            "relay",
            f"holds {plural(len(waiting), 'envelope')} ({sum(waiting):,} bytes) for dave.1, "
            "until dave.1 fetches them (at most 72 hours)",
        )
        await dave.connect(self.nursery, self.port)
        self.n.say("dave", "comes back online")
        await self.show_read(dave, first, where=GROUP_TITLE)
        await self.show_read(dave, second, where=GROUP_TITLE)
        await self.mailbox_drained(dave.address)
        self.n.say(
            "relay",
            "holds nothing for dave.1: each envelope was deleted when dave's client "
            "acknowledged it, which it does only after saving it",
        )

    async def second_device(self) -> None:
        p = self.people
        alice, bob, desktop = p["alice"], p["bob"], self.desktop
        self.n.section("A second device: alice's desktop")
        core = ClientCore.create_linked(
            "alice", 2, alice.client.core.user_identity_public, now=int(time.time())
        )
        await alice.client.link_device(core.device_entry)
        self.n.say(
            "alice.1",
            "signed a new device list naming alice.2 (the desktop's own identity key) "
            "and uploaded it",
        )
        await desktop.connect(self.nursery, self.port, core)
        counts = await self.storage.prekey_counts("alice", 2)
        self.n.say(
            "alice.2",
            f"connected and uploaded its own prekeys ({counts.one_time} + {counts.one_time_kem})",
        )
        synced = await desktop.expect(GroupUpdated, lambda e: e.joined)
        self.n.say(
            "alice.2",
            f"asked alice.1 for her groups: now holds {quote(GROUP_TITLE)} "
            f"(epoch {desktop.client.group(synced.group_id).epoch}, the same signed state as "
            "alice.1) and alice.1's sender key; the others send theirs with their next message",
        )
        question = self.said("Alice, did you get the train tickets?")
        self.n.say("bob", f"-> alice: {quote(question)}")
        await bob.client.send_direct("alice", question)
        added = await bob.expect(DeviceAdded, lambda e: e.address == desktop.address)
        self.n.note(
            "The relay refused bob's first try (alice's devices had changed); bob's client "
            f"fetched the new list, checked alice's signature on it, saw {added.address} "
            "added, started a session with it and sent again:"
        )
        self.relay_since_mark()
        await self.show_read(alice, question)
        await self.show_read(desktop, question)
        answer = self.said("Yes, two tickets for Saturday.")
        self.n.say("alice.1", f"-> bob: {quote(answer)}")
        await alice.client.send_direct("bob", answer)
        self.relay_since_mark()
        await self.show_read(bob, answer)
        copy = await desktop.expect(MessageSentByOtherDevice, lambda e: e.body == answer)
        self.n.say(
            "alice.2",
            f"shows {quote(answer)} as sent to {copy.to_user} "
            f"from {copy.device}, from the copy it was sent",
        )
        self.n.note(
            "History is not copied to a new device: it reads what is sent after it was linked."
        )

    async def remove_member(self) -> None:
        p = self.people
        alice, bob, carol, dave = p["alice"], p["bob"], p["carol"], p["dave"]
        self.n.section("A member removed: sender keys rotate")
        # dave's state before the removal, as a dishonest dave could have kept it.
        dave_before = ClientCore.load(dave.store.records())
        self.n.say("alice", f"removes dave from {quote(GROUP_TITLE)}")
        await alice.client.remove_member(self.group_id, "dave")
        self.relay_since_mark()

        def removed(event: GroupUpdated) -> bool:
            return any(isinstance(c, MemberRemoved) and c.user_id == "dave" for c in event.changes)

        # It takes effect for alice when the relay's receipt for it comes back: her next
        # message must not leave before (under load it did, still to dave, on the old key).
        await alice.expect(GroupUpdated, removed)
        for person in (bob, carol, dave):
            await person.expect(GroupUpdated, removed)
            remaining = ", ".join(alice.client.group(self.group_id).user_ids)
            seen = "he was removed" if person is dave else f"members are now {remaining}"
            self.n.say(person.label, f"verified alice's signed change: {seen}")
        self.n.note(
            "dave held everyone's sender keys, so each remaining member drops its own and "
            "makes a new one for its next message, sent only to the remaining devices:"
        )
        old_chain = self._last_chain("alice")
        after = self.said("New plan: we meet at 9.")
        self.n.say("alice", f"-> {GROUP_TITLE}: {quote(after)}")
        await alice.client.send_group(self.group_id, after)
        (group_batch,) = self.group_batches(self.relay_since_mark())
        new_chain = SenderKeyMessage.decode(group_batch.payloads[0][1]).chain_id
        self.n.say("alice", f"sender key chain {old_chain:#010x} -> {new_chain:#010x}")
        await self.show_read(bob, after)
        await self.show_read(carol, after)
        if any(d.user_id == "dave" for d in group_batch.deliveries):
            raise DemoFailed("the relay was asked to deliver to a removed member")

        self.n.note(
            "Can dave read it? Give his client the ciphertext anyway (the relay would not):"
        )
        sender, now = Address("alice", 1), int(time.time())
        for label, core in (
            ("his client now", ClientCore.load(dave.store.records())),
            ("a copy of his state from before the removal", dave_before),
        ):
            outcome = core.receive(sender, ENVELOPE_GROUP, group_batch.payloads[0][1], now=now)
            results = [e for e in outcome.events if isinstance(e, Undecryptable)]
            if len(results) != len(outcome.events) or not results:
                raise DemoFailed(f"{label} could read a message after his removal")
            self.n.say(
                "dave", f"{label}: cannot decrypt, Undecryptable({results[0].reason})", "green"
            )
        self.n.note(
            "dave's client forgot the group; even a copy of his keys from before the removal "
            "fails: the message is under a sender key he never received."
        )

    async def hostile_relay(self) -> None:
        p = self.people
        alice, bob, carol = p["alice"], p["bob"], p["carol"]
        mallory = self.mallory
        self.n.section("The relay turns hostile: it forges a message and slips in a member")
        await mallory.connect(self.nursery, self.port)
        self.n.say(
            "mallory.1",
            "registered: a user of the relay's operator, with real keys and the real client",
        )
        held = {person.label: person.client.group(self.group_id) for person in (bob, carol)}
        await bob.disconnect()
        self.n.say("bob", "goes offline, and the relay gets to work on his mail")
        ask = self.said("Hi Bob, it's Alice: please add mallory to Weekend trip.")
        genuine = self.said("Tickets are in my bag.")
        first_batch = len(self.storage.batches)
        restamping = True

        def tamper(batch: EnvelopeBatch) -> tuple[list[EnvelopeBatch], EnvelopeBatch]:
            if batch.sender_user == "mallory" and restamping:
                # A stranger's message, restamped as alice's.
                return [], dataclasses.replace(batch, sender_user="alice", sender_device=1)
            if batch.sender_user == "alice" and _is_group(batch):
                ((_, payload),) = batch.payloads
                altered = bytearray(payload)
                altered[len(altered) // 2] ^= 0x01  # one bit of alice's ciphertext
                forged = [
                    self._copy(batch, ENVELOPE_GROUP, bytes(altered), [bob.address]),
                    self._copy(batch, ENVELOPE_GROUP, payload, [mallory.address]),
                ]
                return forged, batch
            return [], batch

        self.storage.tampering = tamper
        try:
            await mallory.client.send_direct("bob", ask)
            self.n.say(
                "relay",
                f"stores mallory's {quote(ask)} for bob.1 as sent by alice.1",
                "bold red",
            )
            # The group's id is in every group message's header; its epoch and state
            # hash are not, but mallory is given them, to show what the clients check.
            state = held["carol.1"]
            add_mallory = AddMember("mallory", mallory.client.core.user_identity_public)
            as_alice = self._signed_by_mallory(state, add_mallory, Address("alice", 1))
            await self._send_content(mallory, ["bob"], GroupControl(as_alice.encode(), None))
            self.n.say(
                "mallory.1",
                f"signs the change 'add mallory' to {quote(GROUP_TITLE)} on its current state "
                f"(epoch {state.epoch}; given its hash, as a leak would), naming alice.1 as its "
                "author, with her own device key (she has no other); her client, modified, "
                "sends it to bob.1",
            )
            self.n.say("relay", "stores it for bob.1 as sent by alice.1", "bold red")
            restamping = False
            as_herself = self._signed_by_mallory(state, add_mallory, mallory.address)
            await self._send_content(
                mallory, ["bob", "carol"], GroupControl(as_herself.encode(), None)
            )
            self.n.say("mallory.1", "signs it as its author and sends it to bob.1 and carol.1")
            replay = self.creation_for_bob
            if replay is None:
                raise DemoFailed("the relay kept no creation to replay")
            await self.storage.enqueue(
                self._copy(replay, ENVELOPE_DIRECT, replay.payloads[0][1], [bob.address]),
                max_mailbox_size=1 << 20,
            )
            self.n.say(
                "relay",
                "queues for bob.1 a replay of alice's genuine change that created the group "
                "(with dave in it)",
                "bold red",
            )
            await alice.client.send_group(self.group_id, genuine)
            self.n.say("alice", f"-> {GROUP_TITLE}: {quote(genuine)}")
            self.n.say(
                "relay",
                "queues for bob.1, before it, a copy with one bit changed, as from alice.1; "
                "and queues the message for mallory.1 too, as if she were a member",
                "bold red",
            )
        finally:
            self.storage.tampering = None
        await mallory.disconnect()
        self.relay_since_mark()
        refused = await carol.expect(Undecryptable, lambda e: e.sender == mallory.address)
        self.n.say(
            "carol.1",
            f"mallory's change: refused, Undecryptable({refused.reason}): its author is "
            "not a member, let alone an admin",
            "green",
        )
        await self.show_read(carol, genuine)

        await bob.connect(self.nursery, self.port)
        self.n.say("bob", "comes back online")
        for what, sender in (
            ("the restamped message", alice.address),
            ("the change restamped as alice's", alice.address),
            ("mallory's change", mallory.address),
            ("the altered copy", alice.address),
        ):
            refused = await bob.expect(Undecryptable, sent_by(sender))
            self.n.say(
                "bob.1",
                f"{what}: refused, Undecryptable({refused.reason}); nothing of it reaches bob",
                "green",
            )
        await self.show_read(bob, genuine, where=GROUP_TITLE)
        await self.mailbox_drained(bob.address)
        # Only what the replay could have produced counts: not the connection's state, nor
        # how bob's own messages fared (sent, then confirmed by their recipients).
        shown = [
            e
            for e in bob._unseen
            if not isinstance(
                e, Connected | Disconnected | MessagePending | MessageSent | MessageDelivered
            )
        ]
        if shown:
            raise DemoFailed(f"bob.1 shows something of the replay: {shown!r}")
        self.n.say(
            "bob.1",
            "the replayed creation: dropped as a copy of a message already read (no event)",
            "green",
        )
        for person in (bob, carol):
            state = person.client.group(self.group_id)
            was = held[person.label]
            if (state.epoch, state.state_hash) != (was.epoch, was.state_hash):
                raise DemoFailed(f"{person.label}'s group changed: {state.user_ids}")
            self.n.say(
                person.label,
                f"members of {quote(GROUP_TITLE)}: still {', '.join(state.user_ids)} "
                f"(epoch {state.epoch})",
                "green",
            )
        await self.send_to_group("bob", "See you all at 9.", [alice, carol])
        await mallory.connect(self.nursery, self.port)
        copied = await mallory.expect(Undecryptable, lambda e: e.group_id == self.group_id)
        self.n.say(
            "mallory.1",
            f"gets the group's ciphertext but cannot read it: Undecryptable({copied.reason})",
            "green",
        )
        keys_to_mallory = [
            b
            for b in self.storage.batches[first_batch:]
            if b.sender_user != "mallory"
            and not _is_group(b)
            and any(d.user_id == "mallory" for d in b.deliveries)
        ]
        if keys_to_mallory or any(
            isinstance(e, MessageReceived | GroupUpdated) for e in bob._unseen + mallory._unseen
        ):
            raise DemoFailed("mallory got a sender key, or a forged message reached an app")
        self.n.say(
            "mallory.1",
            "no member's client sent her a sender key (0 one-to-one envelopes to her)",
            "green",
        )
        self.n.note(
            "A message is accepted only under the keys of the session or sender key it "
            "claims, so the relay can neither change one bit nor put words in alice's mouth; "
            "a group change only if an admin's device signed it on the state the member "
            "holds, once; and members send their sender keys only to the devices of the "
            "members in that signed state: a copy to a device of the relay's choosing is noise."
        )
        await mallory.disconnect()

    def _signed_by_mallory(
        self, state: GroupState, action: AddMember, author: Address
    ) -> ControlMessage:
        """A change of the group on ``state``, naming ``author``, signed by mallory's device."""
        return ControlMessage.sign(
            self.mallory.client.core.account.identity,
            group_id=self.group_id,
            parent_epoch=state.epoch,
            parent_hash=state.state_hash,
            author_user_id=author.user_id,
            author_device_id=author.device_id,
            action=action,
        )

    @staticmethod
    async def _send_content(person: Person, to_users: Sequence[str], content: GroupControl) -> None:
        """What a modified client sends: ``content`` one-to-one to every device of
        ``to_users``, in its real sessions (the library sends a change only as an admin)."""
        client = person.client
        connection = await client._wait_ready()
        async with client._prepare_lock:
            await client._prepare(connection, to_users)
        async with client._lock:
            devices = [a for user in to_users for a in client.core.devices_of(user)]
            sends = client.core._sessions.encrypt_for(devices, content.encode(), client.now())
            await client._commit(client.core.take_changes(), sends=list(sends))
        client._wake.set()  # the outbox sends it, as any send
        await client._wait_for_flush(connection)

    def _copy(
        self, batch: EnvelopeBatch, kind: int, payload: bytes, to: Sequence[Address]
    ) -> EnvelopeBatch:
        """A send of ``payload`` to ``to``, as ``batch``'s sender, made up by the relay."""
        deliveries = tuple(Delivery(a.user_id, a.device_id, secrets.token_bytes(16), 0) for a in to)
        return dataclasses.replace(
            batch,
            payloads=((kind, payload),),
            deliveries=deliveries,
            device_list_counters={},
        )

    def _last_chain(self, user_id: str) -> int:
        for batch in reversed(self.group_batches(self.storage.batches)):
            if batch.sender_user == user_id:
                return SenderKeyMessage.decode(batch.payloads[0][1]).chain_id
        raise DemoFailed(f"{user_id} has sent no group message")

    async def safety_numbers(self) -> None:
        alice, bob = self.people["alice"].client, self.people["bob"].client
        self.n.section("alice and bob compare safety numbers (in person or on a call)")
        theirs = alice.safety_number("bob").grouped()
        ours = bob.safety_number("alice").grouped()
        self.n.say("alice", f"sees {theirs}")
        self.n.say("bob", f"sees {ours}")
        if theirs != ours:
            raise DemoFailed("the safety numbers differ")
        self.n.note(
            "They match, so no one in between (the relay included) swapped their identity "
            "keys. A mismatch would mean someone did."
        )

    async def leave_mail_waiting(self) -> None:
        carol, bob = self.people["carol"], self.people["bob"]
        self.n.section("Mail that waits too long")
        await carol.disconnect()
        self.n.say("carol", "goes offline, and stays away")
        last = self.said("Carol, the tickets are on me.")
        self.n.say("bob", f"-> carol: {quote(last)}")
        await bob.client.send_direct("carol", last)
        self.relay_since_mark()
        self.n.note(
            "The relay seals everything it keeps about a queued envelope (its ciphertext, "
            "sender, recipient, kind and times) under the keys of the hour it arrived in, "
            "and files it under an index that only that hour's keys connect to carol.1."
        )

    async def relay_forgets(self) -> None:
        carol = self.people["carol"]
        self.n.section("The relay forgets")
        seized = os.path.join(self.workdir, "seized")
        os.mkdir(seized)
        for suffix in ("", "-wal", ".keys"):
            if os.path.exists(self.db_path + suffix):
                shutil.copy(self.db_path + suffix, os.path.join(seized, "relay.db" + suffix))
        self.n.say(
            "someone",
            "copies the relay's disk (relay.db and its key file), as a warrant, a backup or "
            "a snapshot of the machine would",
        )
        copy = await trio.to_thread.run_sync(
            lambda: SqliteDatabase(os.path.join(seized, "relay.db"), clock=self.clock.ms)
        )
        waiting = copy.pending("carol", 1, after_seq=0, limit=10, now=self.clock.ms())
        copy.close()
        if len(waiting) != 1:
            raise DemoFailed("the copy of the relay's disk does not show carol's envelope")
        envelope, epoch = waiting[0].envelope, waiting[0].epoch
        sent = time.strftime("%H:%M", time.localtime(envelope.server_ts / 1000))
        self.n.say(
            "someone",
            f"with both files, reads that carol.1 has 1 envelope from {envelope.sender_user}."
            f"{envelope.sender_device}, sent at {sent} ({len(envelope.payload):,} bytes of "
            "end-to-end ciphertext): who wrote to whom and when, not what",
        )
        chain = self.storage.database.key_chain
        self.clock.offset += DEFAULT_RETENTION_SECONDS * 1000 + chain.epoch_ms
        await self.storage.purge_expired(self.clock.ms())
        state = read_key_file(self.storage.database.key_file or "")
        if state is None or state.epoch <= epoch:
            raise DemoFailed("the relay still holds the keys of carol's envelope")
        self.n.say(
            "relay",
            f"72 hours later: deleted the envelope that waited unread for carol.1, with its "
            f"epoch; its key file now holds epoch {state.epoch}: the keys of epoch {epoch} are "
            "gone from it and from the relay's memory",
        )
        if self._open_seized_row(seized, KeyChain(state)):
            raise DemoFailed("the copy still opens with the relay's key file of today")
        self.n.say(
            "someone",
            "the copy from 72 hours ago, with the relay's key file of today: carol's "
            f"envelope is filed under epoch {epoch}, which the key file cannot derive (its "
            "chain only runs forwards); the row opens under none of its keys, and its "
            "mailbox index names no one",
            "green",
        )
        await carol.connect(self.nursery, self.port)
        told = await carol.expect(MailExpired)
        self.n.say(
            "carol.1",
            f"comes back online and is told: {plural(told.count or 0, 'message')} sent to her "
            f"at {time.strftime('%H:%M', time.localtime(told.first_ts / 1000))} expired "
            "unread (MailExpired)",
        )
        self.n.note(
            "A relay that is seized reveals who wrote to whom only for the mail it still "
            "holds, never for mail older than its retention window, from any copy."
        )
        for person in [*self.people.values(), self.desktop]:
            if person.online:
                await person.disconnect()
        self.n.say("everyone", "closes the app; the relay shuts down")

    def _open_seized_row(self, seized: str, keys_now: KeyChain) -> bool:
        """Whether a delivery row of the seized copy opens with ``keys_now`` (its epoch's
        keys, or any key of the retention window it derives)."""
        db = sqlite3.connect(f"file:{os.path.join(seized, 'relay.db')}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT seq, epoch, mailbox, payload_id, sealed FROM deliveries")
            for seq, row_epoch, mailbox, payload_id, sealed in rows.fetchall():
                if keys_now.keys(row_epoch) is not None:
                    return True
                window = range(keys_now.held_epoch, keys_now.held_epoch + EPOCHS_PER_RETENTION + 2)
                for epoch in window:
                    keys = keys_now.keys(epoch)
                    if keys and open_delivery(keys, seq, mailbox, payload_id, sealed):
                        return True
        finally:
            db.close()
        return False


def scan_relay_file(
    path: str, n: Narrator, storage: ObservedStorage, plaintexts: list[bytes], now: int
) -> bool:
    """Report what the relay's database holds; True if no plaintext is in it."""
    n.section("What the relay holds")
    files = [f for f in (path, path + "-wal", path + "-shm", path + ".keys") if os.path.exists(f)]
    contents = b"".join(open(f, "rb").read() for f in files)  # noqa: SIM115
    report = relay_report(path, path + ".keys", now)
    n.say("relay", f"{os.path.basename(path)}: {len(contents):,} bytes on disk with its key file")
    n.say(
        "relay",
        f"{report.users} users, {report.devices} devices: public identity keys, signed device "
        f"lists; public prekeys: {report.one_time_prekeys} one-time X25519, "
        f"{report.one_time_kem_prekeys} one-time ML-KEM-768",
    )
    since = report.keys_since
    keys = (
        "" if since is None else time.strftime(" from %Y-%m-%d %H:%M", time.localtime(since / 1000))
    )
    n.say(
        "relay",
        f"{plural(report.envelopes, 'envelope')} waiting for delivery; its key file derives "
        f"the keys of mail accepted{keys} on, none earlier ('hushchat relay report' says what "
        "a seizure of the relay reveals)",
    )
    found = [p for p in plaintexts if p in contents]
    if found:
        n.say("relay", f"PLAINTEXT FOUND in the file: {found!r}", "bold red")
    else:
        n.say(
            "relay",
            f"none of the {len(plaintexts) - 1} messages of this demo, nor the group's title, "
            "appears anywhere in the file, its journal or its key file (searched byte for byte)",
            "green",
        )
    n.section("What the relay deleted")
    n.say(
        "relay",
        f"queued {storage.queued_envelopes} envelopes over the demo and deleted "
        f"{storage.deleted_envelopes} of them on delivery, with their "
        f"{storage.deleted_payloads} distinct ciphertexts ({storage.deleted_bytes:,} bytes), "
        "overwritten in the file (SQLite secure_delete; the journal is emptied on close), "
        "not merely marked free"
        + (
            f", and {plural(storage.expired_envelopes, 'envelope')} at expiry, with the keys "
            "that sealed it"
            if storage.expired_envelopes
            else ""
        ),
    )
    n.note(
        "What a relay does see is metadata: who sends to whom, when, how much, and which "
        "devices each group message goes to. It cannot read or forge the messages, the "
        "group's title or its signed membership changes."
    )
    return not found


async def run_demo(relay_db: str | None, out: TextIO, palette: Palette, pause: float = 0.0) -> int:
    """Run the whole demo (``pause``: seconds between steps); 0 if all happened as narrated."""
    started = time.monotonic()
    n = Narrator(out, palette, width=min(100, max(60, shutil.get_terminal_size((100, 24)).columns)))
    if relay_db is not None and os.path.exists(relay_db):
        print(f"demo: {relay_db} exists; give a path for a new relay database", file=out)
        return 2
    with tempfile.TemporaryDirectory(prefix="hushchat-demo-") as workdir:
        db_path = relay_db or os.path.join(workdir, "relay.db")
        print(
            palette.paint("bold", "hushchat demo")
            + ": a relay and four people on this machine; everything below happens over TCP.",
            file=out,
        )
        clock = DemoClock()
        storage = ObservedStorage(
            await trio.to_thread.run_sync(lambda: SqliteDatabase(db_path, clock=clock.ms))
        )
        failure: DemoFailed | None = None
        try:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(serve_observed_relay, storage, clock)
                n.say("relay", f"listening on {HOST}:{port}, database {db_path}")
                demo = Demo(nursery, port, storage, workdir, n, pause, clock=clock, db_path=db_path)
                try:
                    await demo.run()
                except DemoFailed as exc:
                    failure = exc
                nursery.cancel_scope.cancel()  # the relay, and any client still online
            demo.close()
        finally:
            await storage.aclose()
        if failure is not None:
            n.say("demo", f"FAILED: {failure}", "bold red")
            return 1
        clean = scan_relay_file(db_path, n, storage, demo.plaintexts, clock.ms())
        if relay_db is not None:
            n.note(f"The relay's database stays at {relay_db}: open it with sqlite3 to look.")
    print(file=out)
    print(f"demo finished in {time.monotonic() - started:.1f} s", file=out)
    return 0 if clean else 1
