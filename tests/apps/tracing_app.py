"""A partitioned app whose workers set OpenTelemetry up as its Celery instrumentation docs say
(``CeleryInstrumentor().instrument()`` in ``worker_process_init``).

CP_REDIS_URL: broker and record store; CP_NS: unique namespace. The worker's spans are written
to the Redis list ``{ns}spans`` as JSON (name, trace and span ids, parent id, kind).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery, signals

import celery_partitioning as cp

NS = os.environ.get("CP_NS", "cptest-local:")
REDIS_URL = os.environ.get("CP_REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")

app = Celery("tracing_app", broker=REDIS_URL, set_as_current=False)
app.conf.update(
    broker_transport_options={"global_keyprefix": NS},
    partitioning_pools={"t": 2},
    partitioning_queue_prefix=f"{NS}partition",
    partitioning_lease_ttl=2,
    worker_hijack_root_logger=False,
)
cp.install(app)

_client = redis.Redis.from_url(REDIS_URL, decode_responses=True)


def span_record(span: Any) -> dict[str, Any]:
    parent = span.parent
    return {"name": span.name, "trace_id": format(span.context.trace_id, "032x"),
            "span_id": format(span.context.span_id, "016x"),
            "parent_id": format(parent.span_id, "016x") if parent is not None else None,
            "kind": span.kind.name}


@signals.worker_process_init.connect(weak=False)
def _instrument(**_: Any) -> None:
    if os.environ.get("CP_NS") != NS:  # only in this test's worker processes
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class RedisExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            for span in spans:
                _client.rpush(f"{NS}spans", json.dumps(span_record(span)))
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RedisExporter()))
    CeleryInstrumentor().instrument(tracer_provider=provider)


@app.task(name="tracing.ok", shared=False)
@cp.partitioned(lambda args: str(args["key"]), pool="t")
def ok(key: str) -> str:
    return key
