"""Partitioning settings: the only reader of ``app.conf.partitioning_*`` (pure).

In Django with ``config_from_object("django.conf:settings", namespace="CELERY")`` the
settings are spelled ``CELERY_PARTITIONING_POOLS`` and so on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from kombu.utils.url import maybe_sanitize_url

from .errors import PartitionConfigError
from .keys import RECOMMENDED_PARALLELISM

__all__ = ["PartitioningSettings", "read_settings", "DEFAULTS", "redis_namespace"]

#: Largest accepted pool size: one single-concurrency worker process per partition.
MAX_PARTITIONS: Final = 4096

#: Pool names and the queue prefix end up in queue and Redis key names.
_POOL_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://", "redis+socket://")

#: Every setting, by its ``app.conf`` name, with its default.
DEFAULTS: Final[Mapping[str, Any]] = MappingProxyType(
    {
        "partitioning_pools": dict(RECOMMENDED_PARALLELISM),
        "partitioning_queue_prefix": "partition",
        "partitioning_lease_ttl": 10.0,
        "partitioning_redis_url": None,
        "partitioning_checkpoint_store": None,
        "partitioning_checkpoint_database": "default",
        "partitioning_dedupe_window": 100,
    }
)


def _django_name(name: str) -> str:
    return "CELERY_" + name.upper()


def _bad(name: str, problem: str, fix: str) -> PartitionConfigError:
    return PartitionConfigError(
        f"setting {name} (Django: {_django_name(name)}) {problem}; {fix}"
    )


@dataclass(frozen=True)
class PartitioningSettings:
    """Validated partitioning settings of one app."""

    #: pool name → number of partitions (>= 1).
    pools: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType(dict(RECOMMENDED_PARALLELISM))
    )
    #: queue of partition i of pool p is ``f"{queue_prefix}.{p}.{i}"``.
    queue_prefix: str = "partition"
    #: seconds an exclusive-consumer lease lives without a heartbeat.
    lease_ttl: float = 10.0
    #: Redis holding leases, dead letters and parked keys; None → the broker's URL
    #: when the broker is Redis, else the result backend's when that is Redis.
    redis_url: str | None = None
    #: Where checkpoints live: a dotted path (``"pkg.module:Class"`` or ``"pkg.module.Class"``)
    #: or an object/factory; None → the Django store when its app is installed.
    checkpoint_store: Any = None
    #: The Django database alias whose transaction holds a task body and its checkpoint.
    checkpoint_database: str = "default"
    #: Message ids remembered per (projection, key) by projections deduplicating by id.
    dedupe_window: int = 100

    def queue_name(self, pool: str, index: int) -> str:
        """The one place a partition queue name is built."""
        return f"{self.queue_prefix}.{pool}.{index}"

    def partitions(self, pool: str) -> int:
        """The number of partitions of ``pool``; ``PartitionConfigError`` if unknown."""
        try:
            return self.pools[pool]
        except KeyError:
            raise PartitionConfigError(
                f"unknown partition pool {pool!r}; configured pools: {', '.join(self.pools)} "
                f"(add it to the setting partitioning_pools / CELERY_PARTITIONING_POOLS)"
            ) from None


def _pools(value: Any) -> Mapping[str, int]:
    name = "partitioning_pools"
    if not isinstance(value, Mapping) or not value:
        raise _bad(name, f"must be a non-empty mapping of pool name to partition count, got {value!r}",
                   'for example {"entity": 10, "global": 1}')
    pools: dict[str, int] = {}
    for pool, count in value.items():
        if not isinstance(pool, str) or not _POOL_NAME.match(pool):
            raise _bad(name, f"has an invalid pool name {pool!r}",
                       "use 1-64 letters, digits, '_' or '-'")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PARTITIONS:
            raise _bad(name, f"gives pool {pool!r} the partition count {count!r}",
                       f"use an int from 1 to {MAX_PARTITIONS}")
        pools[pool] = count
    return MappingProxyType(pools)


def _prefix(value: Any) -> str:
    if not isinstance(value, str) or not _PREFIX.match(value):
        raise _bad("partitioning_queue_prefix", f"is {value!r}",
                   "use 1-128 letters, digits, '_', '-', '.' or ':'")
    return value


def _ttl(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 <= value <= 3600:
        raise _bad("partitioning_lease_ttl", f"is {value!r}",
                   "use a number of seconds from 1 to 3600")
    return float(value)


def _redis_url(conf: Mapping[str, Any]) -> str | None:
    explicit = conf.get("partitioning_redis_url")
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit.startswith(_REDIS_SCHEMES):
            shown = maybe_sanitize_url(explicit) if isinstance(explicit, str) else explicit
            raise _bad("partitioning_redis_url", f"is {shown!r}",
                       "use a redis://, rediss:// or unix:// URL")
        return explicit
    for name in ("broker_url", "result_backend"):
        # Celery's Settings resolve these two through properties that read CELERY_BROKER_URL /
        # CELERY_RESULT_BACKEND first (what ``celery -b`` exports): use them where present.
        resolved = isinstance(getattr(type(conf), name, None), property)
        value = getattr(conf, name) if resolved else conf.get(name)
        if isinstance(value, str):
            first = value.split(";")[0].strip()
            if first.startswith(_REDIS_SCHEMES):
                return first
    return None


def _checkpoint_database(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad("partitioning_checkpoint_database", f"is {value!r}",
                   "use a database alias from DATABASES, such as 'default'")
    return value


def _dedupe_window(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10000:
        raise _bad("partitioning_dedupe_window", f"is {value!r}",
                   "use an int from 1 to 10000 (message ids kept per projection and key)")
    return value


def read_settings(conf: Mapping[str, Any]) -> PartitioningSettings:
    """Read and validate the partitioning settings from an ``app.conf``-like mapping."""

    def get(name: str) -> Any:
        value = conf.get(name)
        return DEFAULTS[name] if value is None else value

    return PartitioningSettings(
        pools=_pools(get("partitioning_pools")),
        queue_prefix=_prefix(get("partitioning_queue_prefix")),
        lease_ttl=_ttl(get("partitioning_lease_ttl")),
        redis_url=_redis_url(conf),
        checkpoint_store=conf.get("partitioning_checkpoint_store"),
        checkpoint_database=_checkpoint_database(get("partitioning_checkpoint_database")),
        dedupe_window=_dedupe_window(get("partitioning_dedupe_window")),
    )


def redis_namespace(conf: Mapping[str, Any]) -> str:
    """The Redis key namespace of an app: kombu's ``global_keyprefix`` transport option, else ``""``.

    Every celery-partitioning Redis key lives under it (``RedisKeys(namespace)``), beside
    kombu's own queue lists and ``unacked`` hash, so several apps can share one Redis.
    """
    options = conf.get("broker_transport_options") or {}
    if not isinstance(options, Mapping):
        raise _bad("broker_transport_options", f"is {options!r}", "use a dict")
    prefix = options.get("global_keyprefix") or ""
    if not isinstance(prefix, str):
        raise _bad("broker_transport_options", f"has global_keyprefix={prefix!r}", "use a str")
    return prefix
