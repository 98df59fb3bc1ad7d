"""One partition, built in one place: its lease, and the ordered stages every message goes through.

The pipeline of a partition (``stage.py``: ``Stage`` hooks, called in this order):

==  ==============  ======================  =====================================================
 #  stage           module, hooks           owns
==  ==============  ======================  =====================================================
 1  pause           ``pausing.py``          (a Redis store) an operator's pause of the partition
                    between                 holds it there, lease kept (``store/pausing.py``)
 2  resize gate     ``resize.py``           (a resize in flight, Redis broker = store) a moved key
                    before, between         waits for its old partition; held keys released
 3  misroute guard  ``guard.py`` before     another partition's message: re-published there
 4  parking gate    ``parking.py``          (a Redis store) a parked, paused or backing-off key:
                    before, after,          set aside in order; keys due run again; the end of a
                    between                 replay releases what was deferred (``finished``)
 5  retry           ``retry.py``            (a Redis store) the attempt record: resumed after a
                    before, retrying,       crash; a retry waits in place or sets its key aside;
                    after                   forgotten when done
 6  ETA hold        ``eta.py`` before       a future ETA waits in place, the partition with it
 -  execution       ``executor.py``         not a stage: Celery's strategy and request, inline
                                            (the body inside its checkpoint:
                                            ``checkpoint_runner.py``); the task patch
                                            (``task_patch.py``) calls ``retrying``/``failed``; the
                                            ack calls ``after``
 7  dead letter     ``failures.py`` failed  (a Redis store) no retry left: dead letter, key parked
                                            (``on_failure="skip"``: only recorded); malformed ones
==  ==============  ======================  =====================================================

``before`` hooks run in this order until one takes the message or sends it back; ``between``
hooks run between messages, the pause first (while it holds, nothing else moves). How
set-aside messages go back to the queue is chosen once, here, for the partition
(``store/requeue.py``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ..state import redis_client, replicas_of
from ..store.attempts import AttemptStore
from ..store.backoff import BackoffStore
from ..store.broker import broker_redis
from ..store.deadletters import DeadLetterStore
from ..store.keys import RedisKeys
from ..store.lease import Lease, LeaseRenewer
from ..store.pausing import PauseStore
from ..store.requeue import requeue_for
from ..store.resize import ResizeState, ResizeStore
from .eta import EtaHold
from .failures import DeadLetters
from .guard import MisrouteGuard
from .parking import Parking
from .pausing import PartitionPause, PausePoll
from .resize import resize_gate
from .retry import Retry
from .runtime import LEASE_TAKEOVER_ENV, LEASE_TOKEN_ENV, PartitionRuntime, WorkerRuntime
from .stage import Stage

if TYPE_CHECKING:
    from ..config import PartitioningSettings

__all__ = ["build_partition"]

logger = logging.getLogger("celery_partitioning.worker")

#: Connections of a process's lease client, shared by all its partitions.
LEASE_CONNECTIONS: Final = 2


def build_partition(worker: WorkerRuntime, pool: str, index: int, *, store: Any,
                    keys: RedisKeys, at_head: bool, resizes: ResizeStore | None,
                    recorded: ResizeState | None,
                    fence: Callable[[str], None] | None = None) -> PartitionRuntime:
    """Partition ``index`` of ``pool`` in ``worker``: its lease, dead letters and stages, in
    the order above. ``store``: the store's client (None: no lease, no records); ``at_head``:
    re-queues go onto the head of the Redis list; ``resizes``/``recorded``: the pool's resize
    record; ``fence``: what a holder that lost its lease does (default: end the process)."""
    app, settings = worker.app, worker.settings
    partition = PartitionRuntime(
        app=app, settings=settings, pool=pool, index=index,
        queue=settings.queue_name(pool, index), redis=store, keys=keys,
        hostname=worker.hostname, transport=worker.transport, worker=worker,
        broker=broker_redis(app) if worker.transport == "redis" else None,
        requeue=requeue_for(app, pool, index, at_head=at_head))
    # On RabbitMQ a balanced member takes the lease too, so a partition moving to it waits
    # for the holder; pinned ones take none, so a Redis outage cannot stop them.
    if settings.redis is not None and (partition.broker is not None or worker.balanced):
        lease = partition.lease = _lease(partition, settings, fence)
        # the heartbeat fences a thread stuck outside a task body, and records its progress
        lease.stall_check = partition.progress.stall
        if store is not None:
            lease.on_beat.append(partition.progress.recorder(store, keys, partition.queue,
                                                             expire_ms=3 * lease.ttl_ms))
    place, requeue = partition.place, partition.requeue
    letters = DeadLetterStore(store, keys) if store is not None else None
    if letters is None:
        logger.warning("partition %s: no Redis store configured (partitioning_redis_url); dead "
                       "letters, parking, pausing and retry records are off", partition.label)
    else:
        partition.dead_letters = DeadLetters(place, letters, requeue)
        if worker.pauses is None:
            worker.pauses = PausePoll(PauseStore(letters))
    parking = Parking(place, letters, requeue) if letters is not None else None
    pause = PartitionPause(partition, worker.pauses) if letters is not None else None
    if parking is not None and pause is not None and partition.lease is not None:
        partition.lease.on_acquire.extend([parking.recheck, pause.recheck])
    if pause is not None:
        partition.on_woken.append(pause.recheck)  # `pause` wakes an idle holder's fetch
    stages: list[Stage | None] = [
        pause,
        resize_gate(partition, resizes, recorded) if resizes is not None and recorded else None,
        MisrouteGuard(place),
        parking,
        Retry(place, AttemptStore(store, keys), BackoffStore(letters), requeue)
        if letters is not None else None,
        EtaHold(partition),
        partition.dead_letters,
    ]
    partition.pipeline.stages = [stage for stage in stages if stage is not None]
    return partition


def _lease(partition: PartitionRuntime, settings: PartitioningSettings,
           fence: Callable[[str], None] | None) -> Lease:
    """The partition's lease, renewed by its process's renewer (one call per beat for all)."""
    assert settings.redis is not None and partition.worker is not None
    ttl = settings.lease_ttl
    renewer = partition.worker.renewer
    if renewer is None:
        replicas = replicas_of(settings)  # a renewal also waits for their acknowledgement
        client = redis_client(
            settings.redis, replicas=replicas, max_connections=LEASE_CONNECTIONS, blocking=True,
            timeout=max(0.2, ttl / 4) + (settings.wait_for_replicas_timeout if replicas else 0))
        renewer = partition.worker.renewer = LeaseRenewer(client, ttl)
    return Lease(renewer.client, partition.keys.lease(partition.queue), ttl,
                 node=f"{partition.hostname}#{partition.label}",
                 token=os.environ.get(LEASE_TOKEN_ENV),
                 takeover=os.environ.get(LEASE_TAKEOVER_ENV), fence=fence, renewer=renewer)
