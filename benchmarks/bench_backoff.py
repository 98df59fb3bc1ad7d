"""Retry backoff: does one key waiting out its retries hold up the other keys of its partition?

One partition; the first event of key ``A`` fails twice with a 2 s retry countdown, then
``A``'s second event and 200 events of 50 other keys are published behind it. Three workers
run the same stream, interleaved over the rounds, on the same Redis:

* ``plain``     - a plain ``celery worker -P solo``: Celery re-publishes the retry with an ETA
                  and runs later messages meanwhile (other keys go on, ``A`` runs out of order);
* ``hold``      - a partition worker with ``partitioning_retry_hold_below`` above the backoff:
                  the partition waits out each backoff in place (what every retry did before
                  keys were set aside);
* ``set-aside`` - a partition worker with the default (0.1 s): ``A`` is set aside during its
                  backoff, the other keys go on, ``A`` runs 0, 1 when due.

Measured from the start of publishing: when the last event of the other keys ended, when
``A``'s last event ended, and the order ``A``'s events ended in. The worker is started and has
run a warm-up task before the clock starts (start-up is not measured).

    python -m benchmarks.bench_backoff   # BENCH_BACKOFF_KEYS=50 BENCH_BACKOFF_EVENTS=200
                                         # BENCH_BACKOFF_COUNTDOWN=2 BENCH_BACKOFF_ROUNDS=3
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery

import celery_partitioning as cp
from benchmarks.bench_drain import ROOT, _celery, _start, _stop
from benchmarks.common import Table, bench_namespace, delete_namespace, env_float, env_int, machine, redis_url

__all__ = ["app", "make_app", "run_once", "main"]

TASK = "bench.backoff.step"
PLAIN_TASK = "bench.backoff.plain"
#: A hold threshold above any backoff of the benchmark: the partition waits in place.
HOLD_ALL = 3600.0


def make_app(broker: str, ns: str, hold_below: float) -> Celery:
    app = Celery(f"{ns}backoff", broker=broker, set_as_current=False)
    app.conf.update(
        broker_transport_options={"global_keyprefix": ns},
        partitioning_pools={"bench": 1},
        partitioning_queue_prefix=f"{ns}partition",
        partitioning_retry_hold_below=hold_below,
        task_default_queue=f"{ns}plain",
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )
    cp.install(app)
    client = redis.Redis.from_url(broker)

    def step(task: Any, key: str, seq: int, fails: int, countdown: float) -> None:
        if task.request.retries < fails:
            raise task.retry(countdown=countdown, max_retries=fails)
        client.rpush(f"{ns}ends", f"{key} {seq} {time.time()!r}")

    @app.task(name=TASK, bind=True, shared=False)
    @cp.partitioned(lambda args: str(args["key"]), pool="bench")
    def partitioned_step(self: Any, key: str, seq: int, fails: int = 0,
                         countdown: float = 0) -> None:
        step(self, key, seq, fails, countdown)

    @app.task(name=PLAIN_TASK, bind=True, shared=False)
    def plain_step(self: Any, key: str, seq: int, fails: int = 0, countdown: float = 0) -> None:
        step(self, key, seq, fails, countdown)

    return app


app = make_app(
    broker=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/13"),
    ns=os.environ.get("BENCH_NS", "cpbench-local:"),
    hold_below=float(os.environ.get("BENCH_HOLD_BELOW", "0.1")),
)


def _ends(client: redis.Redis, ns: str) -> list[tuple[str, int, float]]:
    rows = []
    for raw in client.lrange(f"{ns}ends", 0, -1):
        key, seq, at = raw.decode().split(" ")
        rows.append((key, int(seq), float(at)))
    return rows


def run_once(variant: str, keys: int, events: int, countdown: float, log_dir: Path,
             url: str | None = None) -> tuple[float, float, str]:
    """One stream through one worker: (other keys done, A done) in seconds after publishing
    started, and the order A's events ended in."""
    url = url or redis_url()
    ns = bench_namespace(f"backoff-{variant}")
    hold = HOLD_ALL if variant == "hold" else 0.1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_BROKER": url, "BENCH_NS": ns,
           "BENCH_HOLD_BELOW": repr(hold)}
    bench = make_app(url, ns, hold)
    client = redis.Redis.from_url(url)
    log = log_dir / f"backoff-{variant}.log"
    if variant == "plain":
        argv = [_celery(), "-A", "benchmarks.bench_backoff", "worker", "-Q", f"{ns}plain", "-P",
                "solo", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l",
                "warning"]
    else:
        argv = [_celery(), "-A", "benchmarks.bench_backoff", "partitioning", "worker", "-l",
                "warning", "--stop-timeout", "20"]
    task = bench.tasks[PLAIN_TASK if variant == "plain" else TASK]
    procs = [_start(argv, env, log)]
    try:
        task.delay("warm-up", 0)
        deadline = time.monotonic() + 120
        while not client.llen(f"{ns}ends"):
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError(f"{variant}: the worker did not start; see {log}")
            time.sleep(0.02)
        client.delete(f"{ns}ends")
        others = [f"K{i}" for i in range(keys)]
        start = time.time()
        with bench.producer_or_acquire() as producer:
            task.apply_async(("A", 0), {"fails": 2, "countdown": countdown}, producer=producer)
            for i in range(events):
                task.apply_async((others[i % keys], i // keys), producer=producer)
            task.apply_async(("A", 1), producer=producer)
        deadline = time.monotonic() + 60 + 4 * countdown
        while client.llen(f"{ns}ends") < events + 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: the stream did not finish; see {log}")
            time.sleep(0.02)
        ends = _ends(client, ns)
        other_done = max(at for key, _s, at in ends if key != "A") - start
        a_done = max(at for key, _s, at in ends if key == "A") - start
        order = ",".join(str(seq) for key, seq, _at in ends if key == "A")
        return other_done, a_done, order
    finally:
        _stop(procs)
        client.close()
        bench.close()
        delete_namespace(url, ns)


def main() -> None:
    keys = env_int("BENCH_BACKOFF_KEYS", 50)
    events = env_int("BENCH_BACKOFF_EVENTS", 200)
    countdown = env_float("BENCH_BACKOFF_COUNTDOWN", 2.0)
    rounds = env_int("BENCH_BACKOFF_ROUNDS", 3)
    variants = ["plain", "hold", "set-aside"]
    results: dict[str, list[tuple[float, float, str]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="cp-backoff-") as tmp:
        for round_no in range(rounds):
            for variant in variants if round_no % 2 == 0 else list(reversed(variants)):
                results[variant].append(run_once(variant, keys, events, countdown, Path(tmp)))
    table = Table(f"Retry backoff: key A fails twice ({countdown:g} s countdown), {events} events of "
                  f"{keys} other keys behind it, one partition; seconds from publishing, {rounds} "
                  f"rounds ({machine()})",
                  ["worker", "other keys done, median", "other keys done, worst",
                   "A done, median", "A's events ended in order"])
    for variant in variants:
        runs = results[variant]
        orders = sorted({order for _o, _a, order in runs})
        table.add(variant, statistics.median(r[0] for r in runs), max(r[0] for r in runs),
                  statistics.median(r[1] for r in runs), " / ".join(orders))
    table.print()


if __name__ == "__main__":
    main()
