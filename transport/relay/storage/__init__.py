"""What the relay stores and how: the storage interface and its SQLite adapter."""

from .interface import RelayStorage as RelayStorage
from .sqlite import SqliteStorage as SqliteStorage
