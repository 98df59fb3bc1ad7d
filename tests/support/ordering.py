"""Per-key sequence checks over what tasks recorded (never over timing).

A recording task appends ``start <seq>`` before its work and ``end <seq>`` after it to a
Redis list per key. From those lists we can tell, per key: whether sequences ran in
publish order, whether two messages of the key overlapped, what was lost, and reruns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class OrderingReport:
    keys: int = 0
    out_of_order: dict[str, list[int]] = field(default_factory=dict)
    overlaps: dict[str, list[str]] = field(default_factory=dict)
    lost: dict[str, list[int]] = field(default_factory=dict)
    reruns: int = 0

    @property
    def ok(self) -> bool:
        return not (self.out_of_order or self.overlaps or self.lost)

    def summary(self) -> str:
        def first(d: Mapping[str, object]) -> str:
            return ", ".join(f"{k}: {v}" for k, v in list(d.items())[:5])

        return (f"{self.keys} keys; out of order: {len(self.out_of_order)} ({first(self.out_of_order)}); "
                f"overlapping: {len(self.overlaps)} ({first(self.overlaps)}); "
                f"lost: {len(self.lost)} ({first(self.lost)}); reruns: {self.reruns}")


def check(records: Mapping[str, Iterable[str]], expected: Mapping[str, int]) -> OrderingReport:
    """Check each key's records against ``expected[key]`` messages numbered 0..n-1.

    Allowed: a message started but not ended (its worker was killed) and then run again
    from its start. Anything else out of sequence is reported.
    """
    report = OrderingReport(keys=len(expected))
    for key, count in expected.items():
        done: list[int] = []
        open_seq: int | None = None
        for entry in records.get(key, []):
            kind, _, raw = entry.partition(" ")
            seq = int(raw)
            if kind == "start":
                if open_seq is not None and open_seq != seq:
                    report.overlaps.setdefault(key, []).append(f"{seq} started while {open_seq} ran")
                if open_seq == seq:
                    report.reruns += 1
                elif done and seq == done[-1]:
                    report.reruns += 1  # ran to the end, re-delivered before its ack
                elif seq != len(done):
                    report.out_of_order.setdefault(key, []).append(seq)
                open_seq = seq
            elif kind == "end":
                if open_seq != seq:
                    report.overlaps.setdefault(key, []).append(f"{seq} ended while {open_seq} open")
                if not done or done[-1] != seq:
                    done.append(seq)
                open_seq = None
        missing = sorted(set(range(count)) - set(done))
        if missing:
            report.lost[key] = missing
    return report


def concurrent_runs(log: Sequence[tuple[str, int, str, int | str]], killed: set[int]) -> list[str]:
    """Places where a partition started a task while another live process had one open.

    ``log`` is one partition's ``(kind, pid, key, seq)`` records in order. A process in
    ``killed`` never ends its open task; its successor may start then.
    """
    problems = []
    open_by: dict[int, str] = {}
    for kind, pid, key, seq in log:
        if kind == "start":
            others = [p for p in open_by if p != pid and p not in killed]
            if others:
                problems.append(f"pid {pid} started {key}#{seq} while pid {others[0]} ran "
                                f"{open_by[others[0]]}")
            open_by[pid] = f"{key}#{seq}"
        else:
            open_by.pop(pid, None)
    return problems
