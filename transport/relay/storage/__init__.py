"""What the relay stores and how: the storage interface (``interface``) and its
SQLite implementation: the SQL schema (``schema``) and its migration
(``migration``), the forward-secure keys that seal queued mail at rest and
their key file (``atrest``), the sealed rows (``rows``), the group-commit
writer thread (``writer``) and the adapter (``sqlite``); and the same queue on
PostgreSQL for several relay processes (``postgres``, the optional extra
``hushchat[postgres]``; ``names`` tells a URL from a file)."""

from .interface import RelayStorage as RelayStorage
from .sqlite import SqliteStorage as SqliteStorage
