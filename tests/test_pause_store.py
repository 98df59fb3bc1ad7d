"""``PauseStore`` against a real Redis (no workers): a paused key's messages are set aside in
order like a parked key's, without a dead letter; resume puts them back ahead of newer ones."""

from __future__ import annotations

import pytest

from celery_partitioning.errors import PauseError
from celery_partitioning.store.backoff import BackoffStore
from celery_partitioning.store.deadletters import DeadLetterStore
from celery_partitioning.store.pausing import PauseStore
from celery_partitioning.store.requeue import ThroughOutbox
from tests.test_deadletters_store import POOL, QUEUE, consume, letter, queue_ids, raw

pytestmark = pytest.mark.integration


def test_a_paused_key_is_set_aside_in_order_and_resume_puts_it_ahead_of_newer_ones(
    store: DeadLetterStore,
) -> None:
    pauses = PauseStore(store)
    key, other = "Order:1", "Order:2"
    pause, new = pauses.pause_key(POOL, key, 0, "alice")
    assert new and pause.by == "alice" and pause.key == key
    again, new = pauses.pause_key(POOL, key, 0, "bob")
    assert not new and again.by == "alice" and again.at == pause.at
    assert [store.gate(POOL, key, m, raw(m), QUEUE) for m in ("m1", "m2")] == ["paused"] * 2
    assert store.gate(POOL, key, "m1", raw("m1"), QUEUE) == "duplicate"  # a redelivery
    assert store.gate(POOL, other, "o1", raw("o1"), QUEUE) == "run"
    assert store.find([POOL]) == []  # no dead letter
    store.client.lpush(store.keys.broker_queue(QUEUE), raw("new"))  # published later, waiting
    done = pauses.resume_key(POOL, key, QUEUE, "carol")
    assert [m.id for m in done.released] == ["m1", "m2"] and done.held_by is None
    assert queue_ids(store) == ["m1", "m2", "new"]
    for task_id in ("m1", "m2"):
        assert store.gate(POOL, key, task_id, raw(task_id), QUEUE) == "run"
        store.finished(POOL, key, task_id, QUEUE)
    assert store.gate(POOL, key, "new", raw("new"), QUEUE) == "run"
    assert [e["action"] for e in pauses.history(POOL)] == ["pause", "resume"]
    with pytest.raises(PauseError, match=r"is not paused: it was resumed at .* by carol"):
        pauses.resume_key(POOL, key, QUEUE, "carol")


def test_a_newer_message_reaching_the_worker_before_the_released_ones_waits_behind_them(
    store: DeadLetterStore,
) -> None:
    pauses = PauseStore(store)
    key = "Order:1"
    pauses.pause_key(POOL, key, 0, "alice")
    store.gate(POOL, key, "m1", raw("m1"), QUEUE)
    pauses.resume_key(POOL, key, QUEUE, "alice")
    # a newer message already fetched before the released one comes back: deferred
    assert store.gate(POOL, key, "new", raw("new"), QUEUE) == "deferred"
    assert consume(store) == "m1" and store.gate(POOL, key, "m1", raw("m1"), QUEUE) == "run"
    store.finished(POOL, key, "m1", QUEUE)
    assert queue_ids(store) == ["new"]  # right behind it


def test_resume_of_a_key_parked_behind_a_dead_letter_leaves_its_messages_parked(
    store: DeadLetterStore,
) -> None:
    pauses = PauseStore(store)
    key = "Order:1"
    store.gate(POOL, key, "m0", raw("m0"), QUEUE)
    store.dead_letter(letter(key, "m0"), QUEUE)
    pauses.pause_key(POOL, key, 0, "alice")
    assert store.gate(POOL, key, "m1", raw("m1"), QUEUE) == "parked"
    done = pauses.resume_key(POOL, key, QUEUE, "alice")
    assert done.released == [] and done.held_by == "a dead letter"
    assert store.is_parked(POOL, key) and queue_ids(store) == []
    assert [m.id for m in store.replay(POOL, key, QUEUE)] == ["m0", "m1"]


def test_a_key_whose_backoff_ends_while_paused_stays_set_aside_until_resume(
    store: DeadLetterStore,
) -> None:
    from celery_partitioning.store.attempts import AttemptRecord

    pauses, backoff = PauseStore(store), BackoffStore(store)
    key = "Order:1"
    backoff.set_aside(POOL, key, "a0", raw("a0"), AttemptRecord(1, 0.0, token="t"), queue=QUEUE)
    pauses.pause_key(POOL, key, 0, "alice")
    backoff.release_due(QUEUE, now=1.0)
    assert queue_ids(store) == []  # the pause holds it
    done = pauses.resume_key(POOL, key, QUEUE, "alice")
    assert [m.id for m in done.released] == ["a0"] and queue_ids(store) == ["a0"]


def test_resume_through_an_outbox_publishes_in_order(store: DeadLetterStore) -> None:
    sent: list[str] = []
    pauses = PauseStore(store)
    key = "Order:1"
    outbox = ThroughOutbox(sent.append)
    pauses.pause_key(POOL, key, 0, "alice")
    for m in ("m1", "m2", "m3"):
        store.gate(POOL, key, m, raw(m), QUEUE, requeue=outbox)
    done = pauses.resume_key(POOL, key, QUEUE, "alice", requeue=outbox)
    assert [m.id for m in done.released] == ["m1", "m2", "m3"] and sent == [
        raw("m1"), raw("m2"), raw("m3")]


def test_a_partition_pause_is_listed_with_the_holder_that_stopped_for_it(
    store: DeadLetterStore,
) -> None:
    pauses = PauseStore(store)
    pause, _ = pauses.pause_partition(POOL, 3, "alice")
    pauses.pause_key(POOL, "Order:9", 1, "bob")
    (part, keyed) = pauses.paused([POOL])
    assert (part.partition, part.key, part.stopped_by) == (3, None, None)
    assert (keyed.key, keyed.by) == ("Order:9", "bob")
    pauses.acknowledge(pause, "w1#entity.3")
    assert pauses.paused([POOL])[0].stopped_by == "w1#entity.3"
    assert pauses.partition_pause(POOL, 3) is not None
    pauses.resume_partition(POOL, 3, "alice")
    assert pauses.partition_pause(POOL, 3) is None
    with pytest.raises(PauseError, match=f"partition {POOL}.3 is not paused: it was resumed"):
        pauses.resume_partition(POOL, 3, "alice")
    # an acknowledgement of an earlier pause is not taken for the next one's
    pauses.acknowledge(pause, "w1#entity.3")
    pauses.pause_partition(POOL, 3, "alice")
    assert pauses.paused([POOL])[0].stopped_by is None


def test_two_senders_of_one_outbox_never_publish_a_message_twice(
    store: DeadLetterStore,
) -> None:
    from celery_partitioning.store.requeue import send_outbox

    outbox = store.keys.replay_outbox(POOL, "Order:1")
    store.client.rpush(outbox, raw("m1"), raw("m2"), raw("m3"))
    first: list[str] = []
    second: list[str] = []

    def slow_first(message: str) -> None:
        first.append(message)
        if len(first) == 1:
            # while the first sender is at it, the scripts append one more and a second
            # sender (the partition thread seeing the key's message) flushes too
            store.client.rpush(outbox, raw("m4"))
            assert send_outbox(store.client, outbox, second.append) == 0

    assert send_outbox(store.client, outbox, slow_first) == 4
    assert first == [raw(m) for m in ("m1", "m2", "m3", "m4")] and second == []
    assert store.client.llen(outbox) == 0
    # the claim is let go: the next sender sends what comes next
    store.client.rpush(outbox, raw("m5"))
    assert send_outbox(store.client, outbox, second.append) == 1 and second == [raw("m5")]
