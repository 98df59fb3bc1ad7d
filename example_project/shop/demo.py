"""The demo: start workers, publish a realistic stream, show progress, verify, print a table.

Run it with ``make demo`` (or ``python example_project/manage.py shop_demo``). Partitioned
mode runs the affinity workers of every pool; ``--unordered`` runs the very same tasks through
plain Celery routing (one queue, several prefork workers) to show what per-key order prevents.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import redis
from django.conf import settings
from django.core.management import call_command

from celery_partitioning.app import settings_of
from celery_partitioning.embedded import stop_with_parent

from .events import append, publish, stored_events
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
from .progress import progress_of
from .stream import StreamPlan, plan_stream
from .verify import ProjectionCheck, verify

__all__ = ["DemoOptions", "DemoResult", "run_demo"]

#: The project directory (manage.py lives here); workers run from it.
PROJECT_DIR = Path(__file__).resolve().parent.parent
#: Seconds a stopping worker has for a warm shutdown before it is killed.
STOP_GRACE = 20.0
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


@dataclass
class DemoResult:
    mode: str
    drained: bool = False
    verified: bool = False
    events: int = 0
    orders: int = 0
    customers: int = 0
    published: dict[str, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    throughput: dict[str, float] = field(default_factory=dict)
    busy_ms: dict[str, float] = field(default_factory=dict)
    dcb_conflicts: int = 0
    retries: int = 0
    dead_letters: int = 0
    drain_seconds: float = 0.0
    checks: list[ProjectionCheck] = field(default_factory=list)

    @property
    def mismatches(self) -> int:
        return sum(len(c.mismatches) for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "drained": self.drained, "verified": self.verified,
            "events": self.events, "orders": self.orders, "customers": self.customers,
            "published": self.published, "done": self.done, "failed": self.failed,
            "throughput": self.throughput, "busy_ms": self.busy_ms, "dcb_conflicts": self.dcb_conflicts,
            "retries": self.retries, "dead_letters": self.dead_letters,
            "drain_seconds": round(self.drain_seconds, 2),
            "mismatches": {c.name: len(c.mismatches) for c in self.checks},
            "total_mismatches": self.mismatches,
            "examples": [m.describe() for c in self.checks for m in c.mismatches[:2]],
        }


# ---- workers -----------------------------------------------------------------------------

def _celery_bin() -> str:
    candidate = Path(sys.executable).with_name("celery")
    return str(candidate) if candidate.exists() else "celery"


def _supervisor_available() -> bool:
    return importlib.util.find_spec("celery_partitioning.cli") is not None


class Workers:
    """The worker processes this demo started: each in its own session, stopped by pid."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        #: The supervisor stops its children itself: signal it alone, not its group.
        self.signal_group = True
        self.nodes = 0

    def _start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(argv, cwd=PROJECT_DIR, env={**self.env, **(extra_env or {})},
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=stop_with_parent())  # noqa: PLW1509 - it only calls prctl()
        finally:
            log.close()
        self.procs.append((name, proc))

    def start_partitioned(self, pools: dict[str, int], mode: str) -> str:
        celery = _celery_bin()
        use_supervisor = mode == "supervisor" or (mode == "auto" and _supervisor_available())
        self.nodes = sum(pools.values())
        if use_supervisor:
            self.signal_group = False
            self._start("supervisor", [celery, "-A", "example_project", "partitioning", "worker",
                                       "-l", "warning"])
            return "celery -A example_project partitioning worker (one process per partition)"
        host = socket.gethostname()
        prefix = settings.CELERY_PARTITIONING_QUEUE_PREFIX
        for pool, count in pools.items():
            for index in range(count):
                self._start(f"{pool}-{index}", [
                    celery, "-A", "example_project", "worker", "-Q", f"{prefix}.{pool}.{index}",
                    "-P", "solo", "-c", "1", "--prefetch-multiplier", "1", "-l", "warning",
                    "-n", f"shop-{pool}-{index}@{host}", "--without-gossip", "--without-mingle",
                ], {"CELERY_PARTITIONING_PARTITION": f"{pool}:{index}"})
        return f"{self.nodes} partition workers (celery worker -P solo -Q <partition queue>)"

    def start_plain(self, count: int, concurrency: int) -> str:
        celery = _celery_bin()
        host = socket.gethostname()
        queue = settings.CELERY_TASK_DEFAULT_QUEUE
        for n in range(count):
            self._start(f"plain-{n}", [
                celery, "-A", "example_project", "worker", "-Q", queue, "-P", "prefork",
                "-c", str(concurrency), "-l", "warning", "-n", f"shop-plain-{n}@{host}",
                "--without-gossip", "--without-mingle",
            ])
        self.nodes = count
        return f"{count} plain workers x {concurrency} processes on one queue {queue!r}"

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs if proc.poll() is not None]

    def stop(self) -> None:
        """SIGTERM every process group (warm shutdown), then SIGKILL what is left."""
        for _name, proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if self.signal_group:
                        os.killpg(proc.pid, signal.SIGTERM)
                    else:
                        os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for _name, proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for _name, proc in self.procs:
            # The whole group: prefork or supervised children outlive a parent that was killed.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


# ---- the run -----------------------------------------------------------------------------

class Console:
    """Progress output: one line redrawn in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._last = 0.0
        self._width = 0

    def say(self, text: str) -> None:
        self.clear()
        print(text, file=self.out, flush=True)

    def status(self, text: str, force: bool = False) -> None:
        if self.tty:
            pad = max(0, self._width - len(text))
            self.out.write("\r" + text + " " * pad)
            self.out.flush()
            self._width = len(text)
        elif force or time.monotonic() - self._last >= 5:
            print(text, file=self.out, flush=True)
            self._last = time.monotonic()

    def clear(self) -> None:
        if self.tty and self._width:
            self.out.write("\r" + " " * self._width + "\r")
            self.out.flush()
            self._width = 0


def _reset_database() -> None:
    call_command("migrate", verbosity=0, interactive=False)
    for model in (StoredEvent, OrderSummary, ProductCatalog, CustomerOrderHistory,
                  OrderWithInventory, DailySalesSummary, InventoryReservation):
        model.objects.all().delete()


def _worker_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")]))
    return {
        **os.environ,
        "PYTHONPATH": path,
        "DJANGO_SETTINGS_MODULE": os.environ.get("DJANGO_SETTINGS_MODULE", "example_project.settings"),
        "REDIS_URL": settings.REDIS_URL,
        "SHOP_DATABASE": str(settings.DATABASES["default"]["NAME"]),
        "SHOP_NAMESPACE": settings.SHOP_NAMESPACE,
        "SHOP_ORDERING": settings.SHOP_ORDERING,
        "SHOP_QUEUE_PREFIX": settings.CELERY_PARTITIONING_QUEUE_PREFIX,
        "SHOP_POOLS": ",".join(f"{p}={n}" for p, n in settings.CELERY_PARTITIONING_POOLS.items()),
        "SHOP_GLOBAL_WRITE_DELAY_MS": str(settings.SHOP_GLOBAL_WRITE_DELAY_MS),
    }


def _wait_ready(app: Any, nodes: int, workers: Workers, console: Console, timeout: float = 90) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        dead = workers.dead()
        if dead:
            raise RuntimeError(f"workers exited at start: {', '.join(dead)} (see their logs)")
        replies = app.control.ping(timeout=0.5)
        console.status(f"waiting for workers: {len(replies)}/{nodes} answer", force=False)
        if len(replies) >= nodes:
            console.clear()
            return time.monotonic() - started
    console.clear()
    console.say(f"note: only some workers answered within {timeout:.0f} s; going on "
                "(messages wait in their queues)")
    return time.monotonic() - started


def _publish_stream(plan: StreamPlan, tenant: str) -> tuple[int, int]:
    """Run the commands, store their events, publish them; returns (events, tasks)."""
    from .inventory import reserve_inventory

    book = OrderBook(plan.prices)
    handlers: dict[str, Callable[..., list[dict[str, Any]]]] = {
        "CreateOrder": book.create_order, "AddItem": book.add_item,
        "RemoveItem": book.remove_item, "SubmitOrder": book.submit_order,
        "ChangePrice": book.change_price,
    }
    events = tasks = 0
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        # One transaction per batch keeps the event store fast while the workers write too;
        # events are published in position order.
        nonlocal events, tasks
        for event in append(pending):
            events += 1
            tasks += publish(event)
            if event["type"] == "OrderSubmitted":
                order_id = event["order_id"]
                reserve_inventory.apply_async(kwargs={
                    "tenant_id": tenant, "reservation_id": f"res-{order_id}",
                    "order_id": order_id, "correlation_id": event["correlation_id"],
                    "lines": event["lines"], "contend": order_id in plan.contended,
                })
                tasks += 1
        pending.clear()

    for command in plan.commands:
        pending.extend(handlers[command.name](**command.args))
        if len(pending) >= PUBLISH_BATCH:
            flush()
    flush()
    return events, tasks


def _queue_depths(client: redis.Redis, pools: dict[str, int], plain_queue: str | None) -> dict[str, int]:
    ns = settings.SHOP_NAMESPACE
    prefix = settings.CELERY_PARTITIONING_QUEUE_PREFIX
    pipe = client.pipeline(transaction=False)
    names: list[str] = []
    if plain_queue is not None:
        pipe.llen(f"{ns}{plain_queue}")
        names.append("plain")
    else:
        for pool, count in pools.items():
            for index in range(count):
                pipe.llen(f"{ns}{prefix}.{pool}.{index}")
                names.append(pool)
    depths: dict[str, int] = {}
    for name, depth in zip(names, pipe.execute(), strict=True):
        depths[name] = depths.get(name, 0) + int(depth)
    return depths


def _counts(snapshot: dict[str, float], kind: str) -> dict[str, int]:
    return {k.split(":", 1)[1]: int(v) for k, v in snapshot.items() if k.startswith(kind + ":")}


def _drain(result: DemoResult, app: Any, pools: dict[str, int], plain_queue: str | None,
           workers: Workers, console: Console, timeout: float, started: float) -> None:
    client = redis.Redis.from_url(settings.REDIS_URL)
    progress = progress_of(app)
    quiet = 0
    try:
        while True:
            snap = progress.snapshot()
            published, done = _counts(snap, "published"), _counts(snap, "done")
            depths = _queue_depths(client, pools, plain_queue)
            parts = [f"{pool} {done.get(pool, 0)}/{published.get(pool, 0)}"
                     + ("" if plain_queue else f" q{depths.get(pool, 0)}") for pool in pools]
            if plain_queue:
                parts.insert(0, f"plain q{depths.get('plain', 0)}")
            elapsed = time.monotonic() - started
            console.status(f"[{elapsed:5.1f}s] " + " | ".join(parts))
            finished = (sum(done.values()) >= sum(published.values())
                        and not any(depths.values()))
            quiet = quiet + 1 if finished else 0
            if quiet >= 3:
                result.drained = True
                break
            dead = workers.dead()
            if dead:
                console.say(f"error: worker(s) exited: {', '.join(dead)}")
                break
            if elapsed > timeout:
                console.say(f"error: not drained after {timeout:.0f} s")
                break
            time.sleep(0.25)
    finally:
        console.clear()
        client.close()


def _dead_letter_count(pools: dict[str, int]) -> int:
    from celery_partitioning.deadletters import DeadLetterStore
    from celery_partitioning.redis_keys import RedisKeys

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return len(DeadLetterStore(client, RedisKeys(settings.SHOP_NAMESPACE)).find(pools))
    finally:
        client.close()


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


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    workers = Workers(_worker_env(), log_dir)
    with _sigterm_as_interrupt():
        try:
            if options.unordered:
                how = workers.start_plain(options.plain_workers, options.plain_concurrency)
            else:
                how = workers.start_partitioned(pools, options.workers)
            console.say(f"workers: {how}; logs in {log_dir}")
            ready = _wait_ready(app, workers.nodes, workers, console)
            console.say(f"workers ready in {ready:.1f} s; publishing {len(plan.commands)} commands "
                        f"({plan.orders} orders, {plan.customers} customers)")
            started_wall = time.time()
            started = time.monotonic()
            events, tasks = _publish_stream(plan, settings.SHOP_TENANT)
            console.say(f"published {events} events as {tasks} tasks in "
                        f"{time.monotonic() - started:.1f} s; draining")
            _drain(result, app, pools, plain_queue, workers, console, options.timeout, started)
            result.drain_seconds = time.monotonic() - started
            snap = progress_of(app).snapshot()
        finally:
            workers.stop()
    result.published = _counts(snap, "published")
    result.done = _counts(snap, "done")
    result.failed = sum(_counts(snap, "failed").values())
    result.throughput = _throughput(snap, pools, started_wall)
    result.busy_ms = {k.split(":", 1)[1]: round(v, 1) for k, v in snap.items()
                      if k.startswith("busy_ms:")}
    result.dcb_conflicts = int(snap.get("dcb_conflicts", 0))
    result.retries = int(snap.get("retries", 0)) + result.dcb_conflicts
    result.dead_letters = _dead_letter_count(pools)
    result.orders, result.customers = plan.orders, plan.customers
    history = stored_events()
    result.events = len(history)
    result.checks = verify(history)
    result.verified = result.drained and result.mismatches == 0
    _print_table(result, pools, console)
    if options.json_path is not None:
        options.json_path.write_text(json.dumps(result.as_json(), indent=2))
    if not options.keep_keys:
        _cleanup_keys()
    return result


def _print_table(result: DemoResult, pools: dict[str, int], console: Console) -> None:
    say = console.say
    title = ("per-key FIFO on affinity workers" if result.mode == "partitioned"
             else "plain Celery routing: one queue, several workers")
    say("")
    say(f"== summary ({result.mode}: {title}) ==")
    say(f"  events          {result.events:>7}   ({result.orders} orders, {result.customers} customers)")
    say(f"  tasks           {sum(result.done.values()):>7}   done of {sum(result.published.values())} "
        f"published, {result.failed} failed")
    say(f"  drain time      {result.drain_seconds:>7.1f}   s (publish + process)")
    say(f"  retries         {result.retries:>7}   ({result.dcb_conflicts} DCB conflicts retried)")
    say(f"  dead letters    {result.dead_letters:>7}")
    say("")
    say(f"  {'pool':<10} {'partitions':>10} {'tasks':>7} {'tasks/s':>8} {'ms/task':>8}")
    for pool, count in pools.items():
        parts = str(count) if result.mode == "partitioned" else "-"
        done = result.done.get(pool, 0)
        per_task = result.busy_ms.get(pool, 0.0) / done if done else 0.0
        say(f"  {pool:<10} {parts:>10} {done:>7} "
            f"{result.throughput.get(pool, 0.0):>8.1f} {per_task:>8.1f}")
    say("  (tasks/s: from the first publish to the pool's last finished task; ms/task: time "
        "inside the task)")
    say("")
    say(f"  {'projection':<22} {'rows':>6} {'mismatches':>10}")
    for check in result.checks:
        say(f"  {check.name:<22} {check.rows:>6} {len(check.mismatches):>10}")
    say(f"  {'TOTAL':<22} {'':>6} {result.mismatches:>10}")
    examples = [m for c in result.checks for m in c.mismatches[:2]]
    if examples:
        say("")
        say("  examples:")
        for mismatch in examples[:8]:
            say(f"    {mismatch.describe(150)}")
    say("")
    if not result.drained:
        say("NOT VERIFIED: the workers did not finish (see the worker logs).")
    elif result.mode == "partitioned":
        say("VERIFIED: every projection equals the sequential replay of the same events."
            if result.verified else
            f"FAILED: {result.mismatches} rows differ from the sequential replay.")
    elif result.mismatches:
        say(f"DEMONSTRATED: without per-key ordering {result.mismatches} rows differ from the "
            "sequential replay (run without --unordered: 0).")
    else:
        say("unordered run matched the replay this time (too little contention); "
            "try more --events")
