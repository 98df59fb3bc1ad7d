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
from .failure_policy import on_failure_setting
from .keys import RECOMMENDED_PARALLELISM
from .redis_target import RedisTarget

__all__ = ["PartitioningSettings", "RedisTarget", "read_settings", "DEFAULTS", "redis_namespace",
           "QUEUE_TYPES", "SENTINEL_PORT"]

#: Largest accepted pool size: one single-concurrency worker process per partition.
MAX_PARTITIONS: Final = 4096

#: Pool names and the queue prefix end up in queue and Redis key names.
_POOL_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://", "redis+socket://")
_SENTINEL_SCHEME: Final = "sentinel://"
#: Port of a sentinel whose URL names none (kombu's default for ``sentinel://``).
SENTINEL_PORT: Final = 26379
#: RabbitMQ queue types a partition queue may have (``x-queue-type``).
QUEUE_TYPES: Final = ("classic", "quorum")
#: Default ``x-delivery-limit`` of quorum partition queues: high enough that no crash loop or
#: redelivery storm reaches it (RabbitMQ 4 would drop a message after 20 deliveries), and a
#: positive number, which every RabbitMQ version reads the same way.
DEFAULT_DELIVERY_LIMIT: Final = 1_000_000

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
        "partitioning_redis_transport_options": None,
        "partitioning_wait_for_replicas": 0,
        "partitioning_wait_for_replicas_timeout": 1.0,
        "partitioning_queue_type": None,
        "partitioning_delivery_limit": DEFAULT_DELIVERY_LIMIT,
        "partitioning_allow_degraded": False,
        "partitioning_retry_hold_below": 0.1,
        "partitioning_worker_pools": None,
        "partitioning_on_failure": "park",
        "partitioning_outbox_relay": True,
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
        default_factory=lambda: MappingProxyType(dict(DEFAULTS["partitioning_pools"])))
    #: queue of partition i of pool p is ``f"{queue_prefix}.{p}.{i}"``.
    queue_prefix: str = DEFAULTS["partitioning_queue_prefix"]
    #: seconds an exclusive-consumer lease lives without a heartbeat.
    lease_ttl: float = DEFAULTS["partitioning_lease_ttl"]
    #: Redis holding leases, dead letters and parked keys; None → the broker when the
    #: broker is Redis (or Sentinel), else the result backend when that is Redis.
    redis: RedisTarget | None = None
    #: The broker, when it is a Redis (plain or Sentinel); None for other brokers.
    broker_redis: RedisTarget | None = None
    #: Replicas that must acknowledge each write this package makes (``WAIT``); 0: none.
    wait_for_replicas: int = DEFAULTS["partitioning_wait_for_replicas"]
    #: Seconds a write waits for those acknowledgements before it counts as failed.
    wait_for_replicas_timeout: float = DEFAULTS["partitioning_wait_for_replicas_timeout"]
    #: RabbitMQ type of the partition queues: ``"classic"`` or ``"quorum"``.
    queue_type: str = "classic"
    #: ``x-delivery-limit`` of quorum partition queues.
    delivery_limit: int = DEFAULTS["partitioning_delivery_limit"]
    #: Start a partition worker even where a guarantee cannot be given (a WARNING says which).
    allow_degraded: bool = DEFAULTS["partitioning_allow_degraded"]
    #: Where checkpoints live: a dotted path (``"pkg.module:Class"`` or ``"pkg.module.Class"``)
    #: or an object/factory; None → the Django store when its app is installed.
    checkpoint_store: Any = None
    #: The Django database alias whose transaction holds a task body and its checkpoint.
    checkpoint_database: str = DEFAULTS["partitioning_checkpoint_database"]
    #: Message ids remembered per (projection, key) by projections deduplicating by id.
    dedupe_window: int = DEFAULTS["partitioning_dedupe_window"]
    #: A retry delay (s) below this holds the partition in place; a longer one sets the key aside.
    retry_hold_below: float = DEFAULTS["partitioning_retry_hold_below"]
    #: Pools ``partitioning worker`` runs without ``--pool``; None: the pools some registered
    #: partitioned task uses (tasks only sent by name from elsewhere need their pool listed).
    worker_pools: tuple[str, ...] | None = None
    #: What a failure does in tasks that choose none: "park" or "skip" (failure_policy.py).
    on_failure: str = DEFAULTS["partitioning_on_failure"]
    #: ``partitioning worker`` runs the Django outbox relay in a thread (when the outbox exists).
    outbox_relay: bool = DEFAULTS["partitioning_outbox_relay"]

    @property
    def redis_url(self) -> str | None:
        """The store's URL as configured (None: no Redis store)."""
        return self.redis.url if self.redis is not None else None

    def queue_name(self, pool: str, index: int) -> str:
        """The one place a partition queue name is built."""
        return f"{self.queue_prefix}.{pool}.{index}"

    @property
    def idle_queue_name(self) -> str:
        """Where a partition worker process's own consumer listens (nothing is sent there)."""
        return f"{self.queue_prefix}.idle"

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


def _conf_value(conf: Mapping[str, Any], name: str) -> Any:
    # Celery's Settings resolve broker_url / result_backend through properties that read
    # CELERY_BROKER_URL / CELERY_RESULT_BACKEND first (what ``celery -b`` exports).
    resolved = isinstance(getattr(type(conf), name, None), property)
    value = getattr(conf, name) if resolved else conf.get(name)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ";".join(value)  # Celery also takes a list of failover URLs
    return value


def _options(conf: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = conf.get(name) or {}
    if not isinstance(value, Mapping):
        raise _bad(name, f"is {value!r}", "use a dict")
    return value


def _ssl_kwargs(value: Any, name: str) -> dict[str, Any]:
    """redis-py connection keyword arguments for Celery's ``broker_use_ssl``-style value."""
    if not value:
        return {}
    if value is True:
        return {"ssl": True}
    if not isinstance(value, Mapping):
        raise _bad(name, f"is {value!r}", "use True or a dict of ssl_* options")
    return {"ssl": True, **value}


def sentinel_target(url: str, options: Mapping[str, Any], ssl: Any, *, url_setting: str,
                    options_setting: str) -> RedisTarget:
    """A Sentinel :class:`RedisTarget` from ``sentinel://`` URL(s) and transport options."""
    from kombu.utils.url import url_to_parts

    sentinels: list[tuple[str, int]] = []
    first = None
    for part in (piece.strip() for piece in url.split(";")):
        if not part:
            continue
        if not part.startswith(_SENTINEL_SCHEME):
            raise _bad(url_setting, f"mixes {maybe_sanitize_url(part)!r} into a sentinel:// list",
                       "list only sentinel:// URLs, separated by ';'")
        parsed = url_to_parts(part)
        first = first or parsed
        sentinels.append((parsed.hostname or "127.0.0.1", int(parsed.port or SENTINEL_PORT)))
    master_name = options.get("master_name")
    if first is None or not isinstance(master_name, str) or not master_name:
        raise _bad(options_setting, "has no master_name for the sentinel:// URL of "
                   f"{url_setting}", "set master_name to the name the sentinels monitor")
    sentinel_kwargs = options.get("sentinel_kwargs") or {}
    if not isinstance(sentinel_kwargs, Mapping):
        raise _bad(options_setting, f"has sentinel_kwargs={sentinel_kwargs!r}", "use a dict")
    vhost = str(first.path or "0").strip("/") or "0"
    if not vhost.isdigit():
        raise _bad(url_setting, f"names the database {vhost!r}", "use a number, e.g. /0")
    connection: dict[str, Any] = {"db": int(vhost)}
    if first.username:
        connection["username"] = first.username
    if first.password:
        connection["password"] = first.password
    connection.update(_ssl_kwargs(ssl, options_setting))
    min_other = options.get("min_other_sentinels", 0)
    return RedisTarget(url=url, sentinels=tuple(sentinels), master_name=master_name,
                       sentinel_kwargs=MappingProxyType(dict(sentinel_kwargs)),
                       connection_kwargs=MappingProxyType(connection),
                       min_other_sentinels=int(min_other or 0))


def _target(url: str, conf: Mapping[str, Any], *, url_setting: str, options_setting: str,
            ssl_setting: str | None) -> RedisTarget | None:
    """The RedisTarget of a (possibly ``;``-separated) URL setting, None if not Redis."""
    if url.startswith(_SENTINEL_SCHEME):
        ssl = conf.get(ssl_setting) if ssl_setting else _options(conf, options_setting).get("ssl")
        return sentinel_target(url, _options(conf, options_setting), ssl,
                               url_setting=url_setting, options_setting=options_setting)
    first = url.split(";", maxsplit=1)[0].strip()
    if first.startswith(_REDIS_SCHEMES):
        return RedisTarget(url=first)
    return None


def _broker_redis(conf: Mapping[str, Any]) -> RedisTarget | None:
    value = _conf_value(conf, "broker_url")
    if not isinstance(value, str):
        return None
    return _target(value, conf, url_setting="broker_url",
                   options_setting="broker_transport_options", ssl_setting="broker_use_ssl")


def _redis(conf: Mapping[str, Any], broker: RedisTarget | None) -> RedisTarget | None:
    explicit = conf.get("partitioning_redis_url")
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit.startswith(
                (*_REDIS_SCHEMES, _SENTINEL_SCHEME)):
            shown = maybe_sanitize_url(explicit) if isinstance(explicit, str) else explicit
            raise _bad("partitioning_redis_url", f"is {shown!r}",
                       "use a redis://, rediss://, unix:// or sentinel:// URL")
        if explicit.startswith(_SENTINEL_SCHEME) and not conf.get(
                "partitioning_redis_transport_options") and broker is not None and broker.is_sentinel:
            # The store is (in the same Sentinel setup as) the broker: its options apply.
            return _target(explicit, conf, url_setting="partitioning_redis_url",
                           options_setting="broker_transport_options", ssl_setting="broker_use_ssl")
        return _target(explicit, conf, url_setting="partitioning_redis_url",
                       options_setting="partitioning_redis_transport_options", ssl_setting=None)
    if broker is not None:
        return broker
    backend = _conf_value(conf, "result_backend")
    if isinstance(backend, str):
        return _target(backend, conf, url_setting="result_backend",
                       options_setting="result_backend_transport_options", ssl_setting=None)
    return None


def _worker_pools(value: Any, pools: Mapping[str, int]) -> tuple[str, ...] | None:
    name = "partitioning_worker_pools"
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) or not value:
        raise _bad(name, f"is {value!r}", 'use a non-empty list of pool names, e.g. ["entity", '
                   '"global"], or None for the pools the registered tasks use')
    unknown = [p for p in value if p not in pools]
    if unknown:
        raise _bad(name, f"names {', '.join(map(repr, unknown))}, not in partitioning_pools",
                   f"use some of {', '.join(pools)}")
    return tuple(p for p in pools if p in value)


def _checkpoint_database(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _bad("partitioning_checkpoint_database", f"is {value!r}",
                   "use a database alias from DATABASES, such as 'default'")
    return value


def _int(name: str, value: Any, low: int, high: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(name, f"is {value!r}", fix)
    return value


def _seconds(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _bad(name, f"is {value!r}", f"use a number of seconds from {low:g} to {high:g}")
    return float(value)


def _queue_type(conf: Mapping[str, Any]) -> str:
    explicit = conf.get("partitioning_queue_type")
    name, value = ("partitioning_queue_type", explicit) if explicit is not None else (
        "task_default_queue_type", conf.get("task_default_queue_type") or "classic")
    if value not in QUEUE_TYPES:
        raise _bad(name, f"is {value!r}", "use 'classic' or 'quorum'")
    return str(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _bad(name, f"is {value!r}", "use True or False")
    return value


def read_settings(conf: Mapping[str, Any]) -> PartitioningSettings:
    """Read and validate the partitioning settings from an ``app.conf``-like mapping."""

    def get(name: str) -> Any:
        value = conf.get(name)
        return DEFAULTS[name] if value is None else value

    broker = _broker_redis(conf)
    ttl = _seconds("partitioning_lease_ttl", get("partitioning_lease_ttl"), 1, 3600)
    wait = get("partitioning_wait_for_replicas_timeout")
    replicas = _int("partitioning_wait_for_replicas", get("partitioning_wait_for_replicas"), 0, 16,
                    "use the number of replicas that must acknowledge each write (0 to 16; 0: "
                    "do not wait)")
    if replicas and not isinstance(wait, bool) and isinstance(wait, (int, float)) and wait > ttl / 4:
        raise _bad("partitioning_wait_for_replicas_timeout", f"is {wait!r}", "use at most a "
                   f"quarter of partitioning_lease_ttl ({ttl / 4:g} s): a lease renewal waits it")
    pools = _pools(get("partitioning_pools"))
    return PartitioningSettings(
        pools=pools,
        worker_pools=_worker_pools(conf.get("partitioning_worker_pools"), pools),
        queue_prefix=_prefix(get("partitioning_queue_prefix")),
        checkpoint_store=conf.get("partitioning_checkpoint_store"),
        checkpoint_database=_checkpoint_database(get("partitioning_checkpoint_database")),
        dedupe_window=_int("partitioning_dedupe_window", get("partitioning_dedupe_window"), 1,
                           10000, "use an int from 1 to 10000 (message ids kept per projection "
                           "and key)"),
        lease_ttl=ttl,
        redis=_redis(conf, broker),
        broker_redis=broker,
        wait_for_replicas=replicas,
        wait_for_replicas_timeout=_seconds("partitioning_wait_for_replicas_timeout",
                                           wait, 0.01, 60),
        queue_type=_queue_type(conf),
        delivery_limit=_int("partitioning_delivery_limit", get("partitioning_delivery_limit"), 1,
                            2**31 - 1, f"use a positive number of deliveries (default "
                            f"{DEFAULT_DELIVERY_LIMIT:,}) that no crash loop reaches"),
        allow_degraded=_flag("partitioning_allow_degraded", get("partitioning_allow_degraded")),
        retry_hold_below=_seconds("partitioning_retry_hold_below",
                                  get("partitioning_retry_hold_below"), 0, 3600),
        on_failure=on_failure_setting(get("partitioning_on_failure")),
        outbox_relay=_flag("partitioning_outbox_relay", get("partitioning_outbox_relay")),
    )


def redis_namespace(conf: Mapping[str, Any]) -> str:
    """The Redis key namespace of an app: kombu's ``global_keyprefix`` transport option, else ``""``.

    Every celery-partitioning Redis key lives under it (``RedisKeys(namespace)``), beside
    kombu's own queue lists and ``unacked`` hash, so several apps can share one Redis.
    """
    prefix = _options(conf, "broker_transport_options").get("global_keyprefix") or ""
    if not isinstance(prefix, str):
        raise _bad("broker_transport_options", f"has global_keyprefix={prefix!r}", "use a str")
    return prefix
