"""Canonical msgpack: the one encoding of every wire structure and pickle.

Wire structures are msgpack arrays of integers, byte strings (``bin``),
UTF-8 strings, booleans and nil, never maps or floats. The canonical
encoding of a value is what :func:`pack` produces (smallest integer and
length formats); :func:`unpack` refuses anything else, so every value has
exactly one encoding and signatures over encodings are unambiguous.

Decoding never raises anything but :class:`~hushchat.protocol.errors.DecodeError`
and its subclasses. :class:`Fields` reads the positional fields of a decoded
array with type and size checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any, NoReturn

import msgpack

from .consts import MAX_MESSAGE_SIZE, MAX_NESTING_DEPTH
from .errors import DecodeError, NonCanonicalEncoding

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def pack(value: Any) -> bytes:
    """Encode ``value`` canonically (bytes as ``bin``, str as ``str``)."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def unpack(data: bytes, *, what: str, max_size: int = MAX_MESSAGE_SIZE) -> Any:
    """Decode exactly one canonical msgpack value from ``data``.

    Raises DecodeError on anything malformed, oversized, trailing, of an
    unsupported type (maps, floats, extension types), nested deeper than
    MAX_NESTING_DEPTH, and
    NonCanonicalEncoding when the bytes are not the canonical encoding.
    """
    data = _checked_bytes(data, what, max_size)
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=max_size,
            max_str_len=max_size,
            max_array_len=max_size,
            max_map_len=max_size,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types; all are "malformed"
        raise DecodeError(f"{what}: not a single msgpack value") from exc
    _check_types(value, what)
    if pack(value) != data:
        raise NonCanonicalEncoding(f"{what}: not canonically encoded")
    return value


def split_array(
    data: bytes, *, what: str, count: int, head: int, max_size: int = MAX_MESSAGE_SIZE
) -> tuple[list[Any], bytes]:
    """The first ``head`` fields of a canonical array of ``count`` (< 16) fields, and the rest.

    The fields are decoded, type-checked and proven canonical as by
    :func:`unpack`; the rest is returned as the bytes that encode the other
    ``count - head`` fields, unread (the caller decodes or recognises them).
    """
    data = _checked_bytes(data, what, max_size)
    if data[:1] != bytes([_FIXARRAY + count]):
        # Not a canonical array of ``count`` fields: unpack or Fields says exactly why.
        Fields.decode(data, what=what, count=count, max_size=max_size)
        raise NonCanonicalEncoding(f"{what}: not canonically encoded")
    reader = msgpack.Unpacker(  # the options of unpack's unpackb
        raw=False,
        use_list=True,
        strict_map_key=True,
        max_buffer_size=len(data),
        max_bin_len=max_size,
        max_str_len=max_size,
        max_array_len=max_size,
        max_map_len=max_size,
        max_ext_len=0,
    )
    reader.feed(data)
    try:
        reader.read_array_header()
        values = [reader.unpack() for _ in range(head)]
    except Exception as exc:  # msgpack raises a zoo of types; all are "malformed"
        raise DecodeError(f"{what}: not an array of {count} msgpack values") from exc
    end = reader.tell()
    _check_types(values, what)
    if pack(values)[1:] != data[1:end]:
        raise NonCanonicalEncoding(f"{what}: not canonically encoded")
    return values, data[end:]


def _checked_bytes(data: object, what: str, max_size: int) -> bytes:
    if not isinstance(data, _BYTES_LIKE):
        raise DecodeError(f"{what}: expected bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise DecodeError(f"{what}: {len(data)} bytes exceeds the limit of {max_size}")
    return data


# Everything a decoded value may hold besides arrays. unpackb makes exactly
# these types (never subclasses), so a set of types is an exact test.
_SCALAR_TYPES = frozenset({int, bool, bytes, str, type(None)})
_BYTES_LIKE = (bytes, bytearray, memoryview)
_FIXARRAY = 0x90  # msgpack's header of an array of 0 to 15 items


def _check_types(value: Any, what: str) -> None:
    # Refuses maps, floats, extension types and deep nesting before anything
    # (re-encoding included) recurses. Walks one depth at a time: the types
    # of all elements at a depth are collected at C speed, and only the
    # non-empty arrays among them are opened next. The outermost value is at
    # depth 0; ``arrays`` holds the non-empty arrays at ``depth``.
    if type(value) is not list:
        _check_scalar_types({type(value)}, what)
        return
    arrays = [value]
    depth = 0
    while arrays:
        if depth >= MAX_NESTING_DEPTH:
            raise DecodeError(f"{what}: nested deeper than {MAX_NESTING_DEPTH}")
        elements = arrays[0] if len(arrays) == 1 else list(chain.from_iterable(arrays))
        kinds = set(map(type, elements))
        if list in kinds:
            kinds.discard(list)
            arrays = [item for item in elements if type(item) is list and item]
        else:
            arrays = []
        _check_scalar_types(kinds, what)
        depth += 1


def _check_scalar_types(kinds: set[type], what: str) -> None:
    if not kinds <= _SCALAR_TYPES:
        kind = min(kinds - _SCALAR_TYPES, key=lambda k: k.__name__)
        raise DecodeError(f"{what}: unsupported msgpack type {kind.__name__}")


class Fields:
    """Typed reader over the positional fields of a decoded msgpack array."""

    __slots__ = ("_items", "_pos", "_what")

    def __init__(self, value: Any, *, what: str, count: int | None = None) -> None:
        if not isinstance(value, list):
            raise DecodeError(f"{what}: expected an array")
        if count is not None and len(value) != count:
            raise DecodeError(f"{what}: expected {count} fields, got {len(value)}")
        self._items: Sequence[Any] = value
        self._pos = 0
        self._what = what

    @classmethod
    def decode(
        cls, data: bytes, *, what: str, count: int | None = None, max_size: int = MAX_MESSAGE_SIZE
    ) -> Fields:
        """Decode ``data`` as one canonical array and read its fields."""
        return cls(unpack(data, what=what, max_size=max_size), what=what, count=count)

    def _fail(self, expected: str) -> NoReturn:
        raise DecodeError(f"{self._what}: field {self._pos} must be {expected}")

    def _next(self) -> Any:
        if self._pos >= len(self._items):
            raise DecodeError(f"{self._what}: missing field {self._pos}")
        item = self._items[self._pos]
        return item

    def _advance(self, item: Any) -> Any:
        self._pos += 1
        return item

    @property
    def remaining(self) -> int:
        return len(self._items) - self._pos

    # The readers below take exactly the types unpackb makes (type(x) is T:
    # a bool is not an integer), and inline _next/_advance: they run for
    # every field of every message.

    def uint(self, maximum: int = UINT32_MAX) -> int:
        item = self._next()
        if type(item) is not int or not 0 <= item <= maximum:
            self._fail(f"an integer from 0 to {maximum}")
        self._pos += 1
        return item

    def boolean(self) -> bool:
        item = self._next()
        if type(item) is not bool:
            self._fail("a boolean")
        self._pos += 1
        return item

    def bin(self, size: int | None = None, *, max_size: int | None = None) -> bytes:
        item = self._next()
        if type(item) is not bytes:
            self._fail("a byte string")
        if size is not None and len(item) != size:
            self._fail(f"{size} bytes long")
        if max_size is not None and len(item) > max_size:
            self._fail(f"at most {max_size} bytes long")
        self._pos += 1
        return item

    def text(self, max_size: int = 1024) -> str:
        item = self._next()
        # A character is at most 4 bytes of UTF-8: short strings skip the encode.
        if type(item) is not str or (len(item) * 4 > max_size and len(item.encode()) > max_size):
            self._fail(f"a string of at most {max_size} bytes")
        self._pos += 1
        return item

    def optional_uint(self, maximum: int = UINT32_MAX) -> int | None:
        if self._next() is None:
            self._advance(None)
            return None
        return self.uint(maximum)

    def optional_bin(self, size: int | None = None, *, max_size: int | None = None) -> bytes | None:
        if self._next() is None:
            self._advance(None)
            return None
        return self.bin(size, max_size=max_size)

    def array(self, *, max_len: int) -> list[Any]:
        item = self._next()
        if not isinstance(item, list) or len(item) > max_len:
            self._fail(f"an array of at most {max_len} items")
        return list(self._advance(item))

    def nested(self, *, what: str, count: int | None = None) -> Fields:
        """The next field as an array of its own."""
        item = self._next()
        self._advance(item)
        return Fields(item, what=f"{self._what}.{what}", count=count)

    def peek(self) -> Any:
        """The next field, without consuming it."""
        return self._next()

    def raw(self) -> Any:
        """The next field undecoded (its reader checks it)."""
        return self._advance(self._next())

    def end(self) -> None:
        """Assert every field was read."""
        if self._pos != len(self._items):
            raise DecodeError(f"{self._what}: {len(self._items) - self._pos} unexpected fields")
