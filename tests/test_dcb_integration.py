"""DCB conflict retries with real ``dcb`` partition workers on a real Redis.

Concurrent operations on DCB scopes hit injected conflicts (another writer moves the scope's
version between the read and the append). Each is retried in place on its scope's partition:
every operation applies exactly once, in publish order, at the version it checked; an
operation that still conflicts after ``max_attempts`` becomes a dead letter with the reason.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import ModuleType

import pytest
import redis

from tests.support.procs import Processes, celery_bin, wait_for

pytestmark = pytest.mark.integration

OPS = 8


def test_concurrent_dcb_operations_with_conflicts_apply_once_in_order(
    fa: ModuleType, processes: Processes, tmp_path: Path
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    scopes = [f"res-{i}" for i in range(4)]
    exhausted = "res-x"
    # Given op i of each scope meets i % 3 conflicts, and op 0 of res-x one more than allowed
    for res in scopes:
        scope = fa.cp.create_scope_key("T", "reservation", res)
        for op in range(OPS):
            client.set(f"{fa.NS}inject:{scope}:{op}", op % 3)
    x_scope = fa.cp.create_scope_key("T", "reservation", exhausted)
    client.set(f"{fa.NS}inject:{x_scope}:0", 5)
    routes = {fa.cp.explain_route(fa.app, "dcb.reserve", "T", res, 0).queue for res in scopes}
    assert len(routes) == 2, "the scopes should use both dcb partitions"
    assert fa.cp.explain_route(fa.app, "dcb.reserve", "T", "res-0", 0).key == \
        fa.cp.create_dcb_partition_key(fa.cp.create_scope_key("T", "reservation", "res-0"))

    # When the dcb pool runs (supervised) while operations are published concurrently
    argv = [celery_bin(), "-A", "tests.apps.failures_app", "partitioning", "worker",
            "--pool", "dcb", "-l", "info"]
    processes.start(argv, env={"CP_REDIS_URL": fa.REDIS_URL, "CP_NS": fa.NS},
                    log=tmp_path / "workers.log")

    def publish(res: str, count: int) -> None:
        for op in range(count):
            fa.reserve.delay("T", res, op)

    threads = [threading.Thread(target=publish, args=(res, OPS)) for res in scopes]
    threads.append(threading.Thread(target=publish, args=(exhausted, 2)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    def log(res: str) -> list[str]:
        scope = fa.cp.create_scope_key("T", "reservation", res)
        return client.lrange(f"{fa.NS}scope:{scope}:log", 0, -1)

    wait_for(lambda: all(len(log(res)) == OPS for res in scopes)
             and client.hlen(f"{fa.NS}cp:dl:dcb") == 1, 90, "every op applied, one dead letter")

    # Then every op applied exactly once, in publish order, at strictly increasing versions
    for res in scopes:
        scope = fa.cp.create_scope_key("T", "reservation", res)
        entries = [e.split("@") for e in log(res)]
        assert [int(op) for op, _ in entries] == list(range(OPS)), (res, entries)
        versions = [int(v) for _, v in entries]
        assert versions == sorted(set(versions)), (res, versions)
        # and each op's attempts ran back to back: no other op of the scope in between
        attempts = [int(a) for a in client.lrange(f"{fa.NS}attempts:{scope}", 0, -1)]
        assert attempts == [op for op in range(OPS) for _ in range(op % 3 + 1)], (res, attempts)
    # And the op that conflicted on every attempt is a dead letter with the reason
    (record,) = [json.loads(v) for v in client.hvals(f"{fa.NS}cp:dl:dcb")]
    assert record["reason"] == "DCB_MAX_RETRIES_EXCEEDED" and record["attempts"] == 5
    assert record["key"] == f"dcb:{x_scope}" and record["task"] == "dcb.reserve"
    assert record["error"].startswith(f"DCBConflict: DCB conflict on scope '{x_scope}'")
    assert client.lrange(f"{fa.NS}attempts:{x_scope}", 0, -1) == ["0"] * 5
    assert log(exhausted) == []
    # with the scope's next operation parked behind it, not run
    from celery_partitioning.store.keys import RedisKeys

    wait_for(lambda: client.llen(RedisKeys(fa.NS).parked("dcb", f"dcb:{x_scope}")) == 1, 10,
             "res-x op 1 parked")
