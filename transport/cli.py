"""The ``hushchat`` command: ``relay`` here, and the commands other packages add.

A subcommand is a function ``add_NAME_command(subparsers)`` that adds its
parser and sets ``run`` (a function from the parsed arguments to an exit
status) with ``set_defaults``. The relay's is in :data:`SUBCOMMANDS`; the
development tools (``bench``, ``vectors``) register theirs as entry points of
the group :data:`COMMAND_ENTRY_POINTS` (pyproject.toml), so the transport never
imports them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TypeAlias

import trio

from hushchat.protocol.errors import InvalidArgument

from .relay.config import RelayConfig, parse_duration
from .relay.server import serve_relay
from .wire.limits import DEFAULT_RETENTION_SECONDS

logger = logging.getLogger("hushchat.relay")

# What add_subparsers() returns; each SUBCOMMANDS function adds one parser to it.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


# ------------------------------------------------------------------ relay


def add_relay_command(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "relay",
        help="run a relay server",
        description="Run a hushchat relay: store-and-forward of ciphertext, device and "
        "prekey directories, on one SQLite file.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7400, help="TCP port (0: any free port)")
    parser.add_argument("--db", default="hushchat-relay.db", help="SQLite database file")
    parser.add_argument(
        "--retention",
        type=_duration,
        default=DEFAULT_RETENTION_SECONDS,
        help="how long undelivered mail is kept, e.g. 72h, 3d, 90m, 3600s (default 72h)",
    )
    parser.add_argument(
        "--name",
        default="hushchat-relay",
        help="relay name that devices sign when authenticating: the public host name",
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain (enables TLS with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.set_defaults(run=run_relay)


def _server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def run_relay(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        print("hushchat relay: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    ssl_context = None
    if args.tls_cert is not None:
        ssl_context = _server_ssl_context(args.tls_cert, args.tls_key)
    config = RelayConfig(
        host=args.host,
        port=args.port,
        db_path=args.db,
        retention_seconds=args.retention,
        name=args.name,
        ssl_context=ssl_context,
    )
    trio.run(_serve_until_signalled, config)
    return 0


async def _serve_until_signalled(config: RelayConfig) -> None:
    # SIGTERM (service managers) and SIGINT (Ctrl-C) stop the relay cleanly:
    # connections are closed and the database is checkpointed and closed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_relay, config)
            async for signum in signals:
                logger.info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


# ------------------------------------------------------------------ entry point

SUBCOMMANDS: list[Callable[[SubParsers], None]] = [add_relay_command]
COMMAND_ENTRY_POINTS = "hushchat.commands"


def _installed_commands() -> list[Callable[[SubParsers], None]]:
    found = sorted(metadata.entry_points(group=COMMAND_ENTRY_POINTS), key=lambda ep: ep.name)
    return [entry_point.load() for entry_point in found]


def _version() -> str:
    try:
        return metadata.version("hushchat")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hushchat", description="hushchat tools")
    parser.add_argument("--version", action="version", version=f"hushchat {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in SUBCOMMANDS + _installed_commands():
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
