"""``start_partition_worker`` and the ``partition_worker`` fixture: the real partition threads
in the test process, on a real broker, started and stopped as often as a test suite needs."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

import celery_partitioning as cp
from celery_partitioning.state import redis_keys
from celery_partitioning.store.deadletters import DeadLetterStore
from celery_partitioning.store.lease import Lease
from celery_partitioning.testing import start_partition_worker
from celery_partitioning.worker.inprocess import InProcessWorkerError
from celery_partitioning.worker.runtime import current_worker
from celery_partitioning.worker.stage import Ended, Outcome, Stage

pytestmark = pytest.mark.integration

pytest_plugins = ("pytester",)


def _app(broker: str, store: str, namespace: str, **conf: Any) -> Celery:
    app = Celery(f"inproc{uuid.uuid4().hex[:6]}", broker=broker, backend=store,
                 set_as_current=False)
    app.conf.update({
        "partitioning_pools": {"entity": 4, "global": 1},
        **conf,
    })
    app.conf.update(
        partitioning_redis_url=store,
        partitioning_queue_prefix=f"{namespace}partition",
        broker_transport_options={"global_keyprefix": namespace},
        result_backend_transport_options={"global_keyprefix": namespace},
        partitioning_lease_ttl=2,
    )
    cp.install(app)
    return app


class Shop:
    """Partitioned tasks that record, per key, what ran (in this process: a list)."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.ran: list[tuple[str, int]] = []
        self.threads: dict[tuple[str, int], str] = {}
        lock = threading.Lock()

        @app.task(bind=True, name="shop.step", shared=False, max_retries=2,
                  default_retry_delay=0.05)
        @cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
        def step(task: Any, order_id: str, seq: int, fail: str = "") -> int:
            if fail == "twice" and task.request.retries < 2:
                raise task.retry()   # in place: the next message of the order waits
            if fail == "always":
                raise ValueError(f"poison {order_id} {seq}")
            with lock:
                self.ran.append((order_id, seq))
                self.threads[order_id, seq] = threading.current_thread().name
            return seq

        self.step = step

    def of(self, order: str) -> list[int]:
        return [seq for o, seq in self.ran if o == order]


@pytest.fixture
def shop(redis_url: str, namespace: str) -> Iterator[Shop]:
    yield Shop(_app(redis_url, redis_url, namespace))


def test_per_key_order_and_in_place_retries_hold_in_process(shop: Shop,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    # Given the app's partition workers running in this process
    caplog.set_level(logging.INFO, logger="celery_partitioning.worker")
    with start_partition_worker(shop.app) as worker:
        # each partition's start-up line names its gates for people
        consuming = [r.getMessage() for r in caplog.records if " via redis (" in r.getMessage()]
        assert len(consuming) == 5
        assert all(line.endswith("stages: pause, resize gate, misroute guard, parking gate, "
                                 "retry, ETA hold, dead letter)")
                   for line in consuming)
        assert worker.runtime is not None and len(worker.runtime.partitions) == 5
        # When two orders publish interleaved, and one message of each retries twice
        results = [shop.step.delay(order, seq, "twice" if seq == 1 else "")
                   for seq in range(4) for order in ("o1", "o2")]
        # Then every message ran, and each order's in publish order: the retries held their place
        assert [r.get(timeout=20) for r in results] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert shop.of("o1") == [0, 1, 2, 3] and shop.of("o2") == [0, 1, 2, 3]
    assert set(shop.threads.values()) <= {f"partition-entity.{i}" for i in range(4)}


def test_a_poison_message_is_dead_lettered_and_parks_its_key_others_go_on(shop: Shop) -> None:
    app = shop.app
    store = DeadLetterStore(redis.Redis.from_url(app.conf.partitioning_redis_url), redis_keys(app))
    other = next(f"x{i}" for i in range(100) if cp.explain_route(app, "shop.step", f"x{i}", 0).index
                 == cp.explain_route(app, "shop.step", "bad", 0).index)
    with start_partition_worker(shop.app, pools="entity"):
        failed = shop.step.delay("bad", 0, "always")
        later = shop.step.delay("bad", 1)
        neighbour = shop.step.delay(other, 0)  # same partition, another key
        assert neighbour.get(timeout=20) == 0
        with pytest.raises(ValueError, match="poison bad 0"):
            failed.get(timeout=20)
        # the failure was for good (no retry asked): a dead letter, and the key parked with
        # its later message set aside behind it
        view = _wait(lambda: _parked_view(store, 1))
        assert view.dead_letter.id == failed.id and view.dead_letter.error.startswith("ValueError")
        assert [m.id for m in view.parked] == [later.id]
    assert shop.of("bad") == [] and shop.of(other) == [0]


def test_a_dead_letter_that_cannot_be_stored_keeps_its_message_and_fails_the_block(
        shop: Shop, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a store that refuses dead letters (where a worker process would exit at once,
    # inside Celery's tracer, without acking)
    app = shop.app
    store = DeadLetterStore(redis.Redis.from_url(app.conf.partitioning_redis_url), redis_keys(app))

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise redis.ConnectionError("store down")

    monkeypatch.setattr(DeadLetterStore, "dead_letter", refuse)
    index = cp.explain_route(app, "shop.step", "bad", 0).index
    with (pytest.raises(InProcessWorkerError),
          start_partition_worker(app, pools="entity") as worker):
        failed = shop.step.delay("bad", 0, "always")
        thread = worker.threads[index]
        thread.join(20)  # the partition stops; the test process goes on
        assert not thread.is_alive()
    # When the store works again, the next start recovers the message (it was not acked)
    monkeypatch.undo()
    with start_partition_worker(app, pools="entity"):
        view = _wait(lambda: _parked_view(store, 0))
    assert view.dead_letter.id == failed.id


def _wait(probe: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


def _parked_view(store: DeadLetterStore, count: int) -> Any:
    view = store.get("entity", "Order:bad")
    return view if view is not None and len(view.parked) == count else None


def test_a_misrouted_message_moves_to_its_partition_and_runs_there(shop: Shop, redis_url: str,
                                                                  namespace: str) -> None:
    # Given a producer that believes the pool has 2 partitions (the worker's app: 4)
    producer = Shop(_app(redis_url, redis_url, namespace, partitioning_pools={"entity": 2}))
    right = {o: cp.explain_route(shop.app, "shop.step", o, 0).index for o in ("o1", "o2", "o3")}
    wrong = {o: cp.explain_route(producer.app, "shop.step", o, 0).index for o in right}
    order = next(o for o in right if right[o] != wrong[o])
    with start_partition_worker(shop.app, pools="entity"):
        # When it publishes a key to the partition its own count gives
        assert producer.step.delay(order, 0).get(timeout=20) == 0
    # Then the misroute guard moved it: it ran on the partition the key maps to
    assert shop.threads[order, 0] == f"partition-entity.{right[order]}"


def test_a_producer_with_another_partition_count_is_logged_once_per_count(
        shop: Shop, redis_url: str, namespace: str, caplog: pytest.LogCaptureFixture) -> None:
    # Given a producer that believes the pool has 3 partitions (the worker's app: 4)
    producer = Shop(_app(redis_url, redis_url, namespace, partitioning_pools={"entity": 3}))
    with caplog.at_level(logging.WARNING, logger="celery_partitioning.worker"), \
            start_partition_worker(shop.app, pools="entity"):
        # When it publishes several messages, to several keys (misrouted or not)
        for seq, order in enumerate(["o1", "o2", "o3", "o4", "o5", "o1"]):
            assert producer.step.delay(order, seq).get(timeout=20) == seq
        # and a producer with the worker's own count publishes too
        assert shop.step.delay("o1", 9).get(timeout=20) == 9
    # Then the worker said so once, naming both counts; nothing for the right count
    lines = [r.getMessage() for r in caplog.records if "a producer routes pool" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "routes pool 'entity' with 3 partition(s), this worker with 4" in lines[0]


def test_it_starts_twice_and_leaves_nothing_behind(shop: Shop, redis_url: str) -> None:
    app = shop.app
    task = app.tasks["shop.step"]
    run_before = task.run
    client = redis.Redis.from_url(redis_url)
    for round_ in range(2):
        started = time.monotonic()
        with start_partition_worker(app, pools=["entity"]) as worker:
            assert current_worker(app) is worker.runtime
            assert shop.step.delay("o1", round_).get(timeout=20) == round_
            leases = [p.lease.key for p in worker.runtime.partitions if p.lease is not None]
            assert len(leases) == 4 and all(client.exists(key) for key in leases)
        took = time.monotonic() - started
        print(f"round {round_}: start, one task, warm stop in {took:.2f}s")
        assert took < 5, "a partitioned task end to end in-process: well under 5 s (about 0.3 s)"
        # nothing left: threads joined, leases released, tasks as they were, runtime detached
        assert not [t for t in threading.enumerate() if t.name.startswith("partition")]
        assert not any(client.exists(key) for key in leases)
        assert current_worker(app) is None
        assert task.run == run_before and "retry" not in vars(task)
        assert "__trace__" not in vars(task) and "acks_late" not in vars(task)
    assert shop.of("o1") == [0, 1]


def test_a_lease_held_elsewhere_fails_the_start_and_names_its_holder(shop: Shop,
                                                                     redis_url: str) -> None:
    app = shop.app
    queue = app.conf.partitioning_queue_prefix + ".global.0"
    other = Lease(redis.Redis.from_url(redis_url), redis_keys(app).lease(queue), 30,
                  node="other-worker@elsewhere")
    assert other.try_acquire()
    try:
        with (pytest.raises(InProcessWorkerError, match=r"global\.0 does not consume.*other-worker"),
              start_partition_worker(app, start_timeout=1.0)):
            pass  # pragma: no cover - not reached
    finally:
        other.release()
    assert not [t for t in threading.enumerate() if t.name.startswith("partition")]
    assert current_worker(app) is None


def test_after_hooks_run_just_before_the_ack_with_how_the_message_ended(shop: Shop) -> None:
    app = shop.app
    seen: list[tuple[str, Ended, int]] = []
    with start_partition_worker(app, pools="entity") as worker:
        assert worker.runtime is not None
        partition = worker.runtime.partitions[cp.explain_route(app, "shop.step", "o7", 0).index]
        assert partition.broker is not None
        client, in_transit = partition.broker.client, partition.keys.in_transit(partition.queue)

        class Spy(Stage):
            name = "spy"

            def after(self, msg: Any, outcome: Outcome) -> None:
                # the message still waits in the in-transit list: not acked yet
                seen.append((msg.task_id, outcome.ended, int(client.llen(in_transit))))

        partition.pipeline.stages.append(Spy())
        # Given a message that retries twice in place, one that fails for good (its key is
        # parked), and one that the parking gate then sets aside
        ok, poison, behind = (shop.step.delay("o7", 0, "twice"), shop.step.delay("o7", 1, "always"),
                              shop.step.delay("o7", 2))
        assert ok.get(timeout=20) == 0
        _wait(lambda: len(seen) == 2 and client.llen(in_transit) == 0)
        queue = partition.broker.queue_list(partition.queue)
        _wait(lambda: client.llen(queue) == 0 and client.llen(in_transit) == 0)  # gate took it
    # Then the after hooks saw each message that ran once, unacked, with how it ended
    assert seen == [(ok.id, Ended.SUCCEEDED, 1), (poison.id, Ended.FAILED, 1)]
    assert behind.state == "PENDING"


def test_a_partition_that_fails_stops_keeps_its_message_and_fails_the_block(shop: Shop) -> None:
    app = shop.app
    with (pytest.raises(InProcessWorkerError, match="stage broken failed") as failure,
          start_partition_worker(app, pools="entity") as worker):
        assert worker.runtime is not None
        index = cp.explain_route(app, "shop.step", "o9", 0).index

        class Broken(Stage):
            name = "broken"

            def before(self, msg: Any) -> Any:
                raise RuntimeError("a gate bug")

        worker.runtime.partitions[index].pipeline.stages.insert(0, Broken())
        shop.step.delay("o9", 0)
        thread = worker.threads[index]
        thread.join(20)  # where a worker process would exit: the partition thread ends
        assert not thread.is_alive()
    assert "partition thread failed" not in str(failure.value)  # one failure, said once
    # The process goes on; the message was not acked: the next start recovers and runs it
    with start_partition_worker(app, pools="entity"):
        _wait(lambda: shop.of("o9") == [0])


@pytest.mark.rabbitmq
def test_per_key_order_in_process_on_rabbitmq(amqp_url: str, redis_url: str,
                                              namespace: str) -> None:
    shop = Shop(_app(amqp_url, redis_url, namespace))
    try:
        with start_partition_worker(shop.app, pools="entity") as worker:
            assert worker.runtime is not None and worker.runtime.transport == "amqp"
            results = [shop.step.delay(order, seq, "twice" if seq == 1 else "")
                       for seq in range(3) for order in ("o1", "o2")]
            assert [r.get(timeout=20) for r in results] == [0, 0, 1, 1, 2, 2]
    finally:
        with shop.app.connection_for_write() as conn:
            for index in range(4):
                conn.default_channel.queue_delete(f"{namespace}partition.entity.{index}")
    assert shop.of("o1") == [0, 1, 2] and shop.of("o2") == [0, 1, 2]


TASKS = '''
import threading

from celery import shared_task
import celery_partitioning as cp

ran = []

@shared_task(bind=True, name="own.added")
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def added(self, order_id, seq):
    ran.append((order_id, seq, threading.current_thread().name))
    return seq
'''

CONFTEST = '''
import os
import pytest

@pytest.fixture(scope="session")
def celery_config():
    url = os.environ["REDIS_URL"]
    ns = os.environ["CP_NS"]
    return {"broker_url": url, "result_backend": url,
            "broker_transport_options": {"global_keyprefix": ns},
            "result_backend_transport_options": {"global_keyprefix": ns},
            "partitioning_pools": {"entity": 2, "global": 1},
            "partitioning_redis_url": url, "partitioning_queue_prefix": ns + "partition"}

@pytest.fixture(scope="session")
def celery_includes():
    return ["tasks_mod"]
'''

FIXTURE_TESTS = '''
import os
import uuid

import pytest
from celery import Celery

import celery_partitioning as cp
import tasks_mod


def test_with_celery_app(celery_app, partition_worker):
    # partition_worker runs celery_app (from celery_config; tasks from celery_includes)
    assert partition_worker.app is celery_app
    assert [p.label for p in partition_worker.runtime.partitions] == ["entity.0", "entity.1", "global.0"]
    # celery_app is not the current app: call its own task, not the shared_task proxy
    result = celery_app.tasks["own.added"].delay("o1", 1)
    assert result.get(timeout=10) == 1
    assert tasks_mod.ran[-1][:2] == ("o1", 1) and tasks_mod.ran[-1][2].startswith("partition-entity.")


def own_app():
    url, ns = os.environ["REDIS_URL"], os.environ["CP_NS"]
    app = Celery("own" + uuid.uuid4().hex[:6], broker=url, backend=url, set_as_current=False)
    app.conf.update(partitioning_pools={"entity": 2}, partitioning_redis_url=url,
                    partitioning_queue_prefix=ns + "own",
                    broker_transport_options={"global_keyprefix": ns},
                    result_backend_transport_options={"global_keyprefix": ns})
    cp.install(app)

    @app.task(name="own.double", shared=False)
    @cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
    def double(order_id, n):
        return 2 * n

    return app


@pytest.mark.parametrize("partition_worker_app", [own_app()], indirect=True)
@pytest.mark.parametrize("partition_worker_pools", ["entity"])
def test_with_my_own_app(partition_worker_app, partition_worker):
    assert partition_worker.app is partition_worker_app
    assert partition_worker_app.tasks["own.double"].delay("o2", 21).get(timeout=10) == 42
'''


def test_the_fixture_runs_celery_app_or_the_users_own_app(pytester: pytest.Pytester, redis_url: str,
                                                          namespace: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a project whose tests use Celery's celery_app fixture, and one test with its own app
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CP_NS", namespace)
    pytester.makepyfile(tasks_mod=TASKS, conftest=CONFTEST, test_fixture=FIXTURE_TESTS)
    # When pytest runs them through the installed plugin
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    print(f"two tests with partition_worker, in a fresh pytest: {time.monotonic() - started:.2f}s")
    # Then both ran their task end to end on in-process partition workers
    result.assert_outcomes(passed=2)


def test_a_partition_pause_wakes_an_idle_holder_which_stops_at_once(
        shop: Shop, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_partitioning.cli.pausing import pause_target, resume_target
    from celery_partitioning.store.broker import BROKER_SOCKET_TIMEOUT
    from celery_partitioning.worker import partition as partition_module

    # Given an idle partition whose holder waits in a fetch that only its socket time-out ends
    monkeypatch.setattr(partition_module, "FETCH_TIMEOUT", 60.0)
    patience = BROKER_SOCKET_TIMEOUT - 2  # without a wake the holder looks again after that
    app = shop.app
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with start_partition_worker(app, pools=["global"]) as worker:
        thread = worker.partition("global", 0).thread
        assert thread is not None

        def blocked() -> bool:
            return any(entry.get("name") == thread.fetch_name and entry.get("cmd") == "blmove"
                       for entry in client.client_list(_type="normal"))

        deadline = time.monotonic() + 10
        while not blocked():
            assert time.monotonic() < deadline, "the holder never waited in its fetch"
            time.sleep(0.05)
        # When an operator pauses the partition (the command waits for the holder to stop)
        started = time.monotonic()
        done = pause_target(app, by="test", partition="global.0", wait=patience)
        print(f"the idle holder stopped {time.monotonic() - started:.2f}s after the pause")
        # Then the command woke the fetch: the holder stopped before its fetch could have ended
        assert done.stopped, done
        resume_target(app, by="test", partition="global.0")
    client.close()
