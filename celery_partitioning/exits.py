"""Every exit status of celery-partitioning's processes, the one way to end a process now, and
the one way a serving process learns it should stop.

The supervisor (``celery partitioning worker``) and its children use these; the deployment
docs list them for operators.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Final, NoReturn

from celery.exceptions import WorkerTerminate

from . import compat

__all__ = ["EXIT_OK", "EXIT_UNCLEAN", "EXIT_USAGE", "EXIT_KEEP_MESSAGE", "EXIT_FENCED",
           "exit_now", "exit_forked_child", "flush_standard_streams", "ThreadExit", "raise_instead_of_exit",
           "stop_on_signal"]

#: Every worker stopped cleanly; nothing was cut short.
EXIT_OK: Final = 0
#: A worker exited non-zero, or had to be killed while stopping.
EXIT_UNCLEAN: Final = 1
#: Bad usage, bad settings or an invalid task registry: nothing was started.
EXIT_USAGE: Final = 2
#: A partition worker stopped at once without acking the message it held (a gate raised,
#: a dead letter could not be stored): the message goes back to the head of its queue.
EXIT_KEEP_MESSAGE: Final = 70
#: A partition worker ended itself because it lost, or could not renew, its lease.
EXIT_FENCED: Final = 75


class ThreadExit(WorkerTerminate):  # type: ignore[misc]
    """What :func:`exit_now` raises instead of ending the process, in a thread that asked for
    it (:func:`raise_instead_of_exit`: the partition threads of an in-process worker).

    A ``WorkerTerminate``, so that raised inside a task it leaves the message unacked as a
    cold stop does (Celery does not turn it into a ``WorkerLostError`` that would ack it).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (exit status {self.status})"


_thread = threading.local()


def raise_instead_of_exit(on_exit: Callable[[ThreadExit], None]) -> None:
    """In the calling thread, make :func:`exit_now` call ``on_exit`` and raise ``ThreadExit``
    instead of ending the process (a test process hosting partition threads must go on)."""
    _thread.on_exit = on_exit


def exit_now(status: int, message: str, *args: object, exc_info: bool = False) -> NoReturn:
    """Log ``message`` as CRITICAL, flush every log handler, and end the process at once.

    ``os._exit``: no cleanup runs, so nothing is acked and no lease is released; the
    partition's successor recovers the held message at the head of the queue. In a thread
    marked by :func:`raise_instead_of_exit`, raises :class:`ThreadExit` instead.
    """
    logging.getLogger("celery_partitioning.worker").critical(message, *args, exc_info=exc_info)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    on_exit = getattr(_thread, "on_exit", None)
    if on_exit is not None:
        error = ThreadExit(status, message % args if args else message)
        on_exit(error)
        raise error
    os._exit(status)


def exit_forked_child(status: int) -> NoReturn:
    """End a forked child as a normal interpreter exit would, but never return into the code
    it was forked from: run the exit handlers the child registered (Celery's pidfile
    release, the orphan output drain), shut logging down, flush, ``os._exit``."""
    compat.run_exit_handlers()
    logging.shutdown()
    flush_standard_streams()
    os._exit(status)


def flush_standard_streams() -> None:
    """Flush ``sys.stdout``/``stderr`` and the original ``__stdout__``/``__stderr__``."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if stream is not None:
                stream.flush()


def stop_on_signal() -> threading.Event:
    """An event set by the next SIGTERM or SIGINT: a serving process stops and cleans up
    (closes its server, stops its child) instead of dying mid-way."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    return stop
