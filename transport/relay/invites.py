"""Invitation tokens: how an operator lets chosen people register at a relay.

With ``--registration invite`` a relay registers a new user only together
with a token it issued (spec/07-relay-protocol.md section 7.6). A token is
random (``INVITE_TOKEN_BYTES``), good for one registration until it expires,
and the relay keeps only its SHA-256: a copy of the database does not give
anyone a token. ``hushchat relay invite`` issues tokens into the relay's
database, running or not (SQLite lets the two processes share the file;
PostgreSQL, any number of them).

Issuing touches the ``invites`` table only: it never opens the relay's key
file nor its queue (a relay's retention and keys are the running relay's
business), so the database must be new or of the current schema; an older
one is upgraded by starting the relay once.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3

from hushchat.protocol.errors import UnknownStateVersion

from ..wire.limits import INVITE_TOKEN_BYTES
from .config import wall_clock_ms
from .storage.names import is_postgres_url
from .storage.schema import SCHEMA_VERSION, create_or_check_schema
from .storage.sqlite import BUSY_TIMEOUT_MS, make_private


def token_hash(token: str) -> bytes:
    """What the relay stores of a token, and looks it up by."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def issue_invites(db_path: str, count: int, *, lifetime_seconds: int) -> list[str]:
    """``count`` new tokens, stored (hashed) in the relay database at ``db_path``.

    ``db_path`` is a SQLite file (a new file gets the relay's schema) or a
    PostgreSQL URL (its schema made by ``hushchat relay migrate`` or a
    relay). sqlite3.Error (or OSError) if the file is not a database,
    psycopg's errors for PostgreSQL's; UnknownStateVersion if its schema is
    not the current one.
    """
    tokens = [secrets.token_hex(INVITE_TOKEN_BYTES) for _ in range(count)]
    expires_at = wall_clock_ms() + 1000 * lifetime_seconds
    if is_postgres_url(db_path):
        from .storage.postgres import insert_invites

        insert_invites(db_path, [(token_hash(token), expires_at) for token in tokens])
        return tokens
    make_private(db_path)  # a new database is the relay's: owner-only, as the relay makes it
    with contextlib.closing(
        sqlite3.connect(db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    ) as db:
        version = create_or_check_schema(db)
        if version not in (0, SCHEMA_VERSION):
            raise UnknownStateVersion(
                f"relay database schema version {version}: start the relay once to upgrade it"
            )
        db.execute("PRAGMA journal_mode=WAL")  # as the relay keeps it
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT INTO invites (token_hash, expires_at) VALUES (?, ?)",
                [(token_hash(token), expires_at) for token in tokens],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return tokens
