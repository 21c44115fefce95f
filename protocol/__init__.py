"""hushchat's pure protocol core: no I/O, no clocks, randomness injected.

The objects an app uses, re-exported here (see README.md and spec/):

* :class:`Account`: a device identity and its private prekeys; publishes
  :class:`PreKeyBundle` data, starts and answers sessions.
* :class:`SessionRecord`: every session with one peer device; encrypt and
  decrypt one-to-one messages (transactional: a failure changes nothing).
* :class:`Party`: whose a device is (user id, device id, user identity), as
  every session binds both sides.
* :class:`OutboundSenderKey` / :class:`SenderKeyRecord`: group encryption.
* :class:`SafetyNumber`: what two users compare out of band.
* :class:`HushchatError`, the root of every error of hushchat (the
  transport's included), and its protocol branch :class:`ProtocolError`
  with the subclasses in :mod:`hushchat.protocol.errors`.
"""

from .account import Account as Account
from .errors import HushchatError as HushchatError
from .errors import LocalProtocolError as LocalProtocolError
from .errors import ProtocolError as ProtocolError
from .errors import RemoteProtocolError as RemoteProtocolError
from .fingerprint import SafetyNumber as SafetyNumber
from .group_cipher import OutboundSenderKey as OutboundSenderKey
from .group_cipher import SenderKeyRecord as SenderKeyRecord
from .keys import IdentityKeyPair as IdentityKeyPair
from .keys import PublicIdentity as PublicIdentity
from .pqxdh import Party as Party
from .prekeys import PreKeyBundle as PreKeyBundle
from .primitives import RandomSource as RandomSource
from .session import DecryptResult as DecryptResult
from .session import Session as Session
from .session import SessionRecord as SessionRecord
