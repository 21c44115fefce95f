"""The client library apps embed: a relay connection, a persistent store and the
:class:`Client` that runs a :class:`~hushchat.protocol.client_core.ClientCore`
over them, with the events it adds to the core's (:mod:`.events`)."""

from .backup import BackupError as BackupError
from .backup import export_backup as export_backup
from .backup import import_backup as import_backup
from .client import Client as Client
from .client import SendDropped as SendDropped
from .client import open_client as open_client
from .connection import RelayConnection as RelayConnection
from .connection import connect_relay as connect_relay
from .events import Connected as Connected
from .events import Disconnected as Disconnected
from .events import MailExpired as MailExpired
from .events import MessagePending as MessagePending
from .events import MessageSent as MessageSent
from .events import Reregistered as Reregistered
from .events import SendFailed as SendFailed
from .events import Status as Status
from .events import StoredItemSetAside as StoredItemSetAside
from .events import UnknownToRelay as UnknownToRelay
from .store import ClientStore as ClientStore
from .store import StoreFailed as StoreFailed
from .store import StoreFull as StoreFull
from .store import StoreLocked as StoreLocked
from .store import WrongStoreKey as WrongStoreKey
