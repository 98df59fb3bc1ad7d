"""The patch on partitioned tasks: Celery's retry, in place, driving the partition's pipeline.

:func:`enable_in_place_retry` replaces ``retry`` on each partitioned task instance and wraps
``run``. ``retry`` keeps Celery's meaning (countdown, eta, ``default_retry_delay``,
``max_retries``) but raises :class:`RetryInPlace` instead of publishing, which would reorder the
partition. The ``run`` wrapper asks the pipeline where the retry waits: set aside, Celery records
the retry and acks; in place, it records the retry as Celery would, waits with the message
unacked and runs the task again. A task that fails for good reaches ``Pipeline.failed`` before
Celery records it. Eager calls, other tasks and other workers keep Celery's behaviour.
"""

from __future__ import annotations

import base64
import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from celery.exceptions import Ignore, Reject, Retry, WorkerShutdown

from .. import compat
from ..store.attempts import AttemptRecord
from ..tasks import spec_of
from .runtime import current_runtime
from .stage import Failure, Pipeline

if TYPE_CHECKING:
    from celery import Celery

    from ..message import PartitionMessage

__all__ = ["RetryInPlace", "InPlaceRetry", "enable_in_place_retry", "retry_arguments",
           "encode_call", "decode_call"]

logger = logging.getLogger("celery_partitioning.retry")

#: Longest single sleep of a backoff wait: how quickly a warm shutdown is noticed.
WAIT_SLICE: Final = 0.1
#: Attribute marking a task instance as patched.
PATCHED: Final = "_celery_partitioning_in_place"


class RetryInPlace(Retry):  # type: ignore[misc]
    """Internal: ``task.retry`` in a partition worker, caught by the run wrapper. A ``Retry``,
    so code that catches ``Retry`` (and ``autoretry_for``) behaves as with Celery."""

    def __init__(self, delay: float, exc: BaseException | None, args: Any, kwargs: Any) -> None:
        super().__init__(exc=exc, when=delay)
        self.delay = delay
        self.retry_args = args
        self.retry_kwargs = kwargs


@dataclass
class _Attempt:
    """The state of the message being run right now."""

    task_id: str
    #: Its partition's pipeline and message (None outside a partition thread: in place).
    pipeline: Pipeline | None = None
    msg: PartitionMessage | None = None
    exhausted: bool = False
    pending: RetryInPlace | None = None
    #: The arguments the message carries; a retry that changes them records the new ones.
    message_call: tuple[Any, Any] = ((), {})


def retry_arguments(run: Callable[..., Any], current_args: Any, current_kwargs: Any,
                    args: Any, kwargs: Any) -> tuple[Any, Any]:
    """The arguments of the next attempt, merged as Celery's ``Task.retry`` merges them: new
    ``args`` drop the keyword arguments they now fill; new ``kwargs`` replace same-named
    positional ones (celery/celery#6494)."""
    current_args = () if current_args is None else current_args
    current_kwargs = {} if current_kwargs is None else current_kwargs
    if not ((args is not None and kwargs is None and current_kwargs)
            or (kwargs is not None and args is None and current_args)):
        return (current_args if args is None else args,
                current_kwargs if kwargs is None else kwargs)
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError):
        return (current_args if args is None else args,
                current_kwargs if kwargs is None else kwargs)
    if args is not None:
        positional = [p for p in signature.parameters.values()
                      if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                    inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        merged = dict(current_kwargs)
        for parameter in positional[:len(args)]:
            if parameter.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD:
                merged.pop(parameter.name, None)
        return args, merged
    try:
        bound = signature.bind_partial(*current_args)
    except TypeError:
        return current_args, kwargs
    rest = dict(kwargs or {})
    for name in list(rest):
        if (name in bound.arguments
                and signature.parameters[name].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD):
            bound.arguments[name] = rest.pop(name)
    return bound.args, {**bound.kwargs, **rest}


def encode_call(task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, str]:
    """Arguments a retry changed, serialized as the task's messages are (for the attempt record)."""
    from kombu import serialization

    dumps: Callable[..., tuple[str, str, bytes | str]] = serialization.dumps
    serializer = getattr(task, "serializer", None) or task.app.conf.task_serializer
    content_type, encoding, body = dumps([list(args), kwargs], serializer=serializer)
    raw = body if isinstance(body, bytes) else body.encode(encoding)
    return {"content_type": content_type, "encoding": encoding,
            "body": base64.b64encode(raw).decode("ascii")}


def decode_call(call: dict[str, str]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    from kombu import serialization

    loads: Callable[..., Any] = serialization.loads
    args, kwargs = loads(base64.b64decode(call["body"]), call["content_type"], call["encoding"],
                         accept={call["content_type"]})
    return tuple(args), dict(kwargs)


def delay_of(app: Any, eta: Any, countdown: Any) -> float:
    if eta is not None:
        if isinstance(eta, datetime):
            from celery.utils.time import maybe_make_aware

            aware = maybe_make_aware(eta, app.timezone)
            return max(0.0, float((aware - app.now()).total_seconds()))
        raise TypeError(f"eta must be a datetime, got {eta!r}")
    if countdown is None:
        return 0.0
    if isinstance(countdown, timedelta):
        return max(0.0, countdown.total_seconds())
    return max(0.0, float(countdown))


class InPlaceRetry:
    """Patches the partitioned tasks of a process; each call finds its partition's pipeline."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._active: dict[str, _Attempt] = {}
        #: The tasks this patcher patched, with what their instance held before.
        self._patched: list[tuple[Any, dict[str, Any]]] = []

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
        self._patched.append((task, own_attributes(task, ("run", "retry"))))
        task.retry = functools.partial(self._retry, task, original_retry)
        task.run = functools.wraps(original_run)(functools.partial(self._run, task, original_run))
        setattr(task, PATCHED, True)
        return True

    def unpatch_all(self) -> None:
        """Give the patched tasks back as they were."""
        for task, before in reversed(self._patched):
            restore_attributes(task, ("run", "retry", PATCHED), before)
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
        runtime = current_runtime(self.app)
        pipeline = runtime.pipeline if runtime is not None else None
        msg = pipeline.current(task_id) if pipeline is not None else None
        attempt = _Attempt(task_id, pipeline, msg, message_call=(args, kwargs))
        self._active[task_id] = attempt
        try:
            if msg is not None and msg.call is not None:  # resumed: the retry's arguments
                args, kwargs = msg.call
                request.args, request.kwargs = args, kwargs
            result = self._attempts(task, original, request, attempt=attempt, args=args,
                                    kwargs=kwargs)
            if pipeline is not None and msg is not None:
                pipeline.succeeded(msg)
            return result
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
                pipeline, msg = attempt.pipeline, attempt.msg
                if pipeline is None or msg is None or not pipeline.failed(
                        msg, Failure(task, request, exc, attempt.exhausted)):
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
        attempt = self._active[request.id]
        call = None
        if (args, kwargs) != (tuple(attempt.message_call[0]), dict(attempt.message_call[1])):
            try:
                call = encode_call(task, args, kwargs)
            except Exception:  # Celery could not have published them either; keep going
                logger.warning("%s[%s]: the arguments of its retry cannot be serialized; a "
                               "crash during the backoff would resume with the message's own",
                               task.name, request.id, exc_info=True)
        pipeline, msg = attempt.pipeline, attempt.msg
        if pipeline is not None and msg is not None and pipeline.retrying(
                msg, AttemptRecord(retries, resume_at, call), signal.delay):
            logger.info("%s[%s] retries (%d) in %.2fs, its key set aside until then: %s",
                        task.name, request.id, retries, signal.delay,
                        signal.excs or "retry requested")
            raise signal  # Celery records the retry and acks the message
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

    def _wait_until(self, resume_at: float) -> None:
        """Sleep until ``resume_at``; on a warm or cold shutdown stop the worker, unacked."""
        runtime = current_runtime(self.app)
        while (remaining := resume_at - time.time()) > 0:
            if compat.stop_requested() or (runtime is not None and runtime.stopping()):
                logger.warning("shutdown during an in-place retry wait: the message stays "
                               "unacked and goes back to the head of %s",
                               runtime.queue if runtime is not None else "its queue")
                raise WorkerShutdown(0)
            time.sleep(min(WAIT_SLICE, remaining))


# In-place attempts share one traced call, so Celery sends task_prerun/task_postrun only for
# the first start and the last end: these send them for the attempts in between.
def announce_retry(task: Any, request: Any, signal: Any) -> None:
    """What Celery does for a retry, minus the re-publish: RETRY state, on_retry, task_retry."""
    from celery import signals
    from celery.app.trace import ExceptionInfo  # billiard's, as Celery uses it

    exc_info = sys.exc_info()
    if exc_info[0] is None:  # retry(throw=False): give the record a traceback all the same
        try:
            raise signal
        except type(signal):
            exc_info = sys.exc_info()
    try:
        einfo = ExceptionInfo(exc_info)
        if not task.ignore_result:
            task.backend.mark_as_retry(request.id, signal.exc, einfo.traceback, request=request)
        task.on_retry(signal.exc, request.id, request.args, request.kwargs, einfo)
        signals.task_retry.send(sender=task, request=request, reason=signal, einfo=einfo)
    except Exception:
        logger.warning("%s[%s]: recording the retry failed; retrying anyway", task.name,
                       request.id, exc_info=True)


def end_attempt(task: Any, request: Any, args: Any, kwargs: Any, signal: Any) -> None:
    """The attempt that retried in place is over: ``task_postrun`` with state ``RETRY``."""
    from celery import signals, states

    signals.task_postrun.send(sender=task, task_id=request.id, task=task, args=args,
                              kwargs=kwargs, retval=signal, state=states.RETRY)


def begin_attempt(task: Any, request: Any, args: Any, kwargs: Any) -> None:
    """The next in-place attempt starts: ``task_prerun``, then the task's ``before_start``."""
    from celery import signals
    from celery.app.task import Task

    signals.task_prerun.send(sender=task, task_id=request.id, task=task, args=args,
                             kwargs=kwargs)
    before_start = getattr(type(task), "before_start", None)
    if before_start is not None and before_start is not Task.before_start:
        task.before_start(request.id, args, kwargs)


def own_attributes(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """What ``obj`` itself (not its class) holds of ``names``."""
    return {name: vars(obj)[name] for name in names if name in vars(obj)}


def restore_attributes(obj: Any, names: tuple[str, ...], before: dict[str, Any]) -> None:
    """Give ``obj`` back the ``names`` it held (:func:`own_attributes`); drop the others."""
    for name in names:
        if name in before:
            setattr(obj, name, before[name])
        elif name in vars(obj):
            delattr(obj, name)


def enable_in_place_retry(app: Celery) -> InPlaceRetry:
    """Patch the partitioned tasks of ``app`` for in-place retry and dead letters."""
    patcher = InPlaceRetry(app)
    count = patcher.patch_all()
    logger.info("in-place retry on %d partitioned task(s)", count)
    return patcher
