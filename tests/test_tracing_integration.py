"""OpenTelemetry sees partitioned tasks: the span of a run in a real partition worker is in
the trace of its publish span, a child of it (W3C context carried in the message headers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import redis

from tests.support.procs import ROOT, Processes, celery_bin, wait_for

pytest.importorskip("opentelemetry.instrumentation.celery")
pytestmark = pytest.mark.integration


@pytest.mark.timeout(120)
def test_a_partitioned_run_span_is_a_child_of_its_publish_span(
        redis_url: str, namespace: str, processes: Processes, tmp_path: Path) -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    url = redis_url
    env = {"CP_REDIS_URL": url, "CP_NS": namespace, "PYTHONPATH": str(ROOT)}
    os.environ.update(env)
    try:
        from tests.apps import tracing_app
    finally:
        for name in env:
            os.environ.pop(name, None)
    app = tracing_app.app
    app.conf.update(broker_url=url, broker_transport_options={"global_keyprefix": namespace},
                    partitioning_queue_prefix=f"{namespace}partition")
    client = redis.Redis.from_url(url, decode_responses=True)
    processes.start([celery_bin(), "-A", "tests.apps.tracing_app", "partitioning", "worker",
                     "-l", "info", "--processes", "1", "--stop-timeout", "30"],
                    env=env, log=tmp_path / "worker.log")

    # Given a producer instrumented as OpenTelemetry's Celery docs say
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        # When it publishes partitioned tasks
        results = [app.tasks["tracing.ok"].delay(f"k{n}") for n in range(4)]
    finally:
        instrumentor.uninstrument()
    published = {s.attributes.get("messaging.message.id") if s.attributes else None: s
                 for s in exporter.get_finished_spans() if s.kind.name == "PRODUCER"}
    assert set(published) == {r.id for r in results}, exporter.get_finished_spans()

    # Then each run's span in the partition worker is a child of its publish span
    def runs() -> list[dict[str, str]]:
        return [r for r in (json.loads(e) for e in client.lrange(f"{namespace}spans", 0, -1))
                if r["kind"] == "CONSUMER"]

    try:
        wait_for(lambda: len(runs()) == 4, 60, "the four run spans")
    except AssertionError as exc:
        log = (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{exc}: {runs()}\n{log}") from None
    by_parent = {r["parent_id"]: r for r in runs()}
    for task_id, span in published.items():
        run = by_parent[format(span.context.span_id, "016x")]
        assert run["trace_id"] == format(span.context.trace_id, "032x"), (task_id, run)
        assert run["name"] == "run/tracing.ok", run
