"""How ``--db`` names a relay database: a SQLite file's path, or a PostgreSQL URL.

Apart from :mod:`.postgres` so that telling them apart needs no psycopg.
"""

from __future__ import annotations

import re

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(db: str) -> bool:
    """Whether ``db`` names a PostgreSQL database (else it is a SQLite file)."""
    return db.startswith(POSTGRES_SCHEMES)


def without_password(dsn: str) -> str:
    """``dsn`` as logs and errors may show it: a password in it left out."""
    dsn = re.sub(r"(://[^:/@]*):[^@]*@", r"\1@", dsn)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", dsn)
