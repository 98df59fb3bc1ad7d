"""Every Redis key name celery-partitioning uses, built in this one module.

User-supplied text (partition keys) never appears raw in a key name: it is hashed, so
no key content (``*``, ``:``, newlines, megabytes of text) can forge or collide with
another key. All names live under ``{namespace}cp:`` where the namespace is kombu's
``global_keyprefix`` (empty by default) so one Redis can host several apps.
"""

from __future__ import annotations

from dataclasses import dataclass
from hashlib import blake2b
from typing import Final

__all__ = ["PER_KEY", "RedisKeys", "key_digest", "outbox_lock"]

#: The families of names made per pool and partition key: ``{root}{family}:{pool}:{digest}``.
PER_KEY: Final = ("parked", "parked-ids", "replaying", "deferred", "backoff", "replay-outbox")


def outbox_lock(outbox: str) -> str:
    """String: held (token, short TTL) by the one process sending the outbox list ``outbox``."""
    return f"{outbox}:sending"


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

    def _per_key(self, family: str, pool: str, partition_key: str) -> str:
        return f"{self.root}{family}:{pool}:{key_digest(partition_key)}"

    def per_key_patterns(self, pool: str) -> list[str]:
        """Glob patterns of every per-key name of ``pool``."""
        return [f"{self.root}{family}:{pool}:*" for family in PER_KEY]

    def lease(self, queue: str) -> str:
        """String: the exclusive-consumer lease of a partition queue (value: holder token)."""
        return f"{self.root}lease:{queue}"

    def progress(self, queue: str) -> str:
        """String: when the partition's lease holder last took a message off its queue (epoch
        seconds), written by its lease heartbeat; ``status`` tells a stalled partition by it."""
        return f"{self.root}progress:{queue}"

    def members(self, pool: str) -> str:
        """Hash: member id → JSON of a live worker process of the pool (host, pid, since, last
        beat, pinned partitions); a member whose beat is older than its TTL is gone."""
        return f"{self.root}members:{pool}"

    def in_transit(self, queue: str) -> str:
        """List (on the broker's Redis): messages a partition worker popped from its queue and
        has not yet registered in kombu's ``unacked`` hash (BLMOVE target; crash recovery)."""
        return f"{self.root}in-transit:{queue}"

    # -- dead letters and per-key parking (store/deadletters.py) -------------------
    # Pool names are validated by config (letters, digits, '_', '-'); key text is hashed.

    def dead_letters(self, pool: str) -> str:
        """Hash: key digest → JSON dead-letter record; a field present means the key is parked."""
        return f"{self.root}dl:{pool}"

    def skipped_dead_letters(self, pool: str) -> str:
        """Hash: task id → JSON dead letter of a task with ``on_failure="skip"`` (its key went
        on; nothing is parked behind it)."""
        return f"{self.root}dl-skipped:{pool}"

    def dead_letter_log(self, pool: str) -> str:
        """List: JSON records of replays, skips and discards of the pool's dead letters (newest last)."""
        return f"{self.root}dl-log:{pool}"

    def parked(self, pool: str, partition_key: str) -> str:
        """List: raw messages set aside while the key is parked, in arrival (publish) order."""
        return self._per_key("parked", pool, partition_key)

    def parked_ids(self, pool: str, partition_key: str) -> str:
        """Set: task ids already dead-lettered, parked or deferred for the key (idempotency)."""
        return self._per_key("parked-ids", pool, partition_key)

    def replaying(self, pool: str, partition_key: str) -> str:
        """Set: task ids re-queued by a replay that have not reached the worker yet."""
        return self._per_key("replaying", pool, partition_key)

    def deferred(self, pool: str, partition_key: str) -> str:
        """List: newer raw messages of the key that arrived while a replay was in flight."""
        return self._per_key("deferred", pool, partition_key)

    def backoff(self, pool: str, partition_key: str) -> str:
        """String: present while the key waits out a retry backoff (its messages are set aside
        in ``parked`` like a parked key's); the retried message's task id."""
        return self._per_key("backoff", pool, partition_key)

    def backoff_schedule(self, queue: str) -> str:
        """Sorted set: the keys of a partition waiting out a retry backoff (member: JSON
        ``[pool, key]``), scored by the time (epoch s) their retried message is due."""
        return f"{self.root}backoff-due:{queue}"

    def attempts(self, task_id: str) -> str:
        """String: in-place retries made so far by one task id (survives a worker crash)."""
        return f"{self.root}attempts:{key_digest(task_id)}"

    def broker_queue(self, queue: str) -> str:
        """List: kombu's Redis list of a queue (priority 0), under the same global_keyprefix."""
        return f"{self.namespace}{queue}"

    def replay_outbox(self, pool: str, partition_key: str) -> str:
        """List: replayed messages still to be re-published (brokers other than this Redis)."""
        return self._per_key("replay-outbox", pool, partition_key)

    # -- pausing keys and partitions (celery_partitioning.store.pausing) -------------------

    def paused_keys(self, pool: str) -> str:
        """Hash: key digest → JSON pause record of a key (key, by, at); a field present means
        the key's messages are set aside in ``parked``, as a parked key's are."""
        return f"{self.root}paused:{pool}"

    def paused_partitions(self, pool: str) -> str:
        """Hash: partition index → JSON pause record (by, at); its holder stops between two
        messages and keeps its lease."""
        return f"{self.root}paused-partitions:{pool}"

    def pause_acks(self, pool: str) -> str:
        """Hash: partition index → JSON: the holder that stopped for the pause (node, at, and
        the ``at`` of the pause it saw)."""
        return f"{self.root}pause-acks:{pool}"

    def pause_log(self, pool: str) -> str:
        """List: JSON records of pauses and resumes of the pool (newest last, capped)."""
        return f"{self.root}pause-log:{pool}"

    # -- resizing a pool (celery_partitioning.store.resize) -------------------------------

    def resize(self, pool: str) -> str:
        """Hash: the pool's recorded ``size``; during a resize also ``from`` and ``started``."""
        return f"{self.root}resize:{pool}"

    def resize_drained(self, pool: str) -> str:
        """Set: partitions of the old size whose queue holds no more old-size messages."""
        return f"{self.root}resize-drained:{pool}"

    def resize_waiting(self, pool: str, index: int) -> str:
        """Hash: key digest → the old partition that new partition ``index`` holds the key for."""
        return f"{self.root}resize-waiting:{pool}:{index}"

    def resize_ids(self, pool: str) -> str:
        """Set: task ids set aside during the resize (moved or held; idempotency)."""
        return f"{self.root}resize-ids:{pool}"

    def resize_released(self, pool: str) -> str:
        """Set: task ids released to their new partition's head: they run there."""
        return f"{self.root}resize-released:{pool}"

    def resize_outbox(self, pool: str, index: int) -> str:
        """List: released messages still to be published to partition ``index`` (a broker
        that cannot push to the head of a queue)."""
        return f"{self.root}resize-outbox:{pool}:{index}"

    def resize_lists(self, pool: str) -> str:
        """Prefix of a key's lists: ``<prefix><digest>:moved`` (old-size messages moved from
        the old partition) and ``<prefix><digest>:held`` (new-size messages set aside); set
        ``<prefix><digest>:pending``: released ids not yet back (published releases)."""
        return f"{self.root}resize-key:{pool}:"
