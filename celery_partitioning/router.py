"""The Celery router: a task call → its partition queue and headers (pure, no I/O)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from kombu.entity import Exchange, Queue

from .checkpoint import HEADER_POSITION, CheckpointField, position_of
from .config import PartitioningSettings
from .errors import PartitionConfigError, PartitionKeyError
from .hashing import partition_for
from .tasks import KeyBinder, spec_of

__all__ = ["HEADER_KEY", "HEADER_POOL", "HEADER_INDEX", "HEADER_COUNT", "HEADER_PUBLISHED_AT",
           "HEADER_POSITION", "Route", "PartitionRouter", "partition_queue", "queue_arguments"]

#: Message header: the partition key the message was routed by.
HEADER_KEY: Final = "partition_key"
#: Message header: the pool name.
HEADER_POOL: Final = "partition_pool"
#: Message header: the partition index within the pool.
HEADER_INDEX: Final = "partition_index"
#: Message header: the pool's partition count when the message was published.
HEADER_COUNT: Final = "partition_count"
#: Message header: when the message was first published (epoch seconds), for ``status``' ages.
HEADER_PUBLISHED_AT: Final = "partition_published_at"

#: RabbitMQ queue argument that lets one consumer at a time receive from the queue.
SINGLE_ACTIVE_CONSUMER: Final = {"x-single-active-consumer": True}


def queue_arguments(settings: PartitioningSettings) -> dict[str, Any]:
    """The RabbitMQ arguments of every partition queue: a single active consumer; a quorum
    queue also gets ``partitioning_delivery_limit``, as RabbitMQ 4 would otherwise drop a
    message at its 21st delivery."""
    arguments: dict[str, Any] = dict(SINGLE_ACTIVE_CONSUMER)
    if settings.queue_type == "quorum":
        arguments["x-queue-type"] = "quorum"
        arguments["x-delivery-limit"] = settings.delivery_limit
    return arguments


def partition_queue(settings: PartitioningSettings, pool: str, index: int, exchange: Exchange) -> Queue:
    """The kombu Queue of one partition, declared for a single active consumer (the one
    place a partition queue is built: publishing, workers, status and re-publishing)."""
    name = settings.queue_name(pool, index)
    return Queue(
        name, exchange, routing_key=name, queue_arguments=queue_arguments(settings)
    )


@dataclass(frozen=True)
class Route:
    """Where one call of a partitioned task goes."""

    task: str
    key: str
    pool: str
    index: int
    partitions: int
    queue: str
    #: The event position of a task declared with ``checkpoint=`` (None otherwise).
    position: int | None = None


#: Bound on the per-task memo of key → partition index (cleared when full).
_INDEX_MEMO_SIZE: Final = 65536
#: Longest key the memo keeps (so it holds at most 64 Mi characters of key text).
_MEMO_KEY_CHARS: Final = 1024


class _TaskPlan:
    """Everything a partitioned task's publish needs, computed once per task."""

    __slots__ = ("binder", "checkpoint", "memo", "partitions", "pool")

    def __init__(self, binder: KeyBinder, pool: str, partitions: int,
                 checkpoint: CheckpointField | None = None) -> None:
        self.binder = binder
        self.pool = pool
        self.partitions = partitions
        self.checkpoint = checkpoint
        self.memo: dict[str, int] = {}

    def key_and_position(self, args: Any, kwargs: Any) -> tuple[str, int | None]:
        """The call's key and event position (``checkpoint=``; else None), binding it once."""
        if self.checkpoint is None:
            return self.binder(args, kwargs), None
        named = self.binder.arguments(args, kwargs)
        return (self.binder.key_of(named),
                position_of(self.binder.task_name, self.checkpoint, named))

    def index(self, key: str) -> int:
        """The partition of ``key``, memoized: event streams repeat their keys."""
        index = self.memo.get(key)
        if index is None:
            try:
                index = partition_for(key, self.partitions)
            except PartitionKeyError as exc:
                raise PartitionKeyError(
                    f"task {self.binder.task_name}: {exc}; nothing was published"
                ) from None
            if len(key) <= _MEMO_KEY_CHARS:  # huge keys would make the bounded memo unbounded in bytes
                if len(self.memo) >= _INDEX_MEMO_SIZE:
                    self.memo.clear()
                self.memo[key] = index
        return index


#: Marker cached for registered tasks that are not partitioned.
_PLAIN: Final = object()


class PartitionRouter:
    """A Celery router (``task_routes`` entry) for partitioned tasks.

    Returns ``None`` for other tasks, so the routers after it decide for them.
    """

    def __init__(
        self,
        settings: Callable[[], PartitioningSettings],
        lookup_task: Callable[[str], Any],
        exchange: Callable[[], Exchange],
        registry_error: Callable[[], PartitionConfigError | None] = lambda: None,
    ) -> None:
        self._settings = settings
        self._lookup_task = lookup_task
        self._exchange = exchange
        self._registry_error = registry_error
        self._plans: dict[str, object] = {}
        self._queues: dict[tuple[str, int], Queue] = {}

    def _plan(self, name: str, task: Any) -> _TaskPlan | None:
        plan = self._plans.get(name)
        if plan is None:
            task = task if task is not None else self._lookup_task(name)
            if task is None:
                return None  # not registered here: not ours to route
            spec = spec_of(task)
            if spec is None:
                plan = _PLAIN
            else:
                pool = spec.effective_pool
                if spec.key is None or pool is None:
                    raise PartitionConfigError(
                        f"task {name} is a projection without a "
                        f"{'key' if spec.key is None else 'pool'}; nothing was published "
                        "(give @projection key=... and pool=...)"
                    )
                plan = _TaskPlan(KeyBinder(name, spec.key, task.run), pool,
                                 self._settings().partitions(pool), spec.checkpoint)
            self._plans[name] = plan
        return plan if isinstance(plan, _TaskPlan) else None

    def _locate(self, plan: _TaskPlan, args: Any, kwargs: Any) -> tuple[str, int | None, int, Queue]:
        """The one place a call becomes a partition (key, event position, index, queue), for
        ``route`` and the Celery router entry ``__call__``."""
        key, position = plan.key_and_position(args, kwargs)
        index = plan.index(key)
        return key, position, index, self.queue(plan.pool, index)

    def route(self, name: str, args: Any, kwargs: Any, task: Any = None) -> Route | None:
        """The Route of a call, or None when ``name`` is not a partitioned task."""
        plan = self._plan(name, task)
        if plan is None:
            return None
        key, position, index, queue = self._locate(plan, args, kwargs)
        return Route(name, key, plan.pool, index, plan.partitions, queue.name, position)

    def queue(self, pool: str, index: int) -> Queue:
        """The (cached) kombu Queue of one partition."""
        queue = self._queues.get((pool, index))
        if queue is None:
            queue = partition_queue(self._settings(), pool, index, self._exchange())
            self._queues[(pool, index)] = queue
        return queue

    def __call__(
        self,
        name: str,
        args: Any,
        kwargs: Any,
        options: dict[str, Any],
        task: Any = None,
        **_: Any,
    ) -> dict[str, Any] | None:
        plan = self._plan(name, task)
        if plan is None:
            return None
        error = self._registry_error()
        if error is not None:
            raise error
        key, position, index, queue = self._locate(plan, args, kwargs)
        if options.get("queue") is not None or options.get("routing_key") is not None or (
            options.get("exchange") is not None or options.get("priority")
        ):
            _reject_fixed_destination(name, options, queue)
        headers = dict(options.get("headers") or ())
        headers[HEADER_KEY] = key
        headers[HEADER_POOL] = plan.pool
        headers[HEADER_INDEX] = index
        headers[HEADER_COUNT] = plan.partitions
        if position is not None:
            headers[HEADER_POSITION] = position
        if HEADER_PUBLISHED_AT not in headers:
            headers[HEADER_PUBLISHED_AT] = time.time()
        # Router results are merged *under* the call's options, so a call that passes its
        # own ``headers=`` would drop ours: put them into the options themselves as well.
        options["headers"] = headers
        return {"queue": queue, "headers": headers}


def _name_of(value: Any) -> Any:
    return getattr(value, "name", value)


def _reject_fixed_destination(name: str, options: Mapping[str, Any], queue: Queue) -> None:
    """Refuse options that would send a partitioned message elsewhere or reorder it; the
    partition's own destination (a retry, the misroute guard) is allowed."""
    wrong = []
    fixed_queue = options.get("queue")
    if fixed_queue is not None and _name_of(fixed_queue) != queue.name:
        wrong.append(f"queue={_name_of(fixed_queue)!r}")
    routing_key = options.get("routing_key")
    if routing_key is not None and routing_key != queue.routing_key:
        wrong.append(f"routing_key={routing_key!r}")
    exchange = options.get("exchange")
    if exchange is not None and _name_of(exchange) not in ("", queue.exchange.name):
        wrong.append(f"exchange={_name_of(exchange)!r}")
    priority = options.get("priority")
    if priority not in (None, 0):
        wrong.append(f"priority={priority!r}")
    if wrong:
        raise PartitionKeyError(
            f"task {name} is partitioned, so its calls may not set {', '.join(wrong)}: that "
            f"would bypass or reorder partition queue {queue.name!r}; remove the option "
            "(from the call, the task's options or task_routes); nothing was published"
        )
