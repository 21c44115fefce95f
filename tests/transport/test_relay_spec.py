"""spec/07-relay-protocol.md agrees with the code: frame table, error table, limits, examples."""

from __future__ import annotations

import re

import pytest

from hushchat.transport.wire import limits
from hushchat.transport.wire.auth import auth_message
from hushchat.transport.wire.errors import RELAY_ERROR_CLASSES, RateLimited
from hushchat.transport.wire.frames import EnvelopePush, ErrorFrame, FrameType, Hello, encode_body
from hushchat.transport.wire.framing import encode_frame
from hushchat.transport.wire.records import Envelope
from tests.support.paths import REPO

SPEC = (REPO / "spec" / "07-relay-protocol.md").read_text()


def section(title: str) -> str:
    start = SPEC.index(f"## {title}")
    end = SPEC.find("\n## ", start + 1)
    return SPEC[start : end if end != -1 else None]


def table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| ---")
    ]


def test_frame_table_lists_every_frame_type() -> None:
    rows = [r for r in table_rows(section("7.5 Frames")) if r[0].isdigit()]
    assert {(int(r[0]), r[1]) for r in rows} == {(t.value, t.name) for t in FrameType}


def test_error_table_lists_every_code_and_whether_it_closes() -> None:
    rows = [r for r in table_rows(section("7.10 Error codes")) if r[0].startswith("`")]
    documented = {r[0].strip("`"): r[1] for r in rows}
    assert set(documented) == set(RELAY_ERROR_CLASSES)
    for code, closes in documented.items():
        assert (closes == "yes") == RELAY_ERROR_CLASSES[code].closes, code


_UNITS = {"s": 1, "h": 3600, "bytes": 1, "": 1}


def test_limit_table_values_match_the_code() -> None:
    checked = 0
    for row in table_rows(section("7.11 Limits and timeouts")):
        match = re.fullmatch(r"`([A-Z_]+)`", row[0])
        if match is None:
            continue
        number = re.match(r"([0-9,.]+)\s*(s|h|bytes)?\b", row[1])
        assert number is not None, row
        value = float(number.group(1).replace(",", "")) * _UNITS[number.group(2) or ""]
        assert value == getattr(limits, match.group(1)), row
        checked += 1
    assert checked >= 15


def test_every_limit_is_in_the_spec() -> None:
    names = [n for n in vars(limits) if n.isupper() and not n.startswith("_")]
    imported = {"MAX_DEVICES_PER_USER", "MAX_GROUP_MEMBERS", "MAX_MESSAGE_SIZE"}
    imported |= {"PREKEY_BATCH_SIZE", "PREKEY_LOW_WATERMARK"}
    missing = [n for n in names if f"`{n}`" not in SPEC and n not in imported]
    assert missing == []


def test_rate_limit_defaults_match() -> None:
    assert (limits.BUNDLE_FETCH_CAPACITY, 1 / limits.BUNDLE_FETCH_PER_SECOND) == (6, 600)
    assert (limits.SEND_CAPACITY, limits.SEND_PER_SECOND) == (60, 60)
    assert "6 at once, 1 per 600 s" in SPEC and "60 at once, 60 per s" in SPEC
    budget = (limits.TARGET_ONE_TIME_CAPACITY, 3600 * limits.TARGET_ONE_TIME_PER_SECOND)
    assert budget == (20, 20) and "20 at once, 20 per hour, per target device" in SPEC


EXAMPLES = [
    encode_frame(encode_body(Hello(0, limits.RELAY_PROTOCOL_VERSION, 114))),
    auth_message("relay.example", bytes(range(32)), "alice", 1),
    encode_frame(
        encode_body(
            EnvelopePush(
                Envelope(
                    bytes.fromhex("00112233445566778899aabbccddeeff"),
                    1_700_000_000_000,
                    "alice",
                    1,
                    1,
                    b"\xde\xad",
                )
            )
        )
    ),
    encode_frame(
        encode_body(
            ErrorFrame.from_error(7, RateLimited("too many bundle fetches", retry_after_ms=600_000))
        )
    ),
]


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_hex_examples(index: int) -> None:
    blocks = re.findall(r"```hex\n(.*?)```", SPEC, re.S)
    assert len(blocks) == len(EXAMPLES)
    assert bytes.fromhex("".join(blocks[index].split())) == EXAMPLES[index]


def test_frame_size_claims() -> None:
    assert limits.MAX_FRAME_SIZE == 2_162_688 == 2 * 2**20 + 64 * 2**10
    assert "2,162,688 bytes" in section("7.2 Framing")
