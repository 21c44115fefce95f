"""The relay's transparency report: what it holds, and what anyone who seizes it can read.

:func:`relay_report` reads a relay database (a SQLite file or a PostgreSQL
URL; read-only, while the relay runs or not) and its key file, and counts;
it never opens a sealed row.
:func:`format_report` writes it out for ``hushchat relay report``.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .storage.atrest import KeyState, read_key_file
from .storage.names import is_postgres_url, without_password
from .storage.schema import (
    BUDGETS_SCHEMA_VERSION,
    SCHEMA_VERSION,
    SEALED_SCHEMA_VERSION,
    UNSEALED_SCHEMA_VERSION,
)

# Columns the report's text is wrapped to.
REPORT_WIDTH = 79
HOUR_MS = 3600 * 1000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True, slots=True)
class QueueAge:
    """Envelopes queued in one age band (by their epoch's start)."""

    label: str
    envelopes: int


@dataclass(frozen=True, slots=True)
class RelayReport:
    """What a relay database and its key file hold, counted."""

    db_path: str
    key_file: str
    now: int
    schema_version: int
    sealed: bool  # the queue is sealed at rest (every schema but SQLite's first)
    users: int
    devices: int
    signed_prekeys: int
    last_resort_kem_prekeys: int
    one_time_prekeys: int
    one_time_kem_prekeys: int
    envelopes: int
    payloads: int
    payload_bytes: int
    ages: tuple[QueueAge, ...]
    notices: int
    epoch_seconds: int | None
    # The key file: None if absent; its held epoch if it belongs to this database.
    key_state: KeyState | None
    key_file_matches: bool
    unreadable_envelopes: int  # in epochs whose keys no longer exist
    budgets: int  # devices whose one-time prekeys were taken lately (a budget row each)

    @property
    def keys_since(self) -> int | None:
        """Mail accepted from this time (ms) on can be opened with the key file."""
        if self.key_state is None or not self.key_file_matches:
            return None
        return self.key_state.epoch * self.key_state.epoch_seconds * 1000


def relay_report(db_path: str, key_file: str, now: int) -> RelayReport:
    """Count what ``db_path`` (a SQLite file or a PostgreSQL URL) and ``key_file`` hold at
    ``now`` (ms).

    FileNotFoundError if there is no SQLite file; RelayKeysMissing if the key
    file is damaged; sqlite3.Error if the file is not a relay database;
    on PostgreSQL, psycopg's errors, and UnknownStateVersion if the database
    has no relay schema or a newer one.
    """
    if is_postgres_url(db_path):
        version, counts = _postgres_counts(db_path)
        shown = without_password(db_path)
    else:
        version, counts = _sqlite_counts(db_path)
        shown = db_path
    return _report(shown, key_file, now, version, counts)


@dataclass(frozen=True, slots=True)
class _Counts:
    """What the report reads of a database, in one read-only transaction."""

    sealed: bool
    meta: dict[str, bytes]
    epochs: list[tuple[int, int]]  # (epoch, envelopes)
    notices: int
    payload_bytes: int
    tables: tuple[int, ...]  # COUNT(*) of REPORT_TABLES, in order
    budgets: int  # rows of one_time_budgets (0 in a schema without it)


# The tables the report counts the rows of, in RelayReport's order.
REPORT_TABLES = (
    "users",
    "devices",
    "signed_prekeys",
    "last_resort_kem_prekeys",
    "one_time_prekeys",
    "one_time_kem_prekeys",
    "deliveries",
    "payloads",
)


def _read_counts(
    query: Callable[[str], list[tuple[Any, ...]]], sealed: bool, budgets: bool
) -> _Counts:
    """The counts, read with ``query`` (SQL spoken alike by SQLite and PostgreSQL);
    ``budgets``: the schema has one_time_budgets."""

    def count(sql: str) -> int:
        return int(query(sql)[0][0] or 0)

    budget_rows = count("SELECT COUNT(*) FROM one_time_budgets") if budgets else 0

    if not sealed:
        return _Counts(
            False,
            {},
            [],
            0,
            count("SELECT SUM(LENGTH(data)) FROM payloads"),
            tuple(count(f"SELECT COUNT(*) FROM {table}") for table in REPORT_TABLES),
            budget_rows,
        )
    return _Counts(
        True,
        {str(name): bytes(value) for name, value in query("SELECT name, value FROM meta")},
        [
            (int(epoch), int(n))
            for epoch, n in query(
                "SELECT epoch, COUNT(*) FROM deliveries GROUP BY epoch ORDER BY epoch"
            )
        ],
        count("SELECT COUNT(*) FROM mailboxes WHERE noticed = 1"),
        count("SELECT SUM(LENGTH(sealed)) FROM payloads"),
        tuple(count(f"SELECT COUNT(*) FROM {table}") for table in REPORT_TABLES),
        budget_rows,
    )


def _sqlite_counts(db_path: str) -> tuple[int, _Counts]:
    if not os.path.exists(db_path):
        raise FileNotFoundError(db_path)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if not UNSEALED_SCHEMA_VERSION <= version <= SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version}: not a relay database")
        db.execute("BEGIN")  # one snapshot for every count
        counts = _read_counts(
            lambda sql: db.execute(sql).fetchall(),
            version >= SEALED_SCHEMA_VERSION,
            version >= BUDGETS_SCHEMA_VERSION,
        )
        db.execute("COMMIT")
        return version, counts
    finally:
        db.close()


def _postgres_counts(dsn: str) -> tuple[int, _Counts]:
    """The counts of a PostgreSQL relay database, in one read-only snapshot (every
    schema version of PostgreSQL seals the queue)."""
    from .storage.postgres import POSTGRES_BUDGETS_SCHEMA_VERSION, read_only_snapshot

    with read_only_snapshot(dsn) as (version, query):
        return version, _read_counts(query, True, version >= POSTGRES_BUDGETS_SCHEMA_VERSION)


def _report(db_path: str, key_file: str, now: int, version: int, counts: _Counts) -> RelayReport:
    meta, epochs, notices = counts.meta, counts.epochs, counts.notices
    users, devices, signed, last_resort, one_time, one_time_kem, envelopes, payloads = counts.tables
    epoch_seconds = (
        int.from_bytes(meta["epoch_seconds"], "big") if "epoch_seconds" in meta else None
    )
    state = read_key_file(key_file)
    matches = state is not None and meta.get("chain_id") == state.chain_id
    ages: dict[str, int] = {}
    unreadable = 0
    if epoch_seconds is not None:
        for epoch, envelopes in epochs:
            age = now - epoch * epoch_seconds * 1000
            label = (
                "accepted within the last hour"
                if age < HOUR_MS
                else "1 hour to 1 day ago"
                if age < DAY_MS
                else "1 to 3 days ago"
                if age < 3 * DAY_MS
                else "more than 3 days ago"
            )
            ages[label] = ages.get(label, 0) + envelopes
            if not matches or state is None or epoch < state.epoch:
                unreadable += envelopes
    return RelayReport(
        db_path,
        key_file,
        now,
        version,
        counts.sealed,
        users,
        devices,
        signed,
        last_resort,
        one_time,
        one_time_kem,
        envelopes,
        payloads,
        counts.payload_bytes,
        tuple(QueueAge(label, n) for label, n in ages.items()),
        notices,
        epoch_seconds,
        state,
        matches,
        unreadable,
        counts.budgets,
    )


def _when(ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _wrapped(lines: list[str]) -> str:
    """Each line wrapped to REPORT_WIDTH, continued under its own text."""
    out = []
    for line in lines:
        text = line.lstrip(" ")
        indent = " " * (len(line) - len(text))
        more = indent + "  " if text.startswith("- ") else indent
        wrapped = textwrap.wrap(text, REPORT_WIDTH, initial_indent=indent, subsequent_indent=more)
        out += wrapped or [""]
    return "\n".join(out) + "\n"


def _count(n: int, noun: str) -> str:
    """``n`` and the noun, singular for one: "1 user", "2 users", "1,024 bytes"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def format_report(report: RelayReport) -> str:
    """The report as text: the counts, then what is readable and what is not."""
    r = report
    lines = [
        f"hushchat relay transparency report, {_when(r.now)}",
        f"database {r.db_path} (schema {r.schema_version}), key file {r.key_file}",
        "",
        "What the relay holds:",
        f"  {_count(r.users, 'user')} and {_count(r.devices, 'device')}: signed device lists",
        f"  prekeys: {r.signed_prekeys} signed, {r.last_resort_kem_prekeys} last-resort "
        f"ML-KEM-768, {r.one_time_prekeys} one-time X25519, {r.one_time_kem_prekeys} "
        "one-time ML-KEM-768 (public keys)",
        f"  {_count(r.envelopes, 'queued envelope')} "
        f"({_count(r.payloads, 'distinct payload')}, {_count(r.payload_bytes, 'byte')})",
    ]
    lines += [f"    {age.envelopes} {age.label}" for age in r.ages]
    if r.notices:
        lines.append(f"  {_count(r.notices, 'expiry notice')} not yet told to their devices")
    if not r.sealed:
        lines += [
            "",
            "This database predates sealing at rest: everything above is readable by anyone",
            "with the file. Start the relay once to seal its queue.",
        ]
        return _wrapped(lines)
    if r.epoch_seconds is not None:
        lines.append(f"  epochs of {r.epoch_seconds} s; keys change at every epoch boundary")
    lines.append("")
    since = r.keys_since
    if r.key_state is None:
        lines.append(f"The key file {r.key_file} does not exist: no queued envelope can be opened.")
    elif not r.key_file_matches:
        lines.append(
            f"The key file {r.key_file} holds another key chain: no queued envelope can be opened."
        )
    else:
        assert since is not None
        lines.append(
            f"The oldest epoch whose keys exist began {_when(since)}: the key file derives "
            "its keys and every later one, never an earlier one."
        )
    readable = r.envelopes - r.unreadable_envelopes
    lines += [
        "",
        "Anyone who seizes the relay (its disk and key file) can read:",
        f"  - the directory: {_count(r.users, 'user id')} with their signed device lists and "
        "public prekeys. It is public by design (the relay serves a user's list to any device that "
        "names the user) and outlives every key.",
    ]
    if r.budgets:
        lines.append(
            f"  - the one-time budgets of {_count(r.budgets, 'device')} "
            "whose one-time prekeys were taken "
            "in about the last hour: how many and when the last was, not who took them (a "
            "database alone shows them too)."
        )
    if readable:
        lines.append(
            f"  - for the {_count(readable, 'envelope')} still queued"
            + (f" (accepted since {_when(since)})" if since is not None else "")
            + ": who sent each to which device, when, whether one-to-one or group, its size "
            "and its ciphertext, which is end-to-end encrypted (a group message's header names "
            "its group id)."
        )
    else:
        lines.append("  - nothing of the queue: no envelope can be opened with the key file.")
    lines += [
        "They cannot read:",
        "  - message contents, group titles or memberships: end-to-end encrypted;",
        "  - anything queued before"
        + (f" {_when(since)}" if since is not None else " the oldest epoch with keys")
        + ": deleted, and its keys no longer exist, in this key file or any later one, so "
        "no copy of the database made earlier opens with them;",
        "  - without the key file (a database backup, snapshot or replica alone), nothing of "
        "the queue: not even whose mailbox a row is in.",
    ]
    if r.unreadable_envelopes:
        lines.append(
            f"  {_count(r.unreadable_envelopes, 'queued row')} "
            f"{'is' if r.unreadable_envelopes == 1 else 'are'} in epochs without keys: no one "
            "can open them; the next sweep deletes them."
        )
    lines += [
        "The relay keeps no contact lists, group memberships, delivery history, IP addresses "
        "or backups of its queue.",
    ]
    return _wrapped(lines)
