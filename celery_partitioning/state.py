"""Per-app state and its lookups, and the one factory of Redis clients (a leaf module).

``install(app)`` hangs a :class:`Partitioning` object off the app; every other module finds
it here (``partitioning_of``, ``settings_of``), so no module needs ``app.py`` (which wires
everything) to look something up. This module imports only the pure core and the task look-up
(``discovery``); the Redis client library is imported when a client is first made, never by a
producer that only publishes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from .config import PartitioningSettings, read_settings, redis_namespace
from .discovery import TaskLookup
from .errors import PartitionConfigError
from .router import PartitionRouter

if TYPE_CHECKING:
    from celery import Celery
    from redis import Redis

    from .store.keys import RedisKeys

__all__ = ["Partitioning", "partitioning_of", "settings_of", "attach", "redis_client", "redis_client_like",
           "redis_keys", "STATE_ATTRIBUTE"]

#: Attribute of the Celery app that holds its Partitioning object.
STATE_ATTRIBUTE: Final = "_celery_partitioning"


class Partitioning:
    """The partitioning state of one Celery app (settings, router, registry verdict)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._settings: PartitioningSettings | None = None
        self.registry_error: PartitionConfigError | None = None
        self.router = PartitionRouter(
            settings=lambda: self.settings,
            lookup_task=TaskLookup(app),  # imports the app's task modules once for an unknown name
            exchange=lambda: self.app.amqp.default_exchange,
            registry_error=lambda: self.registry_error,
        )

    @property
    def settings(self) -> PartitioningSettings:
        """The app's validated settings, read once on first use."""
        if self._settings is None:
            self._settings = read_settings(self.app.conf)
        return self._settings


def attach(app: Celery) -> tuple[Partitioning, bool]:
    """The app's Partitioning object, made and attached if it has none (True when made)."""
    state = vars(app).get(STATE_ATTRIBUTE)
    if isinstance(state, Partitioning):
        return state, False
    state = Partitioning(app)
    setattr(app, STATE_ATTRIBUTE, state)
    return state, True


def partitioning_of(app: Celery) -> Partitioning:
    """The Partitioning object of an installed app; ``PartitionConfigError`` if not installed."""
    state = vars(app).get(STATE_ATTRIBUTE)
    if not isinstance(state, Partitioning):
        raise PartitionConfigError(
            f"celery_partitioning is not installed on app {app.main!r}; "
            "call celery_partitioning.install(app) where the app is created"
        )
    return state


def settings_of(app: Celery) -> PartitioningSettings:
    """The partitioning settings of an app (installed or not)."""
    state = vars(app).get(STATE_ATTRIBUTE)
    return state.settings if isinstance(state, Partitioning) else read_settings(app.conf)


def redis_keys(app: Celery) -> RedisKeys:
    """Every partitioning Redis key name of ``app`` (under its broker's key prefix)."""
    from .store.keys import RedisKeys

    return RedisKeys(redis_namespace(app.conf))


def redis_client(url: str, *, timeout: float | None = None) -> Redis:
    """A redis-py client for ``url``; with ``timeout``, socket and connect time-outs too.

    Every Redis client celery-partitioning makes for its own keys comes from here.
    """
    import redis

    if timeout is None:
        return redis.Redis.from_url(url)
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def redis_client_like(pool: Any) -> Redis:
    """A plain redis-py client with the connection settings of ``pool`` (kombu's Redis channel
    pool: the broker's host, credentials, TLS), without kombu's key prefixing."""
    import redis

    return redis.Redis(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **pool.connection_kwargs))
