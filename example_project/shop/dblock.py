"""One writer at a time on SQLite, queued by the OS instead of SQLite's sleeping busy handler.

SQLite allows a single writer; with a dozen worker processes writing, its busy handler
retries on a sleep schedule (1, 2, 5, 10 ... 100 ms), so writers idle while the database is
free. Taking an exclusive ``flock`` on a file beside the database around each short write
transaction hands the lock to the next writer as soon as it is released. Only the write is
serialized: reads stay outside, so a read-modify-write can still lose an update when two
workers run it for the same row at once (which is what the unordered demo shows).
On other databases this is a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from django.db import connection, transaction

__all__ = ["write_transaction"]


@contextlib.contextmanager
def write_transaction() -> Iterator[None]:
    """``transaction.atomic()``, behind an OS lock when the database is an SQLite file."""
    name = str(connection.settings_dict.get("NAME") or "")
    if connection.vendor != "sqlite" or not name or name == ":memory:":
        with transaction.atomic():
            yield
        return
    fd = os.open(name + ".writelock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with transaction.atomic():
            yield
    finally:
        os.close(fd)  # closing releases the lock
