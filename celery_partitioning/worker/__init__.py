"""What runs inside a partition worker: runtime, gates, lease, crash recovery, misroute guard."""

from __future__ import annotations

from .runtime import PARTITIONS_ENV, Gate, PartitionRuntime, WorkerRuntime, current_runtime

__all__ = ["PARTITIONS_ENV", "Gate", "PartitionRuntime", "WorkerRuntime", "current_runtime"]
