"""The demo: start workers, publish a realistic stream, show progress, verify, print a table.

Run it with ``make demo`` (or ``python example_project/manage.py shop_demo``). Partitioned
mode runs the affinity workers of every pool; ``--unordered`` runs the very same tasks through
plain Celery routing (one queue, several prefork workers) to show what per-key order prevents.
``--chaos`` SIGKILLs partition workers during the run (``shop.chaos``) and still verifies
every projection: the checkpoints skip what a killed worker's messages would apply twice;
``--chaos --no-checkpoints`` shows what at-least-once delivery does without them.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import redis
from django.conf import settings
from django.core.management import call_command

from celery_partitioning.state import settings_of
from celery_partitioning.store.keys import RedisKeys

from .chaos import ChaosMonkey
from .events import append, signatures_for, stored_events
from .interrupt import check_interrupted, signals_as_interrupt
from .models import (
    CustomerOrderHistory,
    DailySalesSummary,
    InventoryReservation,
    OrderSummary,
    OrderWithInventory,
    ProductCatalog,
    StoredEvent,
)
from .orders import OrderBook
from .progress import count_published, count_publishes_in_bulk, progress_of
from .report import Console, DemoResult, print_table
from .stream import StreamPlan, plan_stream
from .verify import verify
from .workers import PROJECT_DIR, Workers, wait_ready, worker_env

__all__ = ["DemoOptions", "DemoResult", "run_demo"]

#: Events stored per event-store transaction while publishing.
PUBLISH_BATCH = 50


@dataclass
class DemoOptions:
    events: int = 3000
    unordered: bool = False
    seed: int = 7
    timeout: float = 300.0
    workers: str = "auto"  # auto | supervisor | children
    plain_workers: int = 2
    plain_concurrency: int = 4
    json_path: Path | None = None
    log_dir: Path | None = None
    keep_keys: bool = False
    #: publish_many | apply_async (one call per task, to compare) | outbox (in the events'
    #: transaction, published by `partitioning outbox relay` after the commit)
    publisher: str = "publish_many"
    chaos: bool = False
    kills: int = 12
    checkpoints: bool = True


def _reset_database() -> None:
    from celery_partitioning.contrib.django.models import Checkpoint, OutboxMessage

    call_command("migrate", verbosity=0, interactive=False)
    for model in (Checkpoint, OutboxMessage, StoredEvent, OrderSummary, ProductCatalog, CustomerOrderHistory,
                  OrderWithInventory, DailySalesSummary, InventoryReservation):
        model.objects.all().delete()


@dataclass
class Published:
    events: int = 0
    tasks: int = 0
    seconds: float = 0.0  # spent publishing tasks (not running commands or storing events)


def _publish_stream(app: Any, plan: StreamPlan, tenant: str, publisher: str,
                    on_batch: Callable[[float], None] | None = None) -> Published:
    """Run the commands, store their events, publish their tasks (in position order);
    ``on_batch(share of the commands done)`` after each batch (the chaos monkey's turn)."""
    from celery_partitioning import publish_many
    from celery_partitioning.contrib.django import outbox

    from .dblock import write_transaction
    from .inventory import reserve_inventory

    book = OrderBook(plan.prices)
    handlers: dict[str, Callable[..., list[dict[str, Any]]]] = {
        "CreateOrder": book.create_order, "AddItem": book.add_item,
        "RemoveItem": book.remove_item, "SubmitOrder": book.submit_order,
        "ChangePrice": book.change_price,
    }
    done = Published()
    pending: list[dict[str, Any]] = []

    def calls_for(stored: list[dict[str, Any]]) -> list[Any]:
        calls = []
        for event in stored:
            done.events += 1
            calls.extend(signatures_for(event))
            if event["type"] == "OrderSubmitted":
                order_id = event["order_id"]
                calls.append(reserve_inventory.s(
                    tenant_id=tenant, reservation_id=f"res-{order_id}", order_id=order_id,
                    correlation_id=event["correlation_id"], lines=event["lines"],
                    contend=order_id in plan.contended))
        return calls

    def count(calls: list[Any]) -> None:
        count_published(app, calls)

    def flush() -> None:
        # One transaction per batch keeps the event store fast while the workers write too;
        # the batch's tasks go out in one publish_many, in event position order.
        if publisher == "outbox":
            # The events and their tasks in one transaction: the relay publishes the tasks
            # after the commit, and never those of a batch that rolled back.
            started = time.perf_counter()
            with write_transaction():
                calls = calls_for(append(pending))
                count(calls)
                outbox.publish_many(calls)
            done.seconds += time.perf_counter() - started
            done.tasks += len(calls)
            pending.clear()
            return
        calls = calls_for(append(pending))
        pending.clear()
        count(calls)
        started = time.perf_counter()
        if publisher == "apply_async":
            for call in calls:
                call.apply_async()
        else:
            publish_many(calls, app=app)
        done.seconds += time.perf_counter() - started
        done.tasks += len(calls)

    for n, command in enumerate(plan.commands, 1):
        pending.extend(handlers[command.name](**command.args))
        if len(pending) >= PUBLISH_BATCH:
            flush()
            if on_batch is not None:
                on_batch(n / len(plan.commands))
    flush()
    return done


def _outbox_chaos(monkey: ChaosMonkey, plan: StreamPlan, console: Console) -> None:
    """The relay kills still due after publishing, then a producer killed after its commit
    (a new order of its own: two events, their tasks only in the outbox)."""
    from .chaos import OUTBOX_WAIT, RELAY_KILLS

    while monkey.relay_kills < RELAY_KILLS:
        if not monkey.kill_relay(console.say, wait=OUTBOX_WAIT):
            raise RuntimeError("chaos: no live process held the outbox relay's lease")
    book = OrderBook(plan.prices)
    order_id = "ord-chaos-producer"
    events = (book.create_order(order_id, "cust-chaos-producer")
              + book.add_item(order_id, sorted(plan.prices)[0], 1))
    monkey.kill_producer_after_commit(events, worker_env(), PROJECT_DIR, console.say)


def _watched_queues(app: Any, pools: dict[str, int], plain_queue: str | None) -> list[tuple[str, str]]:
    """(label, kombu's Redis list) of every queue the demo's tasks go to."""
    keys = RedisKeys(settings.SHOP_NAMESPACE)
    if plain_queue is not None:
        return [("plain", keys.broker_queue(plain_queue))]
    names = settings_of(app)
    return [(pool, keys.broker_queue(names.queue_name(pool, index)))
            for pool, count in pools.items() for index in range(count)]


def _queue_depths(client: redis.Redis, watched: list[tuple[str, str]]) -> dict[str, int]:
    pipe = client.pipeline(transaction=False)
    for _label, key in watched:
        pipe.llen(key)
    depths: dict[str, int] = {}
    for (label, _key), depth in zip(watched, pipe.execute(), strict=True):
        depths[label] = depths.get(label, 0) + int(depth)
    return depths


def _counts(snapshot: dict[str, float], kind: str) -> dict[str, int]:
    return {k.split(":", 1)[1]: int(v) for k, v in snapshot.items() if k.startswith(kind + ":")}


def _drain(result: DemoResult, app: Any, pools: dict[str, int], plain_queue: str | None,
           workers: Workers, console: Console, timeout: float, started: float,
           monkey: ChaosMonkey | None = None) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    progress = progress_of(app)
    watched = _watched_queues(app, pools, plain_queue)
    quiet = 0
    try:
        while True:
            check_interrupted()
            snap = progress.snapshot()
            published, done = _counts(snap, "published"), _counts(snap, "done")
            depths = _queue_depths(client, watched)
            parts = [f"{pool} {done.get(pool, 0)}/{published.get(pool, 0)}"
                     + ("" if plain_queue else f" q{depths.get(pool, 0)}") for pool in pools]
            if plain_queue:
                parts.insert(0, f"plain q{depths.get('plain', 0)}")
            elapsed = time.monotonic() - started
            console.status(f"[{elapsed:5.1f}s] " + " | ".join(parts))
            finished = (sum(done.values()) >= sum(published.values())
                        and not any(depths.values()))
            if monkey is not None and not monkey.finished:
                total = sum(published.values())
                left = {pool: published.get(pool, 0) - done.get(pool, 0) for pool in pools}
                monkey.step(sum(done.values()) / total if total else 0.0, console.say, left)
                finished = False  # every planned kill happens before the run counts as over
            quiet = quiet + 1 if finished else 0
            if quiet >= 3:
                result.drained = True
                console.status(f"[{elapsed:5.1f}s] " + " | ".join(parts), force=True)
                break
            dead = workers.dead()
            if dead:
                console.say(f"error: worker(s) exited: {', '.join(dead)}")
                break
            if elapsed > timeout:
                console.say(f"error: not drained after {timeout:.0f} s")
                break
            time.sleep(0.1 if monkey is not None else 0.25)
    finally:
        console.clear()
        client.close()


def _dead_letter_count(pools: dict[str, int]) -> int:
    from celery_partitioning.store.deadletters import DeadLetterStore

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return len(DeadLetterStore(client, RedisKeys(settings.SHOP_NAMESPACE)).find(pools))
    finally:
        client.close()


def _skipped_by_checkpoints() -> int:
    from django.db.models import Sum

    from celery_partitioning.contrib.django.models import Checkpoint

    return int(Checkpoint.objects.aggregate(n=Sum("skipped"))["n"] or 0)


def _cleanup_keys() -> None:
    namespace = settings.SHOP_NAMESPACE
    if not namespace:
        return
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for key in client.scan_iter(match=f"{namespace}*", count=1000):
            client.delete(key)
    finally:
        client.close()


def _throughput(snapshot: dict[str, float], pools: dict[str, int], started_at: float) -> dict[str, float]:
    done = _counts(snapshot, "done")
    rates = {}
    for pool in pools:
        last = snapshot.get(f"last:{pool}")
        if done.get(pool) and last and last > started_at:
            rates[pool] = round(done[pool] / (last - started_at), 1)
    return rates


def _chaos_monkey(options: DemoOptions, workers: Workers, pools: dict[str, int],
                  console: Console) -> ChaosMonkey | None:
    if not options.chaos:
        return None
    supervisor = workers.supervisor_pid
    if supervisor is None:
        raise RuntimeError("--chaos needs the supervisor, which is not running")
    console.say(f"chaos: {options.kills} SIGKILLs of partition workers, spread over the run"
                + ("; and of the outbox relay, and a producer right after its commit"
                   if options.publisher == "outbox" else ""))
    return ChaosMonkey(supervisor, list(pools), options.kills, options.seed)


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> DemoResult:
    """Run the whole demo; returns its result (the table is printed to ``out``)."""
    from example_project.celery import app

    console = Console(out)
    mode = "unordered" if options.unordered else "partitioned"
    result = DemoResult(mode)
    pools = dict(settings.CELERY_PARTITIONING_POOLS)
    if not options.unordered:
        pools = dict(settings_of(app).pools)
    plain_queue = settings.CELERY_TASK_DEFAULT_QUEUE if options.unordered else None
    log_dir = options.log_dir or (PROJECT_DIR.parent / ".demo" / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)

    console.say(f"celery-partitioning demo ({mode}) - broker {settings.REDIS_URL}, "
                f"namespace {settings.SHOP_NAMESPACE or '(none)'}")
    _reset_database()
    progress_of(app).reset()
    plan = plan_stream(options.events, options.seed)
    workers = Workers(worker_env(), log_dir)
    monkey: ChaosMonkey | None = None
    try:
        with signals_as_interrupt():
            try:
                if options.unordered:
                    how = workers.start_plain(options.plain_workers, options.plain_concurrency)
                else:
                    how = workers.start_partitioned(app, pools, options.workers)
                    if workers.supervisor_pid is not None:
                        how += "; the outbox relay in a thread of its first process"
                    elif options.publisher == "outbox":
                        how += "; " + workers.start_outbox_relay()
                console.say(f"workers: {how}; logs in {log_dir}")
                console.say("checkpoints: " + ("on (body and checkpoint in one transaction)"
                                               if options.checkpoints else "OFF"))
                ready = wait_ready(app, workers.nodes, workers, console)
                check_interrupted()
                console.say(f"workers ready in {ready:.1f} s; publishing {len(plan.commands)} "
                            f"commands ({plan.orders} orders, {plan.customers} customers)")
                started_wall = time.time()
                started = time.monotonic()
                count_publishes_in_bulk()
                monkey = _chaos_monkey(options, workers, pools, console)
                outbox_monkey = monkey if options.publisher == "outbox" else None
                published = _publish_stream(
                    app, plan, settings.SHOP_TENANT, options.publisher,
                    None if outbox_monkey is None else partial(outbox_monkey.during_publish,
                                                               note=console.say))
                check_interrupted()
                console.say(f"published {published.events} events as {published.tasks} tasks in "
                            f"{time.monotonic() - started:.1f} s ({published.seconds:.2f} s of it "
                            f"in {options.publisher}); draining")
                if outbox_monkey is not None:
                    _outbox_chaos(outbox_monkey, plan, console)
                _drain(result, app, pools, plain_queue, workers, console, options.timeout, started,
                       monkey)
                result.drain_seconds = time.monotonic() - started
                snap = progress_of(app).snapshot()
            finally:
                if monkey is not None:
                    monkey.stop()
                workers.stop()
        result.dead_letters = _dead_letter_count(pools)
    finally:
        # Also after Ctrl-C: the run's queues, leases and counters go with it.
        if not options.keep_keys:
            _cleanup_keys()
    result.published = _counts(snap, "published")
    result.done = _counts(snap, "done")
    result.failed = sum(_counts(snap, "failed").values())
    result.throughput = _throughput(snap, pools, started_wall)
    result.busy_ms = {k.split(":", 1)[1]: round(v, 1) for k, v in snap.items()
                      if k.startswith("busy_ms:")}
    result.dcb_conflicts = int(snap.get("dcb_conflicts", 0))
    result.retries = int(snap.get("retries", 0)) + result.dcb_conflicts
    result.orders, result.customers = plan.orders, plan.customers
    result.publisher, result.publish_seconds = options.publisher, published.seconds
    result.publish_tasks = published.tasks
    result.checkpoints = options.checkpoints
    result.reruns = sum(_counts(snap, "reruns").values())
    result.skipped = _skipped_by_checkpoints()
    if monkey is not None:
        result.chaos = monkey.summary()
    history = stored_events()
    result.events = len(history)
    result.checks = verify(history)
    result.verified = result.drained and result.mismatches == 0
    print_table(result, pools, console)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(result.as_json(), indent=2))
    return result


