"""Turn ``celery partitioning status --json`` into Prometheus text format (no dependencies).

    celery -A proj partitioning status --json | python scripts/prometheus_status.py > partitions.prom

Reads the JSON on stdin (or from the file named as the only argument) and prints one sample
per partition and metric, labelled ``pool``, ``partition`` and ``queue``. Write the output
where node_exporter's textfile collector reads it (``--collector.textfile.directory``), from
cron or a systemd timer; see docs/monitoring.md for the alerts. Values that ``status`` does not
know (``unacked`` and ``oldest_age`` over AMQP) are left out rather than reported as 0.
Exit status: 0, or 2 when the input is not ``status --json`` output.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

PREFIX = "celery_partitioning_"

#: (metric, type, help, how to get the value from a partition row; None = leave the sample out)
METRICS: list[tuple[str, str, str, Any]] = [
    ("queue_depth", "gauge", "Messages waiting in the partition queue.",
     lambda row: row["depth"]),
    ("unacked", "gauge", "Messages delivered to the partition's worker and not acked yet (Redis).",
     lambda row: row["unacked"]),
    ("oldest_message_age_seconds", "gauge",
     "Age of the partition's oldest message, waiting or delivered (Redis).",
     lambda row: row["oldest_age"]),
    ("consumer_up", "gauge", "1 when a worker consumes the partition (lease held / consumer attached).",
     lambda row: 0 if row["consumer"] is None else 1),
    ("lease_holder_pid", "gauge",
     "Process id of the partition's lease holder (Redis); a change means a new worker took over.",
     lambda row: _pid(row["consumer"])),
    ("parked_keys", "gauge", "Keys of the partition parked behind a dead letter.",
     lambda row: row["parked_keys"]),
    ("backoff_keys", "gauge", "Keys of the partition waiting out a retry backoff.",
     lambda row: row.get("backoff_keys", 0)),
]

_PID = re.compile(r"\(pid (\d+)\)$")


def _pid(consumer: Any) -> int | None:
    match = _PID.search(consumer) if isinstance(consumer, str) else None
    return int(match.group(1)) if match else None


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def render(status: Mapping[str, Any]) -> str:
    """Prometheus text format for one ``status --json`` document."""
    rows: Iterable[Mapping[str, Any]] = status["partitions"]
    rows = list(rows)
    lines: list[str] = []
    for name, kind, text, value_of in METRICS:
        lines += [f"# HELP {PREFIX}{name} {text}", f"# TYPE {PREFIX}{name} {kind}"]
        for row in rows:
            value = value_of(row)
            if value is None:
                continue
            labels = (f'pool="{_label(row["pool"])}",partition="{_label(row["index"])}",'
                      f'queue="{_label(row["queue"])}"')
            lines.append(f"{PREFIX}{name}{{{labels}}} {_number(value)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    try:
        if argv:
            with open(argv[0], encoding="utf-8") as source:
                status = json.load(source)
        else:
            status = json.load(sys.stdin)
        text = render(status)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"prometheus_status: the input is not `partitioning status --json` output: {exc!r}",
              file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
