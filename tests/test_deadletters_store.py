"""The dead-letter store against a real Redis (no workers): parking, idempotency, replay order.

The worker's gate and the operator's replay meet in these scripts; here each race the
worker can produce is played step by step.
"""

from __future__ import annotations

import json

import pytest

from celery_partitioning.errors import DeadLetterError
from celery_partitioning.message import message_summary
from celery_partitioning.store.deadletters import DeadLetter, DeadLetterStore, GateResult, now_iso
from celery_partitioning.store.keys import key_digest
from celery_partitioning.store.requeue import ThroughOutbox

pytestmark = pytest.mark.integration

POOL, QUEUE = "entity", "partition.entity.0"


def raw(task_id: str, seq: int = 0) -> str:
    return json.dumps({"body": "", "headers": {"id": task_id, "task": "t.step",
                                               "argsrepr": f"({seq},)", "kwargsrepr": "{}"},
                       "properties": {"correlation_id": task_id, "delivery_tag": task_id}})


def letter(key: str, task_id: str) -> DeadLetter:
    return DeadLetter(pool=POOL, key=key, task="t.step", id=task_id, args="(0,)", kwargs="{}",
                      error="ValueError: bad", traceback="Traceback ...", attempts=1,
                      failed_at=now_iso(), raw=raw(task_id))


def queue_ids(store: DeadLetterStore) -> list[str]:
    """The queue from its head (BRPOP end) to its tail."""
    items = store.client.lrange(store.keys.broker_queue(QUEUE), 0, -1)
    return [message_summary(m).id for m in reversed(items)]


def consume(store: DeadLetterStore) -> str:
    item = store.client.rpop(store.keys.broker_queue(QUEUE))
    assert item is not None
    return message_summary(item).id


def test_a_parked_key_sets_messages_aside_in_order_and_only_once(store: DeadLetterStore) -> None:
    key = "Order:1"
    assert store.gate(POOL, key, "m0", raw("m0"), QUEUE) == "run"
    assert store.dead_letter(letter(key, "m0"), QUEUE) is True
    assert store.gate(POOL, "Order:2", "x", raw("x"), QUEUE) == "run"  # other keys go on
    assert [store.gate(POOL, key, i, raw(i), QUEUE) for i in ("m1", "m2")] == ["parked"] * 2
    # a crash between "stored" and "acked" re-delivers: recognized, not stored twice
    assert store.gate(POOL, key, "m1", raw("m1"), QUEUE) == "duplicate"
    assert store.gate(POOL, key, "m0", raw("m0"), QUEUE) == "duplicate"
    view = store.get(POOL, key)
    assert view is not None and [p.id for p in view.parked] == ["m1", "m2"]
    assert store.is_parked(POOL, key) and not store.is_parked(POOL, "Order:2")


def test_replay_puts_them_at_the_head_in_order_ahead_of_newer_messages(store: DeadLetterStore) -> None:
    key = "Order:1"
    store.gate(POOL, key, "m0", raw("m0"), QUEUE)
    store.dead_letter(letter(key, "m0"), QUEUE)
    store.gate(POOL, key, "m1", raw("m1"), QUEUE)
    store.client.lpush(store.keys.broker_queue(QUEUE), raw("new"))  # published later, waiting
    replayed = store.replay(POOL, key, QUEUE)
    assert [m.id for m in replayed] == ["m0", "m1"]
    assert queue_ids(store) == ["m0", "m1", "new"]
    assert not store.is_parked(POOL, key)
    with pytest.raises(DeadLetterError, match="it was replayed at"):
        store.replay(POOL, key, QUEUE)
    assert queue_ids(store) == ["m0", "m1", "new"]  # nothing changed
    with pytest.raises(DeadLetterError, match="no dead letter for key 'Order:9'"):
        store.replay(POOL, "Order:9", QUEUE)


def test_a_newer_message_in_flight_during_a_replay_is_deferred_behind_it(store: DeadLetterStore) -> None:
    key = "Order:1"
    store.gate(POOL, key, "m0", raw("m0"), QUEUE)
    store.dead_letter(letter(key, "m0"), QUEUE)
    store.gate(POOL, key, "m1", raw("m1"), QUEUE)
    # the worker took "new" off the queue just before the replay landed
    store.replay(POOL, key, QUEUE)
    assert store.gate(POOL, key, "new", raw("new"), QUEUE) == "deferred"
    assert consume(store) == "m0" and store.gate(POOL, key, "m0", raw("m0"), QUEUE) == "run"
    # the replayed message comes back after a crash: still recognized as part of the replay
    assert store.gate(POOL, key, "m0", raw("m0"), QUEUE) == "run"
    store.finished(POOL, key, "m0", QUEUE)
    assert consume(store) == "m1" and store.gate(POOL, key, "m1", raw("m1"), QUEUE) == "run"
    assert queue_ids(store) == []
    store.finished(POOL, key, "m1", QUEUE)  # the last one: the deferred message goes next
    assert queue_ids(store) == ["new"]
    assert consume(store) == "new" and store.gate(POOL, key, "new", raw("new"), QUEUE) == "run"
    store.finished(POOL, key, "new", QUEUE)
    assert store.gate(POOL, key, "later", raw("later"), QUEUE) == "run"


def test_the_gate_tells_a_running_message_its_attempt_record_and_whether_it_is_replayed(
        store: DeadLetterStore) -> None:
    # What the worker needs to skip Redis on the happy path: the record only if there is one,
    # ``finished`` only for a message of a replay (or one deferred behind it).
    key = "Order:1"
    assert store.check(POOL, key, "m0", raw("m0"), QUEUE) == GateResult("run", None, False)
    store.client.set(store.keys.attempts("m0"), '{"retries": 2, "resume_at": 1.5}')
    assert store.check(POOL, key, "m0", raw("m0"), QUEUE) == GateResult(
        "run", '{"retries": 2, "resume_at": 1.5}', False)
    store.dead_letter(letter(key, "m0"), QUEUE)
    assert store.check(POOL, key, "m1", raw("m1"), QUEUE) == GateResult("parked")
    store.replay(POOL, key, QUEUE)  # also resets m0's attempt record
    assert store.check(POOL, key, "new", raw("new"), QUEUE) == GateResult("deferred")
    assert consume(store) == "m0"
    assert store.check(POOL, key, "m0", raw("m0"), QUEUE) == GateResult("run", None, True)
    store.finished(POOL, key, "m0", QUEUE)
    assert consume(store) == "m1"
    assert store.check(POOL, key, "m1", raw("m1"), QUEUE) == GateResult("run", None, True)
    store.finished(POOL, key, "m1", QUEUE)
    assert consume(store) == "new"
    assert store.check(POOL, key, "new", raw("new"), QUEUE) == GateResult("run", None, True)
    store.finished(POOL, key, "new", QUEUE)
    assert store.check(POOL, key, "later", raw("later"), QUEUE) == GateResult("run", None, False)


def test_a_replay_that_fails_again_parks_the_rest_in_their_original_order(store: DeadLetterStore) -> None:
    key = "Order:1"
    store.gate(POOL, key, "m0", raw("m0"), QUEUE)
    store.dead_letter(letter(key, "m0"), QUEUE)
    store.gate(POOL, key, "m1", raw("m1"), QUEUE)
    store.replay(POOL, key, QUEUE)
    assert store.gate(POOL, key, "new", raw("new"), QUEUE) == "deferred"
    assert consume(store) == "m0" and store.gate(POOL, key, "m0", raw("m0"), QUEUE) == "run"
    assert store.dead_letter(letter(key, "m0"), QUEUE) is True  # still broken
    assert consume(store) == "m1" and store.gate(POOL, key, "m1", raw("m1"), QUEUE) == "parked"
    view = store.get(POOL, key)
    assert view is not None and [p.id for p in view.parked] == ["m1", "new"]
    assert view.dead_letter.id == "m0"


def test_discard_keeps_a_record_of_what_was_dropped(store: DeadLetterStore) -> None:
    key = "Order:1"
    store.dead_letter(letter(key, "m0"), QUEUE)
    store.gate(POOL, key, "m1", raw("m1"), QUEUE)
    dropped = store.discard(POOL, key)
    assert [m.id for m in dropped] == ["m0", "m1"] and not store.is_parked(POOL, key)
    (event,) = store.history(POOL)
    assert event["action"] == "discard" and event["key"] == key and event["at"]
    assert [m["id"] for m in event["messages"]] == ["m0", "m1"]
    assert store.gate(POOL, key, "m2", raw("m2"), QUEUE) == "run"
    with pytest.raises(DeadLetterError, match="it was discarded at"):
        store.discard(POOL, key)


def test_key_text_never_appears_in_redis_key_names(store: DeadLetterStore) -> None:
    nasty = "Order:*\n cp:dl:entity \x00" + "x" * 5000
    store.dead_letter(letter(nasty, "m0"), QUEUE)
    store.gate(POOL, nasty, "m1", raw("m1"), QUEUE)
    names = [n.decode() for n in store.client.scan_iter(match=f"{store.keys.namespace}*")]
    assert names and all(len(n) < 120 and "\n" not in n and "*" not in n for n in names)
    digest = key_digest(nasty)
    assert store.keys.parked(POOL, nasty).endswith(digest)
    view = store.get(POOL, nasty)
    assert view is not None and view.dead_letter.key == nasty
    assert store.get(POOL, "Order:*") is None


def test_through_a_publisher_a_replay_goes_to_the_back_and_newer_messages_wait(
    store: DeadLetterStore,
) -> None:
    # A broker queue we can only append to (RabbitMQ): the replayed messages land behind
    # "new", which was published while the key was parked but not consumed yet.
    key = "Order:1"
    broker: list[str] = []

    def publish(raw_message: str) -> None:
        broker.append(message_summary(raw_message).id)

    store.gate(POOL, key, "m0", raw("m0"), QUEUE, requeue=ThroughOutbox(publish))
    store.dead_letter(letter(key, "m0"), QUEUE, requeue=ThroughOutbox(publish))
    store.gate(POOL, key, "m1", raw("m1"), QUEUE, requeue=ThroughOutbox(publish))
    broker.append("new")
    assert [m.id for m in store.replay(POOL, key, QUEUE, requeue=ThroughOutbox(publish))] == ["m0", "m1"]
    assert broker == ["new", "m0", "m1"]

    def deliver() -> str:
        task_id = broker.pop(0)
        return store.gate(POOL, key, task_id, raw(task_id), QUEUE, requeue=ThroughOutbox(publish))

    assert deliver() == "deferred"  # "new" must not overtake the replay
    assert deliver() == "run"
    store.finished(POOL, key, "m0", QUEUE, requeue=ThroughOutbox(publish))
    assert deliver() == "run"
    store.finished(POOL, key, "m1", QUEUE, requeue=ThroughOutbox(publish))
    assert broker == ["new"]  # published again, behind the replay
    assert deliver() == "run"
    store.finished(POOL, key, "new", QUEUE, requeue=ThroughOutbox(publish))
    assert store.client.llen(store.keys.replay_outbox(POOL, key)) == 0


def test_an_interrupted_publishing_replay_is_finished_by_the_next_replay(
    store: DeadLetterStore,
) -> None:
    key = "Order:1"
    store.dead_letter(letter(key, "m0"), QUEUE)
    store.gate(POOL, key, "m1", raw("m1"), QUEUE)
    sent: list[str] = []

    def broken(raw_message: str) -> None:
        raise ConnectionError("broker down")

    with pytest.raises(ConnectionError):
        store.replay(POOL, key, QUEUE, requeue=ThroughOutbox(broken))
    # nothing is lost: the messages wait in the outbox; replaying again sends them
    assert [m.id for m in store.replay(POOL, key, QUEUE,
                                       requeue=ThroughOutbox(lambda r: sent.append(message_summary(r).id)))] \
        == ["m0", "m1"]
    assert sent == ["m0", "m1"]
    with pytest.raises(DeadLetterError, match="it was replayed at"):
        store.replay(POOL, key, QUEUE, requeue=ThroughOutbox(sent.append))
