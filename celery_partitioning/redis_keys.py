"""Every Redis key name celery-partitioning uses, built in this one module.

User-supplied text (partition keys) never appears raw in a key name: it is hashed, so
no key content (``*``, ``:``, newlines, megabytes of text) can forge or collide with
another key. All names live under ``{namespace}cp:`` where the namespace is kombu's
``global_keyprefix`` (empty by default) so one Redis can host several apps.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b

__all__ = ["RedisKeys", "key_digest"]


def key_digest(partition_key: str) -> str:
    """A fixed-size, collision-resistant stand-in for a partition key in key names."""
    return blake2b(partition_key.encode("utf-8"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class RedisKeys:
    """Key names for one app namespace."""

    namespace: str = ""

    @property
    def root(self) -> str:
        return f"{self.namespace}cp:"

    def lease(self, queue: str) -> str:
        """String: the exclusive-consumer lease of a partition queue (value: holder token)."""
        return f"{self.root}lease:{queue}"
