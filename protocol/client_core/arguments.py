"""The checks ClientCore runs on its caller's arguments before it changes anything.

Each returns the argument or raises :class:`~hushchat.protocol.errors.InvalidArgument`
(:class:`~hushchat.protocol.errors.LimitExceeded` naming the limit, for a
size over one). They run first in every public method, so a refused call
leaves the state, the pending changes and the random source as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..consts import (
    GROUP_ID_SIZE,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_TITLE_SIZE,
    MAX_PLAINTEXT_SIZE,
    MAX_RECEIPT_MESSAGE_IDS,
)
from ..content import MESSAGE_ID_SIZE, STATE_HASH_SIZE, GroupText
from ..devices import check_identity_key
from ..devices import check_user_id as check_user_id
from ..encoding import UINT32_MAX, UINT64_MAX
from ..errors import InvalidArgument, LimitExceeded
from .events import Address


def check_now(now: object) -> int:
    """A time: whole seconds since the epoch, as the wire's u64 carries it."""
    if isinstance(now, bool) or not isinstance(now, int) or not 0 <= now <= UINT64_MAX:
        raise InvalidArgument("a time is an integer number of seconds from 0 to 2**64-1")
    return now


def check_device_id(device_id: object) -> int:
    if (
        isinstance(device_id, bool)
        or not isinstance(device_id, int)
        or not 0 <= device_id <= UINT32_MAX
    ):
        raise InvalidArgument("a device id is an integer from 0 to 2**32-1")
    return device_id


def check_address(address: object) -> Address:
    if not isinstance(address, Address):
        raise InvalidArgument("a device address is an Address")
    check_user_id(address.user_id)
    check_device_id(address.device_id)
    return address


def check_user_ids(user_ids: object, *, most: int | None = None) -> list[str]:
    """An iterable of user ids (not a single string), at most ``most`` distinct ones."""
    if isinstance(user_ids, str | bytes) or not isinstance(user_ids, Iterable):
        raise InvalidArgument("user ids come as a list, not a single value")
    checked = [check_user_id(user_id) for user_id in user_ids]
    if most is not None and len(set(checked)) > most:
        raise LimitExceeded("the number of members", len(set(checked)), "MAX_GROUP_MEMBERS", most)
    return checked


def check_group_id(group_id: object) -> bytes:
    if not isinstance(group_id, bytes) or len(group_id) != GROUP_ID_SIZE:
        raise InvalidArgument(f"a group id is {GROUP_ID_SIZE} bytes")
    return group_id


def check_title(title: object) -> str:
    if not isinstance(title, str):
        raise InvalidArgument("a group title is a string")
    try:
        size = len(title.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument("a group title is valid UTF-8") from None
    if size > MAX_GROUP_TITLE_SIZE:
        raise LimitExceeded("the group title", size, "MAX_GROUP_TITLE_SIZE", MAX_GROUP_TITLE_SIZE)
    return title


def check_members(members: object) -> list[str]:
    """The other members of a new group: at most MAX_GROUP_MEMBERS - 1 besides its creator."""
    return check_user_ids(members, most=MAX_GROUP_MEMBERS - 1)


def check_direct_body(body: object) -> bytes:
    """A one-to-one message body: what a Text (and a SentCopy) carries, MAX_PLAINTEXT_SIZE."""
    if not isinstance(body, bytes):
        raise InvalidArgument("a message body is bytes")
    if len(body) > MAX_PLAINTEXT_SIZE:
        raise LimitExceeded(
            "the message body (bytes)", len(body), "MAX_PLAINTEXT_SIZE", MAX_PLAINTEXT_SIZE
        )
    return body


def check_group_body(body: object, now: int) -> bytes:
    """A group message body: its GroupText fits MAX_PLAINTEXT_SIZE.

    Counted with the group state fields at their largest (epoch 2**64-1), so
    that the limit an app meets does not move with the group's epoch.
    """
    if not isinstance(body, bytes):
        raise InvalidArgument("a message body is bytes")
    size = len(
        GroupText(bytes(MESSAGE_ID_SIZE), now, body, UINT64_MAX, bytes(STATE_HASH_SIZE)).encode()
    )
    if size > MAX_PLAINTEXT_SIZE:
        raise LimitExceeded(
            "the group message with its id and time (bytes)",
            size,
            "MAX_PLAINTEXT_SIZE",
            MAX_PLAINTEXT_SIZE,
        )
    return body


def check_message(message_id: object, sent_at: object) -> None:
    """A message id (16 bytes) and its send time, each optional."""
    if message_id is not None and (
        not isinstance(message_id, bytes) or len(message_id) != MESSAGE_ID_SIZE
    ):
        raise InvalidArgument(f"a message id is {MESSAGE_ID_SIZE} bytes")
    if sent_at is not None:
        check_now(sent_at)


def check_message_ids(message_ids: object) -> tuple[bytes, ...]:
    """The ids a delivery receipt names: 1 to MAX_RECEIPT_MESSAGE_IDS of 16 bytes."""
    if isinstance(message_ids, bytes | str) or not isinstance(message_ids, Iterable):
        raise InvalidArgument("message ids come as a list")
    ids = tuple(message_ids)
    if not ids or not all(isinstance(i, bytes) and len(i) == MESSAGE_ID_SIZE for i in ids):
        raise InvalidArgument(f"1 or more message ids of {MESSAGE_ID_SIZE} bytes")
    if len(ids) > MAX_RECEIPT_MESSAGE_IDS:
        raise LimitExceeded(
            "the message ids of one receipt",
            len(ids),
            "MAX_RECEIPT_MESSAGE_IDS",
            MAX_RECEIPT_MESSAGE_IDS,
        )
    return ids


def check_input(data: object, what: str) -> bytes:
    """Bytes from the relay (a bundle, a device list, a payload): their checks come later."""
    if not isinstance(data, bytes):
        raise InvalidArgument(f"{what} is bytes")
    return data


def check_identity(identity: object) -> bytes:
    return check_identity_key(identity)
