"""The defect machinery of wire.json: structures, and inputs with exactly one defect each."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hushchat.protocol.consts import MAX_NESTING_DEPTH
from hushchat.protocol.encoding import pack, unpack
from hushchat.protocol.errors import ProtocolError

from ._common import Json

# (comment, flag, input bytes), or with a fourth element: the error the input
# must give (the generator refuses to write it otherwise). Inputs with two
# defects (flag CheckOrder) state the error, so the order of checks the
# spec describes is the order the decoder follows.
Defect = tuple[str, str, bytes] | tuple[str, str, bytes, str]


def defect_parts(defect: Defect) -> tuple[str, str, bytes, str | None]:
    """(comment, flag, input, the error it states it must give or None)."""
    if len(defect) == 4:
        return defect
    comment, flag, data = defect
    return comment, flag, data, None


@dataclass(frozen=True, slots=True)
class Structure:
    name: str
    decode: Callable[[bytes], Json]
    encode: Callable[[Json], bytes]
    # Index of the version (or type) integer and of the first byte-string field.
    version_index: int
    bin_index: int
    # Whether that byte string has a fixed size.
    fixed_bin: bool = True
    # Whether the defects go into a signed body before a 64-byte signature.
    signed_suffix: bool = False


def raw_array(items: list[bytes], *, wide: bool = False) -> bytes:
    n = len(items)
    prefix = b"\xdc" + n.to_bytes(2, "big") if wide or n > 15 else bytes([0x90 | n])
    return prefix + b"".join(items)


def split(data: bytes, signed: bool) -> tuple[list[Any], bytes]:
    """The top-level fields of a sample (of its body, for body || signature)."""
    if signed:
        return unpack(data[:-64], what="test"), data[-64:]
    return unpack(data, what="test"), b""


def with_field(fields: list[Any], index: int, raw: bytes, suffix: bytes) -> bytes:
    items = [pack(f) for f in fields]
    items[index] = raw
    return raw_array(items) + suffix


def generic_defects(structure: Structure, sample: bytes) -> list[Defect]:
    fields, suffix = split(sample, structure.signed_suffix)
    items = [pack(f) for f in fields]
    first_bin = fields[structure.bin_index]
    defects: list[Defect] = [
        ("empty input", "Empty", b""),
        ("last byte missing", "Truncated", sample[:-1]),
        ("a zero byte after the value", "TrailingBytes", sample + b"\x00"),
        ("array length as array 16", "NonCanonicalArray", raw_array(items, wide=True) + suffix),
        (
            f"field {structure.bin_index} as bin 16",
            "NonCanonicalBin",
            with_field(
                fields,
                structure.bin_index,
                b"\xc5" + len(first_bin).to_bytes(2, "big") + first_bin,
                suffix,
            ),
        ),
        ("one extra field (nil)", "ExtraField", raw_array([*items, b"\xc0"]) + suffix),
        ("last field missing", "MissingField", raw_array(items[:-1]) + suffix),
        (
            f"field {structure.bin_index} as a string",
            "WrongType",
            with_field(fields, structure.bin_index, pack("x" * len(first_bin)), suffix),
        ),
        (
            f"field {structure.bin_index} as a float",
            "Float",
            with_field(fields, structure.bin_index, b"\xcb" + struct.pack(">d", 1.0), suffix),
        ),
        (
            f"field {structure.bin_index} as an extension",
            "Extension",
            with_field(fields, structure.bin_index, b"\xd4\x01\x00", suffix),
        ),
        ("a map instead of the array", "Map", pack({"a": 1}) + suffix),
        (
            f"last field nested so that a nil is at depth {MAX_NESTING_DEPTH + 1}",
            "TooDeep",
            with_field(fields, len(fields) - 1, b"\x91" * MAX_NESTING_DEPTH + b"\xc0", suffix),
        ),
    ]
    if structure.fixed_bin:
        defects.append(
            (
                f"field {structure.bin_index} one byte short",
                "WrongSize",
                with_field(fields, structure.bin_index, pack(first_bin[:-1]), suffix),
            )
        )
    if structure.version_index >= 0:
        version = fields[structure.version_index]
        defects += [
            (
                f"field {structure.version_index} as uint 8",
                "NonCanonicalInteger",
                with_field(fields, structure.version_index, b"\xcc" + bytes([version]), suffix),
            ),
            (
                f"field {structure.version_index} is -1",
                "NegativeInteger",
                with_field(fields, structure.version_index, pack(-1), suffix),
            ),
        ]
    return defects


def replace(sample: bytes, structure: Structure, index: int, value: Any) -> bytes:
    fields, suffix = split(sample, structure.signed_suffix)
    fields[index] = value
    return pack(fields) + suffix


def replace_all(
    sample: bytes, structure: Structure, changes: dict[int, Any], *, extra: bool = False
) -> bytes:
    """``sample`` with several fields replaced and, if ``extra``, a nil field appended."""
    fields, suffix = split(sample, structure.signed_suffix)
    for index, value in changes.items():
        fields[index] = value
    if extra:
        fields.append(None)
    return pack(fields) + suffix


def error_of(structure: Structure, data: bytes) -> str | None:
    try:
        structure.decode(data)
    except ProtocolError as exc:
        return exc.code
    return None
