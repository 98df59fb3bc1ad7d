"""The exclusive-consumer lease of a partition (Redis): token, TTL, heartbeat, self-fencing.

The lease key holds ``"token|host|pid|node"`` with a TTL. A standby polls and takes it within
the TTL after the holder stops renewing. The holder renews every TTL/3; if it cannot renew for
70% of the TTL, finds the lease taken, or its partition thread is stuck, it ends its process
at once (``os._exit``), so two holders never run one partition at the same time. A successor
given a dead child's token takes its lease over at once instead of waiting out the TTL.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..exits import EXIT_FENCED, exit_now
from .keys import RedisKeys
from .scripts import scripts_for

__all__ = ["Lease", "LeaseHolder", "LeaseRenewer", "parse_holder", "new_token", "read_holders"]

logger = logging.getLogger("celery_partitioning.worker")

#: Share of the TTL after the last good renewal at which a holder fences itself.
FENCE_AFTER: Final = 0.7

def new_token() -> str:
    """A random lease token (hex, no ``|``)."""
    return secrets.token_hex(12)


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds a lease, as stored in its value."""

    token: str
    host: str
    pid: int
    node: str
    #: Milliseconds the lease has left (-1 when unknown).
    ttl_ms: int = -1

    def describe(self) -> str:
        return f"{self.node or self.host} (pid {self.pid})"


def parse_holder(value: bytes | str | None, ttl_ms: int = -1) -> LeaseHolder | None:
    """A lease value ``"token|host|pid|node"`` as a LeaseHolder (None when absent)."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    token, host, pid, node = ([*text.split("|", 3), "", "", ""])[:4]
    return LeaseHolder(token, host, int(pid) if pid.isdigit() else 0, node, ttl_ms)


def read_holders(client: Any, keys: RedisKeys, queues: Sequence[str], *,
                 ttl: bool = True) -> dict[str, LeaseHolder | None]:
    """Who holds the lease of each partition queue (None: free), in one round trip; without
    ``ttl`` (what every member's beat reads) one ``MGET``, not two commands a partition."""
    if not ttl:
        values = client.mget([keys.lease(queue) for queue in queues]) if queues else []
        return {queue: parse_holder(value) for queue, value in zip(queues, values, strict=True)}
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            pipe.get(keys.lease(queue))
            pipe.pttl(keys.lease(queue))
        replies = pipe.execute()
    return {queue: parse_holder(replies[2 * i], int(replies[2 * i + 1]))
            for i, queue in enumerate(queues)}


class Lease:
    """The lease of one partition queue, for this process."""

    def __init__(self, client: Any, key: str, ttl: float, *, node: str = "",
                 token: str | None = None, takeover: str | None = None,
                 fence: Callable[[str], None] | None = None,
                 renewer: LeaseRenewer | None = None) -> None:
        self.client = client
        self._scripts = scripts_for(client)
        self.key = key
        self.ttl = ttl
        self.token = token or new_token()
        self.takeover = takeover or ""
        self.value = f"{self.token}|{socket.gethostname()}|{os.getpid()}|{node}"
        self._fence = fence or _exit_fenced
        #: Renews it: the process's renewer (one script for all its leases), else its own.
        self._renewer = renewer or LeaseRenewer(client, ttl)
        self._held = False
        self._last_ok = time.monotonic()
        #: Called after every good renewal; errors logged.
        self.on_beat: list[Callable[[], None]] = []
        #: Asked after every renewal: a reason means the partition's thread is stuck and the
        #: process fences itself (a lease must not outlive the consumer it stands for).
        self.stall_check: Callable[[], str | None] | None = None
        #: Called when the lease becomes ours, and just before a fence (metrics); errors logged.
        self.on_acquire: list[Callable[[], None]] = []
        self.on_fence: list[Callable[[str], None]] = []

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    def holder(self) -> LeaseHolder | None:
        """The current holder as stored in Redis (None when free)."""
        with self.client.pipeline(transaction=False) as pipe:
            value, ttl_ms = pipe.get(self.key).pttl(self.key).execute()
        return parse_holder(value, int(ttl_ms))

    def try_acquire(self) -> bool:
        """Take the lease if it is free, ours, or held by the token we may take over."""
        started = time.monotonic()
        ok = bool(self._scripts.lease_acquire(keys=[self.key],
                                               args=[self.value, self.ttl_ms, self.takeover]))
        if ok:
            if not self._held:
                _run_hooks(self.on_acquire)
            self._held = True
            self._last_ok = started
        return ok

    def acquire(self, should_stop: Callable[[], bool], label: str = "") -> bool:
        """Block until the lease is ours (True), or ``should_stop()`` turns true (False)."""
        poll = min(0.5, max(0.05, self.ttl / 10))
        announced = 0.0
        while not should_stop():
            try:
                if self.try_acquire():
                    return True
            except Exception as exc:  # noqa: BLE001 - Redis down: keep waiting, say why
                if time.monotonic() - announced > 30:
                    logger.warning("%s lease store unreachable (%s); waiting", label, exc)
                    announced = time.monotonic()
            else:
                if time.monotonic() - announced > 30:
                    holder = self.holder()
                    logger.warning(
                        "%s standby: partition is held by %s; waiting to take over "
                        "(at most %.0fs after it stops)", label,
                        holder.describe() if holder else "another worker", self.ttl)
                    announced = time.monotonic()
            time.sleep(poll)
        return False

    def fresh(self) -> bool:
        """Whether the last good renewal is within the TTL. A process frozen (SIGSTOP, a VM
        pause) or cut off for longer may have been replaced: a message it fetched before or
        during the freeze must not run. When stale, the holder is fenced here and now, before
        its heartbeat wakes up."""
        stale = time.monotonic() - self._last_ok
        if not self._held or stale <= self.ttl:
            return True
        self._fenced(f"was frozen or cut off {stale:.1f}s, longer than the lease TTL, with a "
                     f"message fetched from {self.key}: it does not run here")
        return False

    def start_heartbeat(self) -> None:
        """Have the lease renewed every TTL/3 (by its renewer's thread); fence this process if
        the lease is lost."""
        self._renewer.add(self)

    def renewed(self, renewed: bool | None, started: float, error: Exception | None) -> bool:
        """What one renewal (``None``: it failed with ``error``) tells this holder, its renewer
        asks; False when it is fenced (renewed no more). ``started``: when the renewal was
        sent (``time.monotonic()``)."""
        if renewed is None:
            if time.monotonic() - self._last_ok > FENCE_AFTER * self.ttl:
                self._fenced(f"could not renew the lease {self.key} for "
                             f"{time.monotonic() - self._last_ok:.1f}s ({error})")
                return False
            return True
        if not renewed:
            try:
                holder = self.holder()
            except Exception:  # noqa: BLE001 - only for the message
                holder = None
            self._fenced(f"lost the lease {self.key} (now held by "
                         f"{holder.describe() if holder else 'nobody'})")
            return False
        if started - self._last_ok > self.ttl:
            # Renewed, but this process was frozen longer than the TTL: another worker may
            # have run in between. Do not go on as if nothing happened.
            self._fenced(f"was frozen {started - self._last_ok:.1f}s, longer than the lease "
                         "TTL")
            return False
        stalled = self.stall_check() if self.stall_check is not None else None
        if stalled:
            self._fenced(stalled)
            return False
        self._last_ok = started
        _run_hooks(self.on_beat)
        return True

    def _fenced(self, reason: str) -> None:
        _run_hooks([functools.partial(hook, reason) for hook in self.on_fence])
        self._fence(reason)

    def release(self) -> None:
        """Stop the heartbeat (no renewal of it is in flight once this returns) and delete the
        lease if it is still ours."""
        self._renewer.discard(self)
        if self._held:
            self._held = False
            try:
                self._scripts.lease_release(keys=[self.key], args=[self.value])
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                logger.warning("could not release the lease %s (%s); it expires in %.0fs",
                               self.key, exc, self.ttl)


class LeaseRenewer:
    """Renews leases of one TTL in one script call per beat (every TTL/3), however many
    partitions the process holds; each lease judges its own renewal (:meth:`Lease.renewed`).
    The thread runs while it has leases to renew."""

    def __init__(self, client: Any, ttl: float) -> None:
        self.client = client
        self.ttl = ttl
        self._scripts = scripts_for(client)
        self._leases: list[Lease] = []
        #: Held while a renewal is in flight: :meth:`discard` waits for it.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: Set to end the current thread (no lease left).
        self._stop = threading.Event()

    def add(self, lease: Lease) -> None:
        """Renew ``lease`` from the next beat on (no-op when renewed already)."""
        with self._lock:
            if lease not in self._leases:
                self._leases.append(lease)
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._beat, args=(self._stop,),
                                                name="partition-lease", daemon=True)
                self._thread.start()

    def discard(self, lease: Lease) -> None:
        """Renew ``lease`` no more; once this returns no renewal of it is in flight. The
        last lease gone, the thread ends (joined)."""
        with self._lock:
            if lease in self._leases:
                self._leases.remove(lease)
            thread = self._thread if not self._leases else None
            if thread is not None:
                self._stop.set()
                self._thread = None
        if thread is not None and thread is not threading.current_thread():
            thread.join(self.ttl)

    def _renew(self, stop: threading.Event) -> tuple[list[tuple[Lease, bool | None]],
                                                      Exception | None] | None:
        """One renewal of every lease (under the lock): each with True (renewed), False (lost)
        or None (the call failed, with the error); None when the thread ends."""
        with self._lock:
            leases = list(self._leases)
            if stop.is_set() or not leases:
                if self._thread is threading.current_thread():
                    self._thread = None
                return None
            try:
                replies = self._scripts.lease_renew(
                    keys=[lease.key for lease in leases],
                    args=[max(1, int(self.ttl * 1000)), *(lease.value for lease in leases)])
            except Exception as exc:  # noqa: BLE001 - any failure: retry until the fence
                return [(lease, None) for lease in leases], exc
            return [(lease, bool(int(reply)))
                    for lease, reply in zip(leases, replies, strict=True)], None

    def _beat(self, stop: threading.Event) -> None:
        interval = self.ttl / 3
        wait = interval
        while not stop.wait(wait):
            started = time.monotonic()
            renewal = self._renew(stop)
            if renewal is None:
                return
            outcomes, error = renewal
            # a failed call is retried sooner, until the leases' fence
            wait = interval if error is None else min(interval, 0.1 * self.ttl)
            for lease, renewed in outcomes:
                with self._lock:
                    if lease not in self._leases:
                        continue  # released meanwhile: its renewal does not count
                # the lease's hooks (fences, progress records) run outside the lock: a fence
                # that stops partitions must not wait for this thread
                if not lease.renewed(renewed, started, error):
                    self.discard(lease)


def _run_hooks(hooks: Sequence[Callable[[], None]]) -> None:
    for hook in list(hooks):
        try:
            hook()
        except Exception:
            logger.exception("lease hook failed")


def _exit_fenced(reason: str) -> None:
    """End the process now: a holder that may have lost its lease must not run a task."""
    exit_now(EXIT_FENCED, "celery-partitioning: %s; stopping this worker at once so two "
                          "workers never consume one partition", reason)
