"""Bare partition workers of tests/apps/failures_app, started by a test that controls restarts.

A bare worker is exactly what ``celery partitioning worker`` starts for one partition: a solo
``celery worker`` on the idle queue with the partition in its environment (it consumes the
partition in a thread).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from tests.support.procs import Processes, celery_bin


def env_of(fa: ModuleType, **extra: str) -> dict[str, str]:
    """The environment that gives a subprocess the same failures_app (broker, store, namespace)."""
    env = {"CP_REDIS_URL": fa.REDIS_URL, "CP_NS": fa.NS}
    if fa.BROKER_URL != fa.REDIS_URL:
        env["CP_BROKER_URL"] = fa.BROKER_URL
    return {**env, **extra}


def start_partition_worker(processes: Processes, fa: ModuleType, pool: str, index: int,
                           log: Path) -> Any:
    """A bare partition worker of ``pool`` partition ``index``, logging to ``log``."""
    idle = fa.app.conf.partitioning_queue_prefix + ".idle"
    argv = [celery_bin(), "-A", "tests.apps.failures_app", "worker", "-Q", idle, "-P", "solo",
            "-c", "1", "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
            "-n", f"{pool}.{index}-{uuid.uuid4().hex[:6]}@%h", "-l", "info"]
    return processes.start(argv, env=env_of(fa, CELERY_PARTITIONING_PARTITIONS=f"{pool}:{index}"),
                           log=log)
