"""What a new user sees in the first hour: `celery -A proj partitioning worker` on an app with
the default pools and tasks on one of them, run as the real program with a real broker.

The worker starts the partition threads of the pool the tasks use only, says once which
pools it skips and why, its banner names the partition threads instead of `1 (solo)` and
explains the idle queue, and `status` still lists every pool and says which ones no worker
runs by default.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from tests.support.procs import ROOT, Processes, celery_bin, wait_for

pytestmark = pytest.mark.integration

APP = '''
import os
import redis
from celery import Celery
import celery_partitioning as cp

NS = os.environ["FH_NS"]
URL = os.environ["FH_REDIS"]
app = Celery("firsthour", broker=URL, set_as_current=False)
app.conf.update(broker_transport_options={"global_keyprefix": NS},
                partitioning_queue_prefix=NS + "partition", worker_hijack_root_logger=True)
cp.install(app)   # the default pools: entity 10, customer 5, saga 5, global 1, dcb 5
client = redis.Redis.from_url(URL)

@app.task(name="firsthour.added")
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def added(order_id, seq):
    client.rpush(NS + "rec:" + order_id, seq)
'''


@pytest.mark.timeout(180)
def test_the_worker_runs_the_used_pool_only_and_says_what_it_runs(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    (tmp_path / "firsthour.py").write_text(textwrap.dedent(APP))
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "FH_NS": namespace, "FH_REDIS": redis_url}
    log = tmp_path / "worker.log"
    # Given a worker started with no --pool
    sup = processes.start([celery_bin(), "-A", "firsthour", "partitioning", "worker",
                           "--processes", "1", "-l", "info"], env=env, log=log)
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def cli(*args: str) -> str:
        done = subprocess.run([celery_bin(), "-A", "firsthour", "partitioning", *args],
                              env={**os.environ, **env}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    # When tasks are published (by a producer process of the app), they run
    code = "import firsthour as m\nfor seq in range(5): m.added.delay(f'ord-{seq % 2}', seq)"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=tmp_path,
                   check=True, timeout=60)
    wait_for(lambda: client.llen(f"{namespace}rec:ord-0") + client.llen(f"{namespace}rec:ord-1")
             == 5, 90, "5 tasks to run")
    text = log.read_text(errors="replace")

    # Then only the pool the tasks use has threads, and the skipped pools are named once
    skipped = ("not running pool(s) customer, saga, global, dcb: no registered partitioned task "
               "uses them")
    assert text.count(skipped) == 1, text[-3000:]
    assert ": 10 partition(s) in this process: entity.0,entity.1," in text
    assert text.count(" consuming ") == 10 and "consuming " + namespace + "partition.global" \
        not in text
    # and the banner says what runs the tasks, not "1 (solo)"
    assert ".> concurrency: 10 partition thread(s) (pool(s) entity), one message at a time " \
           "each" in text
    assert "(solo)" not in text
    assert f".> {namespace}partition.idle (control only: nothing is sent here; the " \
           "partitions below run the tasks)" in text
    assert "[partitions]" in text and f".> {namespace}partition.entity.9  (thread entity.9)" \
        in text

    # And status still shows every pool, and says which no worker runs by default
    found = json.loads(cli("status", "--json"))
    assert len(found["partitions"]) == 26
    assert found["unused_pools"] == ["customer", "saga", "global", "dcb"]
    assert found["stranded"] == [] and found["size_mismatches"] == []
    held = [r["pool"] for r in found["partitions"] if r["consumer"]]
    assert held == ["entity"] * 10
    assert "not run by `partitioning worker` by default: pool(s) customer, saga, global, dcb" \
        in cli("status")

    processes.signal(sup, signal.SIGTERM)
    assert sup.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]
