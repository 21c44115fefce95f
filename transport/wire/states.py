"""The relay connection's state machine: everything about frame order lives here.

As h11's ``_state.py``: the tables below are the whole of the rules, used
by the relay to refuse out-of-order frames (UNEXPECTED_FRAME) and by the
client to refuse a call locally before it reaches the wire. Pushes from the
relay (envelopes, QUEUE_EMPTY, PREKEYS_LOW) occur only in AUTHENTICATED.

============== ========================================== =====================
state          requests accepted                          on success
============== ========================================== =====================
AWAIT_HELLO    HELLO                                      -> UNAUTHENTICATED
UNAUTHENTICATED AUTH, PUBLISH_DEVICE_LIST (new user), PING AUTH -> AUTHENTICATED
AUTHENTICATED  all but HELLO and AUTH                     (stays)
CLOSED         none                                       (stays)
============== ========================================== =====================

Any error before AUTHENTICATED closes the connection (an unauthenticated
peer gets one attempt per connection); after it, only errors whose
``closes`` is true do.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

from .errors import RelayError, UnexpectedFrame
from .frames import FrameType


class ConnectionState(Enum):
    AWAIT_HELLO = "AWAIT_HELLO"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    AUTHENTICATED = "AUTHENTICATED"
    CLOSED = "CLOSED"


ALLOWED_REQUESTS: Final[dict[ConnectionState, frozenset[FrameType]]] = {
    ConnectionState.AWAIT_HELLO: frozenset({FrameType.HELLO}),
    ConnectionState.UNAUTHENTICATED: frozenset(
        {FrameType.AUTH, FrameType.PUBLISH_DEVICE_LIST, FrameType.PING}
    ),
    ConnectionState.AUTHENTICATED: frozenset(
        {
            FrameType.PUBLISH_DEVICE_LIST,
            FrameType.FETCH_DEVICE_LIST,
            FrameType.UPLOAD_PREKEYS,
            FrameType.FETCH_BUNDLE,
            FrameType.SEND_DIRECT,
            FrameType.SEND_GROUP,
            FrameType.SEND_CHANGE,
            FrameType.ACK,
            FrameType.PING,
        }
    ),
    ConnectionState.CLOSED: frozenset(),
}

# Transitions on a successful request; every other success keeps the state.
TRANSITIONS: Final[dict[tuple[ConnectionState, FrameType], ConnectionState]] = {
    (ConnectionState.AWAIT_HELLO, FrameType.HELLO): ConnectionState.UNAUTHENTICATED,
    (ConnectionState.UNAUTHENTICATED, FrameType.AUTH): ConnectionState.AUTHENTICATED,
}


def check_request(state: ConnectionState, frame_type: FrameType) -> None:
    """UnexpectedFrame unless ``state`` accepts a request of ``frame_type``."""
    if frame_type not in ALLOWED_REQUESTS[state]:
        raise UnexpectedFrame(f"{frame_type.name} is not allowed in state {state.value}")


def state_after_success(state: ConnectionState, frame_type: FrameType) -> ConnectionState:
    return TRANSITIONS.get((state, frame_type), state)


def state_after_error(state: ConnectionState, error: RelayError) -> ConnectionState:
    if error.closes or state is not ConnectionState.AUTHENTICATED:
        return ConnectionState.CLOSED
    return state
