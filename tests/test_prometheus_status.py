"""scripts/prometheus_status.py, the `status --json` → Prometheus recipe of docs/monitoring.md."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from celery_partitioning import partition_for
from celery_partitioning.cli.status import PartitionStatus, status_json
from celery_partitioning.store.keys import RedisKeys
from tests.apps.harness import Harness, keyed_events
from tests.support.procs import ROOT, Processes

SCRIPT = ROOT / "scripts" / "prometheus_status.py"


def _export(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT)], input=text, capture_output=True, text=True,
                          timeout=30)


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_of_every_partition_with_unknowns_left_out() -> None:
    rows = [
        PartitionStatus("entity", 0, "partition.entity.0", 12, 1, 31.5, "entity.0@h1 (pid 4242)", 2,
                        backoff_keys=3, backoff_next_due=1_900_000_000.0),
        PartitionStatus("entity", 1, "partition.entity.1", 0, None, None, None, 0),       # AMQP-like
        PartitionStatus("global", 0, "partition.global.0", 3, None, None, "1 consumer(s)", 0),
    ]
    result = _export(status_json(rows))
    assert result.returncode == 0, result.stderr
    samples = _samples(result.stdout)
    e0 = 'pool="entity",partition="0",queue="partition.entity.0"'
    e1 = 'pool="entity",partition="1",queue="partition.entity.1"'
    g0 = 'pool="global",partition="0",queue="partition.global.0"'
    assert samples == {
        f"celery_partitioning_queue_depth{{{e0}}}": 12, f"celery_partitioning_queue_depth{{{e1}}}": 0,
        f"celery_partitioning_queue_depth{{{g0}}}": 3,
        f"celery_partitioning_unacked{{{e0}}}": 1,
        f"celery_partitioning_oldest_message_age_seconds{{{e0}}}": 31.5,
        f"celery_partitioning_consumer_up{{{e0}}}": 1, f"celery_partitioning_consumer_up{{{e1}}}": 0,
        f"celery_partitioning_consumer_up{{{g0}}}": 1,
        f"celery_partitioning_lease_holder_pid{{{e0}}}": 4242,
        f"celery_partitioning_parked_keys{{{e0}}}": 2, f"celery_partitioning_parked_keys{{{e1}}}": 0,
        f"celery_partitioning_parked_keys{{{g0}}}": 0,
        f"celery_partitioning_backoff_keys{{{e0}}}": 3, f"celery_partitioning_backoff_keys{{{e1}}}": 0,
        f"celery_partitioning_backoff_keys{{{g0}}}": 0,
    }
    assert result.stdout.count("# TYPE ") == 7 and "# TYPE celery_partitioning_queue_depth gauge" in result.stdout


def test_input_that_is_not_status_json_is_exit_2() -> None:
    result = _export("broker redis://...  (12:00:00)\nPOOL PART QUEUE\n")
    assert result.returncode == 2 and "not `partitioning status --json` output" in result.stderr
    assert result.stdout == ""


@pytest.mark.integration
def test_the_recipe_end_to_end_on_redis(redis_url: str, namespace: str, tmp_path: Path) -> None:
    # Given a backlog and a lease holder on partition 1
    url = redis_url
    h = Harness(url, url, namespace, 3, tmp_path, Processes())
    events, _counts = keyed_events(9, 30, ms=1)
    h.publish(events)
    h.redis.set(RedisKeys(namespace).lease(f"{namespace}partition.p.1"), "tok|host-b|777|p.1@host-b",
                px=60_000)
    expected = Counter(partition_for(key, 3) for key, _s, _m, _g in events)

    # When `status --json | python scripts/prometheus_status.py` runs
    status = h.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    result = _export(status.stdout)

    # Then the samples say what the partitions hold
    assert result.returncode == 0, result.stderr
    samples = _samples(result.stdout)
    for i in range(3):
        labels = f'pool="p",partition="{i}",queue="{namespace}partition.p.{i}"'
        assert samples[f"celery_partitioning_queue_depth{{{labels}}}"] == expected.get(i, 0)
        assert samples[f"celery_partitioning_consumer_up{{{labels}}}"] == (1 if i == 1 else 0)
    assert samples[f'celery_partitioning_lease_holder_pid{{pool="p",partition="1",'
                   f'queue="{namespace}partition.p.1"}}'] == 777
    json.loads(status.stdout)  # the script read the command's own output, unchanged
