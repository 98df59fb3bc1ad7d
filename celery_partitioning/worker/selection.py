"""Which partitions a ``partitioning worker`` (or ``purge``) runs: ``--pool`` and ``--partitions``.

``--partitions`` takes plain indexes (``0-3,7``: of the one selected pool) or indexes by pool
(``entity:0-5,global:0``, which also selects those pools).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from ..config import PartitioningSettings
from ..errors import PartitionConfigError

__all__ = ["PartitionSpec", "parse_indexes", "parse_partition_spec", "select_partitions"]

_RANGE: Final = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class PartitionSpec:
    """One partition to run: pool, index and queue name."""

    pool: str
    index: int
    queue: str

    @property
    def label(self) -> str:
        return f"{self.pool}.{self.index}"



def parse_indexes(text: str, shown: str | None = None) -> list[int]:
    """``"0-3,7"`` → ``[0, 1, 2, 3, 7]``; ``PartitionConfigError`` when malformed (naming
    ``shown``, the whole option value, when given)."""
    found: set[int] = set()
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise PartitionConfigError(
                f"--partitions {shown or text!r}: {part.strip()!r} is not an index or a range "
                "(write for example 0-3,7, or entity:0-5,global:0)")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise PartitionConfigError(
                f"--partitions {shown or text!r}: range {low}-{high} is backwards")
        found.update(range(low, high + 1))
    return sorted(found)


def parse_partition_spec(text: str) -> dict[str | None, list[int]]:
    """``--partitions``: ``"0-3,7"`` → ``{None: [0, 1, 2, 3, 7]}`` (no pool named);
    ``"entity:0-5,7,global:0"`` → ``{"entity": [0..5, 7], "global": [0]}`` (an index without
    a pool belongs to the pool named before it). Naming pools for some indexes only, or a
    malformed index, is a ``PartitionConfigError``."""
    found: dict[str | None, set[int]] = {}
    pool: str | None = None
    for item in text.split(","):
        name, colon, part = item.rpartition(":")
        if colon:
            pool = name.strip()
            if not pool:
                raise PartitionConfigError(
                    f"--partitions {text!r}: {':' + part!r} names no pool (write entity:0-5)")
            if None in found:
                raise PartitionConfigError(
                    f"--partitions {text!r}: the indexes before {pool}: name no pool; give "
                    "every range its pool (entity:0-5,global:0) or none")
        found.setdefault(pool, set()).update(parse_indexes(part, text))
    return {name: sorted(indexes) for name, indexes in found.items()}


def select_partitions(settings: PartitioningSettings, pools: Sequence[str] = (),
                      partitions: str | None = None, *,
                      default_pools: Sequence[str] | None = None) -> list[PartitionSpec]:
    """The partitions to run: those ``partitions`` names (``pool:indexes``), or ``pools``
    (default ``default_pools``, else every pool) by ``partitions`` (plain indexes, default all;
    plain indexes need a single selected pool)."""
    spec = parse_partition_spec(partitions) if partitions else {None: []}
    for pool in [*pools, *(p for p in spec if p is not None)]:
        settings.partitions(pool)  # an unknown pool: PartitionConfigError naming the known ones
    if None not in spec:  # pools named in --partitions: that is the selection
        named = [p for p in spec if p is not None]
        if pools and set(pools) != set(named):
            raise PartitionConfigError(
                f"--partitions {partitions} names pool(s) {', '.join(named)} but --pool selects "
                f"{', '.join(dict.fromkeys(pools))}: drop --pool, or name the same pools")
        wanted_by_pool: dict[str, list[int] | None] = {p: spec[p] for p in named}
    else:
        chosen = list(dict.fromkeys(pools)) or list(default_pools or settings.pools)
        indexes = spec[None] or None
        if indexes is not None and len(chosen) > 1:
            raise PartitionConfigError(
                f"--partitions {partitions} names no pool but {len(chosen)} pools are selected "
                f"({', '.join(chosen)}): write POOL:INDEXES, e.g. "
                f"{chosen[0]}:{partitions},{chosen[1]}:0, or choose one pool with --pool")
        wanted_by_pool = {p: indexes for p in chosen}
    specs: list[PartitionSpec] = []
    for pool, wanted in wanted_by_pool.items():
        count = settings.partitions(pool)
        indexes_of = wanted if wanted is not None else list(range(count))
        beyond = [i for i in indexes_of if i >= count]
        if beyond:
            raise PartitionConfigError(
                f"--partitions {partitions}: pool {pool!r} has partitions 0-{count - 1}, not "
                f"{', '.join(map(str, beyond))}")
        specs.extend(PartitionSpec(pool, i, settings.queue_name(pool, i)) for i in indexes_of)
    return specs
