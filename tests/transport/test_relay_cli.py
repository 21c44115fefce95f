"""The ``hushchat relay`` command line."""

from __future__ import annotations

import signal
import ssl
import subprocess
from pathlib import Path

import pytest
import trio

from hushchat.transport import cli
from hushchat.transport.wire.limits import DEFAULT_RETENTION_SECONDS
from tests.support.children import RELAY_COMMAND
from tests.support.relay import announced_port, connected, self_signed


def test_relay_arguments() -> None:
    args = cli.build_parser().parse_args(
        ["relay", "--port", "0", "--db", "x.db", "--retention", "90m", "--name", "relay.example"]
    )
    assert (args.command, args.port, args.db, args.retention) == ("relay", 0, "x.db", 5400)
    assert args.name == "relay.example" and args.run is cli.run_relay
    defaults = cli.build_parser().parse_args(["relay"])
    assert (defaults.host, defaults.retention) == ("127.0.0.1", DEFAULT_RETENTION_SECONDS)


@pytest.mark.parametrize("argv", [["relay", "--retention", "3 days"], ["relay", "--port", "x"], []])
def test_bad_arguments_exit_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "usage: hushchat" in capsys.readouterr().err


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
            assert connection.relay_name == "hushchat-relay"
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
    assert db.exists()
