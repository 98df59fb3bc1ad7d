"""Every exit status of celery-partitioning's processes, and the one way to end a process now.

The supervisor (``celery partitioning worker``) and its children use these; the deployment
docs list them for operators.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Final, NoReturn

from . import compat

__all__ = ["EXIT_OK", "EXIT_UNCLEAN", "EXIT_USAGE", "EXIT_KEEP_MESSAGE", "EXIT_FENCED",
           "exit_now", "exit_forked_child"]

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


def exit_now(status: int, message: str, *args: object, exc_info: bool = False) -> NoReturn:
    """Log ``message`` as CRITICAL, flush every log handler, and end the process at once.

    ``os._exit``: no cleanup runs, so nothing is acked and no lease is released; the
    partition's successor recovers the held message at the head of the queue.
    """
    logging.getLogger("celery_partitioning.worker").critical(message, *args, exc_info=exc_info)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(status)


def exit_forked_child(status: int) -> NoReturn:
    """End a forked child as a normal interpreter exit would, but never return into the code
    it was forked from: run the exit handlers the child registered (Celery's pidfile
    release, the orphan output drain), shut logging down, flush, ``os._exit``."""
    compat.run_exit_handlers()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
