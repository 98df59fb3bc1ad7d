"""Run every benchmark in turn (what ``make bench`` runs); each compares with plain Celery in one run.

    python benchmarks/run_all.py                 # all, default sizes (about 10 minutes on 2 cores)
    BENCH_ONLY=publish,drain python benchmarks/run_all.py
    BENCH_OUT=results.md python benchmarks/run_all.py   # also write the tables to a file

Sizes: see each module's docstring (BENCH_PUBLISH_*, BENCH_DRAIN_*, BENCH_SKEW_*, ...).
Redis: BENCH_REDIS_URL, else REDIS_URL's server on DB 13.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _benchmarks() -> dict[str, Callable[[], None]]:
    from benchmarks import (
        bench_backoff,
        bench_drain,
        bench_idle,
        bench_keyhash,
        bench_memory,
        bench_metrics,
        bench_outbox,
        bench_publish,
        bench_publish_many,
        bench_resize,
        bench_skew,
    )

    return {
        "keyhash": bench_keyhash.main,
        "publish": bench_publish.main,
        "many": bench_publish_many.main,
        "resize": bench_resize.main,
        "skew": bench_skew.main,
        "drain": bench_drain.main,
        "memory": bench_memory.main,
        "idle": bench_idle.main,
        "backoff": bench_backoff.main,
        "metrics": bench_metrics.main,
        "outbox": bench_outbox.main,
    }


class _Tee(io.TextIOBase):
    def __init__(self, *streams: io.TextIOBase) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


def main() -> int:
    benchmarks = _benchmarks()
    only = [name.strip() for name in os.environ.get("BENCH_ONLY", "").split(",") if name.strip()]
    unknown = [name for name in only if name not in benchmarks]
    if unknown:
        sys.stderr.write(f"unknown benchmark(s) {unknown}; choose from {', '.join(benchmarks)}\n")
        return 2
    out_path = os.environ.get("BENCH_OUT")
    sink = open(out_path, "w", encoding="utf-8") if out_path else None  # noqa: SIM115
    try:
        stdout: io.TextIOBase = sys.stdout  # type: ignore[assignment]
        target = _Tee(stdout, sink) if sink is not None else stdout
        with contextlib.redirect_stdout(target):
            for name in only or list(benchmarks):
                started = time.monotonic()
                print(f"\n## {name}\n", flush=True)
                benchmarks[name]()
                print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
    finally:
        if sink is not None:
            sink.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
