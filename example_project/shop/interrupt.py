"""Ctrl-C and SIGTERM stop the demo, and are known to have, whatever exception they become."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

#: Set once Ctrl-C or SIGTERM reached the running demo. An interrupt can come out of library
#: code as another exception (a KeyboardInterrupt raised inside ``__set_name__`` during a lazy
#: import is re-raised as RuntimeError) or be swallowed by a broad ``except``: this still says so.
INTERRUPTED = threading.Event()


def was_interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` ended the demo because the user stopped it (not a failure)."""
    return isinstance(exc, KeyboardInterrupt) or INTERRUPTED.is_set()


def check_interrupted() -> None:
    """Stop here if an interrupt arrived and was swallowed on the way."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM stop the demo as Ctrl-C does, and are remembered in INTERRUPTED."""
    def interrupt(_signum: int, _frame: object) -> None:
        INTERRUPTED.set()
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
