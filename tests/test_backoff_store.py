"""Keys in retry backoff against a real Redis (no workers): set aside, gate, release, crashes.

The retry code sets a key aside (``backoff.lua``), the gate sets its later messages aside
(``check``), the partition thread releases it when due (``release.lua``); here each step, and
each crash between two of them, is played one at a time.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from celery_partitioning.message import message_summary
from celery_partitioning.store.attempts import AttemptRecord
from celery_partitioning.store.backoff import BACKOFF_HEADER, BackoffStore
from celery_partitioning.store.deadletters import DeadLetterStore
from celery_partitioning.store.requeue import HEAD_PUSH, Requeue, ThroughOutbox
from celery_partitioning.worker.parking import Parking
from tests.test_deadletters_store import POOL, QUEUE, consume, queue_ids, raw

pytestmark = pytest.mark.integration

KEY = "Order:1"


def set_aside(store: DeadLetterStore, task_id: str, due: float, *, token: str = "t1",
              in_transit: tuple[str, bytes] | None = None, requeue: Requeue = HEAD_PUSH) -> None:
    BackoffStore(store).set_aside(POOL, KEY, task_id, raw(task_id), AttemptRecord(1, due, token=token),
                                  queue=QUEUE, requeue=requeue, in_transit=in_transit)


def test_a_key_in_backoff_waits_alone_and_comes_back_first_when_due(store: DeadLetterStore) -> None:
    backoff = BackoffStore(store)
    transit = store.keys.in_transit(QUEUE)
    store.client.rpush(transit, b"the delivery that ran")
    due = time.time() + 60
    # Given a0 retries after a backoff: its key is set aside, its delivery acked in the script
    set_aside(store, "a0", due, in_transit=(transit, b"the delivery that ran"))
    assert store.client.llen(transit) == 0
    assert backoff.summary(QUEUE).count == 1 and backoff.summary(QUEUE).next_due == pytest.approx(due)
    # When a1 of the key and b0 of another key arrive, and a0's own delivery comes back
    assert store.check(POOL, KEY, "a1", raw("a1", 1), QUEUE).verdict == "parked"
    assert store.check(POOL, "Order:2", "b0", raw("b0"), QUEUE).verdict == "run"
    assert store.check(POOL, KEY, "a0", raw("a0"), QUEUE).verdict == "duplicate"
    # Then nothing is released before the due time
    assert backoff.release_due(QUEUE, now=due - 1) == pytest.approx(1)
    assert queue_ids(store) == []
    # And at the due time a0 (the copy, with its token) then a1 go to the head of the queue
    assert backoff.release_due(QUEUE, now=due) == float("inf")
    assert queue_ids(store) == ["a0", "a1"]
    copy = store.client.lindex(store.keys.broker_queue(QUEUE), -1)
    assert json.loads(copy)["headers"][BACKOFF_HEADER] == "t1"
    first = store.check(POOL, KEY, consume(store), copy, QUEUE)
    assert first.verdict == "run" and first.replaying
    assert AttemptRecord.parse(first.attempts) == AttemptRecord(1, due, token="t1")
    # And a newer a2 that overtook the released ones is deferred behind them
    assert store.check(POOL, KEY, "a2", raw("a2", 2), QUEUE).verdict == "deferred"
    store.finished(POOL, KEY, "a0", QUEUE)
    assert store.check(POOL, KEY, consume(store), raw("a1", 1), QUEUE).verdict == "run"
    store.finished(POOL, KEY, "a1", QUEUE)
    assert queue_ids(store) == ["a2"]
    assert backoff.summary(QUEUE).count == 0
    assert not store.client.exists(store.keys.backoff(POOL, KEY))


def test_a_replayed_message_that_retries_takes_the_rest_of_its_replay_along(
        store: DeadLetterStore) -> None:
    # Given a1 (retrying) and a2 released together, a3 deferred behind them
    due = time.time() - 1
    set_aside(store, "a1", due)
    store.check(POOL, KEY, "a2", raw("a2", 2), QUEUE)
    BackoffStore(store).release_due(QUEUE)
    assert store.check(POOL, KEY, consume(store), raw("a1", 1), QUEUE).verdict == "run"
    assert store.check(POOL, KEY, "a3", raw("a3", 3), QUEUE).verdict == "deferred"
    # When a1 retries again, and a2 and then a3 reach the gate
    set_aside(store, "a1", due + 0.5, token="t2")
    assert store.check(POOL, KEY, consume(store), raw("a2", 2), QUEUE).verdict == "parked"
    # Then the key comes back as a1, a2, a3
    BackoffStore(store).release_due(QUEUE)
    assert queue_ids(store) == ["a1", "a2", "a3"]


def test_through_a_publisher_the_key_stays_scheduled_until_its_messages_are_sent(
        store: DeadLetterStore) -> None:
    sent: list[str] = []
    failing = {"on": True}

    def publish(message: str) -> None:
        if failing["on"]:
            raise ConnectionError("broker gone")
        sent.append(message_summary(message).id)

    backoff = BackoffStore(store)
    set_aside(store, "a0", time.time() - 1, requeue=ThroughOutbox(publish))
    store.check(POOL, KEY, "a1", raw("a1", 1), QUEUE, requeue=ThroughOutbox(publish))
    # When the first release cannot publish (a crash or a broker outage between the two)
    with pytest.raises(ConnectionError):
        backoff.release_due(QUEUE, requeue=ThroughOutbox(publish))
    assert backoff.summary(QUEUE).count == 1
    # Then the next pass sends them, in order, once, and unschedules the key
    failing["on"] = False
    backoff.release_due(QUEUE, requeue=ThroughOutbox(publish))
    assert sent == ["a0", "a1"] and backoff.summary(QUEUE).count == 0
    backoff.release_due(QUEUE, requeue=ThroughOutbox(publish))
    assert sent == ["a0", "a1"]


def test_the_gate_drops_an_older_delivery_of_a_message_whose_copy_was_released() -> None:
    record = AttemptRecord(1, 0.0, token="t1").to_json()

    def message(headers: dict[str, Any]) -> Any:
        return SimpleNamespace(headers=headers)

    stale = Parking._stale
    assert stale(message({"id": "a0"}), record, True)
    assert stale(message({"id": "a0", BACKOFF_HEADER: "t0"}), record, True)
    assert not stale(message({"id": "a0", BACKOFF_HEADER: "t1"}), record, True)
    assert not stale(message({"id": "a0"}), record, False)  # not released: the script decides
    assert not stale(message({"id": "a0"}), AttemptRecord(1, 0.0).to_json(), True)  # held in place
