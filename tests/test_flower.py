"""Flower sees partition queues: its ``/api/queues/length`` (what its broker page shows) lists a
partition queue a real partition worker hosts, with its depth.

Flower builds its queue list from every worker's ``inspect active_queues`` reply; a partition
worker process lists there the partition queues it consumes in threads.
"""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from celery_partitioning import partition_for
from tests.apps.harness import HOLD_MS, Harness
from tests.support.procs import Processes, celery_bin, wait_for

pytest.importorskip("flower")
pytestmark = pytest.mark.integration

#: Messages left waiting in the partition queue behind the one that runs.
WAITING = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.timeout(180)
def test_flower_lists_a_partition_queue_and_its_depth(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    # Given a partition worker whose partition 0 runs a long task with 60 messages behind it
    url = redis_url
    h = Harness(url, url, namespace, 2, tmp_path, processes)
    h.start_workers("partitions", "--processes", "1")
    key = next(f"Order:{n}" for n in range(100) if partition_for(f"Order:{n}", 2) == 0)
    h.publish([(key, 0, HOLD_MS, "hold")])
    h.next_signal("hold", timeout=90)
    h.publish([(key, seq, 2, None) for seq in range(1, WAITING + 1)])
    queue = f"{namespace}partition.p.0"

    # When Flower runs beside it
    port = _free_port()
    processes.start([celery_bin(), "-A", "tests.apps.ordering_app", "flower",
                     "--address=127.0.0.1", f"--port={port}"],
                    env={**h.env(), "FLOWER_UNAUTHENTICATED_API": "true"}, log=h.log("flower"))
    base = f"http://127.0.0.1:{port}"

    def lengths() -> dict[str, int]:
        try:
            _get(f"{base}/api/workers?refresh=1")  # Flower asks every worker (inspect)
            reply = _get(f"{base}/api/queues/length")
        except OSError:
            return {}
        return {q["name"]: q["messages"] for q in reply.get("active_queues", [])}

    # Then its queue lengths list the partition queue, 60 deep, beside the other one
    try:
        wait_for(lambda: lengths().get(queue) == WAITING, 90, f"Flower to show {queue}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {lengths()}\n{h.log_text('flower')[-3000:]}") from None
    shown = lengths()
    assert shown[f"{namespace}partition.p.1"] == 0, shown
