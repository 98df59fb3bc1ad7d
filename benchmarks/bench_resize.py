"""Resize cost: the fraction of keys that move to another partition when a pool grows N → N+1.

Jump consistent hash moves only the keys that land on the new partition: ideally 1/(N+1).
Goal: measured fraction within 1 % of 1/(N+1), and every moved key moves to the *new*
partition (none shuffle between old ones). The table gives the error both in percentage
points and relative to 1/(N+1), beside the binomial sampling noise of the key sample
(a relative error inside that noise is what a perfect hash would show too). No broker needed.

    python -m benchmarks.bench_resize     # BENCH_RESIZE_KEYS=200000 BENCH_RESIZE_MAX_N=16
"""

from __future__ import annotations

import math

from benchmarks.common import Table, env_int, machine
from celery_partitioning import partition_for

__all__ = ["run", "main"]


def run(keys: int, max_n: int) -> Table:
    names = [f"Order:ord-{i}" for i in range(keys)]
    table = Table(
        f"Resize cost over {keys:,} keys ({machine()})",
        ["N → N+1", "moved", "moved fraction", "ideal 1/(N+1)", "abs. error (points)",
         "relative error", "3-sigma sampling noise (rel.)", "moved between old partitions"],
    )
    before = [partition_for(name, 1) for name in names]
    for n in range(1, max_n + 1):
        after = [partition_for(name, n + 1) for name in names]
        moved = sum(1 for a, b in zip(before, after, strict=True) if a != b)
        shuffled = sum(1 for a, b in zip(before, after, strict=True) if a != b and b != n)
        ideal = 1 / (n + 1)
        fraction = moved / keys
        # Binomial standard deviation of the moved fraction, relative to the ideal.
        noise = 3 * math.sqrt(ideal * (1 - ideal) / keys) / ideal
        table.add(f"{n} → {n + 1}", moved, f"{fraction:.3%}", f"{ideal:.3%}",
                  f"{(fraction - ideal) * 100:+.3f}", f"{(fraction - ideal) / ideal:+.2%}",
                  f"±{noise:.2%}", shuffled)
        before = after
    return table


def main() -> None:
    run(env_int("BENCH_RESIZE_KEYS", 200_000), env_int("BENCH_RESIZE_MAX_N", 16)).print()


if __name__ == "__main__":
    main()
