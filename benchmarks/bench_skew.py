"""Key skew: Zipf-distributed keys over a pool; per-partition load and the hottest keys.

Real event streams are skewed: a few orders/customers produce most events. Per-key FIFO
means one key's events run on one partition, one at a time, so the hottest key bounds the
speed-up no matter how many partitions there are. This shows how a Zipf(s) stream lands on
the partitions, the max/mean load, and the bound set by the hottest key. No broker needed.

    python -m benchmarks.bench_skew   # BENCH_SKEW_EVENTS=200000 BENCH_SKEW_KEYS=5000
                                      # BENCH_SKEW_S=1.1 BENCH_SKEW_PARTITIONS=8 BENCH_SKEW_SEED=7
"""

from __future__ import annotations

import random
from collections import Counter

from benchmarks.common import Table, env_float, env_int, machine
from celery_partitioning import partition_for

__all__ = ["zipf_keys", "run", "main"]


def zipf_keys(events: int, keys: int, s: float, seed: int) -> list[str]:
    """``events`` keys drawn from ``keys`` distinct ones with P(rank r) ∝ 1/r**s."""
    rng = random.Random(seed)
    names = [f"Order:ord-{rng.getrandbits(40):010x}" for _ in range(keys)]
    weights = [1 / (rank ** s) for rank in range(1, keys + 1)]
    return rng.choices(names, weights=weights, k=events)


def run(events: int, keys: int, s: float, partitions: int, seed: int) -> list[Table]:
    stream = zipf_keys(events, keys, s, seed)
    per_key = Counter(stream)
    load: Counter[int] = Counter()
    distinct: Counter[int] = Counter()
    for key, count in per_key.items():
        index = partition_for(key, partitions)
        load[index] += count
        distinct[index] += 1
    mean = events / partitions
    hottest_share = per_key.most_common(1)[0][1] / events
    title = (f"Zipf(s={s}) load: {events:,} events over {len(per_key):,} keys on {partitions} partitions "
             f"(seed {seed}; {machine()})")
    parts = Table(title, ["partition", "events", "share", "load / mean", "distinct keys"])
    for index in range(partitions):
        parts.add(index, load[index], f"{load[index] / events:.2%}", load[index] / mean, distinct[index])
    max_load = max(load.values())
    # Best any key → partition assignment could do (greedy longest-processing-time packing).
    packed = [0] * partitions
    for count in sorted(per_key.values(), reverse=True):
        packed[packed.index(min(packed))] += count
    summary = Table("Skew summary", ["measure", "value"])
    summary.add("max / mean partition load (Zipf traffic, hashed)", max_load / mean)
    summary.add("max / mean distinct keys per partition (uniform traffic, hashed)",
                max(distinct.values()) / (len(per_key) / partitions))
    summary.add("max / mean with the best possible key placement (LPT packing, not hashing)",
                max(packed) / mean)
    summary.add("speed-up bound from the busiest partition (events / max load)", events / max_load)
    summary.add("speed-up bound from the hottest key alone (1 / its share)", 1 / hottest_share)
    summary.add("ideal speed-up with this many partitions", float(partitions))
    hot = Table("Hottest keys", ["rank", "key", "events", "share", "partition"])
    for rank, (key, count) in enumerate(per_key.most_common(10), start=1):
        hot.add(rank, key, count, f"{count / events:.2%}", partition_for(key, partitions))
    return [parts, summary, hot]


def main() -> None:
    for table in run(env_int("BENCH_SKEW_EVENTS", 200_000), env_int("BENCH_SKEW_KEYS", 5000),
                     env_float("BENCH_SKEW_S", 1.1), env_int("BENCH_SKEW_PARTITIONS", 8),
                     env_int("BENCH_SKEW_SEED", 7)):
        table.print()


if __name__ == "__main__":
    main()
