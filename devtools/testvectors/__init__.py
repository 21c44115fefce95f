"""Test vectors: a pure generator and verifier for the files in vectors/.

Every file is built deterministically from fixed seeds (and the recorded
ML-KEM encapsulations in :mod:`._pinned`) and returned as a JSON-ready dict;
nothing here reads or writes files. ``hushchat vectors generate DIR`` writes
them with :func:`render`, ``hushchat vectors verify`` checks loaded files with
:func:`verify_file`. vectors/README.md documents each file's format and how
another implementation verifies it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from hushchat.protocol.consts import PROTOCOL_VERSION
from hushchat.protocol.errors import ProtocolError

from . import (
    devices,
    group,
    handshake,
    kdf,
    key_conversion,
    ratchet,
    relay,
    safety_number,
    sender_keys,
    sessions,
    wire,
)
from ._common import GENERATOR, SCHEMA_VERSION, Json, iter_tests


@dataclass(frozen=True, slots=True)
class VectorFile:
    """One vector file: how to build it and how to check one of its tests."""

    name: str
    generate: Callable[[], Json]
    verify_test: Callable[[Json, Json], list[str]]

    @property
    def filename(self) -> str:
        return f"{self.name}.json"


FILES: tuple[VectorFile, ...] = (
    VectorFile("primitives_kdf", kdf.generate, kdf.verify_test),
    VectorFile("key_conversion", key_conversion.generate, key_conversion.verify_test),
    VectorFile("x3dh", handshake.generate_x3dh, handshake.verify_test),
    VectorFile("pqxdh", handshake.generate_pqxdh, handshake.verify_test),
    VectorFile("double_ratchet", ratchet.generate, ratchet.verify_test),
    VectorFile("session", sessions.generate, sessions.verify_test),
    VectorFile("sender_keys", sender_keys.generate, sender_keys.verify_test),
    VectorFile("wire", wire.generate, wire.verify_test),
    VectorFile("safety_number", safety_number.generate, safety_number.verify_test),
    VectorFile("devices", devices.generate, devices.verify_test),
    VectorFile("group", group.generate, group.verify_test),
    VectorFile("relay", relay.generate, relay.verify_test),
)
BY_FILENAME = {f.filename: f for f in FILES}


def generate_all() -> dict[str, Json]:
    """Every vector file, by file name."""
    return {f.filename: f.generate() for f in FILES}


def render(data: Json) -> str:
    """The exact text of a vector file: sorted keys, 2-space indent, final newline."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def verify_test(filename: str, group: Json, test: Json) -> list[str]:
    """Check one test of a loaded file against this implementation; [] if it agrees."""
    vector_file = BY_FILENAME.get(filename)
    if vector_file is None:
        return [f"{filename}: not a known vector file"]
    try:
        return vector_file.verify_test(group, test)
    except (ProtocolError, AssertionError, KeyError, TypeError, ValueError) as exc:
        return [f"unexpected {type(exc).__name__}: {exc}"]


def verify_header(filename: str, data: Json) -> list[str]:
    """Check a loaded file's header: schema, version, test count, unique tcIds."""
    failures = []
    name = filename.removesuffix(".json")
    if data.get("schema") != f"hushchat-test-vectors/{name}/v{SCHEMA_VERSION}":
        failures.append(f"{filename}: unexpected schema {data.get('schema')!r}")
    if data.get("protocol_version") != PROTOCOL_VERSION:
        failures.append(f"{filename}: protocol_version is not {PROTOCOL_VERSION}")
    ids = [test.get("tcId") for _, test in iter_tests(data)]
    if data.get("numberOfTests") != len(ids):
        failures.append(f"{filename}: numberOfTests is not the number of tests")
    if len(set(ids)) != len(ids):
        failures.append(f"{filename}: tcIds are not unique")
    return failures


def verify_file(filename: str, data: Json) -> list[str]:
    """Every failure in one loaded file, each prefixed with ``file:tcId``."""
    failures = verify_header(filename, data)
    for test_group, test in iter_tests(data):
        for failure in verify_test(filename, test_group, test):
            failures.append(f"{filename}:{test.get('tcId')}: {failure}")
    return failures


__all__ = [
    "BY_FILENAME",
    "FILES",
    "GENERATOR",
    "VectorFile",
    "generate_all",
    "iter_tests",
    "render",
    "verify_file",
    "verify_header",
    "verify_test",
]
