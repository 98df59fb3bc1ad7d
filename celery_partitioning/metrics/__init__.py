"""Prometheus metrics, built in: ``partitioning worker --metrics-port`` and ``partitioning exporter``.

Nothing here imports ``prometheus_client`` at import time: the package works without it, and
asking for metrics without it is one clear error naming the extra (:func:`require_prometheus`).

- :mod:`.instruments`: what only a partition worker process knows, counted through Celery's
  task signals and a few hooks into prometheus_client's multiprocess files.
- :mod:`.queue`: what the queues and the store hold (``cli/status.py``'s collection), per scrape.
- :mod:`.hotkeys`: the recently busiest keys per pool (bounded, hashed by default).
- :mod:`.server`: the one HTTP server, forked beside the supervisor or run by ``exporter``.
"""

from __future__ import annotations

import hashlib
import importlib.util
from typing import Final

from ..errors import PartitionConfigError

__all__ = ["HALF_LIFE_ENV", "METRICS_ENV", "MULTIPROC_ENV", "PROMETHEUS_EXTRA", "key_label",
           "require_prometheus"]

#: Set in partition worker processes whose worker runs with ``--metrics-port``: ``hashed``
#: (keys appear as a digest) or ``raw`` (``--metrics-raw-keys``: keys as they are).
METRICS_ENV: Final = "CELERY_PARTITIONING_METRICS"
#: Seconds after which hot-key counts halve (default ``hotkeys.HALF_LIFE``, 60 s).
HALF_LIFE_ENV: Final = "CELERY_PARTITIONING_METRICS_HALF_LIFE"
#: prometheus_client's own: where every process writes its multiprocess files.
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
PROMETHEUS_EXTRA: Final = "celery-partitioning[prometheus]"


def require_prometheus(what: str) -> None:
    """Raise a one-line PartitionConfigError naming the extra when prometheus_client is absent."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise PartitionConfigError(
            f"{what} needs prometheus_client: pip install '{PROMETHEUS_EXTRA}'")


def key_label(key: str, raw: bool = False) -> str:
    """How a partition key appears as a label: a short digest (keys are often personal data:
    an order id, an e-mail), or the key itself when the user opted in (``raw``)."""
    if raw:
        return key
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
