"""The address of one device of one user (libsignal's ``ProtocolAddress``).

The relay stamps every envelope with the sending device's address, and a
sender chain belongs to the device that created it: sender keys name and
sign over it (spec/04-sender-keys.md, section 4.7).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """One device of one user."""

    user_id: str
    device_id: int

    def __str__(self) -> str:
        return f"{self.user_id}.{self.device_id}"
