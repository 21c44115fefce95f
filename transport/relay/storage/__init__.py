"""What the relay stores and how: the storage interface (``interface``) and its
SQLite implementation: the SQL schema (``schema``), the group-commit writer
thread (``writer``) and the adapter (``sqlite``)."""

from .interface import RelayStorage as RelayStorage
from .sqlite import SqliteStorage as SqliteStorage
