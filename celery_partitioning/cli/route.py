"""``celery partitioning route KEY``: the partition and queue a key maps to in each pool."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import click
from celery.bin.base import CeleryCommand

from ..errors import PartitioningError
from ..hashing import partition_for
from ..keys import GLOBAL_PARTITION_KEY, entity_type_of
from ..state import settings_of
from ..tasks import spec_of
from .common import fail

__all__ = ["route_command"]


@click.command(name="route", cls=CeleryCommand)
@click.argument("key")
@click.option("--pool", "pools", multiple=True, metavar="NAME",
              help="Only this pool (repeat for several). Default: every pool.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@click.pass_context
def route_command(ctx: click.Context, key: str, *, pools: tuple[str, ...], as_json: bool) -> None:
    """Show the partition index and queue KEY maps to, in each pool (or --pool).

    KEY is the partition key exactly as the task's key function makes it: Order:ord-123 for
    create_entity_partition_key("Order"), the bare id (cust-123, corr-123) for customer and
    saga keys, global, dcb:tenant:T:reservation:res-456. A key without ':' gets a hint on
    stderr (an entity key was probably meant).
    """
    app = ctx.obj.app
    settings = settings_of(app)
    rows: list[dict[str, Any]] = []
    try:
        for pool in pools or tuple(settings.pools):
            count = settings.partitions(pool)
            index = partition_for(key, count)
            rows.append({"key": key, "pool": pool, "index": index, "partitions": count,
                         "queue": settings.queue_name(pool, index)})
    except PartitioningError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        width = max(len(r["pool"]) for r in rows)
        for r in rows:
            click.echo(f"{r['pool']:<{width}}  partition {r['index']} "
                       f"(of 0-{r['partitions'] - 1})  queue {r['queue']}")
    hint = _key_hint(app, key)
    if hint:
        click.echo(hint, err=True)  # stdout stays the answer (--json parses); exit status 0


def _key_hint(app: Any, key: str) -> str | None:
    """A hint when ``key`` looks like a bare id where an entity key (``Type:id``) was meant.

    Customer and saga keys are bare ids and ``global`` is a key of its own, so a key without
    ``:`` is routed as given; the hint names the entity types the app's tasks key by.
    """
    if ":" in key or key == GLOBAL_PARTITION_KEY:
        return None
    types: dict[str, set[str]] = {}
    with contextlib.suppress(Exception):  # a hint never fails the command
        app.loader.import_default_modules()
        for task in list(app.tasks.values()):
            spec = spec_of(task)
            entity = entity_type_of(spec.key) if spec is not None else None
            if spec is not None and entity is not None:
                types.setdefault(entity, set()).add(spec.effective_pool or "?")
    if types:
        meant = " or ".join(f"{t}:{key}" for t in sorted(types))
        pools = ", ".join(f"{t} in pool {', '.join(sorted(p))}" for t, p in sorted(types.items()))
        return (f"hint: {key!r} has no ':', so it is routed as it is (right for customer and "
                f"saga keys, which are bare ids); entity keys are Type:id, did you mean "
                f"{meant}? (entity types of this app's tasks: {pools})")
    return (f"hint: {key!r} has no ':', so it is routed as it is (right for customer and saga "
            f"keys, which are bare ids); entity keys are Type:id, e.g. Order:{key}")
