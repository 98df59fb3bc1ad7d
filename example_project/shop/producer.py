"""``python -m shop.producer``: the producer process ``--chaos`` kills right after its commit.

Reads a list of events (JSON) on stdin; stores them and their projections' task calls in the
outbox in one transaction, as the demo's outbox publisher does; prints ``committed`` once the
transaction has committed, then waits to be SIGKILLed. Without the outbox this is the moment
that loses the events' tasks (stored, never published); with it the relay publishes them.
"""

from __future__ import annotations

import json
import sys
import time

#: Longest the producer waits for its kill before it exits on its own.
WAIT_SECONDS = 60.0


def main() -> None:
    import django

    django.setup()
    from example_project.celery import app

    app.loader.import_default_modules()
    from celery_partitioning.contrib.django import outbox

    from .dblock import write_transaction
    from .events import append, signatures_for
    from .progress import count_published, count_publishes_in_bulk

    count_publishes_in_bulk()  # counted below, once, as the demo's publisher counts
    events = json.loads(sys.stdin.read())
    with write_transaction():
        calls = [call for event in append(events) for call in signatures_for(event)]
        count_published(app, calls)
        outbox.publish_many(calls)
    print(f"committed {len(events)} events, {len(calls)} tasks", flush=True)
    time.sleep(WAIT_SECONDS)


if __name__ == "__main__":
    main()
