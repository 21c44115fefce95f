"""What the fuzz targets share: their inputs, their budget, and the count of inputs checked.

An input is random bytes or a mutation of a seed the target accepts (bit
flips, truncations, extensions, insertions, deletions, msgpack type bytes),
so that mutations reach deep code. ``pytest -m fuzz`` gives each target
(every decoder of test_decoder_fuzz.py and every entry point of
test_fuzz_entrypoints.py) HUSHCHAT_FUZZ_EXAMPLES inputs, 50,000 by default.
The inputs are counted inside each check, never estimated; with
HUSHCHAT_FUZZ_REPORT naming a file, conftest.py writes the counts there as
JSON at the end of the session.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ_EXAMPLES = int(os.environ.get("HUSHCHAT_FUZZ_EXAMPLES", "50000"))
CHECKED: Counter[str] = Counter()

# msgpack type bytes worth planting: fixint edges, fixmap/fixarray, nil,
# the never-used 0xC1, bin8, float32, fixext1, array16, negative fixint.
_MAGIC = [0x00, 0x01, 0x7F, 0x80, 0x90, 0xC0, 0xC1, 0xC4, 0xCA, 0xD4, 0xDC, 0xFF]


@st.composite
def mutations(draw: st.DrawFn, seeds: Sequence[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "insert", "delete", "set"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[at:]
        elif op == "extend":
            data += draw(st.binary(min_size=1, max_size=40))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "set" and data:
            data[min(at, len(data) - 1)] = draw(st.sampled_from(_MAGIC))
    return bytes(data)


def inputs(seeds: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=400), mutations(seeds))


def budget(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
