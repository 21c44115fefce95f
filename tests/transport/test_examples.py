"""The examples run as a user runs them: the pure-core example, the demo, the echo bot, the chat.

The chat is driven through pseudo-terminals (as a person at a terminal
would use it) against a relay process started here on a free port.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import trio

from hushchat.protocol.client_core import (
    Address,
    GroupChangeFailed,
    GroupReplaced,
    GroupStateMismatch,
    GroupUpdated,
    MessageReceived,
)
from hushchat.protocol.errors import InvalidArgument
from hushchat.protocol.group import AddMember, MemberAdded, MemberRemoved, SetTitle, TitleChanged
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.transport.client.client import Client, ClientEvent, MailExpired, open_client
from hushchat.transport.client.store import ClientStore
from hushchat.transport.relay.config import RelayConfig
from hushchat.transport.relay.server import serve_relay
from tests.support.children import read_until
from tests.support.clients import free_port
from tests.support.terminals import (
    ANSI,
    EXAMPLES,
    WAIT,
    Terminal,
    clean_env,
    issue_invites,
    relay_process,
)

sys.path.insert(0, str(EXAMPLES))
from terminal import Palette, wants_colour

COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def run_example(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=EXAMPLES,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


# ------------------------------------------------------------------ pure core, colours


def test_one_to_one_example_runs() -> None:
    result = run_example("one_to_one.py")
    assert result.returncode == 0, result.stderr
    assert "Replay:       refused with DUPLICATE_MESSAGE" in result.stdout
    assert "After reload: b'still there after your restart?'" in result.stdout


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "env", "expected"),
    [
        (True, {}, True),
        (False, {}, False),
        (True, {"NO_COLOR": "1"}, False),
        (True, {"NO_COLOR": ""}, True),  # no-color.org: only a non-empty value counts
        (True, {"TERM": "dumb"}, False),
    ],
)
def test_colour_only_on_a_terminal_without_no_color(
    monkeypatch: pytest.MonkeyPatch, tty: bool, env: dict[str, str], expected: bool
) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wants_colour(FakeStream(tty)) is expected
    assert Palette(expected).paint("bold red", "x") == ("\x1b[1;31mx\x1b[0m" if expected else "x")


def test_chat_never_prints_control_characters_it_was_sent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Names, titles and messages come from others: escape codes must not reach the terminal.
    from group_chat import Screen

    screen = Screen(Palette(True), interactive=False)
    screen.show("[#\x1b]0;owned\x07] mallory\x1b[2J: hi\rthere\nsecond line", "red")
    out = capsys.readouterr().out
    assert out == (
        "\x1b[31m[#\ufffd]0;owned\ufffd] mallory\ufffd[2J: hi\ufffdthere\x1b[0m\n"
        "\x1b[31msecond line\x1b[0m\n"
    )


class GoneGroupClient:
    """A client whose core holds no group any more (it processed a removal already)."""

    address = Address("carol", 1)
    core = type("Core", (), {"group_ids": ()})()

    def group(self, group_id: bytes) -> None:
        raise InvalidArgument("unknown group")


def test_chat_shows_group_events_from_the_event_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The event display can lag behind the core: a join shown after the removal that
    # followed it was processed must not ask the core about the group.
    from group_chat import Chat, Screen

    chat = Chat(cast(Client, GoneGroupClient()), Screen(Palette(False), False), "r", str(tmp_path))
    alice, group_id = Address("alice", 1), bytes(16)
    members = tuple(MemberAdded(name, bytes(32), name == "alice") for name in ("alice", "carol"))
    chat.show_event(GroupUpdated(group_id, alice, (*members, TitleChanged("Flash")), joined=True))
    chat.show_event(GroupUpdated(group_id, alice, (MemberRemoved("carol"),)))
    assert capsys.readouterr().out == (
        "* alice added you to #Flash (members: alice, carol)\n* alice removed you from #Flash\n"
    )
    assert chat.current is None


class EventsClient(GoneGroupClient):
    """A client that yields these events, as Client.events would."""

    def __init__(self, *events: ClientEvent) -> None:
        self._events = events

    async def events(self) -> AsyncIterator[ClientEvent]:
        for event in self._events:
            yield event


async def test_chat_tells_of_mail_that_expired_unread_and_carries_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A notice, not a stored event: it used to reach the inbox-row encoder, whose
    # assert_never stopped the chat with an AssertionError.
    from group_chat import Chat, Screen

    client = EventsClient(
        MailExpired(3, 1_700_000_000_000, 1_700_086_400_000),
        MailExpired(None, 1_700_000_000_000, 1_700_086_400_000),
        MessageReceived(Address("bob", 1), bytes(16), 1_700_000_000, b"still here?"),
    )
    chat = Chat(cast(Client, client), Screen(Palette(False), False), "r", str(tmp_path))
    await chat.show_events()
    out = capsys.readouterr().out
    assert "3 messages sent to you from " in out and "expired at the relay unread" in out
    assert "the relay lost what waited for you since " in out
    assert out.endswith("bob: still here?  (sent " + out.rsplit("(sent ", 1)[1])


def test_chat_shows_failed_changes_replaced_groups_and_split_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # These events used to fall through show_event's branches: shown to nobody.
    from group_chat import Chat, Conversation, Screen

    chat = Chat(cast(Client, GoneGroupClient()), Screen(Palette(False), False), "r", str(tmp_path))
    old, new, alice = bytes(16), bytes([1] * 16), Address("alice", 1)
    chat.titles[old] = "Flash"
    dave = AddMember("dave", IdentityKeyPair.generate().public.ed25519)
    chat.show_event(GroupChangeFailed(old, dave, "STALE_CHANGE"))
    chat.show_event(GroupChangeFailed(old, SetTitle("Slow"), "NOT_A_MEMBER"))
    chat.show_event(GroupStateMismatch(old, alice, "forked", 3, bytes(32), 3, bytes([1] * 32)))
    chat.select(Conversation(group_id=old))
    chat.show_event(GroupReplaced(old, new, alice))
    assert capsys.readouterr().out.splitlines() == [
        "! adding dave to #Flash did not take effect (STALE_CHANGE)",
        "! renaming #Flash to 'Slow' did not take effect (NOT_A_MEMBER)",
        "! alice.1 holds another state of #Flash than this device (forked: the group is split);"
        " messages may not reach every member until an admin brings it back to one state",
        "* alice continued #Flash as a new group, #01010101: now talking to #01010101",
    ]
    assert chat.current == Conversation(group_id=new) and old in chat.gone


# ------------------------------------------------------------------ the demo


def test_demo_tells_the_whole_story_and_the_relay_keeps_no_plaintext(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    result = run_example("group_chat.py", "demo", "--relay-db", str(db))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert not ANSI.search(out)  # not a terminal: no colour, no cursor codes
    for expected in [
        "100 one-time X25519 and 100 one-time ML-KEM-768 prekeys",
        'bob.1     reads "Hi Bob! Are you free this weekend?" from alice.1',
        'dave.1    joined "Weekend trip"',
        "stored 1 group ciphertext",
        'dave.1    reads "Dave, you\'re on maps." from alice.1 in Weekend trip',
        "holds nothing for dave.1",
        'alice.2   reads "Alice, did you get the train tickets?" from bob.1',
        "as sent to bob from alice.1",
        "his client now: cannot decrypt, Undecryptable(UNKNOWN_GROUP)",
        "cannot decrypt, Undecryptable(NO_SENDER_KEY)",
        # The hostile relay: what each client shows.
        "the restamped message: refused, Undecryptable(UNTRUSTED_IDENTITY)",
        "the altered copy: refused, Undecryptable(BAD_SIGNATURE)",
        "the change restamped as alice's: refused, Undecryptable(UNTRUSTED_IDENTITY)",
        "bob.1     mallory's change: refused, Undecryptable(UNAUTHORIZED_CHANGE)",
        "carol.1   mallory's change: refused, Undecryptable(UNAUTHORIZED_CHANGE)",
        "the replayed creation: dropped as a copy of a message already read (no event)",
        'bob.1     reads "Tickets are in my bag." from alice.1 in Weekend trip',
        'bob.1     members of "Weekend trip": still alice, bob, carol (epoch 1)',
        'carol.1   members of "Weekend trip": still alice, bob, carol (epoch 1)',
        "cannot read it: Undecryptable(UNKNOWN_GROUP)",
        "no member's client sent her a sender key (0 one-to-one envelopes to her)",
        "reads that carol.1 has 1 envelope from bob.1",
        "the keys of epoch",
        "the row opens under none of its keys",
        "carol.1 comes back online and is told: 1 message sent to her",
        "0 envelopes waiting for delivery",
        "appears anywhere in the file, its journal or its key file",
        "and 1 envelope at expiry, with the keys that sealed it",
        "demo finished in",
    ]:
        assert " ".join(expected.split()) in " ".join(out.split()), expected
    # The safety numbers shown match, and are 12 groups of 5 digits.
    numbers = re.findall(r"sees ((?:\d{5} ){11}\d{5})", out)
    assert len(numbers) == 2 and numbers[0] == numbers[1]
    # Look for every message ourselves, in the relay's database the demo left behind.
    bodies = re.findall(r'-> [^:]+: "([^"]+)"', out)
    assert len(bodies) >= 10
    keys = Path(f"{db}.keys")
    files = [p for p in (db, Path(f"{db}-wal"), keys) if p.exists()]
    contents = b"".join(p.read_bytes() for p in files)
    assert contents and keys.stat().st_mode & 0o777 == 0o600
    for body in [*bodies, "Weekend trip"]:
        assert body.encode() not in contents, body
    with contextlib.closing(sqlite3.connect(db)) as relay:
        assert relay.execute("SELECT COUNT(*) FROM users").fetchone() == (5,)  # mallory too
        assert relay.execute("SELECT COUNT(*) FROM devices").fetchone() == (6,)
        assert relay.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,)  # forgotten


def test_demo_will_not_reuse_a_relay_database(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    db.write_bytes(b"")
    result = run_example("group_chat.py", "demo", "--relay-db", str(db))
    assert result.returncode == 2
    assert "exists" in result.stdout and "Traceback" not in result.stderr


# ------------------------------------------------------------------ the echo bot


def echo_bot(port: int, tmp_path: Path) -> list[str]:
    """The command that runs the echo bot against the relay on ``port``."""
    relay = f"127.0.0.1:{port}"
    return [
        sys.executable,
        str(EXAMPLES / "echo_bot.py"),
        "--relay",
        relay,
        "--state",
        str(tmp_path / "bot"),
    ]


async def exit_status(process: trio.Process, timeout: float) -> int:
    """``process``'s exit status. If it has not exited within ``timeout``, the failure
    shows where it hangs: every thread's stack, which Python's faulthandler (enabled in
    the process) writes to its stderr on SIGABRT. (Once in a full suite run the echo
    bot did not exit on Ctrl-C within 20 s; it never did alone.)"""
    with trio.move_on_after(timeout):
        return await process.wait()
    process.send_signal(signal.SIGABRT)
    await process.wait()
    assert process.stderr is not None
    stacks = b""
    while chunk := await process.stderr.receive_some():
        stacks += chunk
    raise AssertionError(f"no exit within {timeout} s; its stacks:\n{stacks.decode()}")


@pytest.mark.parametrize(
    ("registration", "says"),
    [("closed", "REGISTRATION_CLOSED"), ("invite", "INVITE_REFUSED")],
)
def test_echo_bot_a_relay_will_not_have_is_one_line(
    tmp_path: Path, registration: str, says: str
) -> None:
    """open_client raises what no retry changes; the bot says it in one line, exit 1."""
    with relay_process(tmp_path / "relay.db", registration=registration) as (_, port):
        result = subprocess.run(
            echo_bot(port, tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("echo_bot.py: ")
    assert result.stderr.endswith(f"({says})\n")


async def test_echo_bot_joins_a_relay_by_invitation(tmp_path: Path) -> None:
    """--invite passes an operator's token at the bot's first registration."""
    with relay_process(tmp_path / "relay.db", registration="invite") as (_, port):
        (token,) = issue_invites(tmp_path / "relay.db", 1)
        bot = await trio.lowlevel.open_process(
            [*echo_bot(port, tmp_path), "--invite", token],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert bot.stdout is not None
        try:
            with trio.fail_after(WAIT):
                await read_until(bot.stdout, b"echo-bot ready")
        finally:
            bot.send_signal(signal.SIGINT)
            assert await exit_status(bot, WAIT) == 0


async def test_echo_bot_answers_in_the_groups_it_is_added_to(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        config = RelayConfig(db_path=str(tmp_path / "relay.db"))
        port = await nursery.start(serve_relay, config)
        bot = await trio.lowlevel.open_process(
            echo_bot(port, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # its stacks, should it hang
        )
        assert bot.stdout is not None and bot.stderr is not None
        output = b""

        async def bot_says(text: bytes) -> None:
            nonlocal output
            assert bot.stdout is not None
            output = await read_until(bot.stdout, text, output)

        store = ClientStore.open(str(tmp_path / "alice.db"))
        try:
            with trio.fail_after(WAIT):
                await bot_says(b"echo-bot ready")
                async with open_client(store, "127.0.0.1", port, user_id="alice") as alice:
                    group_id = await alice.create_group("bots", ["echo-bot"])
                    await bot_says(b"joined 'bots', added by alice")
                    await alice.send_group(group_id, b"ping")
                    await alice.send_group(group_id, b"pong")
                    echoes = []
                    async for event in alice.events():
                        if isinstance(event, GroupUpdated):
                            raise AssertionError(f"unexpected {event}")
                        if isinstance(event, MessageReceived):
                            assert event.sender.user_id == "echo-bot"
                            assert event.group_id == group_id
                            echoes.append(event.body)
                            if len(echoes) == 2:
                                break
                    assert echoes == [b"echo: ping", b"echo: pong"]
            bot.send_signal(signal.SIGINT)
            assert await exit_status(bot, WAIT) == 0
            stderr = await bot.stderr.receive_some()
            assert b"Traceback" not in stderr, stderr
            with trio.fail_after(WAIT):
                await bot_says(b"bye")
        finally:
            store.close()
            with contextlib.suppress(ProcessLookupError):
                bot.kill()
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ the chat, in terminals


def test_chat_in_three_terminals(tmp_path: Path, terminals: list[Terminal]) -> None:
    with relay_process(tmp_path / "relay.db", free_port()) as (relay, port):

        def start(name: str, **env: str) -> Terminal:
            # state and args given: mypy then knows env holds only environment variables.
            terminal = Terminal(tmp_path, port, name, state="", args=(), **env)
            terminals.append(terminal)
            terminal.expect(rf"connected to 127\.0\.0\.1:{port} as {name} \(device {name}\.1\)")
            return terminal

        alice = start("alice")  # in colour
        bob = start("bob", NO_COLOR="1")
        carol = start("carol", NO_COLOR="1")

        # One-to-one; the first message opens its conversation, so bob can just type.
        alice.type("/msg bob hello bob")
        bob.expect("alice: hello bob")
        bob.type("hi alice")
        alice.expect("bob: hi alice")

        # A group; alice's plain text now goes to it.
        alice.type('/group create "Weekend trip" bob carol')
        alice.expect(r"created #Weekend trip with bob, carol")
        for member in (bob, carol):
            member.expect(r"alice added you to #Weekend trip \(members: alice, bob, carol\)")
        alice.type("who brings the tent?")
        bob.expect(r"\[#Weekend trip\] alice: who brings the tent\?")
        carol.expect(r"\[#Weekend trip\] alice: who brings the tent\?")

        # carol leaves the chat; what is sent meanwhile reaches her when she is back.
        carol.type("/quit")
        assert carol.finish() == 0
        bob.type("/to Weekend trip")
        bob.expect("now talking to #Weekend trip")
        bob.type("I do, carol is away")
        alice.expect(r"\[#Weekend trip\] bob: I do, carol is away")
        # Meanwhile alice adds carol to a group and removes her at once: carol's client
        # processes both before it shows the first (so the chat must not ask the group).
        alice.type("/group create Flash bob carol")
        alice.expect("created #Flash with bob, carol")
        alice.type("/kick Flash carol")
        alice.expect("removed carol from #Flash")
        alice.type("/to Weekend trip")
        alice.expect("now talking to #Weekend trip")
        carol_again = start("carol", NO_COLOR="1")
        carol_again.expect(r"\[#Weekend trip\] bob: I do, carol is away")
        carol_again.expect(r"alice added you to #Flash \(members: alice, bob, carol\)")
        carol_again.expect("alice removed you from #Flash")
        # The last message carol saw before quitting is not shown twice.
        assert "who brings the tent" not in carol_again.text

        # Removal: everyone is told, and carol no longer gets the group's messages.
        alice.type("/kick 'Weekend trip' carol")
        alice.expect("removed carol from #Weekend trip")
        bob.expect("alice removed carol from #Weekend trip")
        carol_again.expect("alice removed you from #Weekend trip")
        alice.type("carol cannot read this")
        bob.expect(r"\[#Weekend trip\] alice: carol cannot read this")
        # What carol is told now, and what bob (no admin) is told when he tries to kick.
        carol_again.type("still there?")
        carol_again.expect(
            r"not sent: you are no longer in #Weekend trip \(alice removed you\): /to NAME"
        )
        carol_again.type("/to Weekend trip")
        carol_again.expect(r"you are no longer in #Weekend trip \(alice removed you\)")
        bob.type("/kick 'Weekend trip' alice")
        bob.expect(r"only an admin of #Weekend trip can remove members \(admins: alice\)")

        # Safety numbers: both sides see the same 60 digits.
        alice.type("/safety bob")
        bob.type("/safety alice")
        digits = r"safety number with \w+: ((?:\d{5} ){11}\d{5})"
        assert alice.expect(digits).group(1) == bob.expect(digits).group(1)
        bob.type("/devices alice")
        bob.expect(r"alice\.1  key [0-9a-f]{4} [0-9a-f]{4} [0-9a-f]{4} [0-9a-f]{4}")

        # Mistakes get a message, not a traceback.
        alice.type("/invite nosuch bob")
        alice.expect("you are in no group named 'nosuch'")
        alice.type("/bogus")
        alice.expect("unknown command /bogus")
        alice.type("/msg nobody hi")
        alice.expect("no user named 'nobody' on this relay")
        alice.type("/group create lonely")
        alice.expect(r"usage: /group create NAME USER\.\.\.")
        alice.type("/confirm bob")
        alice.expect("no identity change pending for 'bob'")

        # The relay goes away: said once; what is typed meanwhile waits, and goes when
        # the relay is back.
        relay.kill()
        relay.wait()
        bob.expect(r"lost the relay \(\w+\); reconnecting")
        bob.type("anyone there?")
        bob.expect(r"not sent yet \(the relay is out of reach\); it goes by itself later: ")
        assert bob.text.count("lost the relay") == 1
        with relay_process(tmp_path / "relay.db", port):
            bob.expect("connected to the relay again")
            bob.expect(r"sent: \[#Weekend trip\] you: anyone there\?")
            alice.expect(r"\[#Weekend trip\] bob: anyone there\?")

        assert "carol cannot read this" not in carol_again.text
        # alice's terminal is in colour; bob's and carol's (NO_COLOR) are not.
        assert COLOUR.search(alice.raw.decode(errors="replace"))
        assert not COLOUR.search(bob.raw.decode(errors="replace"))
        for terminal in (alice, bob, carol_again):
            terminal.type("/quit")
            assert terminal.finish() == 0


def test_chat_says_clearly_when_no_relay_listens(tmp_path: Path, terminals: list[Terminal]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    terminal = Terminal(tmp_path, free_port, "alice")
    terminals.append(terminal)
    terminal.expect(
        f"group_chat.py chat: nothing listens at 127.0.0.1:{free_port}: is `hushchat relay` "
        r"running there, on that port\? \(CONNECTION_REFUSED\)"
    )
    assert terminal.finish() == 1
    assert not (tmp_path / "alice").exists()  # a first start that failed leaves nothing


def test_chat_warns_when_an_identity_changes(tmp_path: Path, terminals: list[Terminal]) -> None:
    db = tmp_path / "relay.db"
    with relay_process(db) as (_, port):

        def start(name: str, state: str = "") -> Terminal:
            terminal = Terminal(tmp_path, port, name, state, NO_COLOR="1")
            terminals.append(terminal)
            terminal.expect(f"connected to 127.0.0.1:{port} as {name} ")
            return terminal

        alice, bob = start("alice"), start("bob")
        alice.type("/msg bob hello")
        bob.expect("alice: hello")
        alice.type("/safety bob")
        before = alice.expect(r"safety number with bob: ([\d ]+)\n").group(1)
        bob.type("/quit")
        assert bob.finish() == 0
        # The relay operator resets bob's account, and "bob" registers again with new keys
        # (say, bob lost his phone; or someone else took his name).
        with contextlib.closing(sqlite3.connect(db)) as relay:
            for table in ("users", "devices", "signed_prekeys", "last_resort_kem_prekeys"):
                relay.execute(f"DELETE FROM {table} WHERE user_id = 'bob'")
            for table in ("one_time_prekeys", "one_time_kem_prekeys"):
                relay.execute(f"DELETE FROM {table} WHERE user_id = 'bob'")
            relay.commit()
        new_bob = start("bob", state="bob-reinstalled")

        alice.type("/safety bob")  # fetches bob's device list, signed by another identity key
        alice.expect("WARNING: bob's identity key has changed")
        after = alice.expect(r"on a call:\n! +([\d ]+)\n! If they match, type /confirm bob")
        assert after.group(1) != before
        new_bob.type("/safety alice")
        assert new_bob.expect(r"safety number with alice: ([\d ]+)\n").group(1) == after.group(1)

        alice.type("/safety bob")  # the key still in use, and the one waiting
        alice.expect(f"safety number with bob: {before}")
        alice.expect(rf"with bob's NEW key: +{after.group(1)} +\(/confirm bob to accept\)")
        alice.type("/confirm bob")
        alice.expect("accepted bob's new identity key")
        alice.type("/safety bob")
        alice.expect(f"safety number with bob: {after.group(1)}")
        alice.type("/msg bob welcome back")
        new_bob.expect("alice: welcome back")
        for terminal in (alice, new_bob):
            terminal.type("/quit")
            assert terminal.finish() == 0


def test_the_chats_state_is_private_whatever_the_umask(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    """Folders it creates 0700 (its parents too), every file in them 0600, under umask 022."""
    with relay_process(tmp_path / "relay.db") as (_, port):
        old = os.umask(0o022)
        try:
            alice = Terminal(tmp_path, port, "alice", "chats/alice", NO_COLOR="1")
            bob = Terminal(tmp_path, port, "bob", "chats/bob", NO_COLOR="1")
        finally:
            os.umask(old)
        terminals += [alice, bob]
        for terminal in (alice, bob):
            terminal.expect(f"connected to 127.0.0.1:{port}")
        alice.type("/msg bob hello")
        bob.expect("alice: hello")
        for terminal in (alice, bob):
            terminal.type("/quit")
            assert terminal.finish() == 0
    chats = tmp_path / "chats"
    modes = {str(p): p.stat().st_mode & 0o777 for p in [chats, *chats.rglob("*")]}
    assert {Path(p).name for p in modes} >= {"chats", "alice", "bob", "client.db", "last_shown"}
    expected = {p: 0o700 if Path(p).is_dir() else 0o600 for p in modes}
    assert modes == expected


def test_two_chats_making_their_state_folders_under_one_new_parent_both_succeed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two chats started at once (chats/alice, chats/bob) both find chats/ missing: the
    one whose mkdir comes second must take the folder the other made, not fail."""
    from group_chat import make_private_folder

    real_mkdir = os.mkdir
    parent = tmp_path / "chats"

    def other_chat_first(path: str, mode: int = 0o777) -> None:
        if path == str(parent) and not parent.exists():
            real_mkdir(path, 0o700)  # bob's chat, between alice's check and her mkdir
        real_mkdir(path, mode)

    monkeypatch.setattr(os, "mkdir", other_chat_first)
    make_private_folder(str(parent / "alice"))
    assert (parent / "alice").stat().st_mode & 0o777 == 0o700
    assert parent.stat().st_mode & 0o777 == 0o700


def test_the_chats_store_is_encrypted_with_a_passphrase(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    """scrypt of a passphrase (here from the environment), its salt beside the store."""
    help_text = run_example("group_chat.py", "chat", "--help").stdout
    assert "--key-env" in help_text and "HUSHCHAT_STORE_KEY" in help_text
    assert "passphrase" in help_text and "scrypt" in help_text
    with relay_process(tmp_path / "relay.db") as (_, port):

        def start(passphrase: str) -> Terminal:
            terminal = Terminal(
                tmp_path, port, "alice", NO_COLOR="1", HUSHCHAT_STORE_KEY=passphrase
            )
            terminals.append(terminal)
            return terminal

        alice = start("correct horse battery staple")
        alice.expect(f"connected to 127.0.0.1:{port} as alice")
        alice.type("/quit")
        assert alice.finish() == 0
        state = tmp_path / "alice"
        assert len((state / "store.salt").read_bytes()) == 16
        with contextlib.closing(sqlite3.connect(state / "client.db")) as db:
            assert db.execute("SELECT COUNT(*) FROM meta WHERE name = 'salt'").fetchone() == (1,)
        wrong = start("wrong horse")
        wrong.expect("that passphrase \\(or key\\) does not open .*client.db")
        assert wrong.finish() == 1
        again = start("correct horse battery staple")
        again.expect(f"connected to 127.0.0.1:{port} as alice")
        again.type("/quit")
        assert again.finish() == 0
