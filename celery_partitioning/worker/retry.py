"""In-place retry: inside a partition worker a partitioned task retries without leaving its place.

Celery's ``Task.retry`` re-publishes the message to the back of the queue (and the worker holds
countdown/ETA messages aside while it runs later ones), which reorders a partition. In a
partition worker, for partitioned tasks only, :func:`enable_in_place_retry` replaces ``retry``
on the task instance (so ``self.retry()`` and ``autoretry_for``, which calls ``task.retry``,
both come here) and wraps ``task.run``:

* ``retry`` keeps Celery's meaning (``countdown``/``eta``/``default_retry_delay``,
  ``max_retries``; ``autoretry_for`` computes ``retry_backoff``/``retry_jitter`` as usual) but,
  instead of publishing, raises :class:`RetryInPlace`;
* the retry count, the time the next attempt is due and any arguments the retry changed are
  kept in Redis by task id (the attempt record), so the next attempt resumes the same count
  and the same arguments whoever runs it;
* a delay of at least ``partitioning_retry_hold_below`` (0.1 s) sets the message's *key*
  aside (``parking.Parking.set_aside``): the message is stored as the first set-aside message of
  its key with its due time, later messages of the key are set aside behind it, and the
  signal goes on to Celery, which records the retry (``RETRY`` state, ``on_retry``,
  ``task_retry``) and acks; other keys of the partition go on. When due, the partition
  thread re-queues the key's messages, the retried one first, and it runs again here;
* a shorter delay is waited out in place by the ``run`` wrapper, with the message still
  unacked (the partition waits), and the task runs again with the same message; a worker
  SIGKILLed then resumes the rest of the wait when crash recovery hands the message back;
  a warm shutdown during the wait stops the worker at once without acking, and the message
  goes back to the head of its queue;
* when no retry is left, the message becomes a dead letter and its key is parked
  (:mod:`celery_partitioning.store.deadletters`), then the task fails as usual (FAILURE, acked).

Every attempt is counted as with Celery (a retry being a new message): ``request.retries`` is
one higher in its ``task_prerun``, body and ``task_postrun``, on each path (in place,
set aside, resumed after a crash: ``attempt_signals.py``, ``parking.resume_headers``).

Non-partitioned tasks, eager calls and any other worker keep Celery's behaviour.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from celery.exceptions import Ignore, Reject, Retry, WorkerShutdown

from .. import compat
from ..store.attempts import AttemptRecord, AttemptStore
from ..store.lease import new_token
from ..tasks import spec_of
from .attempt_signals import announce_retry, begin_attempt, end_attempt
from .inflight import InFlight
from .retry_semantics import decode_call, delay_of, encode_call, retry_arguments
from .runtime import current_runtime

if TYPE_CHECKING:
    from .failures import DeadLetters
    from .parking import Parking
    from .runtime import PartitionRuntime

__all__ = ["RetryInPlace", "InPlaceRetry", "enable_in_place_retry"]

logger = logging.getLogger("celery_partitioning.retry")

#: Longest single sleep of a backoff wait: how quickly a warm shutdown is noticed.
WAIT_SLICE: Final = 0.1
#: Attribute marking a task instance as patched.
PATCHED: Final = "_celery_partitioning_in_place"


class RetryInPlace(Retry):  # type: ignore[misc]
    """Internal: ``task.retry`` in a partition worker. Caught by the run wrapper, never published.

    A subclass of Celery's ``Retry``, so code that catches ``Retry`` (and ``autoretry_for``,
    which re-raises it) behaves as with Celery.
    """

    def __init__(self, delay: float, exc: BaseException | None, args: Any, kwargs: Any) -> None:
        super().__init__(exc=exc, when=delay)
        self.delay = delay
        self.retry_args = args
        self.retry_kwargs = kwargs


@dataclass
class _Attempt:
    """The state of the message being run right now."""

    task_id: str
    exhausted: bool = False
    pending: RetryInPlace | None = None
    #: Whether Redis may hold an attempt record for the task id (False once known absent).
    recorded: bool = True
    #: The arguments the message carries; a retry that changes them records the new ones.
    message_call: tuple[Any, Any] = ((), {})
    #: The message waits out its backoff set aside with its key (Celery acks it).
    set_aside: bool = False


@dataclass(frozen=True)
class _Partition:
    """The per-partition state a retry or a dead letter needs."""

    runtime: PartitionRuntime
    inflight: InFlight
    parking: Parking | None
    dead_letters: DeadLetters | None


class InPlaceRetry:
    """Patches the partitioned tasks of a partition worker process (see the module docstring)."""

    def __init__(self, runtime: PartitionRuntime, *,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.app = runtime.app
        self._default = _Partition(runtime, runtime.inflight, runtime.parking,
                                   runtime.dead_letters)
        self.attempts = (AttemptStore(runtime.redis, runtime.keys)
                         if runtime.redis is not None else None)
        self._sleep = sleep
        self._active: dict[str, _Attempt] = {}
        #: The tasks this patcher patched, with what their instance held before.
        self._patched: list[tuple[Any, dict[str, Any]]] = []

    def _partition(self) -> _Partition:
        """The partition of the calling thread (one patcher serves every partition of the
        process); the one it was made with outside a partition thread."""
        bound = current_runtime(self.app)
        if bound is None:
            return self._default
        return _Partition(bound, bound.inflight, bound.parking, bound.dead_letters)

    @property
    def runtime(self) -> PartitionRuntime:
        return self._partition().runtime

    @property
    def inflight(self) -> InFlight:
        return self._partition().inflight

    @property
    def dead_letters(self) -> DeadLetters | None:
        return self._partition().dead_letters

    # -- patching ---------------------------------------------------------------------
    def patch_all(self) -> int:
        """Patch every partitioned task of the app; returns how many."""
        count = 0
        for task in list(self.app.tasks.values()):
            if spec_of(task) is not None and self.patch(task):
                count += 1
        return count

    def patch(self, task: Any) -> bool:
        if getattr(task, PATCHED, False):
            return False
        original_run = task.run
        original_retry = task.retry
        own = vars(task)
        self._patched.append((task, {name: own[name] for name in ("run", "retry") if name in own}))
        task.retry = functools.partial(self._retry, task, original_retry)
        task.run = functools.wraps(original_run)(functools.partial(self._run, task, original_run))
        setattr(task, PATCHED, True)
        return True

    def unpatch_all(self) -> None:
        """Give back the tasks this patcher patched as they were (an in-process worker stops)."""
        for task, before in reversed(self._patched):
            for name in ("run", "retry", PATCHED):
                if name in before:
                    setattr(task, name, before[name])
                elif name in vars(task):
                    delattr(task, name)
        self._patched.clear()

    # -- task.retry -------------------------------------------------------------------
    def _retry(self, task: Any, original: Callable[..., Any], args: Any = None,  # noqa: PLR0917
               kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
               eta: Any = None, countdown: Any = None, max_retries: int | None = None,
               **options: Any) -> Any:
        request = task.request
        attempt = self._active.get(request.id) if request.id else None
        if attempt is None or request.called_directly or request.is_eager:
            return original(args=args, kwargs=kwargs, exc=exc, throw=throw, eta=eta,
                            countdown=countdown, max_retries=max_retries, **options)
        retries = (request.retries or 0) + 1
        if max_retries is not None:
            task.override_max_retries = max_retries
        limit = task.max_retries if max_retries is None else max_retries
        if not eta and countdown is None:
            countdown = task.default_retry_delay
        new_args, new_kwargs = retry_arguments(task.run, request.args, request.kwargs, args, kwargs)
        if limit is not None and retries > limit:
            attempt.exhausted = True
            if exc is not None:
                from celery.utils.serialization import raise_with_context

                raise_with_context(exc)
            raise task.MaxRetriesExceededError(
                f"Can't retry {task.name}[{request.id}] args:{new_args} kwargs:{new_kwargs}",
                task_args=new_args, task_kwargs=new_kwargs)
        signal = RetryInPlace(delay_of(task.app, eta, countdown), exc, new_args, new_kwargs)
        if throw:
            raise signal
        attempt.pending = signal
        return signal

    # -- task.run ---------------------------------------------------------------------
    def _run(self, task: Any, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        request = task.request
        task_id = request.id
        if not task_id or request.called_directly or request.is_eager:
            return original(*args, **kwargs)
        attempt = _Attempt(task_id, message_call=(args, kwargs))
        self._active[task_id] = attempt
        try:
            args, kwargs = self._resume(request, attempt, args, kwargs)
            result = self._attempts(task, original, request, attempt=attempt, args=args,
                                   kwargs=kwargs)
        except Exception:
            self._finish(attempt)  # failed for good, or set aside: Celery acks it
            raise
        else:
            self._finish(attempt)
            return result
        # Anything else (WorkerShutdown during a wait...): the message stays unacked and
        # comes back; its attempt record and replay state stay as they are.
        finally:
            self._active.pop(task_id, None)
            if hasattr(task, "override_max_retries"):
                delattr(task, "override_max_retries")

    def _attempts(self, task: Any, original: Callable[..., Any], request: Any, *,
                  attempt: _Attempt, args: Any, kwargs: Any) -> Any:
        """Run the task until it returns, retries are exhausted, or it fails without retry."""
        while True:
            try:
                result = original(*args, **kwargs)
            except RetryInPlace as signal:
                attempt.pending = None
                args, kwargs = self._next_attempt(task, request, signal)
                continue
            except (Ignore, Reject, Retry):
                raise  # Celery's business (a plain Retry raised by hand included)
            except Exception as exc:
                if attempt.pending is not None:  # retry(throw=False), then raised
                    pending, attempt.pending = attempt.pending, None
                    args, kwargs = self._next_attempt(task, request, pending)
                    continue
                if self.dead_letters is not None:
                    entry = self.inflight.get(request.id)
                    self.dead_letters.task_failed(task, request, exc, entry,
                                                  exhausted=attempt.exhausted)
                else:
                    logger.error("%s[%s] failed (%s) and no Redis store is configured "
                                 "(partitioning_redis_url): not dead-lettered, key not parked",
                                 task.name, request.id, exc)
                raise
            if attempt.pending is not None:  # retry(throw=False), then returned
                pending, attempt.pending = attempt.pending, None
                args, kwargs = self._next_attempt(task, request, pending)
                continue
            return result

    def _next_attempt(self, task: Any, request: Any, signal: RetryInPlace) -> tuple[Any, Any]:
        retries = (request.retries or 0) + 1
        resume_at = time.time() + signal.delay
        args = tuple(signal.retry_args if signal.retry_args is not None else ())
        kwargs = dict(signal.retry_kwargs if signal.retry_kwargs is not None else {})
        attempt = self._active.get(request.id)
        call = None
        if attempt is not None:
            attempt.recorded = True
            if (args, kwargs) != (tuple(attempt.message_call[0]), dict(attempt.message_call[1])):
                try:
                    call = encode_call(task, args, kwargs)
                except Exception:  # Celery could not have published them either; keep going
                    logger.warning("%s[%s]: the arguments of its retry cannot be serialized; a "
                                   "crash during the backoff would resume with the message's own",
                                   task.name, request.id, exc_info=True)
        if attempt is not None and self._set_aside(request.id, signal.delay,
                                                   AttemptRecord(retries, resume_at, call)):
            attempt.set_aside = True
            logger.info("%s[%s] retries (%d) in %.2fs, its key set aside until then: %s",
                        task.name, request.id, retries, signal.delay,
                        signal.excs or "retry requested")
            raise signal  # Celery records the retry and acks the message
        self._remember(request.id, retries, resume_at, call)
        logger.info("%s[%s] retries in place (%d) in %.2fs: %s", task.name, request.id,
                    retries, signal.delay, signal.excs or "retry requested")
        announce_retry(task, request, signal)
        end_attempt(task, request, request.args, request.kwargs, signal)
        self._wait_until(resume_at)
        request.retries = retries
        # As on the message Celery would have re-published: a later retry() inherits these.
        request.args, request.kwargs = args, kwargs
        begin_attempt(task, request, args, kwargs)
        return args, kwargs

    def _set_aside(self, task_id: str, delay: float, record: AttemptRecord) -> bool:
        """Set the message's key aside until the record's due time (a copy of the message
        first, marked with a new token) and save the record, unless the delay is short enough
        to hold the partition (or there is no store, or the gate did not see the message)."""
        partition = self._partition()
        parking = partition.parking
        if parking is None or delay < partition.runtime.settings.retry_hold_below:
            return False
        entry = partition.inflight.get(task_id)
        if entry is None:
            return False
        parking.set_aside(entry, task_id, replace(record, token=new_token()))
        return True

    def _wait_until(self, resume_at: float) -> None:
        """Sleep until ``resume_at``; on a warm or cold shutdown stop the worker, unacked."""
        while True:
            remaining = resume_at - time.time()
            if remaining <= 0:
                return
            runtime = self.runtime
            stopping = getattr(runtime, "stopping", None)
            if compat.stop_requested() or (stopping is not None and stopping()):
                logger.warning("shutdown during an in-place retry wait: the message stays "
                               "unacked and goes back to the head of %s", runtime.queue)
                raise WorkerShutdown(0)
            self._sleep(min(WAIT_SLICE, remaining))

    # -- the attempt record (survives a crash) -----------------------------------------
    def _remember(self, task_id: str, retries: int, resume_at: float,
                  call: dict[str, str] | None) -> None:
        if self.attempts is not None:
            self.attempts.save(task_id, AttemptRecord(retries, resume_at, call))

    def _resume(self, request: Any, attempt: _Attempt, args: Any, kwargs: Any) -> tuple[Any, Any]:
        """After a crash: continue the retry count, the arguments and the wait where they were.

        The parking gate read the record already for the messages it let through (in the
        script that received them); others are read here.
        """
        if self.attempts is None:
            attempt.recorded = False
            return args, kwargs
        entry = self.inflight.get(request.id)
        if entry is not None and entry.attempts_read:
            raw: Any = entry.attempts
        else:
            raw = self.attempts.load_raw(request.id)
        attempt.recorded = raw is not None
        record = AttemptRecord.parse(raw)
        if record is None:
            return args, kwargs
        retries, resume_at = record.retries, record.resume_at
        # The parking gate gave the message the record's count already (task_prerun saw it),
        # and a copy set aside with its key carries it: equal counts resume too.
        if retries >= (request.retries or 0):
            logger.info("%s resumes at retry %d", request.id, retries)
            request.retries = retries
            if record.call is not None:
                try:
                    args, kwargs = decode_call(record.call)
                except Exception:  # an unreadable record must not lose the message
                    logger.exception("%s: the arguments its last retry gave cannot be read; "
                                     "it resumes with the message's own", request.id)
                else:
                    request.args, request.kwargs = args, kwargs
            self._wait_until(resume_at)
        return args, kwargs

    def _finish(self, attempt: _Attempt) -> None:
        """The message is done (about to be acked): forget it here and in Redis.

        The happy path (no attempt record, not part of a replay) costs no Redis call.
        """
        task_id = attempt.task_id
        partition = self._partition()
        entry = partition.inflight.pop(task_id)
        if attempt.set_aside:  # not done: its attempt record and replay state stay
            return
        if self.attempts is not None and attempt.recorded:
            self.attempts.forget(task_id)
        if partition.parking is not None and entry is not None:
            partition.parking.finished(entry, task_id)


def enable_in_place_retry(runtime: PartitionRuntime) -> InPlaceRetry:
    """Patch the partitioned tasks for in-place retry and dead letters (one patcher per
    process: each call finds the partition of the calling thread; ``runtime`` outside one)."""
    patcher = InPlaceRetry(runtime)
    count = patcher.patch_all()
    logger.info("partition %s: in-place retry on %d partitioned task(s)", runtime.label, count)
    return patcher
