"""Where a Redis is: a plain URL, or a master found through Redis Sentinel (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kombu.utils.url import maybe_sanitize_url

__all__ = ["RedisTarget"]


@dataclass(frozen=True)
class RedisTarget:
    """How to reach one Redis: a plain URL, or a master found through Redis Sentinel.

    A Sentinel target is read as kombu reads a ``sentinel://`` broker URL: every
    ``;``-separated URL names one sentinel; the first one's user, password and database are
    those of the master; ``master_name`` and ``sentinel_kwargs`` come from transport options.
    """

    #: The URL as configured (``;``-separated for Sentinel); it may hold a password.
    url: str = field(repr=False)
    #: ``(host, port)`` of every sentinel; empty for a plain URL.
    sentinels: tuple[tuple[str, int], ...] = ()
    #: The name the sentinels monitor the master under.
    master_name: str | None = None
    #: Keyword arguments of the connections to the sentinels (``password``, ``ssl``...).
    sentinel_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}),
                                               repr=False)
    #: Keyword arguments of the connections to the master (``db``, ``password``, ``ssl``...).
    connection_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}),
                                                 repr=False)
    #: Smallest number of other sentinels a sentinel must see to be believed.
    min_other_sentinels: int = 0

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    def describe(self) -> str:
        """The target without secrets, for messages."""
        if not self.is_sentinel:
            return str(maybe_sanitize_url(self.url))
        hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
        return f"sentinel master {self.master_name!r} via {hosts} db {self.connection_kwargs.get('db', 0)}"

    def same_server(self, other: RedisTarget | None) -> bool:
        """Whether ``other`` is the same Redis database (same sentinels and master, or the same
        host, port and database)."""
        if other is None or self.is_sentinel != other.is_sentinel:
            return False
        if self.is_sentinel:
            return (set(self.sentinels) == set(other.sentinels)
                    and self.master_name == other.master_name
                    and self.connection_kwargs.get("db", 0) == other.connection_kwargs.get("db", 0))
        return _plain_identity(self.url) == _plain_identity(other.url)


def _plain_identity(url: str) -> tuple[str, int, str]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    db = (parts.path or "/0").strip("/") or "0"
    return (parts.hostname or "localhost", parts.port or 6379, db)
