"""What runs inside a partition worker: runtime, gates, lease, crash recovery, misroute guard."""

from __future__ import annotations

from .runtime import PARTITION_ENV, Gate, PartitionRuntime, current_runtime

__all__ = ["PARTITION_ENV", "Gate", "PartitionRuntime", "current_runtime"]
