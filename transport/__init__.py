"""hushchat's trio transport: the relay server and the client library.

The transport's errors, for ``except`` clauses (the tree is in
:mod:`hushchat.transport.wire.errors`; its root,
:class:`~hushchat.protocol.errors.HushchatError`, also covers the protocol's
errors)::

    from hushchat.transport import ConnectionFailure, RelayError, RateLimited

Logging goes to the ``hushchat`` logger hierarchy (``hushchat.relay``,
``hushchat.client``) and is silent unless the application configures
logging: the library adds only a NullHandler, as the logging HOWTO asks of
libraries. README.md says what each level reveals.
"""

import logging

from .wire.errors import AuthenticationFailed as AuthenticationFailed
from .wire.errors import ConnectFailed as ConnectFailed
from .wire.errors import ConnectionClosed as ConnectionClosed
from .wire.errors import ConnectionFailure as ConnectionFailure
from .wire.errors import ConnectionRefused as ConnectionRefused
from .wire.errors import ConnectTimeout as ConnectTimeout
from .wire.errors import DeviceRemoved as DeviceRemoved
from .wire.errors import HostUnreachable as HostUnreachable
from .wire.errors import MailboxFull as MailboxFull
from .wire.errors import PayloadTooLarge as PayloadTooLarge
from .wire.errors import RateLimited as RateLimited
from .wire.errors import RelayError as RelayError
from .wire.errors import RelayProtocolViolation as RelayProtocolViolation
from .wire.errors import RelayTimeout as RelayTimeout
from .wire.errors import StorageFull as StorageFull
from .wire.errors import Superseded as Superseded
from .wire.errors import TlsFailed as TlsFailed
from .wire.errors import TooManyRecipients as TooManyRecipients
from .wire.errors import TransportError as TransportError
from .wire.errors import UnknownHost as UnknownHost
from .wire.errors import UnknownUser as UnknownUser

logging.getLogger("hushchat").addHandler(logging.NullHandler())
