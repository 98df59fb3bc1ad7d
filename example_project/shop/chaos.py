"""``shop_demo --chaos``: SIGKILL partition workers while the demo runs.

Kills are real ``SIGKILL``s of the supervisor's child ``celery worker`` processes, spread over
the run (the n-th kill waits until about n/(N+1) of the tasks are done). Three kinds:

* ``random``: any live partition worker, whatever it is doing (often idle or mid-task);
* ``after-commit``: a worker of a chosen pool that has just committed a task and not acked it
  yet (the moment at-least-once delivery runs a message twice);
* ``mid-global``: the global rollup's worker in the middle of a task, between its read and
  its write.

For the last two the demo arms a Redis flag; the first worker of that pool to reach the
moment (``task_postrun``, or the rollup's pause) takes the flag, writes its pid and waits,
at most ``STALL_SECONDS``, for the kill. The flag stays armed while the pool has tasks left
to run (its worker may be restarting after an earlier kill, for longer than a fixed wait
can assume on a loaded machine); once the pool has none left it becomes a random kill.
Workers take part only when ``SHOP_CHAOS=1`` (set by the demo).

With the outbox (``--chaos`` publishes through it), two more kinds, on top of those:

* ``relay``: the process running the outbox relay (the holder of its lease, a thread of the
  supervisor's first process), while the demo commits batches: ``RELAY_KILLS`` times;
* ``producer-after-commit``: a producer process (``shop.producer``) that committed its
  events and their tasks (in the outbox) and is killed before it could do anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from django.conf import settings

__all__ = ["ChaosMonkey", "Kill", "maybe_stall_mid_task", "maybe_stall_after_commit",
           "children_of"]

#: Longest a worker waits for its announced kill (then it simply goes on).
STALL_SECONDS = 10.0
#: SIGKILLs of the outbox relay's process per run (with the outbox).
RELAY_KILLS = 2
#: Longest the demo waits for a relay to hold the lease, or for the producer's commit.
OUTBOX_WAIT = 60.0
#: Kinds of the kills planned over the drain (``--kills``); the outbox ones come on top.
PLANNED = ("random", "after-commit", "mid-task")


def _keys() -> tuple[str, str]:
    prefix = f"{settings.SHOP_NAMESPACE}shop:chaos"
    return f"{prefix}:arm", f"{prefix}:armed"


def _stall_if_armed(wanted: str) -> None:
    """Worker side: take the armed kill ``wanted`` if it is there, announce our pid, wait."""
    arm, armed = _keys()
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        # Only the first worker to compare-and-delete the flag takes the kill.
        if client.get(arm) != wanted.encode() or not client.delete(arm):
            return
        client.set(armed, f"{wanted}:{os.getpid()}")
    finally:
        client.close()
    deadline = time.monotonic() + STALL_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.02)


def maybe_stall_mid_task() -> None:
    """Called by the global rollup between its read and its write."""
    if settings.SHOP_CHAOS:
        _stall_if_armed("mid:global")


def maybe_stall_after_commit(pool: str) -> None:
    """Called from ``task_postrun`` (the task committed; the message is not acked yet)."""
    if settings.SHOP_CHAOS:
        _stall_if_armed(f"commit:{pool}")


def children_of(pid: int) -> list[int]:
    """The child processes of ``pid`` (Linux ``/proc``), empty if it is gone."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(set(found))


def _running(pid: int) -> bool:
    """Whether ``pid`` is alive and not a zombie (killed, not reaped yet by the supervisor)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _partition_of(pid: int) -> str:
    """The partitions a worker process hosts (from its environment), for the log line."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    for entry in environ:
        name, _, value = entry.partition(b"=")
        if name == b"CELERY_PARTITIONING_PARTITIONS":
            return value.decode(errors="replace")
    return "?"


@dataclass
class Kill:
    kind: str
    pool: str
    pid: int
    at: float


@dataclass
class ChaosMonkey:
    """Demo side: arms and performs ``kills`` SIGKILLs spread over the drain."""

    supervisor_pid: int
    pools: list[str]
    kills: int = 12
    seed: int = 7
    done: list[Kill] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    #: The armed kill (``mid:global``, ``commit:<pool>``), until it is taken or given up.
    _armed: str | None = None
    _rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        # Two kills on the global rollup mid-task, every other one after a commit (cycling
        # through the pools), the rest random.
        commit_pools = [p for p in ("entity", "global", "customer", "entity", "saga", "global")
                        if p in self.pools]
        plan = []
        for n in range(self.kills):
            if n in (1, 3) and "global" in self.pools:
                plan.append("mid:global")
            elif n % 2 == 0 and commit_pools:
                plan.append(f"commit:{commit_pools[(n // 2) % len(commit_pools)]}")
            else:
                plan.append("random")
        self.plan = plan
        self._client = redis.Redis.from_url(settings.REDIS_URL)
        self._client.delete(*_keys())

    @property
    def planned_done(self) -> int:
        return sum(1 for kill in self.done if kill.kind in PLANNED)

    @property
    def finished(self) -> bool:
        return self.planned_done >= self.kills

    @property
    def relay_kills(self) -> int:
        return sum(1 for kill in self.done if kill.kind == "relay")

    def _relay_pid(self) -> int | None:
        """The live child of the supervisor that holds the outbox relay's lease, if any."""
        from celery_partitioning.store.lease import parse_holder

        children = children_of(self.supervisor_pid)
        for key in self._client.scan_iter(match=f"{settings.SHOP_NAMESPACE}cp:lease:outbox:*"):
            holder = parse_holder(self._client.get(key))
            if holder is not None and holder.pid in children:
                return holder.pid
        return None

    def kill_relay(self, note: Callable[[str], None], wait: float = 0.0) -> bool:
        """SIGKILL the relay's process (waiting up to ``wait`` s for a live holder)."""
        deadline = time.monotonic() + wait
        while (pid := self._relay_pid()) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        if not self._kill("relay", "outbox", pid):
            return False
        note(f"chaos: SIGKILL #{len(self.done)} outbox relay: worker pid {pid}, the holder of "
             "its lease (relay)")
        return True

    def during_publish(self, fraction: float, note: Callable[[str], None]) -> None:
        """After a batch committed to the outbox: the next relay kill when it is due."""
        if (self.relay_kills < RELAY_KILLS
                and fraction >= (self.relay_kills + 1) / (RELAY_KILLS + 1)):
            self.kill_relay(note)

    def kill_producer_after_commit(self, events: list[dict[str, Any]], env: dict[str, str],
                                   cwd: Path, note: Callable[[str], None]) -> None:
        """Start ``shop.producer``, let it commit ``events``, SIGKILL it right after."""
        proc = subprocess.Popen([sys.executable, "-m", "shop.producer"], cwd=cwd, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                start_new_session=True)
        timer = threading.Timer(OUTBOX_WAIT, proc.kill)  # a producer that never commits
        timer.start()
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(events).encode())
            proc.stdin.close()
            line = proc.stdout.readline().decode().strip()
            if not line.startswith("committed"):
                raise RuntimeError(f"chaos: the producer did not commit (exit {proc.wait()})")
            self._kill("producer-after-commit", "outbox", proc.pid)
            note(f"chaos: SIGKILL #{len(self.done)} producer pid {proc.pid} right after its "
                 f"commit ({line}: in the outbox only; the relay publishes them)")
        finally:
            timer.cancel()
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()

    def _kill(self, kind: str, pool: str, pid: int) -> bool:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            self.done.append(Kill(kind, pool, pid, time.monotonic()))
            return True
        return False

    def _random_kill(self, note: Callable[[str], None], why: str = "") -> None:
        children = [pid for pid in children_of(self.supervisor_pid) if _running(pid)]
        if children:
            pid = self._rng.choice(children)
            label = _partition_of(pid)
            self._kill("random", label, pid)
            note(f"chaos: SIGKILL #{len(self.done)} {label} worker pid {pid} (random{why})")

    def step(self, done_fraction: float, note: Callable[[str], None],
             left: Mapping[str, int]) -> None:
        """One look: perform a taken armed kill, give up one whose pool has no task ``left``
        (tasks published and not done, by pool), or start the next."""
        arm, armed = _keys()
        if self._armed is not None:
            taken = self._client.getdel(armed)
            if taken:
                what, _, pid = taken.decode().rpartition(":")
                moment, _, pool = what.partition(":")
                label = "after-commit" if moment == "commit" else "mid-task"
                self._kill(label, pool, int(pid))
                note(f"chaos: SIGKILL #{len(self.done)} {pool} worker pid {pid} ({label})")
                self._armed = None
            elif left.get(self._armed.partition(":")[2], 0) <= 0 and self._client.delete(arm):
                # no task of its pool will reach the moment: a random kill
                why, self._armed = f" instead of {self._armed}: {dict(left)} left", None
                self._random_kill(note, why)
            return
        planned = self.planned_done
        if self.finished or done_fraction < 0.9 * (planned + 1) / (self.kills + 1):
            return
        kind = self.plan[planned]
        if kind == "random":
            self._random_kill(note)
        else:
            self._client.set(arm, kind)
            self._armed = kind

    def stop(self) -> None:
        self._client.delete(*_keys())
        self._client.close()

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for kill in self.done:
            kinds[kill.kind] = kinds.get(kill.kind, 0) + 1
        return {"kills": len(self.done), "by_kind": kinds}
