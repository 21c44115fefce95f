"""The chat's command line: every bad argument or environment is one line, and creates nothing.

Also: names that are not file names, names with spaces, device linking
(``--link`` and ``/link``) against a forged link request, and backups
(``export`` / ``import``).
"""

from __future__ import annotations

import contextlib
import re
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from hushchat.protocol.client_core import ClientCore, RecordKey
from hushchat.protocol.keys import IdentityKeyPair
from hushchat.transport.client import ClientStore, open_client
from tests.support.terminals import (
    EXAMPLES,
    STORE_KEY,
    Terminal,
    clean_env,
    issue_invites,
    relay_process,
)

CHAT = str(EXAMPLES / "group_chat.py")
PASSPHRASE = "a long enough passphrase"


def chat(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """Run group_chat.py with HOME at ``home`` and piped standard input."""
    return subprocess.run(
        [sys.executable, CHAT, *args],
        cwd=EXAMPLES,
        env=clean_env(HOME=str(home), NO_COLOR="1"),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess[str], status: int, says: str) -> None:
    assert result.returncode == status, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def make_device(state: Path, name: str = "alice") -> None:
    state.mkdir(parents=True, exist_ok=True)
    store = ClientStore.open(str(state / "client.db"))
    try:
        store.commit(ClientCore.create_primary(name, 1, now=1_700_000_000).take_changes())
    finally:
        store.close()


# ------------------------------------------------------------------ arguments


@pytest.mark.parametrize(
    ("name", "says"),
    [("", "a user id is 1 to 64 bytes of UTF-8"), ("x" * 300, "a user id is 1 to 64 bytes")],
)
def test_a_name_the_protocol_refuses_is_a_usage_error_before_anything_exists(
    tmp_path: Path, name: str, says: str
) -> None:
    for command in (["chat", "--relay", "127.0.0.1:7400"], ["export", "f"], ["import", "f"]):
        result = chat(tmp_path, *command, "--name", name)
        assert result.returncode == 2 and says in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("alice", "alice"),
        ("alice.smith", "alice.smith"),
        ("../../etc", "etc-"),
        ("..", "user-"),
        (".hidden", "hidden-"),
        ("two words", "two_words-"),
        ("x" * 64, "x" * 64),
        ("zoë/ü", "zo-"),
    ],
)
def test_state_folders_stay_in_hushchat_whatever_the_name(name: str, folder: str) -> None:
    sys.path.insert(0, str(EXAMPLES))
    from state_folder import state_folder_name

    made = state_folder_name(name)
    assert made.startswith(folder) and "/" not in made and not made.startswith(".")
    assert (made == name) == (folder == name)
    assert state_folder_name(name + "!") != made  # the hash keeps names apart


def test_a_name_with_a_path_in_it_writes_only_under_hushchat(tmp_path: Path) -> None:
    home = tmp_path / "home" / "user"
    home.mkdir(parents=True)
    with relay_process(tmp_path / "relay.db") as (_, port):
        result = chat(home, "chat", "--relay", f"127.0.0.1:{port}", "--name", "../../etc")
    assert result.returncode == 0, result.stderr
    assert "connected" in result.stdout and "as ../../etc" in result.stdout
    written = files_under(tmp_path / "home")
    assert all(path.startswith("user/.hushchat") for path in written[1:]), written
    (folder,) = (home / ".hushchat").iterdir()
    assert re.fullmatch(r"etc-[0-9a-f]{12}", folder.name)
    assert oct((home / ".hushchat").stat().st_mode & 0o777) == "0o700"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize(
    ("relay", "says"),
    [
        ({"registration": "closed"}, ("registers no new users", "REGISTRATION_CLOSED")),
        ({"registration": "invite"}, ("registers new users by invitation", "INVITE_REFUSED")),
        (
            {"name": "relay.example.org"},
            ("calls itself 'relay.example.org'", "RELAY_NAME_MISMATCH"),
        ),
    ],
)
def test_a_relay_that_will_not_have_us_is_one_line_saying_why(
    tmp_path: Path, relay: dict[str, str], says: tuple[str, str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    registration, name = relay.get("registration", "open"), relay.get("name", "")
    with relay_process(tmp_path / "relay.db", registration=registration, name=name) as (_, port):
        result = chat(home, "chat", "--relay", f"127.0.0.1:{port}", "--name", "zed")
    why, code = says
    one_line(result, 1, f"group_chat.py chat: the relay at 127.0.0.1:{port} {why}")
    assert result.stderr.endswith(f" ({code})\n")
    assert files_under(home) == [".hushchat"]  # a failed first start leaves no state


def test_the_chat_joins_a_relay_by_invitation_and_one_dialled_by_another_name(
    tmp_path: Path,
) -> None:
    """--invite passes an operator's token at the first registration, --relay-name the
    name a relay dialled by its address calls itself (a cluster behind a balancer)."""
    home = tmp_path / "home"
    home.mkdir()
    db = tmp_path / "relay.db"
    with relay_process(db, registration="invite", name="relay.example.org") as (_, port):
        [token] = issue_invites(db, 1)
        relay = ["--relay", f"127.0.0.1:{port}", "--relay-name", "relay.example.org"]
        result = chat(home, "chat", *relay, "--name", "zed", "--invite", token, stdin="/quit\n")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        # The token is spent: a second new user with it is refused, in one line that
        # says the token given was refused, not to give one.
        again = chat(home, "chat", *relay, "--name", "yan", "--invite", token, stdin="/quit\n")
        one_line(again, 1, f"group_chat.py chat: the relay at 127.0.0.1:{port} refused the token")
        assert "--invite TOKEN" not in again.stderr
        assert again.stderr.endswith(" (INVITE_REFUSED)\n")
        # zed, registered, starts again without a token.
        result = chat(home, "chat", *relay, "--name", "zed", stdin="/quit\n")
        assert result.returncode == 0, result.stdout + result.stderr


def test_linking_at_a_relay_that_registers_by_invitation(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    """The new device registers a throwaway user to send its link request
    (device_link.py), which such a relay refuses without a token: without --invite the
    link is one line saying so, with it the link is made."""
    db = tmp_path / "relay.db"
    with relay_process(db, registration="invite") as (_, port):
        for_alice, for_the_link = issue_invites(db, 2)
        alice = Terminal(tmp_path, port, "alice", args=("--invite", for_alice), NO_COLOR="1")
        terminals.append(alice)
        alice.expect("connected to")
        home = tmp_path / "home"
        home.mkdir()
        relay = ["--relay", f"127.0.0.1:{port}", "--name", "alice"]
        refused = chat(home, "chat", *relay, "--link", "--state", str(home / "laptop"))
        one_line(refused, 1, "registers new users by invitation")
        assert "--invite" in refused.stderr
        assert not (home / "laptop").exists()

        args = ("--link", "--invite", for_the_link)
        laptop = Terminal(tmp_path, port, "alice", "alice-laptop", args=args, NO_COLOR="1")
        terminals.append(laptop)
        code = laptop.expect(r"/link ([0-9A-Z]{5}-[0-9A-Z]{5})").group(1)
        alice.expect(r"a new device asks to become yours \(alice\.2\)")
        alice.type(f"/link {code}")
        alice.expect(r"linked alice\.2")
        laptop.expect(r"connected to .* as alice \(device alice\.2\)")
        alice.type("/quit")
        assert alice.finish() == 0


def test_linking_without_a_relay_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "laptop"
    relay = f"127.0.0.1:{port}"
    args = ["--relay", relay, "--name", "alice", "--state", str(state), "--link"]
    result = chat(tmp_path, "chat", *args)
    one_line(result, 1, f"nothing listens at {relay}")
    assert not state.exists()


def test_the_chat_help_shows_every_default(tmp_path: Path) -> None:
    for command, defaults in [
        ("chat", ["(default: ~/.hushchat/NAME)", "(default: a new user, or the device in"]),
        ("demo", ["(default: none)"]),
        ("export", ["(default: ~/.hushchat/NAME)"]),
    ]:
        result = chat(tmp_path, command, "--help")
        assert result.returncode == 0
        for default in defaults:
            assert default in " ".join(result.stdout.split()), (command, default)


def test_state_naming_a_file_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "afile"
    state.write_text("not a folder")
    args = ["--relay", "127.0.0.1:7400", "--name", "a", "--state", str(state)]
    result = chat(tmp_path, "chat", *args)
    one_line(result, 2, f"--state {state} is a file, not a folder")
    assert state.read_text() == "not a folder"


def damage_truncated(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def damage_garbage(db: Path) -> None:
    db.write_bytes(b"garbage" * 100)


def damage_flipped(db: Path) -> None:
    # Flipped bits inside a stored record (the SQLite file itself stays valid).
    with contextlib.closing(sqlite3.connect(db)) as store:
        key, value = store.execute("SELECT key, value FROM records WHERE value > x'' ").fetchone()
        flipped = bytes(b ^ 0x55 for b in value)
        store.execute("UPDATE records SET value = ? WHERE key = ?", (flipped, key))
        store.commit()


def damage_empty(db: Path) -> None:
    db.write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (damage_truncated, "is not a readable hushchat device"),
        (damage_garbage, "is not a readable hushchat device (file is not a database)"),
        (damage_flipped, "is not a readable hushchat device (CORRUPT_STATE"),
        (damage_empty, "holds no device (an empty file"),
    ],
)
def test_a_damaged_store_is_one_line_and_never_a_new_identity(
    tmp_path: Path, damage: object, says: str
) -> None:
    state = tmp_path / "alice"
    make_device(state)
    db = state / "client.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    damage(db)  # type: ignore[operator]
    before = db.read_bytes()
    meta = None
    if damage is damage_flipped:  # the file is still a database: read what it holds
        with contextlib.closing(sqlite3.connect(db)) as store:
            (meta,) = store.execute(
                "SELECT value FROM records WHERE key = ?", (RecordKey.META.encode(),)
            ).fetchone()
    result = chat(
        tmp_path, "chat", "--relay", "127.0.0.1:7400", "--name", "alice", "--state", str(state)
    )
    one_line(result, 1, says)
    assert "import a backup" in result.stderr
    if meta is None:
        assert db.read_bytes() == before  # nothing was written: no new identity in its place
    else:
        # Opening it encrypted it (the key given) and set unreadable rows aside, but
        # wrote no new identity: the device's meta is the one it had, or set aside.
        opened = ClientStore.open(str(db), key=bytes.fromhex(STORE_KEY))
        try:
            assert opened.record(RecordKey.META) in (None, meta)
        finally:
            opened.close()


def test_a_store_of_another_user_is_named_without_doubled_quotes(tmp_path: Path) -> None:
    make_device(tmp_path / "dan", "dan")
    result = chat(
        tmp_path,
        "chat",
        "--relay",
        "127.0.0.1:7400",
        "--name",
        "bob",
        "--state",
        str(tmp_path / "dan"),
    )
    one_line(result, 2, "holds dan's device, not bob's: give --name dan or another --state")


# ------------------------------------------------------------------ backups


def test_export_and_import_through_the_chat(tmp_path: Path) -> None:
    make_device(tmp_path / "alice")
    backup = tmp_path / "alice.backup"
    state = ["--state", str(tmp_path / "alice")]
    result = chat(tmp_path, "export", str(backup), "--name", "alice", *state, stdin="short\n")
    one_line(result, 2, "a backup passphrase has at least 8 characters")
    assert not backup.exists()
    result = chat(tmp_path, "export", str(backup), "--name", "alice", *state, stdin=PASSPHRASE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote alice.1 to {backup}, sealed with your passphrase\n"
    again = chat(tmp_path, "export", str(backup), "--name", "alice", *state, stdin=PASSPHRASE)
    one_line(again, 2, "exists; a backup never overwrites a file")

    restored = ["--state", str(tmp_path / "restored")]
    wrong = chat(tmp_path, "import", str(backup), "--name", "alice", *restored, stdin="x" * 9)
    one_line(wrong, 1, "wrong passphrase for")
    assert not (tmp_path / "restored").exists()
    other = chat(tmp_path, "import", str(backup), "--name", "bob", *restored, stdin=PASSPHRASE)
    one_line(other, 2, "holds alice's device, not bob's")
    assert not (tmp_path / "restored").exists()
    result = chat(tmp_path, "import", str(backup), "--name", "alice", *restored, stdin=PASSPHRASE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"imported alice.1 into {tmp_path / 'restored'}")
    restored_store = str(tmp_path / "restored" / "client.db")
    store = ClientStore.open(restored_store, key=bytes.fromhex(STORE_KEY))  # encrypted
    try:
        assert ClientCore.load(store.records()).address.device_id == 1
    finally:
        store.close()
    into_existing = chat(
        tmp_path, "import", str(backup), "--name", "alice", *restored, stdin=PASSPHRASE
    )
    one_line(into_existing, 2, "already holds a device; import into a new --state folder")
    missing = chat(tmp_path, "import", str(tmp_path / "nope"), "--name", "alice", *restored)
    one_line(missing, 2, "no such backup file")


def test_import_on_a_terminal_asks_the_new_store_passphrase_twice(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    """As a new chat does: a typo there would seal the imported device under a
    passphrase no one knows."""
    make_device(tmp_path / "alice")
    backup = tmp_path / "alice.backup"
    state = ["--state", str(tmp_path / "alice")]
    exported = chat(tmp_path, "export", str(backup), "--name", "alice", *state, stdin=PASSPHRASE)
    assert exported.returncode == 0, exported.stderr
    restored = tmp_path / "restored"
    env = clean_env(HOME=str(tmp_path), NO_COLOR="1")
    del env["HUSHCHAT_STORE_KEY"]  # the passphrase is typed
    arguments = ["import", str(backup), "--name", "alice", "--state", str(restored)]
    importer = Terminal.command("import", arguments, env)
    terminals.append(importer)
    for prompt, line in [
        ("passphrase of", PASSPHRASE),
        ("passphrase for this device's messages: ", "the new passphrase"),
        ("the same again: ", "the new passphrasf"),
    ]:
        importer.expect(re.escape(prompt))
        importer.type(line)
    assert importer.finish(timeout=60) == 2
    assert not restored.exists()


# ------------------------------------------------------------------ names with spaces, linking


def test_a_name_with_spaces_can_be_addressed(tmp_path: Path, terminals: list[Terminal]) -> None:
    with relay_process(tmp_path / "relay.db") as (_, port):
        alice = Terminal(tmp_path, port, "alice", NO_COLOR="1")
        terminals.append(alice)
        alice.expect("connected to")
        two = Terminal(tmp_path, port, "two words", NO_COLOR="1")
        terminals.append(two)
        two.expect(r"connected to .* as two words")
        alice.type('/msg "two words" hello there')
        alice.expect('you -> "two words": hello there')
        two.expect("alice: hello there")
        two.type("/msg alice hi")
        alice.expect("two words: hi")
        alice.type("/to 'two words'")
        alice.expect('now talking to "two words"')
        alice.type('/devices "two words"')
        alice.expect(r'"two words"\.1  key')
        for terminal in (alice, two):
            terminal.type("/quit")
            assert terminal.finish() == 0


async def forge_link_request(port: int, folder: Path, user: str, device_id: int) -> None:
    """A stranger (or the relay) asks to link its own key as ``user``'s device."""
    from device_link import LinkRequest

    store = ClientStore.open(str(folder / "mallory.db"))
    try:
        async with open_client(store, "127.0.0.1", port, user_id="link-mallory") as mallory:
            forged = IdentityKeyPair.generate().public.ed25519
            # No proof that would verify: only the code the user types is tried here.
            request = LinkRequest(device_id, forged, bytes(64))
            await mallory.send_direct(user, request.encode())
    finally:
        store.close()


def test_linking_a_second_device_with_a_typed_code(
    tmp_path: Path, terminals: list[Terminal]
) -> None:
    sys.path.insert(0, str(EXAMPLES))
    with relay_process(tmp_path / "relay.db") as (_, port):
        alice = Terminal(tmp_path, port, "alice", NO_COLOR="1")
        terminals.append(alice)
        alice.expect("connected to")
        alice.type("/link ABCDE-FGHJK")
        alice.expect("no new device has asked to be linked in the last 10 minutes")

        laptop = Terminal(tmp_path, port, "alice", "alice-laptop", args=("--link",), NO_COLOR="1")
        terminals.append(laptop)
        code = laptop.expect(r"/link ([0-9A-Z]{5}-[0-9A-Z]{5})").group(1)
        alice.expect(r"a new device asks to become yours \(alice\.2\)")
        # Someone else asks too, for the same device id, with a key of their own.
        trio.run(forge_link_request, port, tmp_path, "alice", 2)
        alice.expect(r"a new device asks to become yours \(alice\.2\)")

        alice.type("/link 00000-00000")
        alice.expect("no new device asking to be linked shows that code")
        alice.type(f"/link {code.lower()}")
        alice.expect(r"linked alice\.2 \(asked through link-[0-9a-f]{10}\)")
        laptop.expect(r"connected to .* as alice \(device alice\.2\)")
        alice.type("/devices")
        alice.expect(r"alice\.1  key .*\(this device\)\n.*alice\.2  key")
        laptop.type("/devices")
        laptop.expect(r"alice\.1  key .*\n.*alice\.2  key .*\(this device\)")
        # The linked key is the laptop's own (it connected as alice.2), not the forger's.
        assert "link-mallory" not in alice.text

        laptop.type("/unlink 1")
        laptop.expect("only your first device can unlink devices")
        alice.type("/unlink 2")
        alice.expect(r"unlinked alice\.2: it can no longer read or send")
        alice.type("/devices")
        alice.expect(r"alice\.1  key .*\(this device\)")
        alice.type("/quit")
        assert alice.finish() == 0
