"""A terminal group chat on hushchat's client library, and a narrated demo of it.

    python examples/group_chat.py demo [--relay-db PATH]
    python examples/group_chat.py chat --relay HOST:PORT --name NAME [--state DIR]

``demo`` starts a relay on loopback and several users, and narrates what
happens, in a few seconds (group_chat_demo.py). ``chat`` is a real client:
start a relay (``hushchat relay --port 7400``), then one chat per person in
its own terminal::

    python examples/group_chat.py chat --relay 127.0.0.1:7400 --name alice
    python examples/group_chat.py chat --relay 127.0.0.1:7400 --name bob

Type /help in a chat for its commands. A device's keys, sessions and groups
live in --state DIR (default ~/.hushchat/NAME), so a chat started again is
the same device, and receives what was sent while it was away.

How the chat uses the library (hushchat.transport.client):

* ``Client(store, core, host, port)`` and ``await nursery.start(client.run)``
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
import hashlib
import os
import shlex
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio
from group_chat_demo import run_demo
from terminal import Palette, wants_colour

from hushchat.protocol import HushchatError
from hushchat.protocol import client_core as core
from hushchat.protocol.client_core import (
    DeviceAdded,
    DeviceRemoved,
    GroupUpdated,
    IdentityChanged,
    MessageReceived,
    MessageSentByOtherDevice,
    RetryRequested,
    Undecryptable,
)
from hushchat.protocol.client_core import DeviceListNeeded as NoDeviceList
from hushchat.protocol.group import AdminChanged, MemberAdded, MemberRemoved, TitleChanged
from hushchat.transport import ConnectionFailure
from hushchat.transport import UnknownUser as NoSuchUser
from hushchat.transport.client.client import Client, Connected, Disconnected, load_or_create_core
from hushchat.transport.client.rows import encode_event
from hushchat.transport.client.store import ClientStore, StoreLocked

try:
    import readline  # line editing and history for input(), where available
except ImportError:  # pragma: no cover - e.g. a Python built without it
    readline = None  # type: ignore[assignment]

# How long the first connection may take before the chat gives up.
STARTUP_TIMEOUT = 15.0
# How long a command waits for a lost relay to come back before it fails.
COMMAND_READY_TIMEOUT = 3.0

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
  /safety NAME               your safety number with NAME: compare it with NAME in person
  /confirm NAME              accept NAME's new identity key (after comparing safety numbers)
  /help                      this help
  /quit                      leave (Ctrl-D too); messages sent meanwhile wait at the relay"""


class UsageError(Exception):
    """A command typed wrong: the message says how to type it."""


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


class Chat:
    """One person's chat: shows events, runs commands."""

    def __init__(self, client: Client, screen: Screen, relay: str, state_dir: str) -> None:
        self.client = client
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
        self.connected = False  # the first connection succeeded
        self.online = False
        self.connections = 0
        self.failure: str | None = None
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
            "/safety": self.cmd_safety,
            "/confirm": self.cmd_confirm,
            "/help": self.cmd_help,
        }

    # ------------------------------------------------------------ connecting

    async def start(self, nursery: trio.Nursery) -> bool:
        """Connect for the first time; False (and why, printed) if that fails."""
        with trio.move_on_after(STARTUP_TIMEOUT):
            async with trio.open_nursery() as race:

                async def connect() -> None:
                    await nursery.start(self.client.run)
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
        self.screen.error(self._explain_failure(self.failure or "no answer"))
        return False

    def _explain_failure(self, reason: str) -> str:
        where = f"the relay at {self.relay}"
        if reason in ("CONNECTION_CLOSED", "RELAY_TIMEOUT"):
            return (
                f"cannot reach {where} ({reason}): is `hushchat relay` running there, "
                "and is the address right?"
            )
        if reason in ("DEVICE_LIST_REJECTED", "FORBIDDEN", "AUTH_FAILED"):
            return (
                f"{where} refused {self.me!r} ({reason}): is the name taken by someone else? "
                "Choose another --name, or the --state directory that holds this name."
            )
        return f"cannot connect to {where} ({reason})"

    # ------------------------------------------------------------ events

    async def show_events(self) -> None:
        try:
            with open(self.last_shown_path, "rb") as file:
                shown_last_time: bytes | None = file.read()
        except FileNotFoundError:
            shown_last_time = None
        first = True
        async for event in self.client.events():
            if isinstance(event, Connected | Disconnected):
                self.show_connection(event)
                continue
            digest = hashlib.sha256(encode_event(event)).digest()
            if not (first and digest == shown_last_time):
                self.show_event(event)
                with open(self.last_shown_path, "wb") as file:
                    file.write(digest)
            first = False

    def show_connection(self, event: Connected | Disconnected) -> None:
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

    def show_event(self, event: core.Event) -> None:
        if isinstance(event, MessageReceived):
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

    def show_message(self, event: MessageReceived) -> None:
        body = event.body.decode(errors="replace")
        sender = event.sender.user_id
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
            members = ", ".join(c.user_id for c in event.changes if isinstance(c, MemberAdded))
            if self.current is None:
                self.select(Conversation(group_id=gid))
            self.screen.info(f"{author} added you to {name} (members: {members})")
            return
        for change in event.changes:
            if isinstance(change, MemberAdded):
                self.screen.info(f"{author} added {change.user_id} to {name}")
            elif isinstance(change, MemberRemoved):
                if change.user_id == self.me and self.current == Conversation(group_id=gid):
                    self.select(None)
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
        if conversation is None:
            self.screen.prompt = "> "
        elif conversation.user is not None:
            self.screen.prompt = printable(conversation.user) + "> "
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
            return "not sent: not connected to the relay (it keeps trying; try again soon)"
        return f"{exc.message} ({exc.code})"

    async def send_text(self, text: str) -> None:
        if self.current is None:
            raise UsageError("no conversation yet: /msg NAME text, or /to NAME or GROUP")
        if self.current.user is not None:
            await self.client.send_direct(self.current.user, text.encode())
            self.screen.show(f"you -> {self.current.user}: {text}", "dim")
        else:
            assert self.current.group_id is not None
            await self.client.send_group(self.current.group_id, text.encode())
            self.screen.show(f"[{self.group_name(self.current.group_id)}] you: {text}", "dim")

    async def cmd_msg(self, rest: str) -> None:
        user, _, text = rest.partition(" ")
        if not user or not text.strip():
            raise UsageError("usage: /msg NAME text")
        await self.client.send_direct(user, text.strip().encode())
        self.select(Conversation(user=user))
        self.screen.show(f"you -> {user}: {text.strip()}", "dim")

    async def cmd_to(self, rest: str) -> None:
        if not rest:
            raise UsageError("usage: /to NAME or /to GROUP")
        titles = {self.client.group(g).title for g in self.client.core.group_ids}
        if rest.removeprefix("#") in titles or rest.startswith("#"):
            self.select(Conversation(group_id=self.find_group(rest)))
        else:
            await self.client.refresh_device_list(rest)  # fails for an unknown name
            self.select(Conversation(user=rest))
        self.screen.info(f"now talking to {self.screen.prompt[:-2]}")

    def _words(self, rest: str, usage: str, count: int | None = None) -> list[str]:
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

    async def cmd_invite(self, rest: str) -> None:
        group, user = self._words(rest, "usage: /invite GROUP NAME", 2)
        group_id = self.find_group(group)
        await self.client.add_member(group_id, user)
        self.screen.info(f"added {user} to {self.group_name(group_id)}")

    async def cmd_kick(self, rest: str) -> None:
        group, user = self._words(rest, "usage: /kick GROUP NAME", 2)
        group_id = self.find_group(group)
        await self.client.remove_member(group_id, user)
        self.screen.info(f"removed {user} from {self.group_name(group_id)}")

    async def cmd_leave(self, rest: str) -> None:
        (group,) = self._words(rest, "usage: /leave GROUP", 1)
        group_id = self.find_group(group)
        name = self.group_name(group_id)
        await self.client.leave_group(group_id)
        if self.current == Conversation(group_id=group_id):
            self.select(None)
        self.screen.info(f"you left {name}")

    async def cmd_devices(self, rest: str) -> None:
        user = rest or self.me
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
            self.screen.info(f"{user}.{device_id}  key {fingerprint(entry.identity)}{this}")

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


def relay_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) for argparse."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:7400")
    return host, int(port)


async def run_chat(host: str, port: int, name: str, state_dir: str, palette: Palette) -> int:
    """The chat until /quit; the exit status."""
    screen = Screen(palette, sys.stdin.isatty() and sys.stdout.isatty())
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    try:
        store = ClientStore.open(os.path.join(state_dir, "client.db"))
    except StoreLocked:
        screen.error(f"{state_dir} is in use by another chat; one device, one chat")
        return 1
    try:
        core = load_or_create_core(store, user_id=name)
        if core.user_id != name:
            screen.error(f"{state_dir} holds {core.user_id!r}'s device, not {name!r}")
            return 2
        client = Client(store, core, host, port, ready_timeout=COMMAND_READY_TIMEOUT)
        chat = Chat(client, screen, f"{host}:{port}", state_dir)
        stopped: list[HushchatError] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(chat.show_events)
                if await chat.start(nursery):
                    await chat.interact()
                nursery.cancel_scope.cancel()
        except* HushchatError as group:
            # Not a typing mistake but the client stopping (say, the relay sent a list
            # for us that our own key did not sign): say why instead of a traceback.
            stopped = [e for e in group.exceptions if isinstance(e, HushchatError)]
        for exc in stopped:
            screen.error(f"the client stopped: {exc.message} ({exc.code})")
        return 0 if chat.connected and not stopped else 1
    finally:
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="group_chat.py", description="hushchat group chat: a narrated demo, or a chat."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the narrated demo (a relay and four users)")
    demo.add_argument("--relay-db", metavar="PATH", help="keep the relay's database at PATH")
    chat = commands.add_parser("chat", help="chat in this terminal through a relay")
    chat.add_argument("--relay", required=True, type=relay_address, metavar="HOST:PORT")
    chat.add_argument("--name", required=True, help="your user name")
    chat.add_argument(
        "--state", metavar="DIR", help="this device's state (default ~/.hushchat/NAME)"
    )
    args = parser.parse_args(argv)

    palette = Palette(wants_colour(sys.stdout))
    if args.command == "demo":
        # On a terminal, a short pause between steps makes the story readable as it unfolds.
        pause = 0.5 if sys.stdout.isatty() else 0.0
        status: int = trio.run(run_demo, args.relay_db, sys.stdout, palette, pause)
        return status
    state = args.state or os.path.join(os.path.expanduser("~"), ".hushchat", args.name)
    host, port = args.relay
    # Ctrl-C can arrive while readline has the terminal in its own mode: restore it.
    terminal = termios.tcgetattr(sys.stdin) if sys.stdin.isatty() else None
    status = 130  # unless run_chat returns: Ctrl-C
    try:
        status = trio.run(run_chat, host, port, args.name, state, palette)
    except* KeyboardInterrupt:  # trio may raise it in an exception group
        print()  # end the line being typed
    finally:
        if terminal is not None:
            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, terminal)
    return status


if __name__ == "__main__":
    sys.exit(main())
