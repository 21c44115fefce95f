"""The fuzzing budget, and the inputs the fuzz targets checked.

``pytest -m fuzz`` gives each target (every decoder of test_decoder_fuzz.py
and every entry point of test_fuzz_entrypoints.py) HUSHCHAT_FUZZ_EXAMPLES
inputs, 50,000 by default. The inputs are counted inside each check, never
estimated; with HUSHCHAT_FUZZ_REPORT naming a file, conftest.py writes the
counts there as JSON at the end of the session.
"""

from __future__ import annotations

import os
from collections import Counter

FUZZ_EXAMPLES = int(os.environ.get("HUSHCHAT_FUZZ_EXAMPLES", "50000"))
CHECKED: Counter[str] = Counter()
