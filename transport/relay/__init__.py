"""The relay server: one trio task per connection, storage behind a group-commit
writer thread, rate limits and configuration (``hushchat relay``)."""

from .config import RelayConfig as RelayConfig
from .server import Relay as Relay
from .server import serve_relay as serve_relay
