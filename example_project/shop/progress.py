"""Progress counters for the demo: task calls published and finished, per pool, in one Redis hash.

A task call is counted once by what it is, not by its message: a projection call by its task
and event position, another call by its task and arguments (plus the retry count in plain
mode, where each retry is a message of its own). Kills make the same call go out more than
once, and some of them between the count and the send:

* a ``reserve_inventory`` run again after a kill publishes its ``InventoryReserved`` event
  again (the first publish may not have happened);
* a relay killed before its delete sends a batch again, and a worker killed before its ack
  runs a message again.

Counting messages, the first case leaves a count that no message will ever finish; counting
calls, every case counts once. ``published:<pool>`` comes from Celery's ``before_task_publish``
(also for tasks published by workers; the demo's own publisher counts each batch in one call,
see ``count_publishes_in_bulk``), ``done:<pool>`` from ``task_postrun``. All work is finished
when they are equal and the queues are empty. A message that starts a second time (its worker
was killed before the ack) counts ``reruns:<pool>``: a message is known by its task id and
retry count, so the next attempt of a retry is not a rerun.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
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
#: KEYS: call set, counters hash. ARGV: call, field, call, field, ... Counts each call not seen.
_COUNT_NEW_CALLS = """
for i = 1, #ARGV, 2 do
  if redis.call('SADD', KEYS[1], ARGV[i]) == 1 then redis.call('HINCRBY', KEYS[2], ARGV[i + 1], 1) end
end
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

    def published(self, calls: Sequence[tuple[str, str]]) -> None:
        """Count ``(call, pool)`` pairs as published, each call once, in one round trip."""
        if calls:
            self.redis.eval(_COUNT_NEW_CALLS, 2, f"{self.key}:published", self.key,
                            *(part for call, pool in calls for part in (call, f"published:{pool}")))

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
        self.redis.delete(self.key, f"{self.key}:started", f"{self.key}:finished",
                          f"{self.key}:published")


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


def call_of(task_name: str, args: Sequence[Any], kwargs: Mapping[str, Any], retries: int) -> str:
    """What a task call is, whichever message carries it (see the module docstring)."""
    event = kwargs.get("event")
    if isinstance(event, Mapping) and "position" in event:
        what = f"{task_name}@{event['position']}"
    else:
        what = f"{task_name}:{json.dumps([list(args), kwargs], sort_keys=True, default=str)}"
    return f"{what}#{retries}" if settings.SHOP_ORDERING == "plain" else what


def count_published(app: Celery, calls: list[Any]) -> None:
    """Count a batch of task calls as published, per pool, in one round trip (before the
    workers can count them done)."""
    counted = [(call_of(call.task, call.args, call.kwargs, 0), pool) for call in calls
               if (pool := pool_of(app, call.task)) is not None]
    progress_of(app).published(counted)


def _on_publish(sender: Any = None, body: Any = None, headers: Any = None, **_: Any) -> None:
    from celery import current_app

    app = current_app._get_current_object()
    pool = pool_of(app, str(sender))
    if pool is not None:
        args, kwargs = body[0], body[1]  # task protocol 2: (args, kwargs, embed)
        retries = int((headers or {}).get("retries") or 0)
        progress_of(app).published([(call_of(str(sender), args, kwargs, retries), pool)])


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
        # A call finishes once, whichever message or attempt carried it (module docstring).
        request = sender.request
        token = call_of(str(name), request.args or (), request.kwargs or {}, request.retries or 0)
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
    """In this process, count publishes per batch (``Progress.published``), not per message.

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
