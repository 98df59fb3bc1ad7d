"""Before partition workers consume: refuse a setup that cannot keep a guarantee.

Run by ``celery partitioning worker`` before it starts any child, and by each partition worker.
Such a setup is refused with one line naming the setting to fix (``PartitionConfigError``);
``partitioning_allow_degraded = True`` starts it with a WARNING per missing guarantee. On
RabbitMQ each partition queue is declared here: one that exists with other arguments is
refused with the migration to follow, instead of Celery's channel error loop.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from ..errors import PartitionConfigError
from ..state import partitioning_of

if TYPE_CHECKING:
    from celery import Celery

    from ..config import PartitioningSettings

__all__ = ["REDIS_SCHEMES", "guarantee_problems", "check_guarantees", "declare_partition_queues",
           "broker_scheme", "MIGRATION_DOC"]

logger = logging.getLogger("celery_partitioning.worker")

#: Where the procedure to change a partition queue's type is documented.
MIGRATION_DOC: Final = "docs/deployment.md, 'Changing a partition queue's type'"
#: Broker URL schemes of RabbitMQ (AMQP 0.9.1).
_AMQP: Final = ("amqp", "amqps", "pyamqp", "librabbitmq")
#: Redis broker URL schemes a partition worker consumes with its loss-free fetch and lease.
REDIS_SCHEMES: Final = ("redis", "rediss", "sentinel")
_REDIS_FAMILY: Final = ("redis", "rediss", "sentinel", "socket", "unix", "redis+socket")


def broker_scheme(app: Celery) -> str:
    """The scheme of the app's broker URL (``redis``, ``sentinel``, ``amqp``...)."""
    url = app.conf.broker_url or "amqp://"
    first = url[0] if isinstance(url, (list, tuple)) and url else url
    return str(first).split(";", 1)[0].strip().split("://", 1)[0].lower()


def guarantee_problems(settings: PartitioningSettings, scheme: str,
                       celery_version: tuple[int, ...] | None = None) -> list[str]:
    """Why a partition worker on this setup could not keep every guarantee (one line each)."""
    if celery_version is None:
        import celery

        celery_version = tuple(celery.VERSION[:2])
    problems: list[str] = []
    redis_family = scheme in _REDIS_FAMILY or scheme.endswith("+socket")
    if redis_family:
        if scheme not in REDIS_SCHEMES:
            problems.append(
                f"broker_url: a {scheme}:// Redis broker has no loss-free fetch and no lease "
                "here; use a redis://, rediss:// or sentinel:// URL")
        if settings.redis is None:
            problems.append(
                "partitioning_redis_url: a Redis broker needs a Redis store for the lease "
                "(exclusive consumer), dead letters and parking; set it or leave it unset to "
                "use the broker")
    elif scheme in _AMQP:
        if settings.queue_type == "quorum" and celery_version < (5, 5):
            problems.append(
                "partitioning_queue_type: quorum partition queues need Celery 5.5 or later "
                "(older workers ask for global QoS, which quorum queues refuse); upgrade "
                "Celery or keep classic queues")
        if settings.redis is None:
            problems.append(
                "partitioning_redis_url: without a Redis store dead letters, parking and "
                "crash-safe in-place retries are off on RabbitMQ; set a redis://, rediss:// "
                "or sentinel:// URL")
    else:
        problems.append(
            f"broker_url: a {scheme}:// broker offers no exclusive consumer per partition "
            "(Redis lease or RabbitMQ single active consumer); use Redis, Redis Sentinel or "
            "RabbitMQ")
    return problems


def check_guarantees(app: Celery) -> list[str]:
    """Refuse (``PartitionConfigError``, one line) a setup that cannot keep a guarantee, or,
    with ``partitioning_allow_degraded``, return what is missing (the caller warns)."""
    settings = partitioning_of(app).settings
    problems = guarantee_problems(settings, broker_scheme(app))
    if problems and not settings.allow_degraded:
        raise PartitionConfigError(
            f"refusing to start partition workers: {problems[0]} (or set "
            "partitioning_allow_degraded = True to run without that guarantee)")
    return problems


def warn_degraded(label: str, problems: Iterable[str]) -> None:
    for problem in problems:
        logger.warning("%s runs WITHOUT a guarantee (partitioning_allow_degraded): %s",
                       label, problem)


_INEQUIVALENT: Final = re.compile(r"inequivalent arg '([^']+)'.*?received (?:the value )?"
                                  r"'?([^' ]*)'?.*?but current is (?:the value )?'?([^' ]*)'?",
                                  re.IGNORECASE)


def declare_partition_queues(app: Celery, names: Iterable[tuple[str, int]]) -> None:
    """Declare each partition queue on RabbitMQ with its arguments; refuse one that exists
    with other arguments (``PartitionConfigError`` naming the setting and the migration)."""
    from amqp.exceptions import PreconditionFailed  # type: ignore[import-untyped]

    settings = partitioning_of(app).settings
    router = partitioning_of(app).router
    with app.connection_for_write() as conn:
        if conn.transport.driver_type != "amqp":
            return
        for pool, index in names:
            queue = router.queue(pool, index)
            channel = conn.channel()
            try:
                queue.bind(channel).declare()
            except PreconditionFailed as exc:
                raise PartitionConfigError(_mismatch(queue.name, settings, str(exc))) from None
            finally:
                with contextlib.suppress(Exception):  # a failed declare closed it already
                    channel.close()


def _mismatch(name: str, settings: PartitioningSettings, reply: str) -> str:
    found = _INEQUIVALENT.search(reply)
    what = (f"its {found.group(1)} is {found.group(3) or 'unset'} on the broker, "
            f"{found.group(2)} here" if found else reply.strip())
    return (f"partition queue {name} exists on RabbitMQ with other arguments ({what}); these "
            f"settings declare a {settings.queue_type} queue (partitioning_queue_type / "
            "task_default_queue_type, partitioning_delivery_limit). Keep the old settings, or "
            "migrate the queue: drain it with the old settings, delete it, start with the new "
            f"ones ({MIGRATION_DOC})")
