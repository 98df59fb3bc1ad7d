"""celery-partitioning: per-key FIFO with parallelism across keys, for Celery."""

from __future__ import annotations

from .app import explain_route, install
from .checkpoint import MESSAGE_ID, CheckpointStore, Mark
from .dcb import DCBConflict, with_dcb_retry
from .errors import PartitionConfigError, PartitioningError, PartitionKeyError, PublishManyError
from .hashing import partition_for
from .keys import (
    GLOBAL_PARTITION_KEY,
    create_customer_partition_key,
    create_dcb_partition_key,
    create_entity_partition_key,
    create_saga_partition_key,
    create_scope_key,
    get_recommended_parallelism,
)
from .publish import publish_many
from .tasks import partitioned, projection
from .validation import assert_valid_partition_keys

__version__ = "0.1.0"

__all__ = [
    "MESSAGE_ID",
    "CheckpointStore",
    "DCBConflict",
    "GLOBAL_PARTITION_KEY",
    "PartitionConfigError",
    "PartitionKeyError",
    "PartitioningError",
    "PublishManyError",
    "assert_valid_partition_keys",
    "create_customer_partition_key",
    "create_dcb_partition_key",
    "create_entity_partition_key",
    "create_saga_partition_key",
    "create_scope_key",
    "explain_route",
    "get_recommended_parallelism",
    "install",
    "Mark",
    "partition_for",
    "partitioned",
    "projection",
    "publish_many",
    "with_dcb_retry",
]
