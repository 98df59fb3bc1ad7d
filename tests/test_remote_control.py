"""Celery's remote control cannot break a partition, and ``inspect active_queues`` shows them.

A real ``celery partitioning worker`` (two partitions, one process) and a plain ``celery worker``
(threads pool, four threads) of the same app run on a real Redis while keyed messages flow.
Every control command that could give a partition a second consumer or a second concurrent run
is sent through Celery's own control API; the replies are checked, and then the per-key
sequences the tasks recorded: in publish order, no overlap, nothing run by the plain worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.apps.harness import Event, Harness, keyed_events
from tests.support.ordering import check, concurrent_runs
from tests.support.procs import Processes, celery_bin, wait_for

pytestmark = pytest.mark.integration

#: Messages published before each command, so that each one meets a queue with work in it.
BATCH = 24


def _replies(replies: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {node: reply for entry in replies or [] for node, reply in entry.items()}


@pytest.mark.timeout(240)
def test_control_commands_are_refused_and_order_is_kept_with_messages_flowing(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    # Given a partition worker process and a plain worker of the same app
    url = redis_url
    h = Harness(url, url, namespace, 2, tmp_path, processes)
    app = h.app()
    plain = f"plain{namespace[7:17]}@%h"
    h.start_workers("partitions", "--processes", "1")
    processes.start([celery_bin(), "-A", "tests.apps.ordering_app", "worker", "-P", "threads",
                     "-c", "4", "-n", plain, "--without-gossip", "--without-mingle", "-l", "info"],
                    env=h.env(), log=h.log("plain"))

    answered: list[str] = []

    def both_answer() -> bool:
        # limit: the second reply ends the wait (without it, each ping waits its timeout)
        answered[:] = sorted(_replies(app.control.ping(timeout=1.0, limit=2)))
        return len(answered) == 2

    wait_for(both_answer, 60, "both workers to answer ping")
    [plain_node] = [n for n in answered if n.startswith("plain")]
    [partition_node] = [n for n in answered if n != plain_node]
    both = [partition_node, plain_node]
    events, counts = keyed_events(10, 20 * BATCH, ms=15)
    # one message of its own, held long enough (15 s) to be running while revoke/terminate arrive
    hold_key = "Order:held"
    pending: list[Event] = list(events)

    def flowing(size: int = BATCH) -> None:
        batch = pending[:size]
        del pending[:size]
        h.publish(batch)

    def settle() -> None:
        """Run what was published so far to the end: a consumer added by a command that was
        not refused would have taken part of it."""
        h.wait_done(len(events) - len(pending), timeout=120, logs=["partitions", "plain"])

    def send(command: str, destination: list[str], **arguments: Any) -> dict[str, Any]:
        flowing()
        got = _replies(app.control.broadcast(command, arguments=arguments, destination=destination,
                                             reply=True, timeout=10, limit=len(destination)))
        assert sorted(got) == sorted(destination), (command, got)
        return got

    def refused(reply: Any, *fragments: str) -> bool:
        error = reply.get("error", "") if isinstance(reply, dict) else ""
        return error.startswith("celery-partitioning:") and all(f in error for f in fragments)

    partition_queue = f"{namespace}partition.p.0"
    # When Flower's "Add consumer" (and the same through the API) names a partition queue
    for node, reply in send("add_consumer", both, queue=partition_queue).items():
        assert refused(reply, "add_consumer refused", partition_queue, "p.0"), (node, reply)
    added = _replies(app.control.add_consumer(partition_queue, reply=True, destination=both,
                                              timeout=10, limit=2))
    assert all(refused(r, "add_consumer refused") for r in added.values()), added
    # ... or binds another queue to a partition queue's routing key
    sneaky = send("add_consumer", both, queue=f"{namespace}sneaky", exchange="celery",
                  routing_key=f"{namespace}partition.p.1")
    assert all(refused(r, "routing key", "p.1") for r in sneaky.values()), sneaky
    flowing(4 * BATCH)
    settle()
    # ... or gives the partition worker process any other queue
    other = send("add_consumer", [partition_node], queue=f"{namespace}other")
    assert refused(other[partition_node], "consumes its partitions in threads"), other
    # ... or cancels a partition queue
    for node, reply in send("cancel_consumer", both, queue=partition_queue).items():
        assert refused(reply, "cancel_consumer refused", "p.0"), (node, reply)
    settle()

    # When the pool is grown, shrunk, autoscaled or restarted on the partition worker process
    for command, arguments in [("pool_grow", {"n": 3}), ("pool_shrink", {"n": 1}),
                               ("autoscale", {"max": 4, "min": 2}),
                               ("pool_restart", {"reload": True})]:
        reply = send(command, [partition_node], **arguments)[partition_node]
        assert refused(reply, f"{command} refused", "one task at a time"), (command, reply)

    # When a rate limit or a time limit is set on the partitioned task, on any node
    for node, reply in send("rate_limit", both, task_name="ordering.record",
                            rate_limit="1/s").items():
        assert refused(reply, "rate_limit refused", "ordering.record"), (node, reply)
    for node, reply in send("time_limit", both, task_name="ordering.record", soft=0.01,
                            hard=0.02).items():
        assert refused(reply, "time_limit refused", "ordering.record"), (node, reply)

    # When a running partitioned task is revoked with terminate, or terminated
    held = app.tasks["ordering.record"].apply_async((hold_key, 0), {"ms": 15000, "signal": "held"})
    h.next_signal("held", timeout=60)
    for command, arguments in [
            ("revoke", {"task_id": [held.id], "terminate": True, "signal": "SIGKILL"}),
            ("terminate", {"task_id": [held.id], "signal": "SIGKILL"})]:
        reply = send(command, [partition_node], **arguments)[partition_node]
        assert refused(reply, "not terminated", held.id), (command, reply)

    # And `inspect active_queues` lists the partition queues the node consumes (Flower's broker
    # view and /api/queues/length read them there), marked as partitions
    active = app.control.inspect(destination=both, timeout=10, limit=2).active_queues() or {}
    by_name = {q["name"]: q for q in active[partition_node]}
    for index in range(2):
        entry = by_name[f"{namespace}partition.p.{index}"]
        assert entry["partition"] == {"pool": "p", "index": index, "partitions": 2}, entry
        assert entry["routing_key"] == entry["name"]
    assert f"{namespace}partition.idle" in by_name
    assert not any("partition" in q for q in active[plain_node]), active[plain_node]
    h.release(hold_key, 0)  # the held task, never terminated, ends now

    # Then, with everything published, every key ran in order, one message at a time, and
    # only in the partition threads
    while pending:
        flowing()
    h.wait_done(len(events) + 1, timeout=120, logs=["partitions", "plain"])
    report = check(h.records([*counts, hold_key]), {**counts, hold_key: 1})
    assert report.ok, report.summary()
    assert report.reruns == 0
    for label in ("p.0", "p.1"):
        assert not concurrent_runs(h.partition_log(label), killed=set())
    assert h.partition_log("none") == [], "the plain worker ran partitioned tasks"
    assert sum(len(h.partition_log(label)) for label in ("p.0", "p.1")) == 2 * (len(events) + 1)
    # And the refusals are in the node's log too (an operator sees why nothing happened)
    assert "add_consumer refused" in h.log_text("partitions")
