"""``SkipStore`` against a real Redis (no workers): a skip is a replay without the failed message."""

from __future__ import annotations

import pytest

from celery_partitioning.errors import DeadLetterError
from celery_partitioning.message import message_summary
from celery_partitioning.store.deadletters import DeadLetterStore
from celery_partitioning.store.requeue import ThroughOutbox
from celery_partitioning.store.skipping import SkipStore
from tests.test_deadletters_store import POOL, QUEUE, letter, queue_ids, raw

pytestmark = pytest.mark.integration


def test_skip_puts_the_parked_ones_at_the_head_in_order_without_the_failed_one(
    store: DeadLetterStore,
) -> None:
    key = "Order:1"
    store.gate(POOL, key, "m0", raw("m0"), QUEUE)
    store.dead_letter(letter(key, "m0"), QUEUE)
    for task_id in ("m1", "m2"):
        assert store.gate(POOL, key, task_id, raw(task_id), QUEUE) == "parked"
    store.client.lpush(store.keys.broker_queue(QUEUE), raw("new"))  # published later, waiting
    result = SkipStore(store).skip(POOL, key, QUEUE)
    assert result.skipped.id == "m0" and [m.id for m in result.released] == ["m1", "m2"]
    assert queue_ids(store) == ["m1", "m2", "new"]
    assert not store.is_parked(POOL, key)
    # the released ones run (they belong to the replay), then the newer one; the failed one
    # is forgotten
    for task_id in ("m1", "m2"):
        assert store.gate(POOL, key, task_id, raw(task_id), QUEUE) == "run"
        store.finished(POOL, key, task_id, QUEUE)
    assert store.gate(POOL, key, "new", raw("new"), QUEUE) == "run"
    assert store.gate(POOL, key, "m0", raw("m0"), QUEUE) == "run"  # a late copy is not parked
    (event,) = store.history(POOL)
    assert (event["action"], event["skipped"]["id"], event["raw"]) == ("skip", "m0", [raw("m0")])
    with pytest.raises(DeadLetterError, match="it was skipped at"):
        SkipStore(store).skip(POOL, key, QUEUE)
    assert len(store.history(POOL)) == 1


def test_through_a_publisher_a_newer_message_waits_behind_the_released_ones(
    store: DeadLetterStore,
) -> None:
    key = "Order:1"
    broker: list[str] = []

    def publish(raw_message: str) -> None:
        broker.append(message_summary(raw_message).id)

    store.dead_letter(letter(key, "m0"), QUEUE, requeue=ThroughOutbox(publish))
    store.gate(POOL, key, "m1", raw("m1"), QUEUE, requeue=ThroughOutbox(publish))
    broker.append("new")
    assert [m.id for m in SkipStore(store).skip(POOL, key, QUEUE, requeue=ThroughOutbox(publish)).released] \
        == ["m1"]
    assert broker == ["new", "m1"]

    def deliver() -> str:
        task_id = broker.pop(0)
        return store.gate(POOL, key, task_id, raw(task_id), QUEUE, requeue=ThroughOutbox(publish))

    assert deliver() == "deferred"
    assert deliver() == "run"
    store.finished(POOL, key, "m1", QUEUE, requeue=ThroughOutbox(publish))
    assert broker == ["new"]
    assert deliver() == "run"


def test_an_interrupted_publishing_skip_is_finished_by_the_next_skip(
    store: DeadLetterStore,
) -> None:
    key = "Order:1"
    store.dead_letter(letter(key, "m0"), QUEUE)
    store.gate(POOL, key, "m1", raw("m1"), QUEUE)
    store.gate(POOL, key, "m2", raw("m2"), QUEUE)

    def broken(raw_message: str) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        SkipStore(store).skip(POOL, key, QUEUE, requeue=ThroughOutbox(broken))
    sent: list[str] = []
    again = SkipStore(store).skip(POOL, key, QUEUE,
                                  requeue=ThroughOutbox(lambda r: sent.append(message_summary(r).id)))
    assert again.skipped.id == "m0" and [m.id for m in again.released] == ["m1", "m2"]
    assert sent == ["m1", "m2"]
    with pytest.raises(DeadLetterError, match="it was skipped at"):
        SkipStore(store).skip(POOL, key, QUEUE, requeue=ThroughOutbox(sent.append))


def test_skip_policy_dead_letters_are_stored_once_listed_and_discarded(
    store: DeadLetterStore,
) -> None:
    import dataclasses

    skips = SkipStore(store)
    failed = dataclasses.replace(letter("Order:1", "m0"), policy="skip")
    assert skips.record(failed) is True
    assert skips.record(failed) is False  # a redelivery after a crash stores it once
    assert not store.is_parked(POOL, "Order:1")
    assert store.gate(POOL, "Order:1", "m1", raw("m1"), QUEUE) == "run"
    assert [v.dead_letter.id for v in skips.find([POOL])] == ["m0"]
    assert skips.find([POOL], "Order:2") == []
    assert [d.id for d in skips.discard([POOL], "Order:1")] == ["m0"]
    assert skips.find([POOL]) == [] and skips.discard([POOL]) == []
    (event,) = store.history(POOL)
    assert (event["action"], event["dead_letter"]["policy"]) == ("discard", "skip")
