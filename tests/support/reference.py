"""Independent references the tests check the protocol against: HKDF and
Curve25519 written from the RFCs, sharing no code with hushchat.protocol."""

from __future__ import annotations

import hmac


def reference_hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA-256 from the stdlib's HMAC, sharing no code with protocol/."""
    prk = hmac.digest(salt, ikm, "sha256")
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes([i]), "sha256")
        okm += block
    return okm[:length]


# The field prime (RFC 7748) and the order of the base point's subgroup (RFC 8032).
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
# The Ed25519 encoding of the neutral element (0, 1): a public key of small order,
# never a valid identity (one of the encodings test_primitives builds from the curve).
SMALL_ORDER_KEY = b"\x01" + b"\x00" * 31


# Affine Edwards arithmetic written from RFC 7748/8032, sharing no code with
# protocol.primitives, to make inputs (torsion points, torsioned keys) and
# to check results against.


class Curve25519:
    D = (-121665 * pow(121666, -1, P)) % P
    IDENTITY = (0, 1)

    def __init__(self) -> None:
        base = self.decode((4 * pow(5, -1, P) % P).to_bytes(32, "little"))
        assert base is not None
        self.base = base  # RFC 8032's B: y = 4/5, x even
        # A point of order 8: [L] of a curve point whose order has the full cofactor.
        y = 2
        while True:
            x = self.recover_x(y, 0)
            if x is not None:
                t = self.mul((x, y), L)
                if self.mul(t, 4) != self.IDENTITY:
                    break
            y += 1
        self.torsion = [self.mul(t, i) for i in range(8)]

    def recover_x(self, y: int, sign: int) -> int | None:
        p = P
        xx = (y * y - 1) * pow(self.D * y * y + 1, -1, p) % p
        x = pow(xx, (p + 3) // 8, p)
        if (x * x - xx) % p:
            x = x * pow(2, (p - 1) // 4, p) % p
        if (x * x - xx) % p or (x == 0 and sign):
            return None
        return p - x if x & 1 != sign else x

    def add(self, a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        p = P
        (x1, y1), (x2, y2) = a, b
        t = self.D * x1 * x2 * y1 * y2 % p
        x = (x1 * y2 + x2 * y1) * pow(1 + t, -1, p) % p
        return x, (y1 * y2 + x1 * x2) * pow(1 - t, -1, p) % p

    def mul(self, point: tuple[int, int], k: int) -> tuple[int, int]:
        result = self.IDENTITY
        while k:
            if k & 1:
                result = self.add(result, point)
            point = self.add(point, point)
            k >>= 1
        return result

    def encode(self, point: tuple[int, int]) -> bytes:
        x, y = point
        return (y | (x & 1) << 255).to_bytes(32, "little")

    def decode(self, data: bytes) -> tuple[int, int] | None:
        n = int.from_bytes(data, "little")
        y = n & ((1 << 255) - 1)
        x = None if y >= P else self.recover_x(y, n >> 255)
        return None if x is None else (x, y)

    def to_u(self, point: tuple[int, int]) -> bytes:
        """The Montgomery u-coordinate (1 + y) / (1 - y) of an Edwards point."""
        y = point[1]
        return ((1 + y) * pow(1 - y, -1, P) % P).to_bytes(32, "little")

    def from_u(self, u: bytes) -> tuple[int, int] | None:
        """An Edwards point with this u-coordinate (sign of x: 0), None if on the twist."""
        n = int.from_bytes(u, "little")
        y = (n - 1) * pow(n + 1, -1, P) % P
        x = self.recover_x(y, 0)
        return None if x is None else (x, y)

    def add_torsion_to_u(self, u: bytes, index: int) -> bytes:
        """u of (the point with u) + the index-th 8-torsion point: same X25519 results."""
        point = self.from_u(u)
        assert point is not None
        return self.to_u(self.add(point, self.torsion[index]))
