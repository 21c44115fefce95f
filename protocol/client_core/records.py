"""The keys of the records a ClientCore persists."""

from __future__ import annotations

from typing import TypeAlias

RecordKey: TypeAlias = tuple[str | int | bytes, ...]
