"""In-place retry semantics without a broker: the patched task run through Celery's own tracer.

The tracer is what a worker runs for each message (``celery.app.trace.build_tracer``); here it
runs the patched task the way a partition worker would, with no Redis store.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
from celery import Celery, states
from celery.app.trace import build_tracer
from celery.exceptions import MaxRetriesExceededError

import celery_partitioning as cp
from celery_partitioning.state import settings_of
from celery_partitioning.store.keys import RedisKeys
from celery_partitioning.store.requeue import HEAD_PUSH
from celery_partitioning.worker.task_patch import InPlaceRetry, RetryInPlace

KEY = cp.create_entity_partition_key("Order")


def make_app() -> Celery:
    app = Celery("retry_unit", set_as_current=False)
    app.conf.update(partitioning_pools={"entity": 2}, result_backend="cache+memory://")
    cp.install(app)
    return app


def patch(app: Celery) -> tuple[InPlaceRetry, list[float]]:
    waits: list[float] = []
    patcher = InPlaceRetry(app)
    original = patcher._wait_until

    def wait_until(resume_at: float) -> None:
        import time

        waits.append(resume_at - time.time())
        original(resume_at)

    patcher._wait_until = wait_until  # type: ignore[method-assign]
    patcher.patch_all()
    return patcher, waits


def run(app: Celery, name: str, *args: Any) -> tuple[str, Any]:
    task = app.tasks[name]
    tracer = build_tracer(name, task, app=app, eager=False, propagate=False)
    request = {"id": f"id-{name}", "retries": 0, "delivery_info": {}, "is_eager": False,
               "args": args, "kwargs": {}, "partition_key": f"Order:{args[0]}"}
    result = tracer(request["id"], args, {}, request)
    value = getattr(result.retval, "exception", result.retval)  # ExceptionInfo on failure
    return task.backend.get_state(request["id"]), value


def test_self_retry_reruns_the_same_call_in_place_with_the_retry_count() -> None:
    app = make_app()
    seen: list[int] = []

    @app.task(bind=True, name="t.flaky", shared=False)
    @cp.partitioned(KEY, pool="entity")
    def flaky(self: Any, order_id: str) -> str:
        seen.append(self.request.retries)
        if self.request.retries < 2:
            raise self.retry(countdown=0.05, max_retries=3)
        return "done"

    _, waits = patch(app)
    state, value = run(app, "t.flaky", "o1")
    assert (state, value, seen) == (states.SUCCESS, "done", [0, 1, 2])
    assert len(waits) == 2 and all(0 < w <= 0.05 for w in waits), waits


def test_exhausted_retries_fail_the_task_with_celerys_error() -> None:
    app = make_app()
    seen: list[int] = []

    @app.task(bind=True, name="t.always", shared=False, max_retries=2, default_retry_delay=0.01)
    @cp.partitioned(KEY, pool="entity")
    def always(self: Any, order_id: str) -> None:
        seen.append(self.request.retries)
        raise self.retry()

    patch(app)
    state, value = run(app, "t.always", "o1")
    assert state == states.FAILURE and isinstance(value, MaxRetriesExceededError)
    assert seen == [0, 1, 2]


def test_retry_with_exc_reraises_that_exception_when_exhausted() -> None:
    app = make_app()

    @app.task(bind=True, name="t.exc", shared=False, max_retries=1)
    @cp.partitioned(KEY, pool="entity")
    def exc_task(self: Any, order_id: str) -> None:
        raise self.retry(exc=KeyError("gone"), countdown=0.01)

    patch(app)
    state, value = run(app, "t.exc", "o1")
    assert state == states.FAILURE and isinstance(value, KeyError)


def test_autoretry_for_uses_the_in_place_retry_with_its_backoff() -> None:
    app = make_app()
    seen: list[int] = []

    @app.task(bind=True, name="t.auto", shared=False, autoretry_for=(ConnectionError,),
              max_retries=3, retry_backoff=0.05, retry_jitter=False, retry_backoff_max=1)
    @cp.partitioned(KEY, pool="entity")
    def auto(self: Any, order_id: str) -> int:
        seen.append(self.request.retries)
        if len(seen) < 3:
            raise ConnectionError("flaky")
        return len(seen)

    patch(app)
    assert run(app, "t.auto", "o1") == (states.SUCCESS, 3)
    assert seen == [0, 1, 2]


def test_retry_with_new_arguments_runs_them() -> None:
    app = make_app()
    seen: list[tuple[str, int]] = []

    @app.task(bind=True, name="t.args", shared=False)
    @cp.partitioned(KEY, pool="entity")
    def with_args(self: Any, order_id: str, step: int = 0) -> int:
        seen.append((order_id, step))
        if step < 2:
            raise self.retry(args=(order_id, step + 1), countdown=0)
        return step

    patch(app)
    assert run(app, "t.args", "o1") == (states.SUCCESS, 2)
    assert seen == [("o1", 0), ("o1", 1), ("o1", 2)]


def test_only_partitioned_tasks_are_patched_and_eager_calls_keep_celerys_behaviour() -> None:
    app = make_app()

    @app.task(bind=True, name="t.plain", shared=False)
    def plain(self: Any) -> None: ...

    @app.task(bind=True, name="t.part", shared=False, max_retries=0)
    @cp.partitioned(KEY, pool="entity")
    def part(self: Any, order_id: str) -> None:
        raise self.retry(exc=ValueError("eager"), countdown=0)

    patcher, _ = patch(app)
    assert patcher.patch_all() == 0  # idempotent
    assert "retry" not in vars(app.tasks["t.plain"])
    assert "retry" in vars(app.tasks["t.part"])
    with pytest.raises(ValueError, match="eager"):
        app.tasks["t.part"].apply(("o1",), throw=True).get()


def test_the_internal_signal_is_a_celery_retry() -> None:
    from celery.exceptions import Retry

    signal = RetryInPlace(1.5, ValueError("x"), (), {})
    assert isinstance(signal, Retry) and signal.delay == 1.5




def test_an_in_place_retry_is_recorded_as_celery_records_a_retry() -> None:
    from celery import signals

    app = make_app()
    hooks: list[str] = []

    class Base(app.Task):  # type: ignore[name-defined,misc]
        def on_retry(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            hooks.append(f"on_retry {type(exc).__name__} {task_id}")

    @app.task(bind=True, base=Base, name="t.hooked", shared=False)
    @cp.partitioned(KEY, pool="entity")
    def hooked(self: Any, order_id: str) -> None:
        if not self.request.retries:
            raise self.retry(exc=OSError("once"), countdown=0)

    def on_signal(sender: Any = None, reason: Any = None, **_: Any) -> None:
        hooks.append(f"task_retry {sender.name} {type(reason).__name__}")

    signals.task_retry.connect(on_signal, weak=False)
    try:
        patch(app)
        assert run(app, "t.hooked", "o1")[0] == states.SUCCESS
    finally:
        signals.task_retry.disconnect(on_signal)
    assert hooks == ["on_retry OSError id-t.hooked", "task_retry t.hooked RetryInPlace"]


def test_retry_without_throw_lets_the_run_finish_then_retries_in_place() -> None:
    app = make_app()
    seen: list[str] = []

    @app.task(bind=True, name="t.nothrow", shared=False)
    @cp.partitioned(KEY, pool="entity")
    def nothrow(self: Any, order_id: str) -> int:
        if not self.request.retries:
            self.retry(countdown=0, throw=False)
            seen.append("after retry()")
        seen.append(f"return {self.request.retries}")
        return int(self.request.retries)

    patch(app)
    assert run(app, "t.nothrow", "o1") == (states.SUCCESS, 1)
    assert seen == ["after retry()", "return 0", "return 1"]


class _RecordingRedis:
    """Stands in for the Redis client: records every call (the attempt record is absent)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def get(self, name: str) -> None:
        self.calls.append(f"get {name}")

    def set(self, name: str, value: str, ex: int | None = None) -> None:
        self.calls.append(f"set {name}")

    def delete(self, name: str) -> None:
        self.calls.append(f"delete {name}")


class _RecordingStore:
    def __init__(self) -> None:
        self.finished: list[str] = []

    def finished_call(self, pool: str, key: str, task_id: str, queue: str, **_: Any) -> None:
        self.finished.append(task_id)


def _delivery(task_id: str, name: str, headers: dict[str, Any]) -> Any:
    """A received message as the partition thread wraps it (kombu's Redis payload in ``_raw``)."""
    from celery_partitioning.message import PartitionMessage

    headers = {"id": task_id, "task": name, **headers}
    return PartitionMessage(types.SimpleNamespace(
        headers=headers, _raw={"headers": headers, "body": "", "properties": {}}), name)


def test_the_happy_path_costs_no_redis_call_after_the_gate() -> None:
    # Given a partition whose parking and retry stages work on stores that record what they
    # are told: a run without retry makes no Redis call after the gate's own; a retried one
    # writes its record and deletes it just before its ack; a replayed one reports its end;
    # one the gate did not read the record of is read by the retry stage.
    from celery_partitioning.store.attempts import AttemptStore
    from celery_partitioning.store.backoff import BackoffStore
    from celery_partitioning.worker.parking import Parking
    from celery_partitioning.worker.retry import Retry
    from celery_partitioning.worker.runtime import PartitionRuntime, bind_thread
    from celery_partitioning.worker.stage import Verdict

    app = make_app()

    @app.task(bind=True, name="t.ok", shared=False)
    @cp.partitioned(KEY, pool="entity")
    def ok(self: Any, order_id: str) -> str:
        return "done"

    @app.task(bind=True, name="t.retried", shared=False)
    @cp.partitioned(KEY, pool="entity")
    def retried(self: Any, order_id: str) -> str:
        if self.request.retries < 1:
            raise self.retry(countdown=0, max_retries=3)
        return "done"

    redis_calls = _RecordingRedis()
    store = _RecordingStore()
    keys = RedisKeys("unit:")
    runtime = PartitionRuntime(app=app, settings=settings_of(app), pool="entity", index=0,
                               queue="q", redis=redis_calls, keys=keys)
    replaying = {"on": False}
    recording: Any = types.SimpleNamespace(
        client=redis_calls, keys=keys, finished=store.finished_call,
        check=lambda *_, **__: types.SimpleNamespace(verdict="run", attempts=None,
                                                     replaying=replaying["on"]))
    runtime.pipeline.stages = [
        Parking(runtime.place, recording, HEAD_PUSH),
        Retry(runtime.place, AttemptStore(redis_calls, keys), BackoffStore(recording), HEAD_PUSH)]
    patcher = InPlaceRetry(app)
    patcher.patch_all()
    record = keys.attempts

    def delivered(name: str, pool: str | None = "entity") -> tuple[str, Any]:
        # what the partition thread does: the before hooks, the task, the after hooks at the ack
        msg = _delivery(f"id-{name}", name, {"partition_key": "Order:o1", "partition_pool": pool})
        assert runtime.pipeline.before(msg) is Verdict.RUN
        outcome = run(app, name, "o1")
        runtime.pipeline.after(msg)
        return outcome

    bind_thread(runtime)
    try:
        assert delivered("t.ok") == (states.SUCCESS, "done")
        assert (redis_calls.calls, store.finished) == ([], [])

        assert delivered("t.retried") == (states.SUCCESS, "done")
        assert redis_calls.calls == [f"set {record('id-t.retried')}",
                                     f"delete {record('id-t.retried')}"]
        assert store.finished == []

        redis_calls.calls.clear()
        replaying["on"] = True
        assert delivered("t.ok") == (states.SUCCESS, "done")
        assert (redis_calls.calls, store.finished) == ([], ["id-t.ok"])

        store.finished.clear()  # not seen by the gate: the retry stage reads the record itself
        assert delivered("t.ok", pool=None) == (states.SUCCESS, "done")
        assert (redis_calls.calls, store.finished) == ([f"get {record('id-t.ok')}"], [])
    finally:
        bind_thread(None)
        patcher.unpatch_all()


def _celery_would_publish(task: Any, request_args: tuple[Any, ...], request_kwargs: dict[str, Any],
                          args: Any, kwargs: Any) -> tuple[Any, Any]:
    """What Celery's own ``Task.retry`` puts on the re-published message (captured, not sent)."""
    captured: list[tuple[Any, Any]] = []

    def signature_from_request(request: Any, new_args: Any, new_kwargs: Any, **_: Any) -> Any:
        captured.append((request.args if new_args is None else new_args,
                         request.kwargs if new_kwargs is None else new_kwargs))
        raise LookupError  # stop before anything is published

    task.signature_from_request = signature_from_request
    task.push_request(id="probe", args=request_args, kwargs=request_kwargs, retries=0,
                      called_directly=False, is_eager=False, delivery_info={})
    try:
        with pytest.raises(LookupError):
            task.retry(args=args, kwargs=kwargs, countdown=0)
    finally:
        task.pop_request()
        del task.signature_from_request
    return captured[0]


MERGE_CASES = [
    # (current args, current kwargs, retry args, retry kwargs, next args, next kwargs)
    (("o1",), {"step": 0}, None, None, ("o1",), {"step": 0}),
    (("o1",), {"step": 0}, ("o2",), None, ("o2",), {"step": 0}),
    (("o1",), {"step": 0}, ("o2", 5), None, ("o2", 5), {}),
    (("o1", 3), {}, None, {"step": 4}, ("o1", 4), {}),
    (("o1",), {}, None, {"step": 4}, ("o1",), {"step": 4}),
    ((), {"order_id": "o1", "step": 1}, ("o2",), None, ("o2",), {"step": 1}),
    (("o1",), {"step": 0}, ("o2",), {"step": 9}, ("o2",), {"step": 9}),
]


@pytest.mark.parametrize(("cur_args", "cur_kwargs", "args", "kwargs", "want_args", "want_kwargs"),
                         MERGE_CASES)
def test_retry_arguments_merge_as_celery_merges_them(
        cur_args: tuple[Any, ...], cur_kwargs: dict[str, Any], args: Any, kwargs: Any,
        want_args: tuple[Any, ...], want_kwargs: dict[str, Any]) -> None:
    from celery_partitioning.worker.task_patch import retry_arguments

    app = make_app()

    @app.task(name="t.merge", shared=False)
    def merge(order_id: str, step: int = 0) -> None:
        pass

    got = retry_arguments(merge.run, cur_args, cur_kwargs, args, kwargs)
    assert (tuple(got[0]), dict(got[1])) == (want_args, want_kwargs)
    # and the installed Celery's own retry publishes the same (it merges since celery/celery#6494)
    task = merge._get_current_object()
    if _celery_would_publish(task, ("o1",), {"step": 0}, ("o2", 5), None)[1] != {}:
        pytest.skip("this Celery predates the argument merge of celery/celery#6494")
    celery_args, celery_kwargs = _celery_would_publish(task, cur_args, cur_kwargs, args, kwargs)
    assert (tuple(celery_args), dict(celery_kwargs)) == (want_args, want_kwargs)


def test_a_retry_with_new_arguments_is_inherited_by_the_next_bare_retry() -> None:
    # Given a task that changes its keyword argument once, then retries bare
    app = make_app()
    seen: list[tuple[str, int]] = []

    @app.task(bind=True, name="t.inherit", shared=False)
    @cp.partitioned(KEY, pool="entity")
    def inherit(self: Any, order_id: str, step: int = 0) -> int:
        seen.append((order_id, step))
        if self.request.retries == 0:
            raise self.retry(kwargs={"step": 7}, countdown=0)
        if self.request.retries == 1:
            raise self.retry(countdown=0)
        return step

    patch(app)
    # Then the bare retry runs with the arguments of the attempt before, as Celery would
    assert run(app, "t.inherit", "o1") == (states.SUCCESS, 7)
    assert seen == [("o1", 0), ("o1", 7), ("o1", 7)]


def test_a_message_resumed_after_a_crash_carries_its_records_count_and_due_time() -> None:
    import json
    import time
    from datetime import datetime

    from celery_partitioning.store.backoff import as_first_delivery, with_token
    from celery_partitioning.worker.retry import Retry

    # Given the original delivery of a task id whose attempt record says retry 2, due in 30 s
    due = time.time() + 30
    record = json.dumps({"retries": 2, "resume_at": due})
    retry = Retry(types.SimpleNamespace(), None, None, HEAD_PUSH)  # type: ignore[arg-type]

    def resumed(retries: int) -> dict[str, Any]:
        msg = _delivery("t1", "t", {"retries": retries, "eta": None})
        msg.attempts, msg.attempts_read = record, True  # as the parking stage read it
        retry.before(msg)
        return dict(msg.headers)

    # When the retry stage sees it: task_prerun will see retry 2, and the ETA hold waits
    # for the due time
    headers = resumed(0)
    assert headers["retries"] == 2
    assert abs(datetime.fromisoformat(headers["eta"]).timestamp() - due) < 0.001
    # And a delivery that carries the count already waits the rest of its backoff too
    headers = resumed(2)
    assert headers["retries"] == 2 and headers["eta"] is not None
    # And a newer delivery than the record is left as it is
    assert resumed(3) == {"id": "t1", "task": "t", "retries": 3, "eta": None}
    # And the copy set aside carries the new count; its dead letter starts afresh
    copy = with_token(json.dumps({"headers": {"id": "t1", "retries": 0}, "body": ""}), "tok", 3)
    assert json.loads(copy)["headers"] == {"id": "t1", "retries": 3, "partition_backoff": "tok"}
    assert json.loads(as_first_delivery(copy))["headers"] == {"id": "t1", "retries": 0}
