"""The demo's output: a progress line per pool while draining, and the summary table."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .verify import ProjectionCheck

__all__ = ["Console", "DemoResult", "print_table"]


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
            # A line longer than the terminal wraps, and "\r" would no longer redraw it.
            text = text[: max(20, shutil.get_terminal_size().columns - 1)]
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
    publisher: str = "publish_many"
    publish_seconds: float = 0.0
    publish_tasks: int = 0
    checkpoints: bool = True
    #: Messages that started again after their worker was killed (before the ack).
    reruns: int = 0
    #: Messages the checkpoints skipped (already applied).
    skipped: int = 0
    #: ``--chaos``: kills performed, by kind.
    chaos: dict[str, Any] = field(default_factory=dict)
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
            "publisher": self.publisher, "publish_seconds": round(self.publish_seconds, 3),
            "publish_tasks": self.publish_tasks,
            "checkpoints": self.checkpoints, "reruns": self.reruns,
            "skipped_by_checkpoint": self.skipped, "chaos": self.chaos,
            "mismatches": {c.name: len(c.mismatches) for c in self.checks},
            "total_mismatches": self.mismatches,
            "examples": [m.describe() for c in self.checks for m in c.mismatches[:2]],
        }


def print_table(result: DemoResult, pools: dict[str, int], console: Console) -> None:
    say = console.say
    title = ("per-key FIFO on affinity workers" if result.mode == "partitioned"
             else "plain Celery routing: one queue, several workers")
    say("")
    say(f"== summary ({result.mode}: {title}) ==")
    say(f"  events          {result.events:>7}   ({result.orders} orders, {result.customers} customers)")
    say(f"  tasks           {sum(result.done.values()):>7}   done of {sum(result.published.values())} "
        f"published, {result.failed} failed")
    say(f"  drain time      {result.drain_seconds:>7.1f}   s (publish + process)")
    rate = result.publish_tasks / result.publish_seconds if result.publish_seconds else 0.0
    say(f"  publish time    {result.publish_seconds:>7.2f}   s ({result.publish_tasks} tasks with "
        f"{result.publisher}, {rate:,.0f} tasks/s)")
    say(f"  retries         {result.retries:>7}   ({result.dcb_conflicts} DCB conflicts retried)")
    say(f"  dead letters    {result.dead_letters:>7}")
    if result.chaos:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(result.chaos["by_kind"].items()))
        say(f"  SIGKILLs        {result.chaos['kills']:>7}   ({kinds})")
    say(f"  ran again       {result.reruns:>7}   messages started again after a kill")
    say(f"  skipped         {result.skipped:>7}   by the checkpoints (already applied)"
        if result.checkpoints else f"  skipped         {'-':>7}   checkpoints OFF")
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
    elif result.mode == "partitioned" and not result.checkpoints and result.mismatches:
        say(f"DEMONSTRATED: without checkpoints {result.mismatches} rows differ from the "
            f"sequential replay ({result.reruns} messages ran again; run without "
            "--no-checkpoints: 0).")
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
