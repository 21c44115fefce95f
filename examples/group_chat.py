"""A terminal group chat on hushchat's client library, and a narrated demo of it.

    python examples/group_chat.py demo [--relay-db PATH]
    python examples/group_chat.py chat --relay HOST:PORT --name NAME [--state DIR] [--link]
        [--invite TOKEN] [--relay-name NAME]
    python examples/group_chat.py export FILE --name NAME [--state DIR]
    python examples/group_chat.py import FILE --name NAME [--state DIR]

``demo`` starts a relay on loopback and several users, and narrates what
happens, in a few seconds (group_chat_demo.py). ``chat`` is a real client:
start a relay (``hushchat relay --port 7400``), then one chat per person in
its own terminal::

    python examples/group_chat.py chat --relay 127.0.0.1:7400 --name alice
    python examples/group_chat.py chat --relay 127.0.0.1:7400 --name bob

Type /help in a chat for its commands. A device's keys, sessions and groups
live in --state DIR (default ~/.hushchat/NAME, or a folder named after a
readable part of NAME and its hash when NAME is not a plain file name), so a
chat started again is the same device, and receives what was sent while it
was away. ``chat --link`` starts a second device of an existing user: it
shows a code to type on the first device (``/link CODE``; device_link.py
says what the code proves). ``export`` writes the device to FILE sealed
with a passphrase, ``import`` makes a new state folder from such a file.

The state folder's store is encrypted (ClientStore.open's key): with a key
derived from a passphrase the chat asks for (scrypt, its salt in
DIR/store.salt), or taken from the environment variable HUSHCHAT_STORE_KEY
(--key-env names another): 64 hex digits there are the key itself, anything
else a passphrase.

Exit status: 0 after /quit, 1 when the environment stops the chat (no relay
at that address, a damaged or busy state folder, a backup that does not
open), 2 for bad arguments, 130 after Ctrl-C. Each failure is one line on
stderr, and a failed first start leaves no state behind.

How the chat uses the library (hushchat.transport.client):

* ``Client(store, device, host, port)`` and ``await nursery.start(client.run)``
  connect it (``open_client`` does the same in one ``async with``; the chat
  starts the client itself so that a failed first connection is reported
  instead of retried forever);
* one task reads ``client.events()`` and prints each event;
* another reads the keyboard (``input()`` in a worker thread, so that trio
  keeps running) and calls ``send_direct``, ``send_group``, ``create_group``...

Only the installed ``protocol`` and ``transport`` packages and the standard
library are used.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import os
import re
import shlex
import sqlite3
import sys
import tempfile
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import assert_never

import trio
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from device_link import (
    LINK_REQUEST_LIFETIME,
    MAX_LINK_REQUESTS,
    LinkRequest,
    codes_match,
    free_device_id,
    link_code,
    throwaway_user_id,
)
from group_chat_demo import run_demo
from state_folder import default_state_dir
from terminal import Palette, wants_colour

from hushchat.protocol import HushchatError
from hushchat.protocol import client_core as core
from hushchat.protocol.client_core import (
    DeviceAdded,
    DeviceRemoved,
    GroupChangeFailed,
    GroupReplaced,
    GroupStateMismatch,
    GroupUpdated,
    IdentityChanged,
    MessageReceived,
    MessageSentByOtherDevice,
    RetryRequested,
    Undecryptable,
)
from hushchat.protocol.client_core import DeviceListNeeded as NoDeviceList
from hushchat.protocol.devices import check_user_id
from hushchat.protocol.errors import InvalidArgument, StateError, UnknownStateVersion
from hushchat.protocol.group import (
    Action,
    AddMember,
    AdminChanged,
    CreateGroup,
    Leave,
    MemberAdded,
    MemberRemoved,
    RemoveMember,
    SetAdmin,
    SetTitle,
    TitleChanged,
)
from hushchat.transport import ConnectionFailure
from hushchat.transport import UnknownUser as NoSuchUser
from hushchat.transport.client.backup import BackupError, export_backup, import_backup
from hushchat.transport.client.client import (
    Client,
    Connected,
    Disconnected,
    MailExpired,
    MessageDelivered,
    MessageNotDelivered,
    MessagePending,
    MessageSent,
    Reregistered,
    SendFailed,
    StoredItemSetAside,
    UnknownToRelay,
    load_or_create_core,
    open_client,
)
from hushchat.transport.client.connection import connect_relay
from hushchat.transport.client.events import StoredEvent
from hushchat.transport.client.rows import encode_event
from hushchat.transport.client.store import (
    ClientStore,
    StoreFailed,
    StoreFull,
    StoreLocked,
    WrongStoreKey,
)
from hushchat.transport.wire.errors import (
    Forbidden,
    InviteRefused,
    RegistrationClosed,
    RelayNameMismatch,
    format_address,
)

try:
    import readline  # line editing and history for input(), where available
except ImportError:  # pragma: no cover - e.g. a Python built without it
    readline = None  # type: ignore[assignment]

# The store key from a passphrase: scrypt (RFC 7914) with the parameters
# OWASP's password storage cheat sheet gives as its minimum (128 MiB, about a
# second), and a random salt kept beside the store.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SALT_FILE = "store.salt"
KEY_ENV = "HUSHCHAT_STORE_KEY"

# How long the first connection may take before the chat gives up.
STARTUP_TIMEOUT = 15.0
# How long a command waits for a lost relay to come back before it fails.
COMMAND_READY_TIMEOUT = 3.0
# How often a new device being linked looks for its key in the user's list.
LINK_POLL_INTERVAL = 1.0
# The state folder's file.
STORE_FILE = "client.db"
# Shorter passphrases are refused for backups: scrypt slows guessing, it cannot make
# a short passphrase strong.
MIN_PASSPHRASE_LENGTH = 8

HELP = """\
Commands:
  /msg NAME text             send a one-to-one message (and make NAME the conversation)
  /to NAME | GROUP           make a person or group the current conversation
  text                       (no slash) send to the current conversation
  /group create NAME USER... create a group with these users (quote a NAME with spaces)
  /groups                    list your groups and their members
  /invite GROUP NAME         add NAME to GROUP (admins only)
  /kick GROUP NAME           remove NAME from GROUP (admins only)
  /leave GROUP               leave GROUP
  /devices [NAME]            list NAME's devices (yours by default)
  /link CODE                 link your new device that shows CODE (chat --link on it)
  /unlink ID                 remove your device ID (see /devices)
  /safety NAME               your safety number with NAME: compare it with NAME in person
  /confirm NAME              accept NAME's new identity key (after comparing safety numbers)
  /help                      this help
  /quit                      leave (Ctrl-D too); messages sent meanwhile wait at the relay
Quote a NAME or GROUP with spaces: /msg "two words" hi"""


class UsageError(Exception):
    """A command typed wrong: the message says how to type it."""


class SetupError(Exception):
    """The chat cannot start: one line for stderr, and the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def shown(name: str) -> str:
    """A user or group name as text shows it: quoted when it has spaces (as it is typed)."""
    if not any(c.isspace() for c in name):
        return name
    return f'"{name}"' if '"' not in name else shlex.quote(name)


def possessive(name: str) -> str:
    """``dan's``, ``"two words"'s``: never ``'dan''s``."""
    return f"{shown(name)}'s"


@dataclass(frozen=True, slots=True)
class Conversation:
    """Where plain text goes: a person (``user``) or a group (``group_id``)."""

    user: str | None = None
    group_id: bytes | None = None


def printable(text: str) -> str:
    """Text made safe for a terminal: control characters (escape codes) replaced.

    Messages, user names and group titles come from other people: printed raw,
    they could move the cursor, rewrite the screen or change the window title.
    """
    return "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text)


def fingerprint(key: bytes) -> str:
    """A short, readable form of a public key (its first 8 bytes in hex)."""
    hex_key = key[:8].hex()
    return " ".join(hex_key[i : i + 4] for i in range(0, len(hex_key), 4))


class Screen:
    """Terminal output that keeps the line being typed intact below incoming messages."""

    def __init__(self, palette: Palette, interactive: bool) -> None:
        self.palette = palette
        self.interactive = interactive
        self.prompt = "> "
        self._reading = False

    def show(self, text: str, style: str = "") -> None:
        """Print ``text`` (lines made printable, then coloured with ``style``)."""
        text = "\n".join(self.palette.paint(style, printable(line)) for line in text.split("\n"))
        if self.interactive and self._reading:
            typed = readline.get_line_buffer() if readline is not None else ""
            # Clear the input line, print above it, then draw the prompt and typing again.
            sys.stdout.write(f"\r\x1b[K{text}\n{self.prompt}{typed}")
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def error(self, text: str) -> None:
        self.show(f"! {text}", "red")

    def info(self, text: str) -> None:
        self.show(f"* {text}", "dim")

    async def read_line(self) -> str | None:
        """The next line typed (None at end of input), without blocking trio."""
        self._reading = True
        try:
            return await trio.to_thread.run_sync(self._input, abandon_on_cancel=True)
        finally:
            self._reading = False

    def _input(self) -> str | None:
        try:
            return input(self.prompt if self.interactive else "")
        except EOFError:  # Ctrl-D, or the end of piped input
            if self.interactive:
                sys.stdout.write("\n")
            return None


# What a GroupStateMismatch's relation means, for its line.
STATE_MISMATCHES = {
    "forked": ": the group is split",
    "unknown": ": older than any state this device keeps",
    "ahead": ": a change was withheld from this device, or the group is split",
}


def describe_action(action: Action, group: str) -> str:
    """Our group change, as the start of a sentence."""
    if isinstance(action, AddMember):
        return f"adding {action.user_id} to {group}"
    if isinstance(action, RemoveMember):
        return f"removing {action.user_id} from {group}"
    if isinstance(action, Leave):
        return f"leaving {group}"
    if isinstance(action, SetAdmin):
        role = "an admin" if action.admin else "no longer an admin"
        return f"making {action.user_id} {role} of {group}"
    if isinstance(action, SetTitle):
        return f"renaming {group} to {action.title!r}"
    if isinstance(action, CreateGroup):
        return f"creating {group}"
    assert_never(action)


def local_time(ms: int) -> str:
    """A relay timestamp (milliseconds since the Unix epoch), in local time."""
    return time.strftime("%a %d %b %H:%M", time.localtime(ms / 1000))


def explain_connect_failure(
    reason: str, relay: str, me: str, detail: str = "", *, invited: bool = False
) -> str:
    """A first connection's failure (its code, and its message), and what to do, in one line.

    ``invited``: a token was given with --invite (the relay does not say why it refused one).
    """
    where = f"the relay at {relay}"
    announced = re.match(r"relay calls itself ('.*?'),", detail)
    if reason == "INVITE_REFUSED" and invited:
        return (
            f"{where} refused the token given with --invite: unknown there, expired or "
            f"already used (each registers one user); ask its operator for another ({reason})"
        )
    explained = {
        "CONNECTION_REFUSED": f"nothing listens at {relay}: is `hushchat relay` "
        "running there, on that port?",
        "UNKNOWN_HOST": f"unknown host in {relay}: check the name in --relay",
        "HOST_UNREACHABLE": f"{relay} is unreachable (no route): check the address "
        "and this machine's network",
        "TLS_FAILED": f"TLS with {where} failed: its certificate is not trusted here",
        "CONNECT_TIMEOUT": f"{where} did not answer in time: is it a hushchat relay, and "
        "is a firewall dropping the connection?",
        "CONNECT_FAILED": f"cannot connect to {where}",
        "CONNECTION_CLOSED": f"{where} closed the connection: is it a hushchat relay?",
        "RELAY_TIMEOUT": f"{where} stopped answering: try again",
        "REGISTRATION_CLOSED": f"{where} registers no new users: its operator decides who "
        "may, or use the --state folder of a user it knows",
        "INVITE_REFUSED": f"{where} registers new users by invitation: give the token its "
        "operator issued with --invite TOKEN (each registers one user)",
        "RELAY_NAME_MISMATCH": f"{where} calls itself "
        f"{announced.group(1) if announced else 'by another name'}: dial it by that name, "
        "or give that name with --relay-name, or it is not the relay you mean",
    }
    if reason in explained:
        return f"{explained[reason]} ({reason})"
    if reason in ("DEVICE_LIST_REJECTED", "FORBIDDEN", "AUTH_FAILED"):
        return (
            f"{where} refused {shown(me)} ({reason}): is the name taken by someone "
            "else? Choose another --name, or the --state folder that holds this name."
        )
    return f"cannot connect to {where} ({reason})"


class Chat:
    """One person's chat: shows events, runs commands."""

    def __init__(
        self, client: Client, screen: Screen, relay: str, state_dir: str, *, invited: bool = False
    ) -> None:
        self.client = client
        self.invited = invited  # a token was given with --invite (to explain a refusal)
        self.screen = screen
        self.relay = relay
        # Events come at least once: the last one shown before a restart comes again
        # (the library deletes an event when the next is taken). Remember it, to skip it.
        self.last_shown_path = os.path.join(state_dir, "last_shown")
        self.me = client.address.user_id
        self.current: Conversation | None = None
        # Titles of the groups we hold (kept after we leave one, to name it in messages).
        self.titles = {gid: client.group(gid).title for gid in client.core.group_ids}
        # New identity keys we have warned about, by user (until /confirm).
        self.pending_identity: dict[str, bytes] = {}
        # Groups we were in and are not any more, with why (to answer /to and typing).
        self.gone: dict[bytes, str] = {}
        # New devices asking to be linked: (when, sender, request), newest last.
        # The group that was the current conversation when we were removed from it.
        self.current_gone: bytes | None = None
        self.link_requests: deque[tuple[float, str, LinkRequest]] = deque(maxlen=MAX_LINK_REQUESTS)
        # What we sent that is not sent yet (by message id), as it was shown.
        self.unsent: dict[bytes, str] = {}
        self.sent_lines: dict[bytes, str] = {}
        self.waiting: dict[bytes, str] = {}  # pending before its command showed it
        self.connected = False  # the first connection succeeded
        self.online = False
        self.connections = 0
        self.failure: str | None = None
        self.failure_detail = ""  # the refusal's own words, where they say more than its code
        self.failure_message = ""
        self._failed = trio.Event()
        self.commands: dict[str, Callable[[str], Awaitable[None]]] = {
            "/msg": self.cmd_msg,
            "/to": self.cmd_to,
            "/group": self.cmd_group,
            "/groups": self.cmd_groups,
            "/invite": self.cmd_invite,
            "/kick": self.cmd_kick,
            "/leave": self.cmd_leave,
            "/devices": self.cmd_devices,
            "/link": self.cmd_link,
            "/unlink": self.cmd_unlink,
            "/safety": self.cmd_safety,
            "/confirm": self.cmd_confirm,
            "/help": self.cmd_help,
        }

    # ------------------------------------------------------------ connecting

    async def start(self, nursery: trio.Nursery) -> bool:
        """Connect for the first time; False (and why, in ``failure_message``) if that fails."""
        with trio.move_on_after(STARTUP_TIMEOUT):
            async with trio.open_nursery() as race:

                async def connect() -> None:
                    try:
                        await nursery.start(self.client.run)
                    except (
                        RegistrationClosed,
                        InviteRefused,
                        RelayNameMismatch,
                        Forbidden,
                    ) as refused:
                        # What the client does not retry: no later attempt would differ.
                        self.failure, self.failure_detail = refused.code, refused.message
                        race.cancel_scope.cancel()
                        return
                    self.connected = True
                    race.cancel_scope.cancel()

                async def give_up() -> None:
                    await self._failed.wait()
                    race.cancel_scope.cancel()

                race.start_soon(connect)
                race.start_soon(give_up)
        if self.connected:
            device = self.client.address
            self.screen.info(f"connected to {self.relay} as {device.user_id} (device {device})")
            return True
        self.failure_message = self._explain_failure(self.failure or "CONNECT_TIMEOUT")
        return False

    def _explain_failure(self, reason: str) -> str:
        return explain_connect_failure(
            reason, self.relay, self.me, self.failure_detail, invited=self.invited
        )

    # ------------------------------------------------------------ events

    async def show_events(self) -> None:
        try:
            with open(self.last_shown_path, "rb") as file:
                shown_last_time: bytes | None = file.read()
        except FileNotFoundError:
            shown_last_time = None
        first = True
        async for event in self.client.events():
            if isinstance(event, Connected | Disconnected | UnknownToRelay | Reregistered):
                self.show_connection(event)
                continue
            if isinstance(event, MessagePending | MessageSent):
                self.show_progress(event)
                continue
            if isinstance(event, MailExpired):
                self.show_expired(event)  # a notice, never stored: nothing to skip
                continue
            digest = hashlib.sha256(encode_event(event)).digest()
            if not (first and digest == shown_last_time):
                self.show_event(event)
                write_private(self.last_shown_path, digest)
            first = False

    def show_connection(
        self, event: Connected | Disconnected | UnknownToRelay | Reregistered
    ) -> None:
        if isinstance(event, UnknownToRelay):
            self.online = False
            self.screen.error(
                f"the relay refused this device's login ({event.reason}): it does not know "
                "it (it lost its data, or the device was removed); trying again..."
            )
            return
        if isinstance(event, Reregistered):
            self.screen.info("the relay had lost this account: registered it again")
            return
        if isinstance(event, Connected):
            self.connections += 1
            if self.connections > 1:
                self.screen.info("connected to the relay again")
            self.online = True
        elif self.connections == 0:
            self.failure = event.reason  # the first connection failed: start() reports it
            self._failed.set()
        elif self.online:
            self.online = False
            self.screen.error(f"lost the relay ({event.reason}); reconnecting...")

    def show_progress(self, event: MessagePending | MessageSent) -> None:
        """A message of ours waits (said once), or went after waiting."""
        if isinstance(event, MessageSent):
            # Its line stays until it is delivered, or not (MessageNotDelivered names it).
            self.waiting.pop(event.message_id, None)
            line = self.unsent.pop(event.message_id, None)
            if line is not None:
                self.screen.info(f"sent: {line}")
            return
        line = self.sent_lines.get(event.message_id)
        if line is None:
            # Said while the command that sent it still runs: shown with its line.
            self.waiting[event.message_id] = event.reason
        elif event.message_id not in self.unsent:
            self.show_unsent(event.message_id, line, event.reason)

    def show_expired(self, event: MailExpired) -> None:
        """Mail for this device the relay deleted unread: its senders are not told."""
        since = local_time(event.first_ts)
        if event.count is None:
            self.screen.error(
                f"the relay lost what waited for you since {since} (how much is unknown): "
                "ask your contacts to send again what matters"
            )
            return
        messages = "1 message" if event.count == 1 else f"{event.count} messages"
        self.screen.error(
            f"{messages} sent to you from {since} to {local_time(event.last_ts)} expired at "
            "the relay unread: their senders were not told, ask them to send again what matters"
        )

    def show_unsent(self, message_id: bytes, line: str, reason: str) -> None:
        self.unsent[message_id] = line
        why = {
            "NOT_CONNECTED": "the relay is out of reach",
            "MAILBOX_FULL": "a recipient device's mailbox is full; the others have it",
        }.get(reason, reason)
        self.screen.info(f"not sent yet ({why}); it goes by itself later: {line}")

    def show_event(self, event: StoredEvent) -> None:
        if isinstance(event, MessageNotDelivered):
            line = self.sent_lines.pop(event.message_id, "a message")
            devices = ", ".join(str(a) for a in event.devices)
            self.screen.error(f"never delivered to {devices} (it expired unread): {line}")
        elif isinstance(event, MessageDelivered):
            self.sent_lines.pop(event.message_id, None)  # the usual case, not worth a line
        elif isinstance(event, core.DeliveryConfirmed):
            pass  # the client library matched it to what we sent (MessageDelivered)
        elif isinstance(event, StoredItemSetAside):
            what = {"outbox": "a message waiting to go", "inbox": "a message or notice"}.get(
                event.table, f"this device's {event.kind or 'state'}"
            )
            self.screen.error(f"{what} could not be read from disk ({event.reason}); set aside")
        elif isinstance(event, SendFailed):
            unsent = self.unsent.pop(event.message_id, None)
            line = unsent or self.sent_lines.pop(event.message_id, "a message")
            self.screen.error(f"not sent ({event.reason}): {line}")
        elif isinstance(event, MessageReceived):
            self.show_message(event)
        elif isinstance(event, MessageSentByOtherDevice):
            self.screen.show(
                f"you -> {event.to_user}: {event.body.decode(errors='replace')}"
                f"  (from your device {event.device})"
            )
        elif isinstance(event, GroupUpdated):
            self.show_group_update(event)
        elif isinstance(event, IdentityChanged):
            self.warn_identity(event)
        elif isinstance(event, DeviceAdded | DeviceRemoved):
            whose = (
                "you have" if event.address.user_id == self.me else f"{event.address.user_id} has"
            )
            change = "a new device" if isinstance(event, DeviceAdded) else "removed the device"
            self.screen.info(f"{whose} {change} {event.address}")
        elif isinstance(event, Undecryptable):
            where = f" in {self.group_name(event.group_id)}" if event.group_id else ""
            retry = f"; asked {event.sender} to send its key again" if event.retry_requested else ""
            self.screen.error(
                f"could not decrypt a message from {event.sender}{where} ({event.reason}){retry}"
            )
        elif isinstance(event, RetryRequested):
            self.screen.info(
                f"sent our key for {self.group_name(event.group_id)} again to {event.requester}"
            )
        elif isinstance(event, GroupChangeFailed):
            doing = describe_action(event.action, self.group_name(event.group_id))
            self.screen.error(f"{doing} did not take effect ({event.reason})")
        elif isinstance(event, GroupReplaced):
            self.show_replaced(event)
        elif isinstance(event, GroupStateMismatch):
            why = STATE_MISMATCHES.get(event.relation, "")
            self.screen.error(
                f"{event.sender} holds another state of {self.group_name(event.group_id)} "
                f"than this device ({event.relation}{why}); messages may not reach every "
                "member until an admin brings it back to one state"
            )
        else:
            assert_never(event)  # mypy names any event the library adds and this misses

    def show_message(self, event: MessageReceived) -> None:
        sender = event.sender.user_id
        request = LinkRequest.decode(event.body) if event.group_id is None else None
        if request is not None:
            self.link_requests.append((time.monotonic(), sender, request))
            self.screen.info(
                f"a new device asks to become yours ({self.me}.{request.device_id}): if you "
                "started it, type /link and the code it shows; otherwise ignore this"
            )
            return
        body = event.body.decode(errors="replace")
        late = ""
        if time.time() - event.sent_at > 60:
            late = f"  (sent {time.strftime('%a %H:%M', time.localtime(event.sent_at))})"
        if event.group_id is None:
            conversation = Conversation(user=sender)
            line = f"{sender}: {body}{late}"
        else:
            conversation = Conversation(group_id=event.group_id)
            who = "you" if sender == self.me else sender
            line = f"[{self.group_name(event.group_id)}] {who}: {body}{late}"
        if self.current is None:
            self.select(conversation)  # the first message opens its conversation
        self.screen.show(line)

    def show_group_update(self, event: GroupUpdated) -> None:
        # Described from the event alone: the core may already be further on (a removal
        # processed after this event was queued), so its current state may differ.
        gid, author = event.group_id, event.author.user_id
        for change in event.changes:
            if isinstance(change, TitleChanged):
                self.titles[gid] = change.title
        name = self.group_name(gid)
        if event.joined:  # the changes list every member, and the title
            self.gone.pop(gid, None)
            members = ", ".join(c.user_id for c in event.changes if isinstance(c, MemberAdded))
            if self.current is None:
                self.select(Conversation(group_id=gid))
            self.screen.info(f"{author} added you to {name} (members: {members})")
            return
        for change in event.changes:
            if isinstance(change, MemberAdded):
                self.screen.info(f"{author} added {change.user_id} to {name}")
            elif isinstance(change, MemberRemoved):
                if change.user_id == self.me:
                    self.gone[gid] = f"{author} removed you"
                    if self.current == Conversation(group_id=gid):
                        self.select(None)
                        self.current_gone = gid
                if change.user_id == author:
                    self.screen.info(f"{author} left {name}")
                elif change.user_id == self.me:
                    self.screen.info(f"{author} removed you from {name}")
                else:
                    self.screen.info(f"{author} removed {change.user_id} from {name}")
            elif isinstance(change, AdminChanged):
                role = "an admin" if change.admin else "no longer an admin"
                self.screen.info(f"{author} made {change.user_id} {role} of {name}")
            elif isinstance(change, TitleChanged):
                self.screen.info(f"{author} renamed the group to {change.title!r}")

    def show_replaced(self, event: GroupReplaced) -> None:
        # The GroupUpdated that joined us to the new group came first (with its title).
        old, new = self.group_name(event.old_group_id), self.group_name(event.new_group_id)
        author = event.author.user_id
        self.gone[event.old_group_id] = f"{author} continued it in a new group"
        line = f"{author} continued {old} as a new group, {new}"
        if self.current == Conversation(group_id=event.old_group_id):
            self.select(Conversation(group_id=event.new_group_id))
            line += f": now talking to {new}"
        self.screen.info(line)

    def warn_identity(self, event: IdentityChanged) -> None:
        if self.pending_identity.get(event.user_id) == event.new_identity:
            return  # already warned about this key
        self.pending_identity[event.user_id] = event.new_identity
        name = event.user_id
        self.screen.show(
            f"! WARNING: {name}'s identity key has changed. That happens when {name} "
            f"reinstalls, or when someone (even the relay) tries to impersonate {name}.\n"
            f"! Nothing goes to or comes from the new key until you accept it. Compare this "
            f"safety number with the one {name} sees (/safety you), in person or on a call:\n"
            f"!   {self.client.safety_number(name, pending=True).grouped()}\n"
            f"! If they match, type /confirm {name}.",
            "bold red",
        )

    # ------------------------------------------------------------ conversations

    def group_name(self, group_id: bytes | None) -> str:
        if group_id is None:
            return ""
        return "#" + (self.titles.get(group_id) or group_id[:4].hex())

    def select(self, conversation: Conversation | None) -> None:
        self.current = conversation
        self.current_gone = None
        if conversation is None:
            self.screen.prompt = "> "
        elif conversation.user is not None:
            self.screen.prompt = printable(shown(conversation.user)) + "> "
        else:
            self.screen.prompt = printable(self.group_name(conversation.group_id)) + "> "

    def find_group(self, name: str) -> bytes:
        """A group we hold, by title (or by the start of its id in hex, after a '#')."""
        name = name.removeprefix("#")
        held = self.client.core.group_ids
        matches = [g for g in held if self.client.group(g).title == name]
        if not matches:
            matches = [g for g in held if self.client.group(g).title.lower() == name.lower()]
        if not matches:
            matches = [g for g in held if g.hex().startswith(name.lower()) and len(name) >= 4]
        if not matches:
            left = [g for g, title in self.titles.items() if title == name and g in self.gone]
            if left:
                raise UsageError(self.no_longer_in(left[0]))
            raise UsageError(f"you are in no group named {name!r} (/groups lists yours)")
        if len(matches) > 1:
            ids = ", ".join("#" + g[:4].hex() for g in matches)
            raise UsageError(f"several groups are named {name!r}; name one by id: {ids}")
        return matches[0]

    # ------------------------------------------------------------ commands

    async def interact(self) -> None:
        self.screen.info("type /help for commands")
        while True:
            line = await self.screen.read_line()
            if line is None or line.strip() == "/quit":
                return
            line = line.strip()
            if line:
                await self.run_command(line)

    async def run_command(self, line: str) -> None:
        try:
            if not line.startswith("/"):
                await self.send_text(line)
                return
            name, _, rest = line.partition(" ")
            command = self.commands.get(name)
            if command is None:
                raise UsageError(f"unknown command {name}; /help lists the commands")
            await command(rest.strip())
        except UsageError as exc:
            self.screen.error(str(exc))
        except HushchatError as exc:
            self.screen.error(self.explain(exc))

    def explain(self, exc: HushchatError) -> str:
        if isinstance(exc, NoSuchUser):
            return f"no user named {exc.user_id!r} on this relay"
        if isinstance(exc, NoDeviceList):
            return f"no user named {exc.user_id!r} is known"
        if isinstance(exc, ConnectionFailure):
            return "not done: not connected to the relay (it keeps trying; try again soon)"
        return f"{exc.message} ({exc.code})"

    def no_longer_in(self, group_id: bytes) -> str:
        return (
            f"you are no longer in {self.group_name(group_id)} ({self.gone[group_id]}): "
            "/to NAME or GROUP to talk elsewhere"
        )

    def is_held_group(self, name: str) -> bool:
        """Whether ``name`` names a group we were in (held or not), rather than a person."""
        known = {*self.titles.values()}
        return name.startswith("#") or name.removeprefix("#") in known

    async def send_text(self, text: str) -> None:
        if self.current is None and self.current_gone is not None:
            raise UsageError(f"not sent: {self.no_longer_in(self.current_gone)}")
        if self.current is None:
            raise UsageError("no conversation yet: /msg NAME text, or /to NAME or GROUP")
        if self.current.user is not None:
            line = f"you -> {self.current.user}: {text}"
            self.show_sent(line, await self.client.send_direct(self.current.user, text.encode()))
        else:
            assert self.current.group_id is not None
            line = f"[{self.group_name(self.current.group_id)}] you: {text}"
            self.show_sent(line, await self.client.send_group(self.current.group_id, text.encode()))

    def show_sent(self, line: str, message_id: bytes) -> None:
        """A message we sent; events say if it waits, and when it goes."""
        self.sent_lines[message_id] = line
        if len(self.sent_lines) > 1000:  # only the latest can still be waiting for news
            del self.sent_lines[next(iter(self.sent_lines))]
        self.screen.show(line, "dim")
        reason = self.waiting.pop(message_id, None)
        if reason is not None:
            self.show_unsent(message_id, line, reason)

    async def cmd_msg(self, rest: str) -> None:
        user, text = first_word(rest, "usage: /msg NAME text")
        if not text:
            raise UsageError("usage: /msg NAME text")
        message_id = await self.client.send_direct(user, text.encode())
        self.select(Conversation(user=user))
        self.show_sent(f"you -> {shown(user)}: {text}", message_id)

    async def cmd_to(self, rest: str) -> None:
        name = whole_name(rest, "usage: /to NAME or /to GROUP")
        if self.is_held_group(name):
            self.select(Conversation(group_id=self.find_group(name)))
        else:
            await self.client.refresh_device_list(name)  # fails for an unknown name
            self.select(Conversation(user=name))
        self.screen.info(f"now talking to {self.screen.prompt[:-2]}")

    def _words(self, rest: str, usage: str, count: int | None = None) -> list[str]:
        """The words of ``rest``, quotes grouping (shlex); UsageError unless ``count`` of them."""
        try:
            words = shlex.split(rest)
        except ValueError:
            raise UsageError(usage) from None
        if (count is not None and len(words) != count) or not words:
            raise UsageError(usage)
        return words

    async def cmd_group(self, rest: str) -> None:
        usage = "usage: /group create NAME USER..."
        words = self._words(rest, usage)
        if words[0] != "create" or len(words) < 3:
            raise UsageError(usage)
        title, members = words[1], words[2:]
        group_id = await self.client.create_group(title, members)
        self.titles[group_id] = title
        self.select(Conversation(group_id=group_id))
        self.screen.info(f"created {self.group_name(group_id)} with {', '.join(members)}")

    async def cmd_groups(self, rest: str) -> None:
        if not self.client.core.group_ids:
            self.screen.info("you are in no group yet (/group create NAME USER...)")
        for group_id in self.client.core.group_ids:
            state = self.client.group(group_id)
            self.screen.info(
                f"{self.group_name(group_id)} (id #{group_id[:4].hex()}): "
                f"{', '.join(state.user_ids)}; admin: {', '.join(state.admins)}"
            )

    def check_admin(self, group_id: bytes, doing: str) -> None:
        admins = self.client.group(group_id).admins
        if self.me not in admins:
            raise UsageError(
                f"only an admin of {self.group_name(group_id)} can {doing} "
                f"(admins: {', '.join(map(shown, admins))})"
            )

    async def cmd_invite(self, rest: str) -> None:
        group, user = self._words(rest, "usage: /invite GROUP NAME", 2)
        group_id = self.find_group(group)
        self.check_admin(group_id, "add members")
        if user in self.client.group(group_id).user_ids:
            raise UsageError(f"{shown(user)} is already in {self.group_name(group_id)}")
        await self.client.add_member(group_id, user)
        self.screen.info(f"added {user} to {self.group_name(group_id)}")

    async def cmd_kick(self, rest: str) -> None:
        group, user = self._words(rest, "usage: /kick GROUP NAME", 2)
        group_id = self.find_group(group)
        self.check_admin(group_id, "remove members")
        if user not in self.client.group(group_id).user_ids:
            raise UsageError(f"{shown(user)} is not in {self.group_name(group_id)}")
        if user == self.me:
            raise UsageError(f"to leave {self.group_name(group_id)}, use /leave")
        await self.client.remove_member(group_id, user)
        self.screen.info(f"removed {user} from {self.group_name(group_id)}")

    async def cmd_leave(self, rest: str) -> None:
        (group,) = self._words(rest, "usage: /leave GROUP", 1)
        group_id = self.find_group(group)
        name = self.group_name(group_id)
        await self.client.leave_group(group_id)
        self.gone[group_id] = "you left"
        if self.current == Conversation(group_id=group_id):
            self.select(None)
        self.screen.info(f"you left {name}")

    async def cmd_devices(self, rest: str) -> None:
        user = whole_name(rest, "usage: /devices [NAME]") if rest else self.me
        await self.client.refresh_device_list(user)
        devices = self.client.core.device_list(user)
        assert devices is not None  # refresh_device_list raised otherwise
        for device_id in devices.device_ids:
            entry = devices.device(device_id)
            assert entry is not None
            this = (
                "  (this device)"
                if (user, device_id) == (self.me, self.client.address.device_id)
                else ""
            )
            self.screen.info(f"{shown(user)}.{device_id}  key {fingerprint(entry.identity)}{this}")

    async def cmd_link(self, rest: str) -> None:
        (typed,) = self._words(rest, "usage: /link CODE (the code your new device shows)", 1)
        if not self.client.core.holds_user_identity:
            raise UsageError("only your first device can link devices; type /link there")
        now = time.monotonic()
        live = [r for r in self.link_requests if now - r[0] < LINK_REQUEST_LIFETIME]
        if not live:
            raise UsageError(
                "no new device has asked to be linked in the last "
                f"{LINK_REQUEST_LIFETIME / 60:.0f} minutes: start it first "
                "(group_chat.py chat --link --name ... on the new device)"
            )
        own = self.client.core.user_identity_public
        for entry in live:
            _, sender, request = entry
            expected = link_code(self.me, own, request.device_id, request.identity)
            if codes_match(typed, expected):
                break
        else:
            raise UsageError(
                "no new device asking to be linked shows that code: check it, or start "
                "linking again on the new device"
            )
        self.link_requests.remove(entry)
        await self.client.link_device(request.entry)
        self.screen.info(
            f"linked {self.me}.{request.device_id} (asked through {sender}): /devices lists "
            f"it; /unlink {request.device_id} removes it"
        )

    async def cmd_unlink(self, rest: str) -> None:
        (text,) = self._words(rest, "usage: /unlink ID (a device id from /devices)", 1)
        if not text.isdigit():
            raise UsageError("usage: /unlink ID (a device id from /devices)")
        device_id = int(text)
        if device_id == self.client.address.device_id:
            raise UsageError("this is the device you are using; /unlink another one")
        if not self.client.core.holds_user_identity:
            raise UsageError("only your first device can unlink devices")
        devices = self.client.core.device_list(self.me)
        if devices is None or devices.device(device_id) is None:
            raise UsageError(f"you have no device {device_id} (/devices lists yours)")
        await self.client.unlink_device(device_id)
        self.screen.info(f"unlinked {self.me}.{device_id}: it can no longer read or send")

    async def cmd_safety(self, rest: str) -> None:
        (user,) = self._words(rest, "usage: /safety NAME", 1)
        if user == self.me:
            raise UsageError("a safety number is between you and someone else")
        try:
            await self.client.refresh_device_list(user)  # learn of a changed key now
        except ConnectionFailure:
            self.screen.info("(offline: showing the key you already have)")
        number = self.client.safety_number(user).grouped()
        self.screen.show(f"safety number with {user}: {number}")
        # The core keeps a pending change across restarts, so this shows it after one too.
        if self.client.pending_identity(user) is not None:
            pending = self.client.safety_number(user, pending=True).grouped()
            self.screen.show(f"with {user}'s NEW key:    {pending}   (/confirm {user} to accept)")

    async def cmd_confirm(self, rest: str) -> None:
        (user,) = self._words(rest, "usage: /confirm NAME", 1)
        await self.client.confirm_identity(user)
        self.pending_identity.pop(user, None)
        self.screen.info(f"accepted {user}'s new identity key")

    async def cmd_help(self, rest: str) -> None:
        self.screen.show(HELP)


def first_word(rest: str, usage: str) -> tuple[str, str]:
    """The first word of ``rest`` (quotes group: ``"two words" hi``) and the text after it."""
    rest = rest.strip()
    if rest[:1] in ("'", '"'):
        end = rest.find(rest[0], 1)
        if end < 0:
            raise UsageError(f"{usage} (a quote is not closed)")
        return rest[1:end], rest[end + 1 :].strip()
    word, _, text = rest.partition(" ")
    if not word:
        raise UsageError(usage)
    return word, text.strip()


def whole_name(rest: str, usage: str) -> str:
    """``rest`` as one name, quotes removed: ``/to "Weekend trip"`` is ``/to Weekend trip``."""
    name, after = first_word(rest, usage) if rest.strip()[:1] in ("'", '"') else (rest.strip(), "")
    if not name or after:
        raise UsageError(usage)
    return name


def make_private_folder(path: str) -> None:
    """``path`` and every folder created on the way to it, readable by their owner only.

    (os.makedirs gives the folders it creates on the way the umask's mode.)
    """
    missing = []
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            # Another chat made it meanwhile (two started at once under one new parent).
            if not os.path.isdir(folder):
                raise
    os.chmod(path, 0o700)  # the umask may not have removed every other bit


def write_private(path: str, data: bytes) -> None:
    """Replace the contents of the file at ``path``, created readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "wb") as file:
        os.fchmod(fd, 0o600)
        file.write(data)


def relay_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) for argparse."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:7400")
    return host, int(port)


# ------------------------------------------------------------------ state and start


def user_name(text: str) -> str:
    """argparse type: a user name by the protocol's rule for user ids."""
    try:
        return check_user_id(text)
    except InvalidArgument as exc:
        shown_text = text if len(text) <= 40 else text[:40] + "..."
        raise argparse.ArgumentTypeError(f"{shown_text!r}: {exc.message}") from None


def prepare_state_dir(state_dir: str) -> bool:
    """Make the state folder (0700) if needed; True if it was made now."""
    if os.path.lexists(state_dir) and not os.path.isdir(state_dir):
        raise SetupError(f"--state {state_dir} is a file, not a folder: name a folder", 2)
    made = not os.path.exists(state_dir)
    try:
        make_private_folder(state_dir)
    except OSError as exc:
        raise SetupError(f"cannot make the state folder {state_dir}: {exc.strerror}") from None
    return made


def remove_new_state(state_dir: str, made_folder: bool) -> None:
    """Undo a first start that failed: the store it created (and the folder, if it made it)."""
    db = os.path.join(state_dir, STORE_FILE)
    others = [os.path.join(state_dir, name) for name in ("last_shown", SALT_FILE)]
    for path in (db, db + "-wal", db + "-shm", db + ".lock", *others):
        if os.path.lexists(path):
            os.remove(path)
    if made_folder and not os.listdir(state_dir):
        os.rmdir(state_dir)


def store_key(state_dir: str, variable: str, *, new: bool | None = None) -> bytes:
    """The key of the store in ``state_dir``: from ``variable``, else a passphrase asked.

    64 hex digits in the variable are the key itself; anything else there,
    or typed, is a passphrase, stretched with scrypt and the folder's salt.
    A typed one is asked twice for a ``new`` store (by default: when the
    folder holds none yet).
    """
    value = os.environ.get(variable)
    if value is not None and re.fullmatch(r"[0-9a-fA-F]{64}", value):
        return bytes.fromhex(value)
    if value is None:
        if not sys.stdin.isatty():
            raise SetupError(f"no passphrase for the state folder: set {variable}")
        if new is None:
            new = not os.path.exists(os.path.join(state_dir, STORE_FILE))
        value = getpass.getpass("passphrase for this device's messages: ")
        if new and getpass.getpass("the same again: ") != value:
            raise SetupError("the two passphrases differ; nothing was written", 2)
    if not value:
        raise SetupError("an empty passphrase protects nothing", 2)
    salt_path = os.path.join(state_dir, SALT_FILE)
    try:
        with open(salt_path, "rb") as file:
            salt = file.read()
    except FileNotFoundError:
        salt = os.urandom(16)
        write_private(salt_path, salt)
    return Scrypt(salt, 32, SCRYPT_N, SCRYPT_R, SCRYPT_P).derive(value.encode())


def open_store(state_dir: str, key: bytes) -> ClientStore:
    path = os.path.join(state_dir, STORE_FILE)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        # SQLite would take an empty file for a new database, and the chat for a new user.
        raise SetupError(no_device(path))
    try:
        return ClientStore.open(path, key=key)
    except WrongStoreKey:
        raise SetupError(f"that passphrase (or key) does not open {path}") from None
    except StoreLocked:
        raise SetupError(f"{state_dir} is in use by another chat; one device, one chat") from None
    except UnknownStateVersion:
        raise SetupError(f"{path} was written by a newer hushchat; use that version") from None
    except StateError as exc:
        raise SetupError(damaged(path, str(exc))) from None
    except StoreFailed as exc:
        # The library says what failed; SQLite's own words say why.
        if isinstance(exc.__cause__, sqlite3.DatabaseError) and not isinstance(exc, StoreFull):
            raise SetupError(damaged(path, str(exc.__cause__))) from None
        raise SetupError(f"cannot open {path}: {exc.__cause__ or exc}") from None


def no_device(path: str) -> str:
    return (
        f"{path} holds no device (an empty file, or a first start that did not finish); it "
        "is never replaced silently: move it away to start a new device, or import a backup"
    )


def damaged(path: str, why: str) -> str:
    return (
        f"{path} is not a readable hushchat device ({why}): import a backup into a new "
        "--state folder (group_chat.py import), or move the folder away to start a new device"
    )


def load_device(store: ClientStore, name: str, existed: bool) -> core.ClientCore | None:
    """The device in ``store``, checked whole; None for a store this start created."""
    try:
        if not store.has_state():
            if existed:
                raise SetupError(no_device(store.path))
            return None
        device = core.ClientCore.load(store.records())
        store.inbox(), store.outbox()  # every row decodes
    except UnknownStateVersion:
        raise SetupError(f"{store.path} was written by a newer hushchat; use it") from None
    except StateError as exc:
        raise SetupError(damaged(store.path, f"{exc.code}: {exc.message}")) from None
    except StoreFailed as exc:
        raise SetupError(damaged(store.path, str(exc.__cause__ or exc))) from None
    if device.user_id != name:
        raise SetupError(
            f"{store.path} holds {possessive(device.user_id)} device, not {possessive(name)}: "
            "give --name " + shown(device.user_id) + " or another --state",
            2,
        )
    return device


async def link_new_device(
    host: str,
    port: int,
    name: str,
    screen: Screen,
    relay_name: str | None = None,
    invite: str | None = None,
) -> core.ClientCore:
    """A new device of ``name``, linked by its first device (device_link.py); or SetupError.

    ``invite``: a token for the throwaway user that carries the request, at a relay
    that registers by invitation.
    """
    relay = format_address(host, port)
    try:  # say at once why the relay cannot be reached (the client would keep trying)
        async with connect_relay(host, port):
            pass
    except ConnectionFailure as exc:
        raise SetupError(explain_connect_failure(exc.code, relay, name)) from None
    with tempfile.TemporaryDirectory(prefix="hushchat-link-") as folder:
        helper_store = ClientStore.open(os.path.join(folder, STORE_FILE))
        try:
            with trio.move_on_after(STARTUP_TIMEOUT) as startup:
                async with open_client(
                    helper_store,
                    host,
                    port,
                    user_id=throwaway_user_id(),
                    ready_timeout=COMMAND_READY_TIMEOUT,
                    expected_relay_name=relay_name,
                    invite=invite,
                ) as helper:
                    startup.deadline = float("inf")
                    return await ask_to_be_linked(helper, name, screen)
        except (RegistrationClosed, InviteRefused, RelayNameMismatch) as refused:
            why = explain_connect_failure(
                refused.code, relay, name, refused.message, invited=invite is not None
            )
            raise SetupError(f"to ask to be linked, a throwaway user registers: {why}") from None
        except NoSuchUser:
            raise SetupError(
                f"no user named {shown(name)} on {relay}: start that user's first device "
                "without --link"
            ) from None
        finally:
            helper_store.close()
    raise SetupError(f"cannot reach the relay at {relay}: is `hushchat relay` running there?")


async def ask_to_be_linked(helper: Client, name: str, screen: Screen) -> core.ClientCore:
    await helper.refresh_device_list(name)
    devices = helper.core.device_list(name)
    assert devices is not None  # refresh_device_list raised otherwise
    device_id = free_device_id(devices.device_ids)
    if device_id is None:
        raise SetupError(f"{shown(name)} has the most devices a user may have: /unlink one first")
    device = core.ClientCore.create_linked(
        name, device_id, devices.user_identity, now=int(time.time())
    )
    await helper.send_direct(name, LinkRequest.of(device.device_entry).encode())
    code = link_code(name, devices.user_identity, device_id, device.device_identity)
    screen.show(
        f"This will be {name}.{device_id}. On {possessive(name)} first device, type:\n\n"
        f"    /link {code}\n\n"
        f"Waiting up to {LINK_REQUEST_LIFETIME / 60:.0f} minutes (Ctrl-C to give up)...",
        "bold",
    )
    with trio.move_on_after(LINK_REQUEST_LIFETIME):
        while True:
            await trio.sleep(LINK_POLL_INTERVAL)
            try:
                await helper.refresh_device_list(name)
            except ConnectionFailure:
                continue  # the relay is back soon; keep waiting
            entry = (helper.core.device_list(name) or devices).device(device_id)
            if entry is not None and entry.identity == device.device_identity:
                return device
            if entry is not None:
                raise SetupError(f"{name}.{device_id} was linked with another key: start again")
    raise SetupError(f"not linked within {LINK_REQUEST_LIFETIME / 60:.0f} minutes: start again")


async def run_chat(
    host: str,
    port: int,
    name: str,
    state_dir: str,
    palette: Palette,
    link: bool = False,
    key_env: str = KEY_ENV,
    invite: str | None = None,
    relay_name: str | None = None,
) -> int:
    """The chat until /quit; the exit status (SetupError if it cannot start).

    ``invite``: the operator's token for a new user's first registration at a relay
    that registers by invitation; ``relay_name``: the name the relay calls itself,
    where it is dialled by another (its address, say).
    """
    screen = Screen(palette, sys.stdin.isatty() and sys.stdout.isatty())
    made_folder = prepare_state_dir(state_dir)
    existed = os.path.exists(os.path.join(state_dir, STORE_FILE))
    store = None
    connected = False
    try:
        key = store_key(state_dir, key_env)
        store = open_store(state_dir, key) if existed or not link else None
        device = load_device(store, name, existed) if store is not None else None
        if link and device is not None:
            raise SetupError(f"{state_dir} already holds {possessive(name)} device", 2)
        if link:
            device = await link_new_device(host, port, name, screen, relay_name, invite)
            store = open_store(state_dir, key)
        assert store is not None
        if device is None:
            device = load_or_create_core(store, user_id=name)
        client = Client(
            store,
            device,
            host,
            port,
            ready_timeout=COMMAND_READY_TIMEOUT,
            expected_relay_name=relay_name,
            invite=invite,
        )
        address = format_address(host, port)
        chat = Chat(client, screen, address, state_dir, invited=invite is not None)
        stopped: list[HushchatError] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chat.show_events)
                if await chat.start(nursery):
                    connected = True
                    await chat.interact()
                nursery.cancel_scope.cancel()
        except* HushchatError as group:
            # Not a typing mistake but the client stopping (say, the relay sent a list
            # for us that our own key did not sign): say why instead of a traceback.
            stopped = [e for e in group.exceptions if isinstance(e, HushchatError)]
        for exc in stopped:
            screen.error(f"the client stopped: {exc.message} ({exc.code})")
        if not connected:
            raise SetupError(chat.failure_message)
        return 0 if not stopped else 1
    finally:
        if store is not None:
            store.close()
        if not connected and not existed:
            remove_new_state(state_dir, made_folder)


def read_passphrase(prompt: str, *, confirm: bool) -> str:
    """A passphrase from the terminal (not echoed), or the first line of piped input."""
    if sys.stdin.isatty():
        passphrase = getpass.getpass(prompt)
        if confirm and getpass.getpass("the same again: ") != passphrase:
            raise SetupError("the two passphrases differ; nothing was written", 2)
    else:
        passphrase = sys.stdin.readline().rstrip("\n")
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise SetupError(f"a backup passphrase has at least {MIN_PASSPHRASE_LENGTH} characters", 2)
    return passphrase


def run_export(path: str, name: str, state_dir: str, key_env: str) -> int:
    if not os.path.isfile(os.path.join(state_dir, STORE_FILE)):
        raise SetupError(f"{state_dir} holds no device to export (see --state)")
    if os.path.lexists(path):
        raise SetupError(f"{path} exists; a backup never overwrites a file", 2)
    store = open_store(state_dir, store_key(state_dir, key_env))
    try:
        if load_device(store, name, existed=True) is None:
            raise SetupError(f"{state_dir} holds no device to export")
        passphrase = read_passphrase("passphrase for the backup: ", confirm=True)
        info = export_backup(store, path, passphrase)
    finally:
        store.close()
    print(f"wrote {info.user_id}.{info.device_id} to {path}, sealed with your passphrase")
    return 0


def run_import(path: str, name: str, state_dir: str, key_env: str) -> int:
    if not os.path.isfile(path):
        raise SetupError(f"no such backup file: {path}", 2)
    if os.path.lexists(os.path.join(state_dir, STORE_FILE)):
        raise SetupError(f"{state_dir} already holds a device; import into a new --state folder", 2)
    passphrase = read_passphrase(f"passphrase of {path}: ", confirm=False)
    made_folder = prepare_state_dir(state_dir)
    try:
        try:
            imported = import_backup(path, passphrase, os.path.join(state_dir, STORE_FILE))
        except BackupError as exc:
            raise SetupError(exc.message) from None
        imported.close()
        # The imported file is there, but its key is new: asked twice.
        store = open_store(state_dir, store_key(state_dir, key_env, new=True))  # encrypts it now
        try:
            device = load_device(store, name, existed=True)
        finally:
            store.close()
    except SetupError:
        remove_new_state(state_dir, made_folder)
        raise
    assert device is not None
    print(
        f"imported {device.user_id}.{device.device_id} into {state_dir}: start the chat with "
        f"--name {shown(name)}" + ("" if state_dir == default_state_dir(name) else " --state ...")
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="group_chat.py",
        description="hushchat group chat: a narrated demo, a chat, and device backups. "
        "Exit status: 0, 1 when the environment stops it (the reason on stderr), 2 for "
        "bad arguments, 130 after Ctrl-C.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the narrated demo (a relay and four users)")
    demo.add_argument(
        "--relay-db", metavar="PATH", help="keep the relay's database at PATH (default: none)"
    )
    state_help = "this device's state folder (default: ~/.hushchat/NAME)"
    chat = commands.add_parser("chat", help="chat in this terminal through a relay")
    chat.add_argument("--relay", required=True, type=relay_address, metavar="HOST:PORT")
    chat.add_argument("--name", required=True, type=user_name, help="your user name")
    chat.add_argument("--state", metavar="DIR", help=state_help)
    chat.add_argument(
        "--link",
        action="store_true",
        help="start a new device of an existing user NAME: type the code it shows on the "
        "first device (/link CODE) (default: a new user, or the device in --state)",
    )
    chat.add_argument(
        "--invite",
        metavar="TOKEN",
        help="a new user's invitation, for a relay that registers by invitation (from "
        "its operator's `hushchat relay invite`); with --link, for the throwaway user that "
        "asks (default: none)",
    )
    chat.add_argument(
        "--relay-name",
        metavar="NAME",
        help="the name the relay calls itself, where --relay dials it by another, such "
        "as its address (default: the host of --relay)",
    )
    for action, what in (("export", "write"), ("import", "read")):
        backup = commands.add_parser(
            action, help=f"{what} a device backup sealed with a passphrase"
        )
        backup.add_argument("file", help="the backup file")
        backup.add_argument("--name", required=True, type=user_name, help="the user name")
        backup.add_argument("--state", metavar="DIR", help=state_help)
    for command in commands.choices.values():
        if command is not demo:
            command.add_argument(
                "--key-env",
                metavar="NAME",
                default=KEY_ENV,
                help=(
                    "the state folder's messages and keys are encrypted with a key derived "
                    "from a passphrase (scrypt; its salt is in DIR/store.salt), asked in the "
                    "terminal, or taken from the environment variable NAME if it is set: 64 "
                    "hex digits there are the key itself, anything else a passphrase "
                    "(default: %(default)s)"
                ),
            )
    args = parser.parse_args(argv)

    palette = Palette(wants_colour(sys.stdout))
    if args.command == "demo":
        # On a terminal, a short pause between steps makes the story readable as it unfolds.
        pause = 0.5 if sys.stdout.isatty() else 0.0
        status: int = trio.run(run_demo, args.relay_db, sys.stdout, palette, pause)
        return status
    state = args.state or default_state_dir(args.name)
    # Ctrl-C can arrive while readline has the terminal in its own mode: restore it.
    terminal = termios.tcgetattr(sys.stdin) if sys.stdin.isatty() else None
    status = 130  # unless the command returns: Ctrl-C
    try:
        try:
            if args.command == "export":
                status = run_export(args.file, args.name, state, args.key_env)
            elif args.command == "import":
                status = run_import(args.file, args.name, state, args.key_env)
            else:
                host, port = args.relay
                status = trio.run(
                    run_chat,
                    host,
                    port,
                    args.name,
                    state,
                    palette,
                    args.link,
                    args.key_env,
                    args.invite,
                    args.relay_name,
                )
        except SetupError as exc:
            print(f"group_chat.py {args.command}: {exc}", file=sys.stderr)
            status = exc.status
    except* KeyboardInterrupt:  # trio may raise it in an exception group
        print()  # end the line being typed
    finally:
        if terminal is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, terminal)
    return status


if __name__ == "__main__":
    sys.exit(main())
