"""The ``hushchat relay`` command line."""

from __future__ import annotations

import gc
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
from contextlib import nullcontext
from pathlib import Path

import pytest
import trio

from hushchat.protocol.errors import InvalidArgument
from hushchat.transport import cli
from hushchat.transport.relay.config import RelayConfig, RelayLimits, wall_clock_ms
from hushchat.transport.relay.ratelimit import RateLimit
from hushchat.transport.relay.storage.sqlite import SqliteDatabase
from hushchat.transport.wire.errors import AuthenticationFailed, MailboxFull, UnknownUser
from hushchat.transport.wire.limits import DEFAULT_RETENTION_SECONDS
from tests.support.children import RELAY_COMMAND, read_until
from tests.support.relay import (
    announced_port,
    connected,
    envelopes_until_empty,
    make_prekeys,
    register,
    relay_config,
    running_relay,
    self_signed,
)
from tests.support.storage import batch, register_devices, schema_2_database, upload_prekeys
from tests.support.users import make_user


def test_relay_arguments() -> None:
    args = cli.build_parser().parse_args(
        ["relay", "--port", "0", "--db", "x.db", "--retention", "90m", "--name", "relay.example"]
    )
    assert (args.command, args.port, args.db, args.retention) == ("relay", 0, "x.db", 5400)
    assert args.name == "relay.example" and args.run is cli.run_relay
    defaults = cli.build_parser().parse_args(["relay"])
    assert (defaults.host, defaults.retention) == ("127.0.0.1", DEFAULT_RETENTION_SECONDS)


def test_the_limits_an_operator_tunes_are_arguments() -> None:
    argv = "relay --max-mailbox 50 --max-in-flight 20 --sweep-interval 5m --send-limit 20/2s"
    argv += " --frame-limit 200/1s --bundle-fetch-limit 3/1h"
    args = cli.build_parser().parse_args(argv.split())
    limits = cli.relay_limits(args)
    assert (limits.max_mailbox_size, limits.max_in_flight, limits.sweep_interval) == (50, 20, 300)
    assert limits.send_rate == RateLimit(20, 10.0)
    assert limits.frame_rate == RateLimit(200, 200.0)
    assert limits.bundle_fetch_rate == RateLimit(3, 3 / 3600)
    # Without them, the defaults of wire.limits.
    assert cli.relay_limits(cli.build_parser().parse_args(["relay"])) == RelayLimits()


@pytest.mark.parametrize("argv", [["relay", "--retention", "3 days"], ["relay", "--port", "x"], []])
def test_bad_arguments_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: hushchat" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (["--port", "99999"], 2, "99999 is not a port"),
        (["--port", "-1"], 2, "-1 is not a port"),
        (["--log-level", "LOUD"], 2, "one of DEBUG, INFO, WARNING, ERROR"),
        (["--retention", "0h"], 2, "must be positive"),
        (["--db", "/nonexistent/x.db"], 1, "no such folder for the database: /nonexistent"),
        (["--key-file", "/nonexistent/k"], 1, "no such folder for the key file: /nonexistent"),
        (["--host", "nosuch.invalid"], 1, "unknown host 'nosuch.invalid'"),
        (["--tls-cert", "/nope.pem", "--tls-key", "/nope.key"], 1, "cannot load the TLS"),
        (["--name", ""], 2, "a relay name is 1 to"),
        (["--max-mailbox", "0"], 2, "argument --max-mailbox: 0 is not a whole number from 1"),
        (["--max-in-flight", "101"], 2, "argument --max-in-flight: 101 is not a whole number "),
        (["--send-limit", "0/1s"], 2, "argument --send-limit: rate '0/1s': expected a count"),
        (["--max-mailbox", "x"], 2, "argument --max-mailbox: 'x' is not a whole number"),
        (["--sweep-interval", "0s"], 2, "argument --sweep-interval: duration '0s' must be"),
    ],
)
def test_a_bad_argument_or_environment_is_one_line_and_creates_nothing(
    argv: list[str], status: int, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    with pytest.raises(SystemExit) if status == 2 and "--name" not in argv else nullcontext():
        code = cli.main(["relay", "--port", "0", "--db", str(db), *argv])
        assert code == status
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert err.startswith(("hushchat relay: ", "usage: hushchat relay"))
    assert list(tmp_path.iterdir()) == []


def test_a_port_in_use_is_one_line_and_creates_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = tmp_path / "relay.db"
        assert cli.main(["relay", "--port", str(port), "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"hushchat relay: cannot listen on 127.0.0.1 port {port}: the port is in use "
        "(is another relay running?)\n"
    )
    assert not db.exists()


@pytest.mark.parametrize("content", [b"garbage" * 100, b"SQLite format 3\x00" + b"\xff" * 200])
def test_a_file_that_is_not_a_relay_database_is_one_line(
    content: bytes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    db.write_bytes(content)
    assert cli.main(["relay", "--port", "0", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hushchat relay: {db} is not a hushchat relay database")
    assert err.count("\n") == 1 and db.read_bytes() == content


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["relay", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ["127.0.0.1", "7400", "hushchat-relay.db", "72h", "6/1h", "20/1h", "INFO"]:
        assert f"(default: {default})" in out
    assert "(default: the first DNS name of --tls-cert, else --host;" in out
    for flag, default in [
        ("--max-mailbox", "10000"),
        ("--max-in-flight", "100"),
        ("--sweep-interval", "at every epoch boundary, 1/72 of --retention"),
        ("--send-limit", "60/1s"),
        ("--frame-limit", "1000/2s"),
    ]:
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(default)}\)", out), flag


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("hushchat ")


def test_tls_needs_both_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["relay", "--tls-cert", "cert.pem"]) == 2
    assert "--tls-key" in capsys.readouterr().err


def test_server_tls_context_loads_a_pair(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    context = cli._server_ssl_context(str(cert), str(key))
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_subcommand_is_one_function() -> None:
    def add_echo_command(subparsers: cli.SubParsers) -> None:
        parser = subparsers.add_parser("echo")
        parser.add_argument("word")
        parser.set_defaults(run=lambda args: len(args.word))

    cli.SUBCOMMANDS.append(add_echo_command)
    try:
        assert cli.main(["echo", "four"]) == 4
    finally:
        cli.SUBCOMMANDS.remove(add_echo_command)


async def test_the_command_runs_a_relay(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    argv = [*RELAY_COMMAND, "--port", "0", "--db", str(db)]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    try:
        async with connected(await announced_port(process)) as connection:
            await connection.ping()
            # Named as clients dial it: the address it listens on (the client checked).
            assert connection.relay_name == "127.0.0.1"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
    assert db.exists()


async def test_each_log_line_names_its_level(tmp_path: Path) -> None:
    """README Logging lists what each level adds: a line says which it is."""
    argv = [*RELAY_COMMAND, "--port", "0", "--db", str(tmp_path / "relay.db")]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    assert process.stderr is not None
    try:
        with trio.fail_after(20):
            output = await read_until(process.stderr, b"listening")
    finally:
        process.kill()
        await process.wait()
    (line,) = [line for line in output.decode().splitlines() if "listening" in line]
    assert " INFO hushchat.relay relay '127.0.0.1' listening on 127.0.0.1 port " in line, line


async def test_a_tls_relay_is_named_after_its_certificate(tmp_path: Path) -> None:
    """Without --name, a TLS relay calls itself by its certificate's DNS name, which is
    the TLS server name its clients dial and check."""
    cert, key = self_signed(tmp_path)
    argv = [*RELAY_COMMAND, "--port", "0", "--db", str(tmp_path / "tls.db")]
    argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    trusting = ssl.create_default_context(cafile=str(cert))
    try:
        port = await announced_port(process)
        async with connected(port, ssl_context=trusting, server_hostname="localhost") as c:
            assert c.relay_name == "localhost"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_relay_on_every_address_needs_a_name(
    host: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    assert cli.main(["relay", "--host", host, "--port", "0", "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hushchat relay: ") and "needs a name" in err and err.count("\n") == 1
    assert not db.exists()


def test_a_relay_is_named_as_it_is_dialled_by_default() -> None:
    assert RelayConfig(host="relay.example").name == "relay.example"
    assert RelayConfig(host="0.0.0.0", name="relay.example").name == "relay.example"
    for host in ("0.0.0.0", "::", ""):
        with pytest.raises(InvalidArgument):
            RelayConfig(host=host)


# ------------------------------------------------------------------ keys and the report


def queued_mail(db: Path, now: int = 10**12) -> None:
    """A database with two users, bob's prekeys, and one envelope queued for bob."""
    database = SqliteDatabase(str(db), clock=lambda: now)
    register_devices(database, "alice", 1, key_base=0xA0)
    register_devices(database, "bob", 1, 2)
    upload_prekeys(database, "bob", 1, one_time=3, kem=2)
    send = batch([("bob", 1), ("bob", 2)], (b"x", b"y"), counters={"bob": 0}, server_ts=now)
    database.enqueue(send, max_mailbox_size=10)
    database.close()


def report(db: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``hushchat relay report`` prints for ``db``, its lines joined by spaces."""
    assert cli.main(["relay", "report", "--db", str(db)]) == 0
    return " ".join(capsys.readouterr().out.split())


def test_the_report_counts_one_of_a_kind_in_the_singular(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    now = wall_clock_ms()
    database = SqliteDatabase(str(db), clock=lambda: now)
    register_devices(database, "alice", 1)
    send = batch([("alice", 1)], (b"x",), counters={"alice": 0}, server_ts=now)
    database.enqueue(send, max_mailbox_size=10)
    database.close()
    out = report(db, capsys)
    for said in [
        "1 user and 1 device:",
        "1 queued envelope (1 distinct payload, ",
        "the directory: 1 user id with",
        "for the 1 envelope still queued",
    ]:
        assert said in out, said


def test_a_lost_key_file_is_one_line_and_discards_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    queued_mail(db)
    Path(f"{db}.keys").unlink()
    before = db.read_bytes()
    assert cli.main(["relay", "--port", "0", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hushchat relay: the key file {db}.keys is missing")
    assert "--reset-keys" in err and err.count("\n") == 1 and "Traceback" not in err
    assert db.read_bytes() == before and not Path(f"{db}.keys").exists()


def test_the_report_says_what_is_held_and_what_a_seizure_reveals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    queued_mail(db, now=wall_clock_ms())
    before = db.read_bytes()
    out = report(db, capsys)
    for said in [
        "2 users and 3 devices",
        "prekeys: 1 signed, 1 last-resort ML-KEM-768, 3 one-time X25519, 2 one-time ML-KEM-768",
        "2 queued envelopes (2 distinct payloads",
        "2 accepted within the last hour",
        "epochs of 3600 s",
        "The oldest epoch whose keys exist began",
        "Anyone who seizes the relay (its disk and key file) can read:",
        "the directory: 2 user ids",
        "for the 2 envelopes still queued",
        "They cannot read:",
        "without the key file",
    ]:
        assert said in out, said
    assert db.read_bytes() == before  # it only reads
    assert "one-time budgets" not in out  # no one-time prekey was taken yet
    # Someone takes one of bob's one-time prekeys: his budget is stored, in clear.
    database = SqliteDatabase(str(db), clock=wall_clock_ms)
    assert database.take_bundle("bob", 1, budget=RateLimit(20, 20 / 3600), now=wall_clock_ms())
    database.close()
    out = report(db, capsys)
    assert "the one-time budgets of 1 device whose one-time prekeys were taken" in out
    Path(f"{db}.keys").unlink()
    out = report(db, capsys)
    assert "does not exist: no queued envelope can be opened" in out
    assert "nothing of the queue: no envelope can be opened" in out
    assert "the one-time budgets of 1 device" in out  # no key opens or hides them


def test_the_report_of_nothing_or_of_not_a_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    none = tmp_path / "none.db"
    assert cli.main(["relay", "report", "--db", str(none)]) == 1
    assert capsys.readouterr().err == f"hushchat relay report: no such database: {none}\n"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"garbage" * 100)
    assert cli.main(["relay", "report", "--db", str(garbage)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hushchat relay report: {garbage} is not a hushchat relay database")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == [garbage]


def test_prekey_limits_are_flags_with_the_default_limits() -> None:
    defaults = cli.build_parser().parse_args(["relay"])
    limits = RelayLimits()
    assert defaults.bundle_fetch_limit == limits.bundle_fetch_rate
    assert defaults.one_time_prekey_budget == limits.one_time_prekey_budget
    args = cli.build_parser().parse_args(["relay", "--one-time-prekey-budget", "50/1d"])
    assert args.one_time_prekey_budget == RateLimit(50, 50 / 86400)


@pytest.mark.parametrize("bad", ["20", "0/1h", "x/1h", "20/1x", "-1/1h"])
def test_a_bad_rate_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["relay", "--one-time-prekey-budget", bad])
    assert "--one-time-prekey-budget" in capsys.readouterr().err


def test_invite_tokens_are_printed_one_per_line_and_stored_hashed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    assert cli.main(["relay", "invite", "--db", str(db), "--count", "3"]) == 0
    tokens = capsys.readouterr().out.split("\n")[:-1]
    assert len(set(tokens)) == 3
    assert not any(token.encode() in db.read_bytes() for token in tokens)


def test_invite_tokens_pass_on_any_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Hex digits only: a token is given as ``--invite TOKEN``, and a command line reads
    one that begins with "-" as an option (base64url's "-" began 1 token in 64)."""
    assert cli.main(["relay", "invite", "--db", str(tmp_path / "r.db"), "--count", "500"]) == 0
    tokens = capsys.readouterr().out.split()
    assert len(set(tokens)) == 500
    assert all(re.fullmatch("[0-9a-f]{32}", token) for token in tokens), tokens


def test_invite_and_report_take_the_database_given_before_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hushchat relay --db DB OPERATION``, as for users and the other operations: the
    operation's own default must not replace DB (a token issued into another database
    registers no one)."""
    db = tmp_path / "relay" / "relay.db"
    db.parent.mkdir()
    queued_mail(db, now=wall_clock_ms())
    monkeypatch.chdir(tmp_path)
    assert cli.main(["relay", "--db", str(db), "invite", "--count", "2"]) == 0
    assert len(capsys.readouterr().out.split()) == 2
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM invites").fetchone() == (2,)
    conn.close()
    assert cli.main(["relay", "--db", str(db), "report"]) == 0
    assert "2 users and 3 devices" in " ".join(capsys.readouterr().out.split())
    assert sorted(path.name for path in tmp_path.iterdir()) == ["relay"]


@pytest.mark.parametrize("argv", [["--count", "0"], ["--count", "1001"], ["--valid-for", "0s"]])
def test_invite_refuses_bad_arguments(argv: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        cli.main(["relay", "invite", "--db", str(tmp_path / "relay.db"), *argv])
    assert list(tmp_path.iterdir()) == []


def test_invite_into_a_file_that_is_not_a_relay_database_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    db.write_bytes(b"garbage" * 100)
    assert cli.main(["relay", "invite", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hushchat relay invite: ") and err.count("\n") == 1
    assert db.read_bytes() == b"garbage" * 100


def test_invite_touches_neither_the_keys_nor_the_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issuing tokens beside a relay never opens its key file: a retention of its own
    would forget keys (and delete mail) the relay still uses."""
    db = tmp_path / "relay.db"
    queued_mail(db, now=wall_clock_ms() - 10 * DEFAULT_RETENTION_SECONDS * 1000)  # long expired
    keys = Path(f"{db}.keys").read_bytes()
    with sqlite3.connect(db) as conn:
        queue = conn.execute("SELECT seq, epoch, sealed FROM deliveries").fetchall()
    conn.close()
    assert cli.main(["relay", "invite", "--db", str(db), "--count", "2"]) == 0
    assert len(capsys.readouterr().out.split()) == 2
    assert Path(f"{db}.keys").read_bytes() == keys
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT seq, epoch, sealed FROM deliveries").fetchall() == queue
        assert conn.execute("SELECT COUNT(*) FROM invites").fetchone() == (2,)
    conn.close()


def test_invite_into_an_older_database_asks_for_the_relay_to_upgrade_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    schema_2_database(db, [])
    before = db.read_bytes()
    assert cli.main(["relay", "invite", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hushchat relay invite: ") and err.count("\n") == 1
    assert "start the relay once to upgrade it" in err
    assert db.read_bytes() == before


async def test_max_mailbox_on_the_command_line_delays_only_the_full_recipient(
    tmp_path: Path,
) -> None:
    # bob stops reading while alice keeps writing to him, to carol, and to a
    # group of bob and dave: nothing but what is addressed to bob waits.
    alice, bob, carol, dave = (make_user(name) for name in ("alice", "bob", "carol", "dave"))
    argv = [*RELAY_COMMAND, "--port", "0", "--db", str(tmp_path / "r.db"), "--max-mailbox", "50"]
    argv += ["--send-limit", "1000/1s"]
    process = await trio.lowlevel.open_process(argv, stderr=subprocess.PIPE)
    try:
        port = await announced_port(process)
        await register(port, alice, bob, carol, dave)
        missed: list[tuple[bytes, bool]] = []  # what bob's full mailbox refused: (payload, group)
        async with connected(port, alice.devices[1]) as sender:
            for n in range(30):
                try:
                    await sender.send_direct("bob", [(1, b"bob %d" % n)])
                except MailboxFull:
                    missed.append((b"bob %d" % n, False))
                await sender.send_direct("carol", [(1, b"carol %d" % n)])
                group = await sender.send_group(b"group %d" % n, [("bob", 1), ("dave", 1)])
                if group.mailbox_full:
                    assert group.mailbox_full == (("bob", 1),)
                    missed.append((b"group %d" % n, True))
        assert len(missed) == 60 - 50
        for user, sent in [(carol, b"carol"), (dave, b"group")]:
            async with connected(port, user.devices[1]) as reader:
                got = [e.payload for e in await envelopes_until_empty(reader, acknowledge=True)]
            assert got == [b"%s %d" % (sent, n) for n in range(30)]
        async with connected(port, bob.devices[1]) as reader:
            first = [e.payload for e in await envelopes_until_empty(reader, acknowledge=True)]
        assert len(first) == 50
        # The sender resends what bob missed, to bob alone, once he has read.
        async with connected(port, alice.devices[1]) as sender:
            for payload, grouped in missed:
                if grouped:
                    await sender.send_group(payload, [("bob", 1)], resend=True)
                else:
                    await sender.send_direct("bob", [(1, payload)], resend=True)
        async with connected(port, bob.devices[1]) as reader:
            second = [e.payload for e in await envelopes_until_empty(reader, acknowledge=True)]
        assert second == [payload for payload, _ in missed]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()


# ------------------------------------------------------------------ operator commands


async def a_relay_database(path: Path) -> None:
    """alice (devices 1, 2) and bob (1), with bob's mail and prekeys, in ``path``."""
    alice, bob = make_user("alice", [1, 2]), make_user("bob")
    async with running_relay(relay_config(path.parent)) as port:
        await register(port, alice, bob)
        async with connected(port, bob.devices[1]) as owner:
            await owner.upload_prekeys(**make_prekeys(bob.devices[1], one_time=3, one_time_kem=3))
        async with connected(port, alice.devices[1]) as sender:
            await sender.send_direct("bob", [(1, b"x" * 100)])
            await sender.send_direct("bob", [(1, b"y" * 20)])
            await sender.send_direct("alice", [(2, b"to my other device")])


def operator(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = cli.main(["relay", *argv])
    out, err = capsys.readouterr()
    return status, out, err


async def test_operator_commands_list_measure_and_delete(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    await a_relay_database(db)
    assert operator(["users", "--db", str(db)], capsys) == (0, "alice\t1 2\nbob\t1\n", "")
    assert operator(["--db", str(db), "users"], capsys)[1] == "alice\t1 2\nbob\t1\n"
    status, out, _ = operator(["mailbox", "bob", "--db", str(db)], capsys)
    sealed = re.fullmatch(
        r"bob device 1: 2 envelopes, (\d+) bytes\nbob: 2 envelopes, \1 bytes\n", out
    )
    assert status == 0 and sealed is not None
    assert int(sealed.group(1)) > 100 + 20  # the payloads, sealed at rest
    status, out, _ = operator(["delete-device", "bob", "1", "--db", str(db)], capsys)
    assert status == 0 and out.startswith("deleted the mailbox (2 envelopes) and prekeys of bob")
    assert operator(["mailbox", "bob", "--db", str(db)], capsys)[1].endswith(
        "bob: 0 envelopes, 0 bytes\n"
    )
    status, out, _ = operator(["delete-user", "alice", "--db", str(db)], capsys)
    assert (status, out) == (0, "deleted user alice: 2 devices, 1 queued envelope\n")
    assert operator(["users", "--db", str(db)], capsys)[1] == "bob\t1\n"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM deliveries").fetchone() == (0,)
        for table in ("one_time_prekeys", "one_time_kem_prekeys", "signed_prekeys"):
            assert conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone() == (0,), table
    # A user deleted by the operator registers again, under a new identity (spec 7.12).
    again = make_user("alice")
    again.identity = make_user("alice, the second").identity
    async with running_relay(relay_config(db.parent)) as port:
        await register(port, again)
        async with connected(port, again.devices[1]) as connection:
            await connection.ping()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["mailbox", "carol"], "hushchat relay mailbox: no user 'carol' at this relay\n"),
        (["delete-user", "carol"], "hushchat relay delete-user: no user 'carol' at this relay\n"),
        (["delete-device", "bob", "7"], "hushchat relay delete-device: bob has no device 7\n"),
        (
            ["delete-device", "carol", "1"],
            "hushchat relay delete-device: no user 'carol' at this relay\n",
        ),
    ],
)
async def test_operator_commands_name_what_is_not_there(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    await a_relay_database(db)
    assert operator([*argv, "--db", str(db)], capsys) == (1, "", says)


def test_operator_commands_create_no_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "none.db"
    assert operator(["users", "--db", str(db)], capsys) == (
        1,
        "",
        f"hushchat relay users: no relay database at {db}\n",
    )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit) as info:
        cli.main(["relay", "delete-device", "bob", "x"])
    assert info.value.code == 2
    assert "argument DEVICE: 'x' is not a whole number" in capsys.readouterr().err


async def test_a_user_deleted_while_the_relay_runs_registers_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A relay that lost a user's devices (or a user who lost them all): the
    # operator deletes the user, and the user registers anew, no restart.
    alice, bob = make_user("alice"), make_user("bob")
    reborn = make_user("alice")
    reborn.identity = make_user("alice, the second").identity
    async with running_relay(relay_config(tmp_path)) as port:
        await register(port, alice, bob)
        async with connected(port, bob.devices[1]) as sender:
            await sender.send_direct("alice", [(1, b"before")])
            argv = ["relay", "delete-user", "alice", "--db", str(tmp_path / "relay.db")]
            assert await trio.to_thread.run_sync(cli.main, argv) == 0
            with pytest.raises(UnknownUser):
                await sender.send_direct("alice", [(1, b"to nobody")])
            async with connected(port) as connection:
                with pytest.raises(AuthenticationFailed):
                    await connection.authenticate("alice", 1, alice.devices[1].identity)
            await register(port, reborn)
            await sender.send_direct("alice", [(1, b"after")])
        async with connected(port, reborn.devices[1]) as receiver:
            assert [e.payload for e in await envelopes_until_empty(receiver, acknowledge=True)] == [
                b"after"
            ]
    assert "deleted user alice: 1 device, 1 queued envelope" in capsys.readouterr().out


async def test_operator_commands_need_the_relay_s_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "relay.db"
    await a_relay_database(db)
    keys = Path(f"{db}.keys")
    keys.rename(tmp_path / "elsewhere.keys")
    before = db.read_bytes()
    assert operator(["users", "--db", str(db)], capsys) == (
        1,
        "",
        f"hushchat relay users: no key file of the relay at {keys}\n",
    )
    assert db.read_bytes() == before and not keys.exists()
    other = ["--key-file", str(tmp_path / "elsewhere.keys")]
    assert operator(["users", "--db", str(db), *other], capsys)[1] == "alice\t1 2\nbob\t1\n"


async def test_a_relay_process_sets_its_startup_objects_aside(tmp_path: Path) -> None:
    """``hushchat relay`` freezes what it made starting (gc.freeze) once it serves, so
    that a full collection, which stops the relay while it runs, does not scan it
    (pauses of 44 to 64 ms were measured mid-run without)."""
    gc.unfreeze()
    config = RelayConfig(
        port=0, db_path=str(tmp_path / "relay.db"), key_file=str(tmp_path / "relay.keys")
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cli._serve_until_signalled, config)
            with trio.fail_after(10):
                while gc.get_freeze_count() == 0:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()  # this test process runs other things
