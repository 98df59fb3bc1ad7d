"""A partitioned app whose workers set Sentry up as Sentry's Celery docs say, in a worker signal.

CP_REDIS_URL: broker and record store; CP_NS: unique namespace; CP_SENTRY_SIGNAL: the signal
``sentry_sdk.init`` runs in (``celeryd_init``, ``worker_init`` or ``worker_process_init``;
unset: none). Events go through a local transport onto the Redis list ``{ns}sentry`` (no
network). ``sentry.fail`` always raises.
"""

from __future__ import annotations

import json
import os
from typing import Any

import redis
from celery import Celery, signals

import celery_partitioning as cp

NS = os.environ.get("CP_NS", "cptest-local:")
REDIS_URL = os.environ.get("CP_REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
SIGNAL = os.environ.get("CP_SENTRY_SIGNAL", "")

app = Celery("sentry_app", broker=REDIS_URL, set_as_current=False)
app.conf.update(
    broker_transport_options={"global_keyprefix": NS},
    partitioning_pools={"s": 3},
    partitioning_queue_prefix=f"{NS}partition",
    partitioning_lease_ttl=2,
    partitioning_on_failure="skip",
    worker_hijack_root_logger=False,
)
cp.install(app)

_client = redis.Redis.from_url(REDIS_URL, decode_responses=True)


def _init_sentry(**_: Any) -> None:
    import sentry_sdk
    from sentry_sdk.envelope import Envelope
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.transport import Transport

    class RedisTransport(Transport):
        def capture_envelope(self, envelope: Envelope) -> None:
            for item in envelope.items:
                event = item.get_event()
                if event is None:
                    continue
                for exc in (event.get("exception") or {}).get("values") or []:
                    _client.rpush(f"{NS}sentry", json.dumps({
                        "signal": SIGNAL, "pid": os.getpid(), "type": exc.get("type"),
                        "value": exc.get("value"),
                        "mechanism": (exc.get("mechanism") or {}).get("type")}))

    sentry_sdk.init(dsn="http://public@127.0.0.1:9/1", transport=RedisTransport,
                    integrations=[CeleryIntegration()])
    _client.rpush(f"{NS}sentry-init", f"{SIGNAL} {os.getpid()}")


if SIGNAL and os.environ.get("CP_NS") == NS:  # only in this test's worker processes
    getattr(signals, SIGNAL).connect(_init_sentry, weak=False)


@app.task(name="sentry.fail", shared=False)
@cp.partitioned(lambda args: str(args["key"]), pool="s")
def fail(key: str) -> None:
    raise ValueError(f"sentry test failure {key}")
