"""Loading serialized state ("pickles"): one versioned format, one error contract.

Every pickle is a canonical msgpack array whose first field is
``STATE_VERSION``. :func:`load_pickle` checks the version and hands the
remaining fields to a reader; whatever goes wrong, only
:class:`~hushchat.protocol.errors.StateError` escapes: ``UnknownStateVersion`` for a
version this code cannot read, ``StateError`` for anything malformed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .consts import MAX_STATE_SIZE, STATE_VERSION
from .encoding import UINT64_MAX, Fields
from .errors import DecodeError, ProtocolError, StateError, UnknownStateVersion

_T = TypeVar("_T")


def load_pickle(data: bytes, what: str, read: Callable[[Fields], _T]) -> _T:
    """Decode ``data`` as a pickle of ``what`` and read its fields with ``read``.

    ``read`` gets the fields after the version and may raise any
    ProtocolError for bad content; every field must be read.
    """
    try:
        fields = Fields.decode(data, what=what, max_size=MAX_STATE_SIZE)
        version = fields.uint(UINT64_MAX)
    except DecodeError as exc:
        raise StateError(f"{what}: corrupt state") from exc
    if version != STATE_VERSION:
        raise UnknownStateVersion(f"{what}: state version {version} is not {STATE_VERSION}")
    try:
        result = read(fields)
        fields.end()
    except StateError:
        raise
    except ProtocolError as exc:
        raise StateError(f"{what}: corrupt state ({exc.message})") from exc
    return result
