"""The outbox relay as a thread of ``partitioning worker`` (the relay itself: ``contrib/django/relay.py``).

The supervisor sets ``RELAY_ENV`` on its first process only, unless ``partitioning_outbox_relay``
is False or ``--without-relay`` is given. That process adds :class:`RelayStep`, which runs a
relay thread per database holding the outbox table, from start to warm stop. Each relay holds
the database's relay lease in the store, so one per database is active and the others stand by;
the lease carries the process's lease token, so a restarted process takes it over at once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from typing import Any, Final

from celery import bootsteps

from ..state import settings_of
from .runtime import LEASE_TAKEOVER_ENV, LEASE_TOKEN_ENV, RELAY_ENV

__all__ = ["RelayStep", "relay_requested", "describe_relays"]

logger = logging.getLogger("celery_partitioning.outbox")

#: Seconds a warm stop waits for a relay thread to finish its round and release its lease.
STOP_WAIT: Final = 30.0


def relay_requested() -> bool:
    """Whether the supervisor asked this process to run the outbox relay."""
    return os.environ.get(RELAY_ENV) == "1"


def _outbox_databases(app: Any) -> list[str]:
    if importlib.util.find_spec("django") is None:
        return []
    from ..contrib.django.relay import outbox_databases

    found = outbox_databases()
    if found and settings_of(app).redis is None:
        logger.warning("outbox relay: off; it keeps its lease in the Redis store (set "
                       "partitioning_redis_url); run `partitioning outbox relay` elsewhere")
        return []
    return found


class RelayStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: one relay thread per database holding the outbox table."""

    label = "outbox-relay"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.databases = _outbox_databases(parent.app)
        parent.outbox_relay_databases = self.databases  # for the banner
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def create(self, parent: Any) -> RelayStep:
        return self

    def start(self, parent: Any) -> None:
        from ..contrib.django.relay import Relay

        if self.threads:
            return
        for alias in self.databases:
            relay = Relay(parent.app, using=alias, stop=self.stop_event,
                          token=os.environ.get(LEASE_TOKEN_ENV),
                          takeover=os.environ.get(LEASE_TAKEOVER_ENV))
            thread = threading.Thread(target=_run, args=(relay,), daemon=True,
                                      name=f"outbox-relay-{alias}")
            thread.start()
            self.threads.append(thread)

    def stop(self, parent: Any) -> None:
        """Warm stop: the relays finish their round and release their leases."""
        self.stop_event.set()
        for thread in self.threads:
            thread.join(STOP_WAIT)

    def terminate(self, parent: Any) -> None:
        self.stop_event.set()

    def shutdown(self, parent: Any) -> None:
        self.terminate(parent)


def _run(relay: Any) -> None:
    try:
        relay.run()
    except Exception:
        logger.exception("outbox relay (%s) stopped; the other relays' standbys take over",
                         relay.using)


def describe_relays(worker: Any) -> str:
    """The ``[outbox relay]`` banner section ('' when this process runs no relay)."""
    databases = getattr(worker, "outbox_relay_databases", None)
    if not databases:
        return ""
    rows = [f".> database {alias}: on (active while it holds the lease, else standby)"
            for alias in databases]
    return ("\n[outbox relay]\n" + "\n".join(rows)
            + "\n.> off: partitioning_outbox_relay = False or --without-relay\n")
