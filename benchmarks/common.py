"""Shared helpers of the benchmarks: env knobs, timing statistics, result tables, clean-up."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "env_int",
    "env_float",
    "env_list",
    "redis_url",
    "bench_namespace",
    "delete_namespace",
    "interleaved",
    "Table",
    "machine",
    "ratio",
]

#: Benchmarks use their own Redis database so they never touch the tests' keys.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"


def env_int(name: str, default: int) -> int:
    """An int knob from the environment (``BENCH_*``)."""
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def env_list(name: str, default: Sequence[int]) -> list[int]:
    """A comma-separated list of ints, e.g. ``BENCH_WORKERS=1,2,4``."""
    raw = os.environ.get(name)
    if raw in (None, ""):
        return list(default)
    return [int(part) for part in raw.split(",") if part.strip()]


def redis_url() -> str:
    """BENCH_REDIS_URL, else the Redis of REDIS_URL (what ``make bench`` exports) on DB 13."""
    explicit = os.environ.get("BENCH_REDIS_URL")
    if explicit:
        return explicit
    shared = os.environ.get("REDIS_URL")
    if shared and shared.count("/") >= 3:
        return shared.rsplit("/", 1)[0] + "/13"
    return shared + "/13" if shared else DEFAULT_REDIS_URL


def bench_namespace(tag: str) -> str:
    """A unique key prefix for one benchmark run (kombu ``global_keyprefix``)."""
    return f"cpbench-{tag}-{uuid.uuid4().hex[:8]}:"


def delete_namespace(url: str, namespace: str) -> None:
    """Delete every Redis key of a benchmark namespace."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        for pattern in (f"{namespace}*", f"*{namespace}*"):
            batch = list(client.scan_iter(match=pattern, count=1000))
            for start in range(0, len(batch), 500):
                client.delete(*batch[start:start + 500])
    finally:
        client.close()


@contextmanager
def namespace_for(tag: str) -> Iterator[str]:
    """A fresh namespace, deleted at the end."""
    ns = bench_namespace(tag)
    try:
        yield ns
    finally:
        delete_namespace(redis_url(), ns)


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, alternating the order, and collect its timings.

    Interleaving spreads the noise of a busy machine evenly over the variants, which is
    what makes a ratio measured in the same run meaningful.
    """
    names = list(variants)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(rounds):
        order = names if round_no % 2 == 0 else list(reversed(names))
        for name in order:
            results[name].append(variants[name]())
    return results


def ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median of ``a`` over median of ``b``."""
    return statistics.median(a) / statistics.median(b)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node()} · {os.cpu_count()} CPUs · load {load:.2f} · Python "
            f"{platform.python_version()} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


class Table:
    """A markdown table printed as the benchmark goes."""

    def __init__(self, title: str, columns: Sequence[str]) -> None:
        self.title = title
        self.columns = list(columns)
        self.rows: list[list[str]] = []

    def add(self, *cells: Any) -> None:
        row = [_cell(c) for c in cells]
        self.rows.append(row)

    def render(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(" --- " for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        sys.stdout.write(self.render() + "\n")
        sys.stdout.flush()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)
