"""Stable key → partition mapping: blake2b-64 then jump consistent hash (pure).

Reproducible in any language::

    h = int.from_bytes(blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    partition = jump_hash(h, partitions)      # Lamping & Veach 2014
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Final

from .errors import PartitionConfigError, PartitionKeyError

__all__ = ["key_hash", "jump_hash", "partition_for"]

_MASK64: Final = (1 << 64) - 1


def key_hash(key: str) -> int:
    """The unsigned 64-bit blake2b digest of a key's UTF-8 bytes, read big-endian."""
    return int.from_bytes(blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


def jump_hash(h: int, buckets: int) -> int:
    """Jump consistent hash of the 64-bit value ``h`` into ``buckets`` buckets."""
    b, j = -1, 0
    h &= _MASK64
    while j < buckets:
        b = j
        h = (h * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (2147483648.0 / ((h >> 33) + 1)))  # 2.0**31 / next value in (0, 1]
    return b


def partition_for(key: str, partitions: int) -> int:
    """The partition index, in ``range(partitions)``, of a partition key."""
    if not isinstance(key, str) or not key:
        raise PartitionKeyError(f"a partition key must be a non-empty str, got {key!r}")
    if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
        raise PartitionConfigError(f"partitions must be an int >= 1, got {partitions!r}")
    try:
        h = key_hash(key)
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from surrogateescape decoding
        raise PartitionKeyError(
            f"a partition key must be valid Unicode text, got {key[:80]!r}: {exc.reason} at "
            f"position {exc.start}; decode ids strictly before using them as keys"
        ) from None
    return jump_hash(h, partitions)
