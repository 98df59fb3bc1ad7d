"""One writer at a time on SQLite, queued by the OS instead of SQLite's sleeping busy handler.

SQLite allows a single writer; with a dozen worker processes writing, its busy handler
retries on a sleep schedule (1, 2, 5, 10 ... 100 ms), so writers idle while the database is
free. Taking an exclusive ``flock`` on a file beside the database around each short write
transaction hands the lock to the next writer as soon as it is released. Only the write is
serialized: reads stay outside, so a read-modify-write can still lose an update when two
workers run it for the same row at once (which is what the unordered demo shows).
On other databases this is a no-op.

Inside a transaction that already holds the lock (a projection's checkpoint transaction,
:class:`LockedCheckpointStore`) ``write_transaction`` is a plain savepoint: taking the lock
there would wait on ourselves' peers while holding SQLite's own write lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from typing import Any

from django.db import connection, transaction

from celery_partitioning.contrib.django.checkpoints import DjangoCheckpointStore

__all__ = ["write_transaction", "LockedCheckpointStore"]


def _lock_file() -> str | None:
    name = str(connection.settings_dict.get("NAME") or "")
    if connection.vendor != "sqlite" or not name or name == ":memory:":
        return None
    return name + ".writelock"


@contextlib.contextmanager
def write_transaction() -> Iterator[None]:
    """``transaction.atomic()``, behind an OS lock when the database is an SQLite file."""
    lock = _lock_file()
    if lock is None or connection.in_atomic_block:
        with transaction.atomic():
            yield
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with transaction.atomic():
            yield
    finally:
        os.close(fd)  # closing releases the lock


class LockedCheckpointStore(DjangoCheckpointStore):
    """The Django checkpoint store, its transaction taken behind the same OS lock.

    A projection's body and its checkpoint share one transaction; on SQLite that
    transaction holds the write lock from its start, so the OS lock is taken first.
    """

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with write_transaction():
            yield

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        return self._locked()
