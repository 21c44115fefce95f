"""Canonical msgpack: the type walk and split_array agree with the obvious definitions."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hushchat.protocol.consts import MAX_NESTING_DEPTH
from hushchat.protocol.encoding import _check_types, pack, split_array, unpack
from hushchat.protocol.errors import DecodeError, NonCanonicalEncoding

# Everything msgpack can decode to: the allowed kinds, and floats, maps and
# extension values, nested to depths on both sides of the limit.
_ANY_SCALAR = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.booleans(),
    st.binary(max_size=4),
    st.text(max_size=4),
    st.none(),
    st.floats(allow_nan=False),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=2)),
)
_VALUES = st.recursive(
    _ANY_SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.integers(0, 3), inner, max_size=2)
    ),
    max_leaves=40,
)


def _nest(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def _reference_accepts(value: Any, depth: int = 0) -> bool:
    """The rule, recursively: arrays and the five scalar kinds; a non-empty array at
    depth MAX_NESTING_DEPTH or deeper (the outermost value is at depth 0) is refused."""
    if type(value) is list:
        if value and depth >= MAX_NESTING_DEPTH:
            return False
        return all(_reference_accepts(item, depth + 1) for item in value)
    return type(value) in (int, bool, bytes, str, type(None))


def _accepts(value: Any) -> bool:
    try:
        _check_types(value, "test")
    except DecodeError:
        return False
    return True


@settings(max_examples=500)
@given(value=_VALUES, depth=st.sampled_from([0, 1, MAX_NESTING_DEPTH - 2, MAX_NESTING_DEPTH - 1]))
def test_type_walk_agrees_with_the_recursive_rule(value: Any, depth: int) -> None:
    nested = _nest(value, depth)
    assert _accepts(nested) == _reference_accepts(nested)


@pytest.mark.parametrize("depth", [MAX_NESTING_DEPTH - 1, MAX_NESTING_DEPTH, MAX_NESTING_DEPTH + 1])
def test_nesting_limit(depth: int) -> None:
    assert _accepts(_nest([], depth)) == (depth <= MAX_NESTING_DEPTH)
    assert _accepts(_nest([1], depth)) == (depth < MAX_NESTING_DEPTH)


VALUE = [1, b"\x00" * 3, "title", None, [["a", b"k", True]]]


def test_split_array_returns_the_head_and_the_rest_unread() -> None:
    data = pack(VALUE)
    head, rest = split_array(data, what="test", count=5, head=3)
    assert head == VALUE[:3]
    assert rest == data[-len(pack(VALUE[3])) - len(pack(VALUE[4])) :]
    assert unpack(pack([*head, None, unpack(rest[1:], what="t")]), what="t") == VALUE
    # Typed bytes, but any bytes-like input is taken as its bytes (as unpack does).
    from_bytearray = split_array(bytearray(data), what="test", count=5, head=3)  # type: ignore[arg-type]
    assert from_bytearray == (head, rest)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (pack(VALUE[:4]), DecodeError),  # four fields, not five
        (pack(7), DecodeError),  # not an array
        (b"\xdc\x00\x05" + pack(VALUE)[1:], NonCanonicalEncoding),  # array16 header
        (b"\x95\x01", DecodeError),  # truncated inside the head
        (b"\x95\xcc\x01" + pack(VALUE)[2:], NonCanonicalEncoding),  # 1 as uint8 in the head
        (b"\x95\xca\x00\x00\x00\x00" + pack(VALUE)[2:], DecodeError),  # a float in the head
        (b"\x95\x81\x00\x00" + pack(VALUE)[2:], DecodeError),  # a map in the head
    ],
)
def test_split_array_refuses(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        split_array(data, what="test", count=5, head=3)


def test_split_array_refuses_oversized_input() -> None:
    with pytest.raises(DecodeError):
        split_array(pack(VALUE), what="test", count=5, head=3, max_size=4)
