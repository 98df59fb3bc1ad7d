"""Bad input, property-based: every bad input gets a PartitioningError subclass, never a crash
elsewhere and never a message on a wrong queue; adversarial keys route safely.

No broker: publishing goes through kombu's in-memory transport, whose queues we inspect
after every call (which queue grew, by how much, and what the message carries).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from kombu.transport.memory import Channel as MemoryChannel

import celery_partitioning as cp
from celery_partitioning import (
    PartitionConfigError,
    PartitioningError,
    PartitionKeyError,
    partition_for,
)
from celery_partitioning.config import MAX_PARTITIONS, read_settings
from celery_partitioning.hashing import jump_hash, key_hash

from .adversarial import ADVERSARIAL_KEYS

#: ``make soak`` (CP_SOAK=1) runs ten times more examples.
SCALE = 10 if os.environ.get("CP_SOAK") == "1" else 1
PROPS = settings(max_examples=150 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Anything at all a caller might pass where a name, key or setting is expected.
anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary(),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.just(object()), st.just(lambda args: "k"), st.just(float("nan")),
)
#: Text including lone surrogates (str values that cannot be encoded as UTF-8).
any_text = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)
#: Values JSON can carry (what task arguments are).
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False),
              any_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
#: An id-ish value: what an ``order_id`` argument may be, good or bad.
id_values = st.one_of(st.none(), st.just(""), st.booleans(), st.integers(), st.floats(allow_nan=False),
                      any_text, st.sampled_from(ADVERSARIAL_KEYS), st.lists(st.integers(), max_size=2))


def _is_partitioning_error(exc: BaseException) -> bool:
    return isinstance(exc, PartitioningError) and bool(str(exc).strip())


def outcome(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """Run ``fn``; a PartitioningError is an outcome, any other exception fails the test."""
    try:
        return fn(), None
    except PartitioningError as exc:
        assert str(exc).strip(), f"{type(exc).__name__} with an empty message"
        return None, exc
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__} instead of a PartitioningError: {exc!r}")


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- hashing ------------------------------------------------------------------------------


def reference_jump(key: int, buckets: int) -> int:
    """Lamping & Veach 2014, written as in the paper (the spec's reference)."""
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * 2862933555777941757 + 1) % 2**64
        j = int(float(b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


@PROPS
@given(st.integers(min_value=0, max_value=2**64 - 1), st.integers(min_value=1, max_value=MAX_PARTITIONS))
def test_jump_hash_matches_the_paper(h: int, buckets: int) -> None:
    assert jump_hash(h, buckets) == reference_jump(h, buckets)


@PROPS
@given(key=st.one_of(any_text, st.sampled_from(ADVERSARIAL_KEYS), anything),
       partitions=st.one_of(st.integers(min_value=-3, max_value=5000), anything))
@example(key="Order:\ud800", partitions=8)  # a lone surrogate cannot be hashed as UTF-8
def test_partition_for_is_in_range_or_a_partitioning_error(key: Any, partitions: Any) -> None:
    index, error = outcome(lambda: partition_for(key, partitions))
    valid_key = isinstance(key, str) and key != "" and utf8(key)
    valid_count = type(partitions) is int and partitions >= 1
    if valid_key and valid_count:
        assert error is None
        assert index == reference_jump(key_hash(key), partitions)
        assert 0 <= index < partitions
    else:
        assert error is not None, f"partition_for({key!r}, {partitions!r}) returned {index!r}"
        if not valid_key and valid_count:
            assert isinstance(error, PartitionKeyError)
        if valid_key and not valid_count:
            assert isinstance(error, PartitionConfigError) and "partitions" in str(error)


# --- key helpers --------------------------------------------------------------------------


def oracle_id(named: Mapping[Any, Any], fields: tuple[str, ...]) -> str | None:
    """The id SPEC says a helper key reads: the first present (non-None) field, str or int."""
    for field in fields:
        if field in named and named[field] is not None:
            value = named[field]
            if isinstance(value, str) and value:
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            return None
    return None


def entity_fields(entity_type: str) -> tuple[str, ...]:
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", entity_type).lower()
    return ("stream_id", f"{snake}_id", "streamId", entity_type[:1].lower() + entity_type[1:] + "Id")


@PROPS
@given(entity_type=st.one_of(any_text, anything), field=st.one_of(st.none(), any_text, anything))
def test_entity_key_factory_accepts_or_rejects_with_a_key_error(entity_type: Any, field: Any) -> None:
    made, error = outcome(lambda: cp.create_entity_partition_key(entity_type, field))
    if error is not None:
        assert isinstance(error, PartitionKeyError)
        assert "entity_type" in str(error) or "field" in str(error)
        return
    assert callable(made)
    assert isinstance(entity_type, str) and entity_type.strip() and ":" not in entity_type


@PROPS
@given(entity_type=st.sampled_from(["Order", "OrderLine", "customerAccount", "X", "{0}", "Ünïcödé"]),
       named=st.one_of(
           st.dictionaries(st.sampled_from(["stream_id", "order_id", "streamId", "orderId", "order_line_id",
                                            "orderLineId", "x_id", "xId", "sku", "qty"]),
                           id_values, max_size=5),
           anything))
def test_entity_key_function_returns_the_spec_key_or_a_key_error(entity_type: str, named: Any) -> None:
    key_fn = cp.create_entity_partition_key(entity_type)
    key, error = outcome(lambda: key_fn(named))
    expected = oracle_id(named, entity_fields(entity_type)) if isinstance(named, Mapping) else None
    if expected is None:
        assert isinstance(error, PartitionKeyError), f"{named!r} gave {key!r}"
        assert "create_entity_partition_key" in str(error)
    else:
        assert error is None
        assert key == f"{entity_type}:{expected}"  # the id is data: braces, '*', ':' stay as they are


@PROPS
@given(factory=st.sampled_from([cp.create_customer_partition_key, cp.create_saga_partition_key]),
       field=st.one_of(st.none(), st.sampled_from(["customer_id", "correlation_id", "tenant"]), any_text, anything),
       named=st.one_of(st.dictionaries(st.sampled_from(["customer_id", "customerId", "correlation_id",
                                                        "correlationId", "tenant"]), id_values, max_size=4),
                       anything))
def test_plain_key_functions_return_the_id_or_a_key_error(factory: Callable[..., Any], field: Any,
                                                          named: Any) -> None:
    made, error = outcome(lambda: factory() if field is None else factory(field))
    if error is not None:
        assert isinstance(error, PartitionKeyError) and "field" in str(error)
        return
    key, error = outcome(lambda: made(named))
    name = field or ("customer_id" if factory is cp.create_customer_partition_key else "correlation_id")
    head, *rest = name.split("_")
    camel = head + "".join(part[:1].upper() + part[1:] for part in rest)
    expected = oracle_id(named, (name, camel)) if isinstance(named, Mapping) else None
    if expected is None:
        assert isinstance(error, PartitionKeyError)
    else:
        assert key == expected


@PROPS
@given(tenant=st.one_of(any_text, anything), scope_type=st.one_of(any_text, anything),
       scope_id=st.one_of(any_text, st.sampled_from(ADVERSARIAL_KEYS), anything))
def test_scope_and_dcb_keys(tenant: Any, scope_type: Any, scope_id: Any) -> None:
    scope, error = outcome(lambda: cp.create_scope_key(tenant, scope_type, scope_id))
    ok = all(isinstance(v, str) and v.strip() for v in (tenant, scope_type, scope_id)) and not (
        ":" in tenant or ":" in scope_type)
    if not ok:
        assert isinstance(error, PartitionKeyError)
        return
    assert scope == f"tenant:{tenant}:{scope_type}:{scope_id}"
    # The scope key parses back unambiguously: ':' may only appear in the id.
    _, t, s, i = scope.split(":", 3)
    assert (t, s, i) == (tenant, scope_type, scope_id)
    dcb = cp.create_dcb_partition_key(scope)
    assert dcb == "dcb:" + scope and cp.create_dcb_partition_key(dcb) == dcb


@PROPS
@given(value=st.one_of(any_text, anything))
def test_dcb_key_and_recommended_parallelism_reject_with_partitioning_errors(value: Any) -> None:
    dcb, error = outcome(lambda: cp.create_dcb_partition_key(value))
    if error is None:
        assert isinstance(dcb, str) and dcb.startswith("dcb:")
    else:
        assert isinstance(error, PartitionKeyError) and "scope_key" in str(error)
    count, error = outcome(lambda: cp.get_recommended_parallelism(value))
    if error is None:
        assert value in ("entity", "customer", "saga", "global", "dcb") and type(count) is int
    else:
        assert isinstance(error, PartitionConfigError) and "strategy" in str(error)


# --- decorators ---------------------------------------------------------------------------


@PROPS
@given(key=anything, pool=st.one_of(any_text, anything), name=st.one_of(any_text, anything))
def test_decorators_reject_bad_options_with_a_config_error(key: Any, pool: Any, name: Any) -> None:
    _, error = outcome(lambda: cp.partitioned(key, pool=pool))
    if error is None:
        assert callable(key) and isinstance(pool, str) and pool
    else:
        assert isinstance(error, PartitionConfigError) and "@partitioned" in str(error)
    _, error = outcome(lambda: cp.projection(name, key=key, pool=pool))
    if error is None:  # a projection without a key or pool is allowed here, refused at validation
        assert isinstance(name, str) and name
        assert key is None or callable(key)
        assert pool is None or (isinstance(pool, str) and pool)
    else:
        assert isinstance(error, PartitionConfigError) and "projection" in str(error)


# --- settings -----------------------------------------------------------------------------

def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


pool_names = st.one_of(st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"), any_text, anything)
pool_counts = st.one_of(st.integers(min_value=-2, max_value=MAX_PARTITIONS + 2), anything)
setting_values = {
    "partitioning_pools": st.one_of(st.dictionaries(pool_names.filter(_hashable), pool_counts,
                                                    max_size=3), anything),
    "partitioning_queue_prefix": st.one_of(st.from_regex(r"\A[A-Za-z0-9_.:-]{1,128}\Z"), any_text, anything),
    "partitioning_lease_ttl": st.one_of(st.floats(min_value=-10, max_value=4000), st.integers(-5, 4000),
                                        anything),
    "partitioning_redis_url": st.one_of(st.sampled_from(["redis://h:1/2", "rediss://h", "unix:///tmp/r.sock",
                                                         "amqp://x", "redis:/", ""]), any_text, anything),
}


def setting_is_valid(name: str, value: Any) -> bool:
    if value is None:
        return True  # the default
    if name == "partitioning_pools":
        return isinstance(value, Mapping) and bool(value) and all(
            isinstance(p, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", p) is not None
            and type(c) is int and 1 <= c <= MAX_PARTITIONS for p, c in value.items())
    if name == "partitioning_queue_prefix":
        return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.:-]{1,128}", value) is not None
    if name == "partitioning_lease_ttl":
        return type(value) in (int, float) and 1 <= value <= 3600
    if name == "partitioning_redis_url":
        return isinstance(value, str) and value.startswith(("redis://", "rediss://", "unix://",
                                                            "redis+socket://"))
    raise AssertionError(name)


@PROPS
@given(conf=st.fixed_dictionaries({}, optional=setting_values))
def test_settings_are_validated_with_the_setting_named(conf: dict[str, Any]) -> None:
    result, error = outcome(lambda: read_settings(conf))
    bad = [name for name, value in conf.items() if not setting_is_valid(name, value)]
    if not bad:
        assert error is None, f"valid settings rejected: {error}"
        assert result.queue_name("p", 3) == f"{result.queue_prefix}.p.3"
        return
    assert isinstance(error, PartitionConfigError), f"{conf!r} accepted"
    message = str(error)
    assert any(name in message for name in bad), message
    assert "Django: CELERY_PARTITIONING_" in message  # says how to spell it in Django too


# --- publishing: arguments, never a wrong queue -------------------------------------------


def order_item_added(order_id: Any, sku: Any, qty: Any = 1) -> None:
    """The task function: its signature decides the argument binding."""


def order_event(stream_id: Any = None, **payload: Any) -> None:
    """A task taking a stream id or any payload."""


class MemoryApp:
    """A partitioned app on kombu's in-memory broker, with a view of its queues."""

    def __init__(self) -> None:
        self.prefix = f"rel{uuid.uuid4().hex[:8]}"
        self.app = Celery(self.prefix, broker="memory://", set_as_current=False)
        self.app.conf.update(partitioning_pools={"entity": 8}, partitioning_queue_prefix=self.prefix,
                             task_default_queue=f"{self.prefix}.default")
        cp.install(self.app)
        key = cp.create_entity_partition_key("Order")
        self.item_added = self.app.task(name="rel.item_added", shared=False)(cp.partitioned(key, pool="entity")(order_item_added))
        self.event = self.app.task(name="rel.event", shared=False)(cp.partitioned(key, pool="entity")(order_event))
        self.app.finalize()

    def sizes(self) -> dict[str, int]:
        return {name: q.qsize() for name, q in MemoryChannel.queues.items() if name.startswith(self.prefix)}

    def last_message(self, queue: str) -> dict[str, Any]:
        message: dict[str, Any] = MemoryChannel.queues[queue].queue[-1]
        return message

    def purge(self) -> None:
        for name in list(MemoryChannel.queues):
            if name.startswith(self.prefix):
                MemoryChannel.queues.pop(name, None)


@pytest.fixture(scope="module")
def memory_app() -> Iterator[MemoryApp]:
    app = MemoryApp()
    yield app
    app.purge()
    app.app.close()


def binds(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[Any, Any]) -> dict[Any, Any] | None:
    """The call's arguments by name under Python's own rules, or None when the call is invalid."""
    try:
        bound = inspect.signature(function).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    named = dict(bound.arguments)
    named.update(named.pop("payload", {}))
    return named


def expected_key(named: Mapping[Any, Any]) -> str | None:
    """The oracle: SPEC's entity key rules over the bound arguments."""
    found = oracle_id(named, entity_fields("Order"))
    return None if found is None or not utf8(found) else f"Order:{found}"


def publish(memory_app: MemoryApp, how: str, task: Any, args: tuple[Any, ...], kwargs: dict[Any, Any]) -> None:
    if how == "apply_async":
        task.apply_async(args, kwargs)
    elif how == "delay":
        task.delay(*args, **kwargs)
    elif how == "send_task":
        memory_app.app.send_task(task.name, args, kwargs)
    elif how == "signature":
        task.signature(args, kwargs).apply_async()
    else:
        raise AssertionError(how)


arg_names = st.sampled_from(["order_id", "sku", "qty", "stream_id", "streamId", "orderId", "other", "", "a b"])
call_kwargs = st.dictionaries(st.one_of(arg_names, st.integers(0, 3)), st.one_of(id_values, json_values),
                              max_size=4)


@PROPS
@given(which=st.sampled_from(["item_added", "event"]),
       how=st.sampled_from(["apply_async", "delay", "send_task", "signature"]),
       args=st.lists(st.one_of(id_values, json_values), max_size=4).map(tuple),
       kwargs=call_kwargs)
@example(which="event", how="apply_async", args=(), kwargs={1: "x", "sku": "s"})
@example(which="item_added", how="apply_async", args=("\ud800", "s"), kwargs={})
def test_any_call_publishes_on_its_partition_or_raises_a_key_error(
    memory_app: MemoryApp, which: str, how: str, args: tuple[Any, ...], kwargs: dict[Any, Any]
) -> None:
    task = getattr(memory_app, which)
    function = order_item_added if which == "item_added" else order_event
    str_names = all(isinstance(name, str) for name in kwargs)
    if how == "delay":
        assume(str_names)  # f(**{1: 2}) fails in Python itself, before Celery
    named = binds(function, args, kwargs if str_names else {k: v for k, v in kwargs.items()
                                                            if isinstance(k, str)})
    if named is not None and not str_names:
        if which == "item_added":
            named = None  # no **kwargs to take a non-str name: an invalid call
        else:
            named.update(kwargs)
    key = None if named is None else expected_key(named)
    before = memory_app.sizes()
    try:
        publish(memory_app, how, task, args, kwargs)
        error: BaseException | None = None
    except PartitioningError as exc:
        error = exc
    except TypeError as exc:
        # Celery's own argument check (``Task.typing``) runs before routing, as in plain
        # Celery: accepted only for calls that Python itself would refuse.
        assert (named is None or not str_names) and how != "send_task", f"TypeError on a valid call: {exc!r}"
        error = exc
    except Exception as exc:
        pytest.fail(f"{type(exc).__name__} instead of a PartitioningError: {exc!r}")
    after = memory_app.sizes()
    grown = {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}
    if key is None:
        assert error is not None, f"{args!r} {kwargs!r} was published: {grown}"
        if isinstance(error, PartitioningError):
            assert isinstance(error, PartitionKeyError)
            assert task.name in str(error) and "nothing was published" in str(error)
        assert grown == {}, f"a rejected call published {grown}"
        return
    if error is not None and not str_names:
        # Refusing non-str argument names is fine (Celery's own check, or ours).
        assert isinstance(error, (PartitionKeyError, TypeError)) and grown == {}
        return
    assert error is None, f"valid call refused: {error}"
    index = partition_for(key, 8)
    queue = f"{memory_app.prefix}.entity.{index}"
    assert grown == {queue: 1}, f"key {key!r} should go to {queue}, went to {grown}"
    headers = memory_app.last_message(queue)["headers"]
    assert (headers["partition_key"], headers["partition_pool"], headers["partition_index"],
            headers["partition_count"]) == (key, "entity", index, 8)


@FEW
@given(how=st.sampled_from(["apply_async", "signature"]),
       options=st.fixed_dictionaries({}, optional={
           "queue": st.sampled_from(["celery", "elsewhere", "x.entity.0"]),
           "routing_key": st.sampled_from(["celery", "elsewhere"]),
           "exchange": st.sampled_from(["other", "amq.topic"]),
           "priority": st.integers(1, 9),
       }))
def test_options_that_would_bypass_the_partition_are_refused(memory_app: MemoryApp, how: str,
                                                             options: dict[str, Any]) -> None:
    assume(options)
    before = memory_app.sizes()
    task = memory_app.item_added
    if how == "apply_async":
        call = lambda: task.apply_async(("ord-1", "s"), **options)  # noqa: E731
    else:
        call = lambda: task.signature(("ord-1", "s"), options=options).apply_async()  # noqa: E731
    _, error = outcome(call)
    assert isinstance(error, PartitionKeyError), f"{options} accepted"
    assert "nothing was published" in str(error)
    assert memory_app.sizes() == before


def test_a_bad_pools_setting_fails_the_publish_not_the_broker() -> None:
    app = Celery("rel-badconf", broker="memory://", set_as_current=False)
    app.conf.partitioning_pools = {"entity": 0}
    cp.install(app)

    @app.task(name="rel.badconf", shared=False)
    @cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
    def badconf(order_id: str) -> None: ...

    before = {name: q.qsize() for name, q in MemoryChannel.queues.items()}
    with pytest.raises(PartitionConfigError, match="partitioning_pools"):
        badconf.delay("ord-1")
    assert {name: q.qsize() for name, q in MemoryChannel.queues.items()} == before
    app.close()


@pytest.mark.parametrize("key", ADVERSARIAL_KEYS, ids=range(len(ADVERSARIAL_KEYS)))
def test_adversarial_keys_route_as_data(memory_app: MemoryApp, key: str) -> None:
    before = memory_app.sizes()
    memory_app.item_added.apply_async((key, "sku"))
    index = partition_for(f"Order:{key}", 8)
    queue = f"{memory_app.prefix}.entity.{index}"
    after = memory_app.sizes()
    assert {n: after[n] - before.get(n, 0) for n in after if after[n] != before.get(n, 0)} == {queue: 1}
    message = memory_app.last_message(queue)
    assert message["headers"]["partition_key"] == f"Order:{key}"
    # The key is data in the message, not a part of its address.
    assert key not in queue and json.loads(json.dumps(message["headers"]))["partition_key"] == f"Order:{key}"


def test_huge_keys_do_not_grow_the_routers_memo(memory_app: MemoryApp) -> None:
    """The router memoizes key → partition; megabyte keys must not be kept (memory bound)."""
    from celery_partitioning.state import partitioning_of

    plan: Any = partitioning_of(memory_app.app).router._plan("rel.item_added", memory_app.item_added)
    memory_app.item_added.apply_async(("small-key", "s"))
    assert "Order:small-key" in plan.memo  # the memo is in use: this test can fail
    held = sum(len(k) for k in plan.memo)
    for i in range(20):
        memory_app.item_added.apply_async((f"{i}" + "x" * 1_000_000, "s"))
    assert sum(len(k) for k in plan.memo) - held < 1_000_000
    memory_app.purge()
