"""What ``partition_worker`` checks of a Django project before it starts: its test databases.

Partition threads run tasks concurrently, each thread on its own database connection. An
in-memory SQLite test database (Django's default for SQLite) is one shared-cache database
that admits one writer: a second thread's write fails with "database table is locked", and
the task becomes a dead letter. The fixture refuses to start on one, saying what works.
"""

from __future__ import annotations

from typing import Final

__all__ = ["IN_MEMORY_SQLITE", "in_memory_sqlite_aliases"]

#: Why and what to do, after the aliases.
IN_MEMORY_SQLITE: Final = (
    "partition_worker runs tasks in several threads at once, each with its own database "
    "connection, and an in-memory SQLite test database admits one writer: tasks would fail "
    "with 'database table is locked' and become dead letters. Give the test database a file "
    "and a lock timeout in settings.DATABASES, e.g. "
    "'TEST': {'NAME': BASE_DIR / 'test.sqlite3'}, 'OPTIONS': {'timeout': 20}, and mark the "
    "test @pytest.mark.django_db(transaction=True) (the tasks' threads do not see a test's "
    "uncommitted transaction); or use PostgreSQL. See docs/testing.md, 'Django'.")


def in_memory_sqlite_aliases() -> list[str]:
    """The database aliases of a configured Django project that are in-memory SQLite now."""
    from django.conf import settings

    if not settings.configured:
        return []
    from django.db import connections

    return [alias for alias in connections
            if connections[alias].vendor == "sqlite" and connections[alias].is_in_memory_db()]
