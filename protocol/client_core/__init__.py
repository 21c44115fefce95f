"""One device of one user, sans I/O: :class:`ClientCore` and what it takes and gives.

The facade and what apps and the transport use are re-exported here:

* :mod:`.core`: :class:`ClientCore`, which routes inputs to one collaborator
  per concern, each in its own module over one shared :class:`~.state.CoreState`:
  :mod:`.directory` (device lists and identities), :mod:`.direct` (one-to-one
  sessions), :mod:`.groups` (group messages and sender keys) and
  :mod:`.membership` (group membership and sync between own devices);
* :mod:`.events` and :mod:`.sends`: what it returns (:class:`Outcome`);
* :mod:`.records` and :mod:`.persistence`: the records it persists;
* :mod:`.arguments`: the checks every public method runs first.
"""

from .core import ClientCore as ClientCore
from .direct import MissingSessions as MissingSessions
from .directory import DeviceListNeeded as DeviceListNeeded
from .events import Address as Address
from .events import DeliveryConfirmed as DeliveryConfirmed
from .events import DeviceAdded as DeviceAdded
from .events import DeviceRemoved as DeviceRemoved
from .events import Event as Event
from .events import GroupChangeFailed as GroupChangeFailed
from .events import GroupReplaced as GroupReplaced
from .events import GroupStateMismatch as GroupStateMismatch
from .events import GroupUpdated as GroupUpdated
from .events import IdentityChanged as IdentityChanged
from .events import MessageReceived as MessageReceived
from .events import MessageSentByOtherDevice as MessageSentByOtherDevice
from .events import RetryRequested as RetryRequested
from .events import Undecryptable as Undecryptable
from .membership import ChangePending as ChangePending
from .records import RecordKey as RecordKey
from .records import RecordKind as RecordKind
from .sends import ENVELOPE_DIRECT as ENVELOPE_DIRECT
from .sends import ENVELOPE_GROUP as ENVELOPE_GROUP
from .sends import ENVELOPE_RECEIPT as ENVELOPE_RECEIPT
from .sends import ChangeSend as ChangeSend
from .sends import DirectSend as DirectSend
from .sends import GroupSend as GroupSend
from .sends import Outcome as Outcome
from .sends import Send as Send
