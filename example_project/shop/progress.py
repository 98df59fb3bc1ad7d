"""Progress counters for the demo: tasks published and finished, per pool, in one Redis hash.

Every publish of a shop task counts ``published:<pool>`` (Celery's ``before_task_publish``,
also for tasks published by workers; the demo's own publisher counts each batch in one call,
see ``count_publishes_in_bulk``) and every finished message counts ``done:<pool>``
(``task_postrun``, once per message even when a killed worker's message runs again, on
whichever attempt). All
work is finished when they are equal and the queues are empty. A message that starts a
second time (its worker was killed before the ack) counts ``reruns:<pool>``: a message is
known by its task id and retry count, so the next attempt of a retry (``request.retries`` one
higher, in ``task_prerun`` too) is not a rerun.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from celery import Celery, signals
from django.conf import settings

from .chaos import maybe_stall_after_commit

__all__ = ["Progress", "progress_of", "connect_signals", "count_publishes_in_bulk", "pool_of"]

#: KEYS: token set, counters hash. ARGV: token, field. Counts ``field`` when the token was seen.
_COUNT_IF_SEEN = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then redis.call('HINCRBY', KEYS[2], ARGV[2], 1) end
"""
#: KEYS: token set, counters hash. ARGV: token ('' = always count), busy ms, now, done field,
#: busy field, failed field ('' = not failed), last field. Counts a message once.
_COUNT_ONCE = """
if ARGV[1] ~= '' and redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[4], 1)
redis.call('HINCRBYFLOAT', KEYS[2], ARGV[5], ARGV[2])
if ARGV[6] ~= '' then redis.call('HINCRBY', KEYS[2], ARGV[6], 1) end
redis.call('HSET', KEYS[2], ARGV[7], ARGV[3])
return 1
"""

#: Attribute of the Celery app holding this process's Progress.
_ATTRIBUTE = "_shop_progress"


class Progress:
    """The counters of one demo run (namespaced like the run's queues)."""

    def __init__(self, url: str, namespace: str) -> None:
        self.redis = redis.Redis.from_url(url)
        self.key = f"{namespace}shop:progress"

    def count(self, field: str, amount: int = 1) -> None:
        self.redis.hincrby(self.key, field, amount)

    def count_many(self, amounts: dict[str, int]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for field, amount in amounts.items():
            pipe.hincrby(self.key, field, amount)
        pipe.execute()

    def started(self, pool: str, token: str) -> None:
        """A message starts; a token (task id and retry count) seen before is a rerun."""
        self.redis.eval(_COUNT_IF_SEEN, 2, f"{self.key}:started", self.key, token,
                        f"reruns:{pool}")

    def finished(self, pool: str, failed: bool, busy_ms: float, token: str = "") -> None:
        # One script: a worker killed half-way through must not leave the token recorded
        # and the message uncounted (its rerun would then never count it).
        fields = [f"done:{pool}", f"busy_ms:{pool}", f"failed:{pool}" if failed else "",
                  f"last:{pool}"]
        self.redis.eval(_COUNT_ONCE, 2, f"{self.key}:finished", self.key, token or "",
                        repr(busy_ms), repr(time.time()), *fields)

    def snapshot(self) -> dict[str, float]:
        raw: dict[bytes, bytes] = self.redis.hgetall(self.key)  # type: ignore[assignment]
        return {k.decode(): float(v) for k, v in raw.items()}

    def reset(self) -> None:
        self.redis.delete(self.key, f"{self.key}:started", f"{self.key}:finished")


def progress_of(app: Celery) -> Progress:
    """This process's Progress for ``app`` (made on first use, kept on the app)."""
    found = vars(app).get(_ATTRIBUTE)
    if not isinstance(found, Progress):
        found = Progress(settings.REDIS_URL, settings.SHOP_NAMESPACE)
        setattr(app, _ATTRIBUTE, found)
    return found


def pool_of(app: Celery, task_name: str) -> str | None:
    """The pool of a shop task (from its partition spec, also in plain mode), else None."""
    from celery_partitioning.tasks import spec_of

    if not task_name.startswith("shop."):
        return None
    task = app.tasks.get(task_name)
    spec = spec_of(task) if task is not None else None
    pool = spec.effective_pool if spec is not None else None
    return pool or "other"


def count_published(app: Celery, calls: list[Any]) -> None:
    """Count a batch of task calls as published, per pool, in one round trip (before the
    workers can count them done)."""
    counts: dict[str, int] = {}
    for call in calls:
        pool = pool_of(app, call.task)
        if pool is not None:
            counts[f"published:{pool}"] = counts.get(f"published:{pool}", 0) + 1
    progress_of(app).count_many(counts)


def _on_publish(sender: Any = None, **_: Any) -> None:
    from celery import current_app

    app = current_app._get_current_object()
    pool = pool_of(app, str(sender))
    if pool is not None:
        progress_of(app).count(f"published:{pool}")


def _token(request: Any) -> str:
    return f"{request.id}:{request.retries or 0}"


def _on_prerun(sender: Any = None, **_: Any) -> None:
    request = getattr(sender, "request", None)
    if request is not None:
        request.shop_started = time.perf_counter()
        request.shop_token = _token(request)
        pool = pool_of(sender.app, str(getattr(sender, "name", "")))
        if pool is not None and request.id:
            progress_of(sender.app).started(pool, request.shop_token)


def _on_postrun(sender: Any = None, state: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    name = getattr(sender, "name", "")
    if app is None:
        return
    pool = pool_of(app, str(name))
    if state == "RETRY" and settings.SHOP_ORDERING != "plain":
        # A partition worker retries without publishing again: the message is not done yet,
        # its next attempt (prerun and postrun of its own, one retry more) finishes it. Plain
        # Celery publishes the retry, so there the attempt counts as done (and the retry as
        # published).
        return
    if pool is not None:
        started = getattr(sender.request, "shop_started", None)
        busy = 0.0 if started is None else (time.perf_counter() - started) * 1000
        # A message finishes once, whatever attempt it is on: a partition worker killed
        # after a retried message's last attempt, before its ack, runs it again from its
        # first attempt (the attempt record is gone), so its id alone tells it apart. Plain
        # Celery publishes each retry as a message of its own: there the attempt counts.
        token = (getattr(sender.request, "shop_token", "") if settings.SHOP_ORDERING == "plain"
                 else sender.request.id or "")
        progress_of(app).finished(pool, failed=state not in ("SUCCESS", "RETRY", "IGNORED"),
                                  busy_ms=busy, token=token)
        maybe_stall_after_commit(pool)


def _on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
    from celery_partitioning.dcb import DCBConflict

    # ``reason`` is Celery's Retry (its ``exc`` is what caused it), or the exception itself.
    if isinstance(getattr(reason, "exc", reason), DCBConflict):
        return  # counted where it happens (shop.inventory), in every mode
    app = getattr(sender, "app", None)
    if app is not None and pool_of(app, str(getattr(sender, "name", ""))) is not None:
        progress_of(app).count("retries")


def count_publishes_in_bulk() -> None:
    """In this process, count publishes per batch (``Progress.count_many``), not per message.

    A per-message counter is a Redis round trip per task: it would cost the demo's publisher
    more than ``publish_many`` spends on the tasks themselves.
    """
    signals.before_task_publish.disconnect(dispatch_uid="shop.progress.publish")


def connect_signals() -> None:
    """Connect the counters (idempotent: each receiver has a dispatch uid)."""
    signals.before_task_publish.connect(_on_publish, weak=False, dispatch_uid="shop.progress.publish")
    signals.task_prerun.connect(_on_prerun, weak=False, dispatch_uid="shop.progress.prerun")
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="shop.progress.postrun")
    signals.task_retry.connect(_on_retry, weak=False, dispatch_uid="shop.progress.retry")
