"""The client library apps embed: a relay connection, a persistent store and the
:class:`Client` that runs a :class:`~hushchat.protocol.client_core.ClientCore`
over them."""

from .backup import BackupError as BackupError
from .backup import export_backup as export_backup
from .backup import import_backup as import_backup
from .client import Client as Client
from .client import SendDropped as SendDropped
from .client import open_client as open_client
from .connection import RelayConnection as RelayConnection
from .connection import connect_relay as connect_relay
from .store import ClientStore as ClientStore
from .store import StoreLocked as StoreLocked
