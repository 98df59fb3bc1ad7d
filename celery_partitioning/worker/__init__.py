"""What runs inside a partition worker: runtime, the pipeline of stages, lease, crash recovery."""

from __future__ import annotations

from .runtime import PARTITIONS_ENV, PartitionRuntime, WorkerRuntime, current_runtime
from .stage import Stage

__all__ = ["PARTITIONS_ENV", "PartitionRuntime", "Stage", "WorkerRuntime", "current_runtime"]
