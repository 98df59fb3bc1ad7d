"""The one HTTP server of ``/metrics``: a process of its own beside the supervisor, or the
``exporter`` command.

``partitioning worker --metrics-port N``: before the supervisor forks its partition worker
processes, the command makes a fresh ``PROMETHEUS_MULTIPROC_DIR`` (every child counts into
it) and forks this server, which at each scrape merges the children's files
(prometheus_client's ``MultiProcessCollector``), their hot-key snapshots and the queue-side
view of the partitions the worker runs. The supervisor itself stays single-threaded (it forks
its children: ``worker/forked.py``); the server leaves when the supervisor is gone, and the
command removes the directory when it stops.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PartitionConfigError
from ..exits import stop_on_signal
from . import MULTIPROC_ENV

if TYPE_CHECKING:
    from celery import Celery

    from ..worker.forked import ForkedProcess

__all__ = ["MetricsProcess", "build_registry", "check_port", "serve"]


def check_port(port: int, address: str = "") -> None:
    """Refuse, before anything starts, a port another process listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError as exc:
            raise PartitionConfigError(f"--metrics-port {port}: cannot listen there ({exc})") from None


class HotKeysCollector:
    """Per pool: the top keys by recent messages, and the skew (busiest partition's recent
    messages over the mean of the partitions this worker runs)."""

    def __init__(self, directory: Path, hosted: Collection[tuple[str, int]]) -> None:
        self.directory = directory
        self.hosted = hosted

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from .hotkeys import merge, read_snapshots
        from .queue import depth_skew

        top, partitions = merge(read_snapshots(self.directory))
        hot = GaugeMetricFamily("celery_partitioning_hot_key_messages", "Recent messages of the "
                                "pool's busiest keys (top 10, decaying; keys hashed unless "
                                "--metrics-raw-keys)", labels=["pool", "key"])
        for pool, keys in top.items():
            for key, count in keys:
                hot.add_metric([pool, key], count)
        skew = GaugeMetricFamily("celery_partitioning_pool_skew", "Recent messages of the busiest "
                                 "partition over the pool's mean (1 even; 0 idle)", labels=["pool"])
        pools: dict[str, list[float]] = {}
        for pool, index in self.hosted:
            pools.setdefault(pool, []).append(partitions.get(pool, {}).get(index, 0.0))
        for pool, counts in pools.items():
            skew.add_metric([pool], depth_skew(counts))
        yield hot
        yield skew


def build_registry(app: Celery, pools: Sequence[str] = (), *, directory: Path | None = None,
                   hosted: Collection[tuple[str, int]] | None = None) -> Any:
    """The registry a scrape reads: the queue-side view, plus (a worker) the children's
    multiprocess files and hot keys."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from .queue import QueueCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(app, pools, hosted))
    if directory is not None:
        MultiProcessCollector(registry, path=str(directory))
        registry.register(HotKeysCollector(directory, hosted or ()))
    return registry


def serve(registry: Any, port: int, address: str = "", *, parent: int | None = None) -> int:
    """Serve ``registry`` on ``address:port`` until SIGTERM/SIGINT (or ``parent`` is gone)."""
    from prometheus_client import start_http_server

    stop = stop_on_signal()
    server, _thread = start_http_server(port, addr=address or "0.0.0.0", registry=registry)
    print(f"metrics: serving http://{address or '0.0.0.0'}:{port}/metrics", flush=True)
    try:
        while not stop.wait(0.5) and (parent is None or os.getppid() == parent):
            pass
    finally:
        server.shutdown()
    return 0


@dataclass
class MetricsProcess:
    """The worker command's metrics: the directory and the server process."""

    directory: Path
    port: int
    address: str = ""
    proc: ForkedProcess | None = None

    @classmethod
    def for_worker(cls, port: int, *, raw_keys: bool) -> MetricsProcess:
        """``worker --metrics-port``: set up before the children fork (they inherit the
        directory and the key-label mode through the environment)."""
        from . import METRICS_ENV, require_prometheus

        require_prometheus("--metrics-port")
        metrics = cls.prepare(port)
        os.environ[METRICS_ENV] = "raw" if raw_keys else "hashed"
        return metrics

    @classmethod
    def prepare(cls, port: int, address: str = "") -> MetricsProcess:
        """Check the port, make the directory and export it to every process forked from
        here (before prometheus_client is imported: it picks multiprocess mode at import)."""
        check_port(port, address)
        directory = Path(tempfile.mkdtemp(prefix="celery-partitioning-metrics-"))
        os.environ[MULTIPROC_ENV] = str(directory)
        # prometheus_client picks its value class when first imported, and Celery's command
        # loads plugins that may import it first (Flower does): pick again, now.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()
        return cls(directory, port, address)

    def start(self, app: Celery, hosted: Collection[tuple[str, int]]) -> None:
        from ..worker.forked import fork_child

        registry = build_registry(app, directory=self.directory, hosted=hosted)
        parent = os.getpid()
        out = os.dup(sys.stdout.fileno())
        try:
            self.proc = fork_child(lambda: serve(registry, self.port, self.address, parent=parent),
                                   env=dict(os.environ), output_fd=out)
        finally:
            os.close(out)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                self.proc.wait(5)
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
