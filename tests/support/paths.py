"""Where the repository's folders are, for tests that read spec/, vectors/ or examples/."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WYCHEPROOF = REPO / "tests" / "wycheproof"
