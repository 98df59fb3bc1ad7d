"""The resize store against a real Redis (no workers): hold, move, release, finish, step by step.

The worker tests (test_worker_resize.py) show the whole resize with real processes; here each
script decision, and each race a SIGKILL can produce, is played one call at a time.
"""

from __future__ import annotations

import json

import pytest
import redis

from celery_partitioning import partition_for
from celery_partitioning.message import raw_message_id
from celery_partitioning.store.keys import RedisKeys
from celery_partitioning.store.requeue import ThroughOutbox
from celery_partitioning.store.resize import RELEASING, ResizeStore

pytestmark = pytest.mark.integration

POOL = "p"


@pytest.fixture
def store(store_redis: redis.Redis, namespace: str) -> ResizeStore:
    return ResizeStore(store_redis, RedisKeys(namespace), "partition")


def raw(task_id: str) -> str:
    return json.dumps({"body": "", "headers": {"id": task_id, "task": "t.step"},
                       "properties": {"correlation_id": task_id}})


def queue(store: ResizeStore, index: int) -> str:
    return f"{store.keys.namespace}queue.{index}"


def head_first(store: ResizeStore, index: int) -> list[str]:
    return [raw_message_id(m) for m in reversed(store.client.lrange(queue(store, index), 0, -1))]


def moved_key(old: int, new: int) -> tuple[str, int, int]:
    for i in range(1000):
        key = f"Order:{i}"
        p, q = partition_for(key, old), partition_for(key, new)
        if p != q:
            return key, p, q
    raise AssertionError("no key moved")


def resize(store: ResizeStore, old: int, new: int) -> None:
    assert store.begin(POOL, old, record=True)[0] == "new"
    outcome, state = store.begin(POOL, new, record=True)
    assert (outcome, state.previous, state.size) == ("started", old, new)


def drain(store: ResizeStore, index: int) -> None:
    """Partition ``index``'s own poll finds its (empty) queue: it is drained."""
    store.poll(POOL, index, queue(store, index), queue(store, index))


def test_a_moved_key_runs_its_old_messages_first_then_the_held_ones(store: ResizeStore) -> None:
    resize(store, 4, 6)
    key, p, q = moved_key(4, 6)

    def gate(task_id: str, action: str, here: int) -> str:
        return store.gate(POOL, key, task_id, raw(task_id), action,  # type: ignore[arg-type]
                          old=p, new=q, mark=None if here >= 4 else here)

    # a new-size message reaches the new partition before the old partition is drained: held
    assert gate("n1", "new", q) == "held"
    # the old partition meets the key's old messages: moved, in order; a redelivery is only acked
    assert gate("o1", "old", p) == "moved"
    assert gate("o2", "old", p) == "moved"
    assert gate("n1", "new", q) == "duplicate"
    assert store.poll(POOL, q, queue(store, q), None) == (True, 0)  # p not drained: nothing yet
    assert store.waiting(POOL, 6) == {q: {p: 1}}
    store.client.lpush(queue(store, q), raw("n2"))  # a newer message queued at q meanwhile
    drain(store, p)
    assert store.poll(POOL, q, queue(store, q), None) == (True, 3)
    assert head_first(store, q) == ["o1", "o2", "n1", "n2"]
    # released messages run at q (even when a crash delivers them again); a later one too
    assert gate("n1", "new", q) == "released"
    assert gate("n1", "new", q) == "released"
    assert gate("n2", "new", q) == "run"
    assert store.waiting(POOL, 6) == {}
    # the resize ends once every old partition is drained
    assert not store.finish(POOL, 4, 6)
    for index in range(4):
        drain(store, index)
    assert store.finish(POOL, 4, 6)
    state = store.state(POOL)
    assert state is not None and not state.in_flight and state.size == 6 and state.finished
    assert gate("n3", "new", q) == "over"


def test_a_stored_message_put_back_by_crash_recovery_holds_the_release_until_acked(
        store: ResizeStore) -> None:
    resize(store, 4, 6)
    key, p, q = moved_key(4, 6)
    assert store.gate(POOL, key, "n1", raw("n1"), "new", old=p, new=q, mark=None) == "held"
    # SIGKILLed after the script, before the ack: n1 is back at the head of q
    store.client.rpush(queue(store, q), raw("n1"))
    drain(store, p)
    assert store.poll(POOL, q, queue(store, q), None) == (True, 0)
    assert store.gate(POOL, key, "n1", raw("n1"), "new", old=p, new=q, mark=None) == "duplicate"
    store.client.rpop(queue(store, q))  # acked
    assert store.poll(POOL, q, queue(store, q), None) == (True, 1)
    assert head_first(store, q) == ["n1"]


def test_a_message_stamped_with_a_third_count_is_held_and_the_resize_does_not_end(
        store: ResizeStore) -> None:
    resize(store, 4, 6)
    key, p, q = moved_key(4, 6)
    assert store.gate(POOL, key, "x1", raw("x1"), "unplaced", old=-1, new=q, mark=None) == "held"
    assert store.gate(POOL, key, "o1", raw("o1"), "old", old=p, new=q, mark=None) == "moved"
    for index in range(4):
        drain(store, index)
    assert store.poll(POOL, q, queue(store, q), None) == (True, 0)
    assert store.waiting(POOL, 6) == {q: {-1: 1}}
    assert not store.finish(POOL, 4, 6)


def test_a_shrink_moves_an_old_partition_without_a_new_one_in_order(store: ResizeStore) -> None:
    resize(store, 6, 3)
    old = 5
    keys = [f"Order:{i}" for i in range(200) if partition_for(f"Order:{i}", 6) == old][:3]
    source = queue(store, old)
    for n, key in enumerate(keys * 2):
        store.client.lpush(source, raw(f"{key}#{n // len(keys)}"))
    while (item := store.client.lindex(source, -1)) is not None:
        key = json.loads(item)["headers"]["id"].split("#")[0]
        assert store.take(POOL, source, old, item, task_id=raw_message_id(item), key=key,
                          new=partition_for(key, 3)) == 1
    assert store.take(POOL, source, old, b"stale", task_id="x", key=keys[0], new=0) == 0
    assert store.take(POOL, source, old, None) == 2
    state = store.state(POOL)
    assert state is not None and old in state.drained
    for index in range(3):
        store.poll(POOL, index, queue(store, index), None)
    for key in keys:
        q = partition_for(key, 3)
        mine = [i for i in head_first(store, q) if i.startswith(f"{key}#")]
        assert mine == [f"{key}#0", f"{key}#1"]


def test_a_second_resize_waits_and_a_worker_of_another_size_is_refused(store: ResizeStore) -> None:
    resize(store, 4, 6)
    assert store.begin(POOL, 8, record=True)[0] == "conflict"
    assert store.begin(POOL, 4, record=False)[0] == "conflict"
    assert store.begin(POOL, 6, record=False)[0] == "same"
    for index in range(4):
        drain(store, index)
    assert store.finish(POOL, 4, 6)
    assert store.begin(POOL, 4, record=False)[0] == "mismatch"
    assert store.begin(POOL, 8, record=True)[0] == "started"


def test_through_a_publisher_the_key_stays_held_until_its_released_messages_are_back(
        store: ResizeStore) -> None:
    resize(store, 4, 6)
    key, p, q = moved_key(4, 6)
    sent: list[str] = []

    def publish(message: str) -> None:
        sent.append(raw_message_id(message))

    def at_q(task_id: str) -> str:
        return store.gate(POOL, key, task_id, raw(task_id), "new", old=p, new=q, mark=None,
                          requeue=ThroughOutbox(publish), here=q)

    assert at_q("n1") == "held"
    assert store.gate(POOL, key, "o1", raw("o1"), "old", old=p, new=q, mark=None) == "moved"
    store.mark_drained(POOL, p)
    assert store.poll(POOL, q, None, None, requeue=ThroughOutbox(publish)) == (True, 2)
    assert sent == ["o1", "n1"]  # to the tail of q, in order
    assert store.waiting(POOL, 6) == {q: {RELEASING: 1}}
    # a newer message that reaches q before the released ones are back is held behind them
    assert at_q("n2") == "held"
    assert at_q("o1") == "released"
    assert at_q("o1") == "released"  # redelivered after a crash: runs again, nothing else moves
    assert sent == ["o1", "n1"]
    assert at_q("n1") == "released"  # the last one back: what was held meanwhile goes now
    assert sent == ["o1", "n1", "n2"]
    assert at_q("n2") == "released"
    assert store.waiting(POOL, 6) == {}
    assert at_q("n3") == "run"
