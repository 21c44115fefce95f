"""What every vector file shares: its header, hex, recorded randomness, checks.

File layout (vectors/README.md)::

    {schema, protocol_version, description, spec, notes, numberOfTests,
     generator, testGroups: [{type, ...shared parameters..., tests: [...]}]}

Each test is ``{tcId, comment, flags, ...inputs and expected values...,
result: "valid" | "invalid", error?}``. Bytes are lowercase hex; ``error`` is
a stable code of :mod:`hushchat.protocol.errors` (spec/08-errors.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from hushchat.protocol import primitives as p
from hushchat.protocol.consts import PROTOCOL_VERSION
from hushchat.protocol.errors import ProtocolError
from hushchat.protocol.primitives import RandomSource, SeededRandom

Json = dict[str, Any]
_T = TypeVar("_T")

# Bump when the layout of a vector file changes (not when a value does).
SCHEMA_VERSION = 1
GENERATOR = {"name": "hushchat.devtools.testvectors", "version": "1"}


def h(data: bytes) -> str:
    """Lowercase hex, the representation of every byte string in the vectors."""
    return data.hex()


def unhex(text: str) -> bytes:
    return bytes.fromhex(text)


def opt_h(data: bytes | None) -> str | None:
    return None if data is None else data.hex()


def large(prefix: bytes, length: int) -> Json:
    """A byte string too large to list: ``prefix`` then zero bytes up to ``length`` bytes."""
    if len(prefix) > length:
        raise AssertionError("the prefix is longer than the whole")
    return {"prefix": h(prefix), "length": length}


def unhex_any(value: str | Json) -> bytes:
    """Hex, or a :func:`large` byte string."""
    if isinstance(value, str):
        return unhex(value)
    prefix = unhex(value["prefix"])
    return prefix + bytes(value["length"] - len(prefix))


# A point of order 8 on edwards25519 (its canonical encoding).
ORDER_8_EDWARDS = "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"


def _edwards_add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """Affine addition on edwards25519 (a = -1)."""
    (x1, y1), (x2, y2) = a, b
    t = p._D * x1 * x2 * y1 * y2 % p._P
    x = (x1 * y2 + y1 * x2) * pow(1 + t, -1, p._P) % p._P
    y = (y1 * y2 + x1 * x2) * pow(1 - t, -1, p._P) % p._P
    return x, y


def torsioned_edwards(public: bytes) -> bytes:
    """An Ed25519 public key plus a point of order 8 (outside the prime-order subgroup)."""
    x, y = _edwards_add(p._decode_edwards(public), p._decode_edwards(unhex(ORDER_8_EDWARDS)))
    return (y | (x & 1) << 255).to_bytes(32, "little")


def torsioned_u(public: bytes) -> bytes:
    """An X25519 public key plus a point of order 8: same DH outputs, another encoding."""
    u = int.from_bytes(public, "little")
    y = (u - 1) * pow(u + 1, -1, p._P) % p._P
    edwards = torsioned_edwards(y.to_bytes(32, "little"))
    y = int.from_bytes(edwards, "little") & ((1 << 255) - 1)
    return ((1 + y) * pow(1 - y, -1, p._P) % p._P).to_bytes(32, "little")


def seeded(label: str) -> SeededRandom:
    """The deterministic random source of one named generator input."""
    return SeededRandom(b"hushchat test vectors/" + label.encode())


class Recorder:
    """A RandomSource that records what it hands out, for the ``random`` fields."""

    def __init__(self, inner: RandomSource) -> None:
        self._inner = inner
        self.drawn: list[bytes] = []

    def random_bytes(self, n: int) -> bytes:
        data = self._inner.random_bytes(n)
        self.drawn.append(data)
        return data

    def encapsulate(self, public_key: bytes) -> tuple[bytes, bytes]:
        return self._inner.encapsulate(public_key)

    def take(self) -> list[str]:
        """Hex of everything drawn since the last call."""
        drawn, self.drawn = self.drawn, []
        return [h(chunk) for chunk in drawn]

    def __repr__(self) -> str:
        return "Recorder(...)"


def case(
    comment: str,
    *,
    result: str = "valid",
    error: str | None = None,
    flags: tuple[str, ...] = (),
    **fields: Any,
) -> Json:
    """One test, without its tcId (numbered when the file is assembled)."""
    test: Json = {"comment": comment, "flags": list(flags), "result": result}
    if error is not None:
        test["error"] = error
    test.update(fields)
    return test


def vector_file(
    name: str,
    *,
    description: str,
    spec: list[str],
    notes: dict[str, Json],
    groups: list[Json],
) -> Json:
    """Assemble a file: number the tests 1..N in order and fill in the header."""
    tc_id = 0
    for group in groups:
        for test in group["tests"]:
            tc_id += 1
            test["tcId"] = tc_id
            for flag in test["flags"]:
                if flag not in notes:
                    raise AssertionError(f"{name}: flag {flag} has no note")
    return {
        "schema": f"hushchat-test-vectors/{name}/v{SCHEMA_VERSION}",
        "protocol_version": PROTOCOL_VERSION,
        "description": description,
        "spec": spec,
        "notes": notes,
        "numberOfTests": tc_id,
        "generator": GENERATOR,
        "testGroups": groups,
    }


def note(bug_type: str, description: str) -> Json:
    return {"bugType": bug_type, "description": description}


def iter_tests(data: Json) -> Iterator[tuple[Json, Json]]:
    """Every (group, test) pair of a loaded file."""
    for group in data.get("testGroups", []):
        for test in group.get("tests", []):
            yield group, test


class Checker:
    """Collects the mismatches found while verifying one test."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def fail(self, message: str) -> None:
        self.failures.append(message)

    def equal(self, what: str, expected: Any, actual: Any) -> bool:
        if expected != actual:
            self.fail(f"{what}: expected {_short(expected)}, got {_short(actual)}")
            return False
        return True

    def raises(self, what: str, code: str, action: Callable[[], object]) -> None:
        """``action`` must raise the ProtocolError whose code is ``code``."""
        try:
            action()
        except ProtocolError as exc:
            self.equal(f"{what}: error", code, exc.code)
        else:
            self.fail(f"{what}: expected error {code}, but it succeeded")

    def outcome(self, what: str, test: Json, action: Callable[[], _T]) -> _T | None:
        """Run ``action``; for an invalid test it must raise ``test["error"]``."""
        if test["result"] == "invalid":
            self.raises(what, test["error"], action)
            return None
        return action()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
