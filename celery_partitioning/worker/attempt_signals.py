"""What Celery's tracer does around each attempt of a task, for attempts run in place.

With Celery a retry is a new message: the attempt that retried ends (``task_retry``, then
``task_postrun`` with state ``RETRY``) and the next one starts as any task does
(``task_prerun``, ``before_start``) with ``request.retries`` one higher. An in-place retry
runs the next attempt inside the same traced call, so the tracer sends these only for the
first start and the last end; :func:`end_attempt` and :func:`begin_attempt` send them for the
attempts in between, so receivers see one prerun and one postrun per attempt, as with Celery.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["announce_retry", "begin_attempt", "end_attempt"]

logger = logging.getLogger("celery_partitioning.retry")


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
    """The next in-place attempt starts (``request.retries`` already counts it):
    ``task_prerun``, then the task's own ``before_start`` when it has one."""
    from celery import signals
    from celery.app.task import Task

    signals.task_prerun.send(sender=task, task_id=request.id, task=task, args=args,
                             kwargs=kwargs)
    before_start = getattr(type(task), "before_start", None)
    if before_start is not None and before_start is not Task.before_start:
        task.before_start(request.id, args, kwargs)
