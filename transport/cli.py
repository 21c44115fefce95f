"""The ``hushchat`` command: ``relay`` here, and the commands other packages add.

Exit status: 0 after a clean stop, 1 when the environment stops a command
(a port in use, an unreadable database or TLS file), 2 for bad arguments,
130 after Ctrl-C where the command has no other meaning for it. A
failure is one line on stderr that names the problem and what to do; nothing
is created on failure.

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
import os
import signal
import sqlite3
import ssl
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TypeAlias, TypeVar

import trio
from cryptography import x509

from hushchat.protocol.errors import InvalidArgument, StateError, UnknownStateVersion

from .relay.config import (
    Registration,
    RelayConfig,
    RelayLimits,
    parse_duration,
    parse_rate,
    wall_clock_ms,
)
from .relay.invites import issue_invites
from .relay.ratelimit import RateLimit
from .relay.report import format_report, relay_report
from .relay.server import (
    RelayStartError,
    database_error,
    freeze_startup_objects,
    is_database_error,
    serve_relay,
)
from .relay.storage.atrest import RelayKeysMissing, default_key_file
from .relay.storage.interface import UnsuitableDatabase
from .relay.storage.names import is_postgres_url, without_password
from .relay.storage.schema import SCHEMA_VERSION, sqlite_schema_version
from .relay.storage.sqlite import SqliteDatabase
from .wire import limits as L
from .wire.frames import MAX_RELAY_NAME_SIZE
from .wire.limits import DEFAULT_INVITE_LIFETIME_SECONDS, DEFAULT_RETENTION_SECONDS

logger = logging.getLogger("hushchat.relay")

# The relay's rate limits as --bundle-fetch-limit, --one-time-prekey-budget,
# --send-limit and --frame-limit take them (wire.limits gives the reasons; a
# test checks these are the same).
BUNDLE_FETCH_LIMIT = "6/1h"
ONE_TIME_PREKEY_BUDGET = "20/1h"
SEND_LIMIT = "60/1s"
FRAME_LIMIT = "1000/2s"

# Invitation tokens one 'hushchat relay invite' issues at most: a batch for a
# team or a class, not a way around the gate.
MAX_INVITES_AT_ONCE = 1000

# What add_subparsers() returns; each SUBCOMMANDS function adds one parser to it.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _duration(text: str) -> int:
    try:
        return parse_duration(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _rate(text: str) -> RateLimit:
    try:
        return parse_rate(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argument type: a whole number from ``low`` (to ``high``)."""
    bounds = f"from {low}" if high is None else f"from {low} to {high}"

    def whole(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number {bounds}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not a whole number {bounds}")
        return value

    return whole


def _port(text: str) -> int:
    """A TCP port: 1 to 65535, or 0 for any free port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: 1 to 65535, or 0 for any")
    return port


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(LOG_LEVELS)}")
    return level


def fail(command: str, message: str) -> int:
    """Print one line on stderr; the exit status of an environment failure."""
    print(f"hushchat {command}: {message}", file=sys.stderr)
    return 1


# ------------------------------------------------------------------ relay


def add_relay_command(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser(
        "relay",
        help="run a relay server",
        description="Run a hushchat relay: store-and-forward of ciphertext, device and "
        "prekey directories, on one SQLite file or on a PostgreSQL database that several relays "
        "share. Exit status: 0 after SIGINT or SIGTERM, "
        "1 if it cannot start (the reason on stderr), 2 for bad arguments. "
        "'hushchat relay invite' issues invitation tokens into its database.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=_port, default=7400, help="TCP port (0: any free port)")
    parser.add_argument(
        "--db",
        default="hushchat-relay.db",
        help="SQLite database file, or a PostgreSQL URL (postgresql://...) that several "
        "relays share (needs hushchat[postgres])",
    )
    parser.add_argument(
        "--key-file",
        help="the keys of the queued mail, created at first start; never back it up "
        "(default: the database's path + .keys; on PostgreSQL, required: the same file "
        "on every relay)%(default).0s",
    )
    parser.add_argument(
        "--reset-keys",
        action="store_true",
        help="the key file is lost: discard the queued mail sealed under it (devices are "
        "told) and start a new one",
    )
    parser.add_argument(
        "--retention",
        type=_duration,
        default=f"{DEFAULT_RETENTION_SECONDS // 3600}h",
        help="how long undelivered mail is kept: a number and a unit s, m, h or d",
    )
    parser.add_argument(
        "--name",
        default=argparse.SUPPRESS,
        help="the host name clients dial, which the relay announces and devices sign when "
        "authenticating (they refuse a relay calling itself otherwise) (default: the first "
        "DNS name of --tls-cert, else --host; needed when --host is every address)",
    )
    parser.add_argument(
        "--bundle-fetch-limit",
        type=_rate,
        default=BUNDLE_FETCH_LIMIT,
        metavar="N/DURATION",
        help="prekey bundles one device may fetch of one other device: N at once, regained "
        "at N per DURATION",
    )
    parser.add_argument(
        "--one-time-prekey-budget",
        type=_rate,
        default=ONE_TIME_PREKEY_BUDGET,
        metavar="N/DURATION",
        help="one-time prekeys handed out per device, whoever fetches: N at once, regained at "
        "N per DURATION; fetches beyond get the signed and last-resort keys only, so this "
        "bounds what any number of registered devices can drain",
    )
    parser.add_argument(
        "--send-limit",
        type=_rate,
        default=SEND_LIMIT,
        metavar="N/DURATION",
        help="sends per connection: N at once, regained at N per DURATION (beyond: "
        "RATE_LIMITED with the time to wait)",
    )
    parser.add_argument(
        "--frame-limit",
        type=_rate,
        default=FRAME_LIMIT,
        metavar="N/DURATION",
        help="frames of any kind read per connection: N at once, regained at N per DURATION "
        "(beyond, the relay reads that connection no faster)",
    )
    parser.add_argument(
        "--max-mailbox",
        type=_whole(1),
        default=L.MAX_MAILBOX_SIZE,
        metavar="N",
        help="envelopes queued per device; a full mailbox takes no more until it is read, "
        "while sends to other devices go on",
    )
    parser.add_argument(
        "--max-in-flight",
        type=_whole(1, L.MAX_IN_FLIGHT),
        default=L.MAX_IN_FLIGHT,
        metavar="N",
        help="envelopes pushed to a device and not yet acknowledged",
    )
    parser.add_argument(
        "--sweep-interval",
        type=_duration,
        metavar="DURATION",
        help="how often expired mail is deleted and its keys cease to exist "
        f"(default: at every epoch boundary, 1/{L.EPOCHS_PER_RETENTION} of --retention)"
        "%(default).0s",
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain (enables TLS with --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--log-level",
        type=_log_level,
        default="INFO",
        help=f"logging level: {', '.join(LOG_LEVELS)}",
    )
    parser.add_argument(
        "--registration",
        choices=[mode.value for mode in Registration],
        default=Registration.OPEN.value,
        help="who may register a new user: anyone (open), the holders of tokens from "
        "'hushchat relay invite' (invite), or no one (closed)",
    )
    parser.set_defaults(run=run_relay)
    operations = parser.add_subparsers(
        dest="action",
        metavar="OPERATION",
        title="operator commands",
        description="Without one, the relay runs. Each works on the relay's database "
        "(--db) and key file, whether the relay is running or not; see hushchat relay "
        "OPERATION --help.",
    )
    for add_operation in RELAY_OPERATIONS:
        add_operation(operations)


def add_report_command(operations: SubParsers) -> None:
    report = operations.add_parser(
        "report",
        help="what the relay holds, and what anyone who seizes it can read",
        description="Print a transparency report of a relay database and its key file: "
        "what it holds (users, devices, prekeys, queued envelopes by age), the oldest epoch "
        "whose keys still exist, and what anyone who seizes the relay can and cannot read. "
        "Reads only; the relay may be running.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_database_arguments(report)
    report.set_defaults(run=run_report)


def add_invite_command(operations: SubParsers) -> None:
    invite = operations.add_parser(
        "invite",
        help="issue invitation tokens",
        description="Issue invitation tokens into the relay's database (on PostgreSQL, a "
        "migrated one), running or not, and "
        "print one per line: each registers one new user at a relay run with "
        "--registration invite, until it expires. The database keeps only a hash of each.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_database_arguments(invite, key_file=None)
    invite.add_argument("--count", type=_count, default=1, help="how many tokens")
    invite.add_argument(
        "--valid-for",
        type=_duration,
        default=f"{DEFAULT_INVITE_LIFETIME_SECONDS // 86400}d",
        help="how long each token is good for: a number and a unit s, m, h or d",
    )
    invite.set_defaults(run=run_invite)


def run_report(args: argparse.Namespace) -> int:
    if is_postgres_url(args.db) and args.key_file is None:
        return fail("relay report", "a relay database on PostgreSQL needs its relays' --key-file")
    key_file = args.key_file or default_key_file(args.db)
    try:
        report = relay_report(args.db, key_file, wall_clock_ms())
    except FileNotFoundError:
        return fail("relay report", f"no such database: {args.db}")
    except sqlite3.Error as exc:
        return fail("relay report", f"{args.db} is not a hushchat relay database ({exc})")
    except RelayKeysMissing as exc:
        return fail("relay report", exc.message)
    except Exception as exc:  # psycopg's errors, a PostgreSQL database without a relay schema
        if not (is_database_error(exc) or isinstance(exc, StateError)):
            raise
        return fail("relay report", database_error(args.db, exc))
    print(format_report(report), end="")
    return 0


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_INVITES_AT_ONCE:
        raise argparse.ArgumentTypeError(f"{text!r}: a count from 1 to {MAX_INVITES_AT_ONCE}")
    return int(text)


def run_invite(args: argparse.Namespace) -> int:
    folder = os.path.dirname(os.path.abspath(args.db))
    if not is_postgres_url(args.db) and not os.path.isdir(folder):
        return fail("relay invite", f"no such folder for the database: {folder}")
    try:
        tokens = issue_invites(args.db, args.count, lifetime_seconds=args.valid_for)
    except (sqlite3.Error, OSError) as exc:
        return fail("relay invite", f"{args.db} is not a hushchat relay database ({exc})")
    except UnknownStateVersion as exc:
        return fail("relay invite", f"{without_password(args.db)}: {exc}")
    except Exception as exc:  # psycopg's errors
        if not is_database_error(exc):
            raise
        return fail("relay invite", database_error(args.db, exc))
    for token in tokens:
        print(token)
    return 0


def _server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def run_relay(args: argparse.Namespace) -> int:
    if (args.tls_cert is None) != (args.tls_key is None):
        print("hushchat relay: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    ssl_context = None
    if args.tls_cert is not None:
        try:
            ssl_context = _server_ssl_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            return fail("relay", f"cannot load the TLS certificate and key: {reason}")
    if is_postgres_url(args.db):
        if args.key_file is None:
            # Every relay of a cluster needs a copy of one key file (spec 7.13).
            return fail("relay", "a relay on PostgreSQL needs --key-file (the same on every relay)")
    elif args.db != ":memory:":
        folder = os.path.dirname(os.path.abspath(args.db))
        if not os.path.isdir(folder):
            return fail("relay", f"no such folder for the database: {folder}")
    key_folder = os.path.dirname(os.path.abspath(args.key_file or args.db))
    if args.key_file is not None and not os.path.isdir(key_folder):
        return fail("relay", f"no such folder for the key file: {key_folder}")
    name = getattr(args, "name", None)
    if name == "":
        print(f"hushchat relay: a relay name is 1 to {MAX_RELAY_NAME_SIZE} bytes", file=sys.stderr)
        return 2
    if name is None and args.tls_cert is not None:
        name = _certificate_name(args.tls_cert)
    try:
        config = RelayConfig(
            host=args.host,
            port=args.port,
            db_path=args.db,
            key_file=args.key_file,
            reset_keys=args.reset_keys,
            retention_seconds=args.retention,
            name=name or "",
            ssl_context=ssl_context,
            registration=Registration(args.registration),
            limits=relay_limits(args),
        )
    except InvalidArgument as exc:
        print(f"hushchat relay: {exc.message}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve_until_signalled, config)
    except ExceptionGroup as group:
        start_error = _only(group, RelayStartError)
        if start_error is None:
            raise
        return fail("relay", str(start_error))
    return 0


def relay_limits(args: argparse.Namespace) -> RelayLimits:
    """The relay's limits from ``hushchat relay``'s arguments (InvalidArgument if they clash)."""
    return RelayLimits(
        bundle_fetch_rate=args.bundle_fetch_limit,
        one_time_prekey_budget=args.one_time_prekey_budget,
        send_rate=args.send_limit,
        frame_rate=args.frame_limit,
        max_mailbox_size=args.max_mailbox,
        max_in_flight=args.max_in_flight,
        sweep_interval=None if args.sweep_interval is None else float(args.sweep_interval),
    )


def _certificate_name(path: str) -> str | None:
    """The first DNS name of the (loaded, so readable) leaf certificate: what TLS clients dial."""
    with open(path, "rb") as pem:
        certificate = x509.load_pem_x509_certificate(pem.read())
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    dns_names = names.value.get_values_for_type(x509.DNSName)
    return dns_names[0] if dns_names else None


E = TypeVar("E", bound=Exception)


def _only(group: ExceptionGroup[Exception], kind: type[E]) -> E | None:
    """The error of ``kind`` if it is all that ``group`` holds (nested or not)."""
    errors: list[Exception] = [group]
    while len(errors) == 1 and isinstance(errors[0], ExceptionGroup):
        errors = list(errors[0].exceptions)
    return errors[0] if len(errors) == 1 and isinstance(errors[0], kind) else None


async def _serve_until_signalled(config: RelayConfig) -> None:
    # SIGTERM (service managers) and SIGINT (Ctrl-C) stop the relay cleanly:
    # connections are closed and the database is checkpointed and closed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_relay, config)
            freeze_startup_objects()
            async for signum in signals:
                logger.info("stopping on %s", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


# ------------------------------------------------------------------ relay operator commands
# hushchat relay OPERATION: one function adds each (RELAY_OPERATIONS); each opens
# the relay's database and key file itself. SQLite's locks keep it apart from a
# running relay.


def _add_database_arguments(
    parser: argparse.ArgumentParser,
    *,
    key_file: str | None = "its key file (default: the database's path + .keys; on "
    "PostgreSQL, the relays' --key-file, which it needs)",
) -> None:
    # SUPPRESS: a --db given before the operation (hushchat relay --db X users) stays;
    # the relay's parser holds the defaults.
    parser.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        help="the relay's SQLite database file, or postgresql:// URL (password from "
        "PGPASSWORD or ~/.pgpass) (default: hushchat-relay.db)",
    )
    if key_file is not None:
        parser.add_argument("--key-file", default=argparse.SUPPRESS, help=key_file)


def _on_database(args: argparse.Namespace, work: Callable[[SqliteDatabase], int]) -> int:
    """Run ``work`` on the relay's database; its exit status (1 if it will not open).

    It creates nothing: neither a database nor a key file (the relay's first
    start makes both).
    """
    command = f"relay {args.action}"
    if is_postgres_url(args.db):
        return _on_postgres(args, command, work)
    key_file = args.key_file or default_key_file(args.db)
    for path, what in ((args.db, "relay database"), (key_file, "key file of the relay")):
        if not os.path.isfile(path):
            return fail(command, f"no {what} at {path}")
    try:
        database = SqliteDatabase(args.db, key_file=key_file, maintain=False)
    except (sqlite3.Error, StateError, OSError, RelayKeysMissing) as exc:
        return fail(command, database_error(args.db, exc))
    try:
        return work(database)
    finally:
        database.close()


def _on_postgres(
    args: argparse.Namespace, command: str, work: Callable[[SqliteDatabase], int]
) -> int:
    """:func:`_on_database` on a PostgreSQL database (it creates no schema either)."""
    from .relay.storage.postgres import PostgresDatabase, schema_version

    if args.key_file is None:
        return fail(command, "a relay database on PostgreSQL needs its relays' --key-file")
    if not os.path.isfile(args.key_file):
        return fail(command, f"no key file of the relay at {args.key_file}")
    try:
        if schema_version(args.db) == 0:
            return fail(command, f"no relay database at {without_password(args.db)}")
        database = PostgresDatabase(args.db, key_file=args.key_file, maintain=False)
    except Exception as exc:  # psycopg's errors, a newer schema, the wrong key file
        expected = (StateError, OSError, RelayKeysMissing)
        if not isinstance(exc, expected) and type(exc).__module__.split(".")[0] != "psycopg":
            raise
        return fail(command, database_error(args.db, exc))
    try:
        return work(database)
    finally:
        database.close()


def _operation_parser(operations: SubParsers, name: str, summary: str) -> argparse.ArgumentParser:
    parser = operations.add_parser(
        name,
        help=summary,
        description=f"{summary[0].upper()}{summary[1:]}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_database_arguments(parser)
    return parser


def add_users_command(operations: SubParsers) -> None:
    parser = _operation_parser(
        operations, "users", "list the registered users, each with its device ids"
    )
    parser.set_defaults(run=run_users)


def run_users(args: argparse.Namespace) -> int:
    def work(database: SqliteDatabase) -> int:
        for user_id, devices in database.users():
            print(f"{user_id}\t{' '.join(map(str, devices))}")
        return 0

    return _on_database(args, work)


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def add_mailbox_command(operations: SubParsers) -> None:
    parser = _operation_parser(
        operations, "mailbox", "show a user's mailbox size: envelopes and bytes queued per device"
    )
    parser.add_argument("user", metavar="USER", help="the user id")
    parser.set_defaults(run=run_mailbox)


def run_mailbox(args: argparse.Namespace) -> int:
    def work(database: SqliteDatabase) -> int:
        sizes = database.mailbox_sizes(args.user)
        if sizes is None:
            return fail("relay mailbox", f"no user {args.user!r} at this relay")
        for device_id, envelopes, size in sizes:
            print(f"{args.user} device {device_id}: {_plural(envelopes, 'envelope')}, {size} bytes")
        total = _plural(sum(envelopes for _, envelopes, _ in sizes), "envelope")
        print(f"{args.user}: {total}, {sum(size for _, _, size in sizes)} bytes")
        return 0

    return _on_database(args, work)


def add_delete_user_command(operations: SubParsers) -> None:
    parser = _operation_parser(
        operations,
        "delete-user",
        "delete a user: its device list, devices, mailboxes and prekeys; the user id is free "
        "to register again (say, for a user who lost every device)",
    )
    parser.add_argument("user", metavar="USER", help="the user id")
    parser.set_defaults(run=run_delete_user)


def run_delete_user(args: argparse.Namespace) -> int:
    def work(database: SqliteDatabase) -> int:
        deleted = database.delete_user(args.user)
        if deleted is None:
            return fail("relay delete-user", f"no user {args.user!r} at this relay")
        devices, envelopes = deleted
        print(
            f"deleted user {args.user}: {_plural(devices, 'device')}, "
            f"{_plural(envelopes, 'queued envelope')}"
        )
        return 0

    return _on_database(args, work)


def add_delete_device_command(operations: SubParsers) -> None:
    parser = _operation_parser(
        operations,
        "delete-device",
        "delete a device's mailbox and prekeys; the device stays in its user's signed device "
        "list, which only the user can change",
    )
    parser.add_argument("user", metavar="USER", help="the user id")
    parser.add_argument("device", metavar="DEVICE", type=_whole(0, 2**32 - 1), help="device id")
    parser.set_defaults(run=run_delete_device)


def run_delete_device(args: argparse.Namespace) -> int:
    def work(database: SqliteDatabase) -> int:
        deleted = database.delete_device_mail(args.user, args.device)
        if deleted is None and database.mailbox_sizes(args.user) is None:
            return fail("relay delete-device", f"no user {args.user!r} at this relay")
        if deleted is None:
            return fail("relay delete-device", f"{args.user} has no device {args.device}")
        mailbox = _plural(deleted, "envelope")
        print(
            f"deleted the mailbox ({mailbox}) and prekeys of {args.user}'s device "
            f"{args.device}; it stays in {args.user}'s signed device list"
        )
        return 0

    return _on_database(args, work)


def add_migrate_command(operations: SubParsers) -> None:
    parser = operations.add_parser(
        "migrate",
        help="bring the relay's database to this version's schema, keeping queued mail",
        description="Bring the relay's database (a SQLite file, or a PostgreSQL URL) to "
        "the schema of this version, in one transaction, keeping the directory and "
        "every queued envelope. A relay also migrates its database when it starts; run "
        "this first to upgrade a cluster: stop the old relays, migrate once, start the "
        "new ones. A SQLite database needs its key file; a PostgreSQL one does not.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_database_arguments(
        parser,
        key_file="its key file (default: the database's path + .keys; not used on PostgreSQL)",
    )
    parser.set_defaults(run=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    if is_postgres_url(args.db):
        from .relay.storage.postgres import POSTGRES_SCHEMA_VERSION, migrate_postgres

        try:
            before = migrate_postgres(args.db)
        except Exception as exc:  # psycopg's errors, a newer schema, a database not in UTF8
            if not isinstance(exc, StateError | UnsuitableDatabase) and not is_database_error(exc):
                raise
            return fail("relay migrate", database_error(args.db, exc))
        after = POSTGRES_SCHEMA_VERSION
        name = without_password(args.db)
    else:
        if not os.path.isfile(args.db):
            return fail("relay migrate", f"no relay database at {args.db}")
        key_file = args.key_file or default_key_file(args.db)
        try:
            before = sqlite_schema_version(args.db)
            SqliteDatabase(args.db, key_file=key_file).close()  # migrates as a relay's start does
        except (sqlite3.Error, StateError, OSError, RelayKeysMissing) as exc:
            return fail("relay migrate", database_error(args.db, exc))
        after, name = SCHEMA_VERSION, args.db
    if before == after:
        print(f"{name}: schema {after}, nothing to migrate")
    elif before == 0:
        print(f"{name}: created with schema {after}")
    else:
        print(f"{name}: migrated from schema {before} to {after}")
    return 0


RELAY_OPERATIONS: list[Callable[[SubParsers], None]] = [
    add_migrate_command,
    add_report_command,
    add_invite_command,
    add_users_command,
    add_mailbox_command,
    add_delete_user_command,
    add_delete_device_command,
]

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
    try:
        args = build_parser().parse_args(argv)
        status: int = args.run(args)
    except KeyboardInterrupt:  # Ctrl-C before a command's own handling: no traceback
        print(file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
