"""Per-app state and its lookups, and the one factory of Redis clients (a leaf module).

``install(app)`` hangs a :class:`Partitioning` object off the app; every other module finds
it here, so none needs ``app.py`` to look something up. The Redis client library is imported
when a client is first made, never by a producer that only publishes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Final, cast

from .config import PartitioningSettings, RedisTarget, read_settings, redis_namespace
from .discovery import TaskLookup
from .errors import PartitionConfigError
from .router import PartitionRouter

if TYPE_CHECKING:
    from celery import Celery
    from redis import Redis

    from .store.keys import RedisKeys

__all__ = ["Partitioning", "partitioning_of", "settings_of", "attach", "redis_client", "redis_client_like",
           "redis_keys", "STATE_ATTRIBUTE", "Replicas", "replicas_of", "store_client"]

#: Attribute of the Celery app that holds its Partitioning object.
STATE_ATTRIBUTE: Final = "_celery_partitioning"
#: Seconds a query to one sentinel may wait (unless ``sentinel_kwargs`` say otherwise).
SENTINEL_TIMEOUT: Final = 2.0


class Partitioning:
    """The partitioning state of one Celery app (settings, router, registry verdict)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._settings: PartitioningSettings | None = None
        self.registry_error: PartitionConfigError | None = None
        #: Whether the registry check at finalize logs what it finds (a command that reports
        #: the problems itself turns it off, so they are printed once), and whether it did.
        self.log_registry_problems = True
        self.registry_problems_logged = False
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


class Replicas:
    """``WAIT numreplicas timeout`` after every write a client makes (``partitioning_wait_for_replicas``).

    Redis replicates asynchronously, and a failover may promote a replica without the master's
    last writes: a write counts as done once ``count`` replicas acknowledged it on the very
    connection that wrote; else a ``redis.RedisError``, which every caller treats as a failed
    write (a lease renewal fails, the worker stops without acking).
    """

    #: Commands that change nothing: no WAIT after them.
    READS: Final = frozenset({
        "GET", "MGET", "PTTL", "TTL", "EXISTS", "TYPE", "HGET", "HGETALL", "HMGET", "HLEN",
        "HKEYS", "HVALS", "HEXISTS", "LRANGE", "LLEN", "LINDEX", "LPOS", "SCARD", "SMEMBERS",
        "SISMEMBER", "ZRANGE", "ZRANGEBYSCORE", "ZCARD", "ZSCORE", "SCAN", "SSCAN", "HSCAN",
        "INFO", "PING", "SCRIPT LOAD", "SCRIPT EXISTS", "WAIT", "ECHO", "EVALSHA_RO", "EVAL_RO",
        "CLIENT SETNAME", "SELECT", "AUTH", "HELLO", "DBSIZE", "KEYS", "WATCH", "UNWATCH",
        "MULTI", "ROLE",
    })

    def __init__(self, count: int, timeout: float) -> None:
        self.count = count
        self.timeout_ms = max(1, int(timeout * 1000))

    @classmethod
    def writes(cls, *commands: Any) -> bool:
        """Whether any of these commands (argument tuples) may change data."""
        return any(str(args[0]).upper() not in cls.READS for args in commands if args)

    def wait(self, client: Any, connection: Any) -> None:
        """Block until ``count`` replicas have this connection's writes; raise if they do not."""
        import redis

        connection.send_command("WAIT", self.count, self.timeout_ms)
        acked = int(redis.Redis.parse_response(client, connection, "WAIT"))
        if acked < self.count:
            raise redis.exceptions.RedisError(
                f"only {acked} of {self.count} replica(s) acknowledged a write within "
                f"{self.timeout_ms} ms (partitioning_wait_for_replicas): it may be lost at a "
                "failover, so it does not count as done")


def _client_class(replicas: Replicas | None) -> Any:
    """redis.Redis, or a subclass whose writes wait for ``replicas``."""
    import redis
    from redis.client import Pipeline

    if replicas is None:
        return redis.Redis
    waiting = replicas

    class WaitingPipeline(Pipeline):
        def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: Any) -> Any:
            result = super()._execute_transaction(connection, commands, raise_on_error)
            if Replicas.writes(*(args for args, _options in commands)):
                waiting.wait(self, connection)
            return result

        def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: Any) -> Any:
            result = cast(Any, super())._execute_pipeline(connection, commands, raise_on_error)
            if Replicas.writes(*(args for args, _options in commands)):
                waiting.wait(self, connection)
            return result

    class WaitingRedis(redis.Redis):
        def _send_command_parse_response(self, conn: Any, command_name: Any, *args: Any,
                                         **options: Any) -> Any:
            result = cast(Any, super())._send_command_parse_response(conn, command_name, *args, **options)
            if Replicas.writes(args):
                waiting.wait(self, conn)
            return result

        def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
            return WaitingPipeline(self.connection_pool, self.response_callbacks, transaction,
                                   shard_hint)

    return WaitingRedis


def replicas_of(settings: PartitioningSettings) -> Replicas | None:
    """The replica acknowledgements the settings ask for, or None (do not wait)."""
    if settings.wait_for_replicas <= 0:
        return None
    return Replicas(settings.wait_for_replicas, settings.wait_for_replicas_timeout)


def redis_client(target: str | RedisTarget, *, timeout: float | None = None,
                 replicas: Replicas | None = None, max_connections: int | None = None,
                 blocking: bool = False) -> Redis:
    """A redis-py client for ``target`` (a URL, or a :class:`~.config.RedisTarget`): every client
    this package makes for its own keys comes from here.

    ``timeout``: socket and connect time-outs; ``replicas``: every write waits for them. A
    Sentinel target's client asks the sentinels for the master at each new connection, so it
    follows a failover. ``max_connections``: how many threads may use it at once;
    ``blocking`` (not on Sentinel): a thread then waits up to ``timeout`` for a free
    connection rather than opening one more.
    """
    import redis

    if isinstance(target, str):
        if target.startswith("sentinel://"):
            raise PartitionConfigError("a sentinel:// URL needs its master_name and sentinel "
                                       "options: pass the settings' RedisTarget (settings.redis)")
        target = RedisTarget(url=target)
    cls = _client_class(replicas)
    timeouts: dict[str, Any] = {} if timeout is None else {"socket_timeout": timeout,
                                                           "socket_connect_timeout": timeout}
    pool = {} if max_connections is None else {"max_connections": max_connections}
    if not target.is_sentinel:
        if blocking and max_connections is not None:
            waiting = redis.BlockingConnectionPool.from_url(
                target.url, timeout=timeout if timeout is not None else 20, **timeouts, **pool)
            blocked: Redis = cls(connection_pool=waiting)
            return blocked
        client: Redis = cls.from_url(target.url, **timeouts, **pool)
        return client
    from redis.sentinel import Sentinel

    # A sentinel that does not answer must not hold a connect (master discovery moves on to
    # the next one); the user's sentinel_kwargs still win.
    sentinel_kwargs = {"socket_timeout": SENTINEL_TIMEOUT,
                       "socket_connect_timeout": SENTINEL_TIMEOUT,
                       **timeouts, **target.sentinel_kwargs}
    sentinel = Sentinel(
        list(target.sentinels), min_other_sentinels=target.min_other_sentinels,
        sentinel_kwargs=sentinel_kwargs)
    master: Redis = sentinel.master_for(
        str(target.master_name), redis_class=cls,
        **{**timeouts, **pool, **target.connection_kwargs})
    assert isinstance(master, redis.Redis)
    return master


@contextmanager
def store_client(app: Celery) -> Iterator[Redis | None]:
    """A client of the app's Redis store for one command's reads, closed afterwards; None when
    no store is configured."""
    settings = settings_of(app)
    if settings.redis is None:
        yield None
        return
    client = redis_client(settings.redis)
    try:
        yield client
    finally:
        client.close()


def redis_client_like(pool: Any, *, replicas: Replicas | None = None,
                      timeout: float | None = None) -> Redis:
    """A plain redis-py client with the connection settings of ``pool`` (kombu's Redis channel
    pool: the broker's host, credentials, TLS), without kombu's key prefixing; ``timeout``:
    socket and connect time-outs instead of kombu's."""
    import redis

    kwargs = dict(pool.connection_kwargs)
    if timeout is not None:
        kwargs.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    client: Redis = _client_class(replicas)(connection_pool=redis.ConnectionPool(
        connection_class=pool.connection_class, **kwargs))
    return client
