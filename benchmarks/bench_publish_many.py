"""Batch publishing: ``publish_many`` in batches vs a loop of plain Celery ``apply_async``, same run.

Variants, interleaved round by round on the same broker (so a busy machine's noise hits them
alike), each publishing the same calls (same argument shapes):

* ``apply_async (plain Celery)``  - a plain Celery app (partitioning not installed), one
  ``apply_async`` per call: the baseline;
* ``apply_async (partitioned)``   - the partitioned task of an installed app, one call each;
* ``publish_many``                - the partitioned task, ``publish_many`` of batches of
  ``BENCH_MANY_BATCH`` signatures (signature building included in the time).

Then the cost per message of ``publish_many`` is broken down (Redis only) by timing its
parts alone over the same calls: building the signatures, routing (the app's Celery
router, which runs ``PartitionRouter``), composing Celery's task message and serializing it,
kombu's envelope, the broker round trip and the ``AsyncResult``s, against the
pipelined-``LPUSH`` limit: the same final bytes pushed with a bare redis-py pipeline.

    python -m benchmarks.bench_publish_many
    BENCH_MANY_MESSAGES=2000 BENCH_MANY_BATCH=500 BENCH_MANY_ROUNDS=15 BENCH_MANY_EVENT=1
    BENCH_MANY_AMQP=amqp://guest:guest@127.0.0.1:5672//   # also on RabbitMQ ("" to skip)

``BENCH_MANY_EVENT=1`` (default) passes a demo-sized event dict (~1 KB message) as in the
example shop; ``0`` the small arguments of ``bench_publish``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

import celery_partitioning
from benchmarks.common import Table, env_int, interleaved, machine, namespace_for, redis_url
from celery_partitioning import create_entity_partition_key, partitioned, publish_many

__all__ = ["run", "main"]

#: A stored event of the example shop (OrderSubmitted-sized).
EVENT: dict[str, Any] = {
    "type": "ItemAdded", "order_id": "ord-00042", "customer_id": "cust-007",
    "correlation_id": "corr-3f2a9c", "sku": "sku-017", "qty": 2, "price_cents": 4375,
    "day": "2026-11-25", "position": 123456,
    "lines": [{"sku": "sku-017", "qty": 2, "price_cents": 4375},
              {"sku": "sku-003", "qty": 1, "price_cents": 1299}],
}


def _conf(app: Celery, url: str, namespace: str) -> None:
    if url.startswith("redis"):
        app.conf.broker_transport_options = {"global_keyprefix": namespace}
    app.conf.task_default_queue = f"{namespace}bench.plain"
    app.conf.broker_connection_retry_on_startup = False


def make_apps(url: str, namespace: str) -> tuple[Celery, Celery]:
    plain = Celery("bench-many-plain", broker=url, set_as_current=False)
    _conf(plain, url, namespace)

    @plain.task(name="bench.many.plain", shared=False)
    def plain_item_added(order_id: str, sku: str, qty: int = 1, event: Any = None) -> None:
        return None

    part = Celery("bench-many-part", broker=url, set_as_current=False)
    _conf(part, url, namespace)
    part.conf.partitioning_pools = {"entity": 8}
    part.conf.partitioning_queue_prefix = f"{namespace}partition"
    celery_partitioning.install(part)

    @part.task(name="bench.many.part", shared=False)
    @partitioned(create_entity_partition_key("Order"), pool="entity")
    def part_item_added(order_id: str, sku: str, qty: int = 1, event: Any = None) -> None:
        return None

    plain.finalize()
    part.finalize()
    return plain, part


def _calls(count: int, event: bool) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    return [((f"ord-{i % 1000}", "sku-1"), {"qty": i, **({"event": EVENT} if event else {})})
            for i in range(count)]


def _variants(plain: Celery, part: Celery, messages: int, batch: int, event: bool,
              clear: Callable[[], None], cpu: dict[str, list[float]]) -> dict[str, Callable[[], float]]:
    """name → one round (returns wall µs/msg; appends client CPU µs/msg to ``cpu[name]``)."""
    plain_task, part_task = plain.tasks["bench.many.plain"], part.tasks["bench.many.part"]
    calls = _calls(messages, event)

    def loop(task: Any) -> Callable[[], None]:
        def go() -> None:
            for args, kwargs in calls:
                task.apply_async(args, kwargs)
        return go

    def many() -> None:
        for first in range(0, messages, batch):
            publish_many([part_task.s(*args, **kwargs) for args, kwargs in calls[first:first + batch]],
                         app=part)

    def timed(name: str, fn: Callable[[], None]) -> Callable[[], float]:
        def go() -> float:
            try:
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                cpu.setdefault(name, []).append((time.process_time() - start_cpu) / messages * 1e6)
                return (time.perf_counter() - start) / messages * 1e6
            finally:
                clear()
        return go

    return {"apply_async (plain Celery)": timed("apply_async (plain Celery)", loop(plain_task)),
            "apply_async (partitioned)": timed("apply_async (partitioned)", loop(part_task)),
            f"publish_many (batches of {batch})": timed(f"publish_many (batches of {batch})", many)}


def _throughput_table(title: str, results: dict[str, list[float]],
                      cpu: dict[str, list[float]]) -> Table:
    table = Table(title, ["variant", "wall µs/msg median", "wall µs/msg best", "msg/s (median)",
                          "speed-up (median)", "speed-up (best)", "client CPU µs/msg median",
                          "CPU speed-up (median)"])
    base, base_cpu = results["apply_async (plain Celery)"], cpu["apply_async (plain Celery)"]
    for name, timings in results.items():
        med = statistics.median(timings)
        cpu_med = statistics.median(cpu[name])
        table.add(name, med, min(timings), 1e6 / med, statistics.median(base) / med,
                  min(base) / min(timings), cpu_med, statistics.median(base_cpu) / cpu_med)
    return table


def _breakdown(part: Celery, url: str, namespace: str, batch: int, event: bool, rounds: int,
               clear: Callable[[], None]) -> Table:
    """Each part of a publish_many alone, over the same calls (best and median of ``rounds``)."""
    timings: dict[str, list[float]] = {}
    client = redis.Redis.from_url(url)
    try:
        for _ in range(rounds):
            for name, value in _breakdown_round(part, client, namespace, batch, event).items():
                timings.setdefault(name, []).append(value)
            clear()
    finally:
        client.close()
    table = Table(f"publish_many cost per message, Redis ({rounds} rounds x {batch} messages of "
                  f"{_message_size:.0f} bytes; {machine()})", ["part", "µs/msg best", "µs/msg median"])
    for name, values in timings.items():
        table.add(name, min(values), statistics.median(values))
    return table


_message_size = 0.0


def _breakdown_round(part: Celery, client: redis.Redis, namespace: str, batch: int,
                     event: bool) -> dict[str, float]:
    from celery_partitioning import delivery, publish
    from celery_partitioning.fastrepr import saferepr

    global _message_size
    task = part.tasks["bench.many.part"]
    calls = _calls(batch, event)
    router = part.amqp.router
    out: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        out[name] = (time.perf_counter() - start) / batch * 1e6
        return result

    sigs = timed("build the signatures", lambda: [task.s(*a, **k) for a, k in calls])
    composer = publish._Composer(part)
    composed = timed("compose (check, route, Celery message, serialize)",
                     lambda: [composer.compose(i, sig) for i, sig in enumerate(sigs)])
    timed("  in it: routing (Celery router, PartitionRouter)",
          lambda: [router.route({}, task.name, a, k, task) for a, k in calls])
    timed("  in it: argsrepr + kwargsrepr", lambda: [(saferepr(a, 1024), saferepr(k, 1024))
                                                     for a, k in calls])
    timed("  in it: body serialization (kombu's json encoder)",
          lambda: [delivery.serialize(m.raw_body, "json", True) for m in composed])
    with part.pool.acquire(block=True) as conn:
        channel = conn.default_channel
        ids = delivery.uuid4_strings()
        timed("send: kombu's Redis payload (envelope, base64, json)",
              lambda: [delivery.redis_json(m, next(ids), channel.default_priority)
                       for m in composed])
        timed("send: all (payloads + one MULTI/EXEC round trip per chunk)",
              lambda: delivery._Delivery(composed, batch, {}).to_redis(conn))
    made = composer.tasks[task.name].result
    timed("results (an AsyncResult per message)", lambda: [made(m.task_id) for m in composed])
    payloads = _pushed(client, namespace)
    _message_size = statistics.median(len(p) for p in payloads)
    limit_key = f"{namespace}limit"

    def one_lpush_each() -> None:
        pipe = client.pipeline(transaction=False)
        for raw in payloads:
            pipe.lpush(limit_key, raw)
        pipe.execute()

    def one_lpush_per_queue() -> None:
        pipe = client.pipeline(transaction=True)
        for start in range(0, len(payloads), 60):
            pipe.lpush(limit_key, *payloads[start:start + 60])
        pipe.execute()

    timed("limit: pipelined LPUSH, one per message (bare redis-py, same bytes)", one_lpush_each)
    timed("limit: MULTI + one LPUSH of many per queue (bare redis-py, same bytes)",
          one_lpush_per_queue)
    client.delete(limit_key)
    return out


def _pushed(client: redis.Redis, namespace: str) -> list[bytes]:
    """Every message kombu pushed under ``namespace``: the bytes the broker round trip carried."""
    out: list[bytes] = []
    for key in client.scan_iter(match=f"{namespace}*", count=1000):
        if client.type(key) == b"list":
            out.extend(client.lrange(key, 0, -1))
    return out


def _clear_redis(client: redis.Redis, namespace: str) -> Callable[[], None]:
    def clear() -> None:
        for name in client.scan_iter(match=f"{namespace}*", count=1000):
            if not name.startswith(f"{namespace}_kombu".encode()):
                client.delete(name)
    return clear


def _amqp_queues(namespace: str) -> list[str]:
    return [f"{namespace}partition.entity.{i}" for i in range(8)] + [f"{namespace}bench.plain"]


def _each_amqp_queue(url: str, namespace: str, action: str) -> None:
    """``queue_purge`` or ``queue_delete`` every queue of the run (a missing one is fine)."""
    from amqp.exceptions import NotFound
    from kombu import Connection

    with Connection(url) as conn:
        for name in _amqp_queues(namespace):
            channel = conn.channel()
            try:
                getattr(channel, action)(queue=name)
            except NotFound:
                continue  # that channel is closed by the broker
            channel.close()


def _clear_amqp(url: str, namespace: str) -> Callable[[], None]:
    return lambda: _each_amqp_queue(url, namespace, "queue_purge")


def run(messages: int, batch: int, rounds: int, event: bool, amqp_url: str | None) -> list[Table]:
    tables = []
    url = redis_url()
    shape = "demo-sized event dict" if event else "small arguments"
    with namespace_for("many") as ns:
        plain, part = make_apps(url, ns)
        client = redis.Redis.from_url(url)
        clear = _clear_redis(client, ns)
        try:
            cpu: dict[str, list[float]] = {}
            variants = _variants(plain, part, messages, batch, event, clear, cpu)
            for publish in variants.values():  # warm up
                publish()
            cpu.clear()
            results = interleaved(variants, rounds)
            tables.append(_throughput_table(
                f"Redis: publish_many vs apply_async ({rounds} interleaved rounds x {messages} "
                f"messages, {shape}; {machine()})", results, cpu))
            tables[-1].print()
            tables.append(_breakdown(part, url, ns, batch=batch, event=event, rounds=rounds,
                                     clear=clear))
            tables[-1].print()
        finally:
            client.close()
            plain.close()
            part.close()
    if amqp_url:
        ns = f"cpbench-many-{os.getpid()}-"
        plain, part = make_apps(amqp_url, ns)
        try:
            amqp_cpu: dict[str, list[float]] = {}
            variants = _variants(plain, part, messages, batch, event, _clear_amqp(amqp_url, ns),
                                 amqp_cpu)
            for publish in variants.values():
                publish()
            amqp_cpu.clear()
            amqp_rounds = max(3, rounds // 2)
            results = interleaved(variants, amqp_rounds)
            tables.append(_throughput_table(
                f"RabbitMQ: publish_many (waits for publisher confirms) vs apply_async (does not) "
                f"({amqp_rounds} interleaved rounds x {messages} messages, {shape}; "
                f"{machine()})", results, amqp_cpu))
            tables[-1].print()
        finally:
            plain.close()
            part.close()
            _each_amqp_queue(amqp_url, ns, "queue_delete")
    return tables


def main() -> None:
    amqp = os.environ.get("BENCH_MANY_AMQP", os.environ.get("AMQP_URL", ""))
    run(env_int("BENCH_MANY_MESSAGES", 2000), env_int("BENCH_MANY_BATCH", 500),
        env_int("BENCH_MANY_ROUNDS", 15), env_int("BENCH_MANY_EVENT", 1) == 1, amqp or None)


if __name__ == "__main__":
    main()
