"""The demo's worker processes: started in their own sessions, stopped by pid, never left behind."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings

from celery_partitioning.embedded import stop_with_parent
from celery_partitioning.state import settings_of

from .report import Console

__all__ = ["Workers", "worker_env", "wait_ready", "PROJECT_DIR"]

#: The project directory (manage.py lives here); workers run from it.
PROJECT_DIR = Path(__file__).resolve().parent.parent
#: Seconds a stopping worker has for a warm shutdown before it is killed.
STOP_GRACE = 20.0


def _celery_bin() -> str:
    candidate = Path(sys.executable).with_name("celery")
    return str(candidate) if candidate.exists() else "celery"


def _supervisor_available() -> bool:
    return importlib.util.find_spec("celery_partitioning.cli") is not None


class Workers:
    """The worker processes this demo started: each in its own session, stopped by pid."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        #: The supervisor stops its children itself: signal it alone, not its group.
        self.signal_group = True
        self.nodes = 0

    def _start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps its own copy
        try:
            proc = subprocess.Popen(argv, cwd=PROJECT_DIR, env={**self.env, **(extra_env or {})},
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=stop_with_parent())  # noqa: PLW1509 - it only calls prctl()
        finally:
            log.close()
        self.procs.append((name, proc))

    def start_partitioned(self, app: Any, pools: dict[str, int], mode: str) -> str:
        celery = _celery_bin()
        use_supervisor = mode == "supervisor" or (mode == "auto" and _supervisor_available())
        partitions = sum(pools.values())
        if use_supervisor:
            self.signal_group = False
            # the command's default: one process per CPU, each hosting a share of the partitions
            self.nodes = max(1, min(os.cpu_count() or 1, partitions))
            self._start("supervisor", [celery, "-A", "example_project", "partitioning", "worker",
                                       "-l", "warning"])
            return (f"celery -A example_project partitioning worker ({partitions} partitions "
                    f"in {self.nodes} processes, a thread each)")
        host = socket.gethostname()
        names = settings_of(app)
        hosted = ",".join(f"{pool}:{index}" for pool, count in pools.items() for index in range(count))
        self.nodes = 1
        self._start("partitions", [
            celery, "-A", "example_project", "worker", "-Q", names.idle_queue_name,
            "-P", "solo", "-c", "1", "--prefetch-multiplier", "1", "-l", "warning", "-E",
            "-n", f"shop-partitions@{host}", "--without-gossip", "--without-mingle",
        ], {"CELERY_PARTITIONING_PARTITIONS": hosted})
        return f"one partition worker process, {partitions} partitions in threads"

    def start_outbox_relay(self) -> str:
        """``celery partitioning outbox relay``: publishes the tasks the demo stored in the outbox."""
        self._start("outbox-relay", [_celery_bin(), "-A", "example_project", "partitioning",
                                     "outbox", "relay", "-l", "warning"])
        return "an outbox relay"

    def start_plain(self, count: int, concurrency: int) -> str:
        celery = _celery_bin()
        host = socket.gethostname()
        queue = settings.CELERY_TASK_DEFAULT_QUEUE
        for n in range(count):
            self._start(f"plain-{n}", [
                celery, "-A", "example_project", "worker", "-Q", queue, "-P", "prefork",
                "-c", str(concurrency), "-l", "warning", "-n", f"shop-plain-{n}@{host}",
                "--without-gossip", "--without-mingle",
            ])
        self.nodes = count
        return f"{count} plain workers x {concurrency} processes on one queue {queue!r}"

    @property
    def supervisor_pid(self) -> int | None:
        """The pid of ``celery partitioning worker`` when the demo runs it, else None."""
        for name, proc in self.procs:
            if name == "supervisor" and proc.poll() is None:
                return proc.pid
        return None

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop(self) -> None:
        """SIGTERM every process group (warm shutdown), then SIGKILL what is left."""
        for _name, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if self.signal_group:
                        os.killpg(proc.pid, signal.SIGTERM)
                    else:
                        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for _name, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for _name, proc in self.procs:
            # The whole group: prefork or supervised children outlive a parent that was killed.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def worker_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")]))
    return {
        **os.environ,
        "PYTHONPATH": path,
        "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "example_project.settings"),
        "REDIS_URL": settings.REDIS_URL,
        "SHOP_DATABASE": str(settings.DATABASES["default"]["NAME"]),
        "SHOP_NAMESPACE": settings.SHOP_NAMESPACE,
        "SHOP_ORDERING": settings.SHOP_ORDERING,
        "SHOP_QUEUE_PREFIX": settings.CELERY_PARTITIONING_QUEUE_PREFIX,
        "SHOP_POOLS": ",".join(f"{p}={n}" for p, n in settings.CELERY_PARTITIONING_POOLS.items()),
        "SHOP_GLOBAL_WRITE_DELAY_MS": str(settings.SHOP_GLOBAL_WRITE_DELAY_MS),
        "SHOP_CHECKPOINTS": "1" if settings.SHOP_CHECKPOINTS else "0",
        "SHOP_CHAOS": "1" if settings.SHOP_CHAOS else "",
    }


def wait_ready(app: Any, nodes: int, workers: Workers, console: Console, timeout: float = 90) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        dead = workers.dead()
        if dead:
            raise RuntimeError(f"workers exited at start: {', '.join(dead)} (see their logs)")
        replies = app.control.ping(timeout=0.5)
        console.status(f"waiting for workers: {len(replies)}/{nodes} answer", force=False)
        if len(replies) >= nodes:
            console.clear()
            return time.monotonic() - started
    console.clear()
    console.say(f"note: only some workers answered within {timeout:.0f} s; going on "
                "(messages wait in their queues)")
    return time.monotonic() - started
