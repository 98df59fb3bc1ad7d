"""DCB helpers without a broker: backoff, the canonical key, the decorator's contract."""

from __future__ import annotations

import pickle

import pytest
from celery import Celery

import celery_partitioning as cp
from celery_partitioning.dcb import DCBConflict, dcb_backoff, dcb_partition_key, with_dcb_retry
from celery_partitioning.errors import PartitionConfigError, PartitioningError, PartitionKeyError


def make_app() -> Celery:
    app = Celery("dcb_unit", set_as_current=False)
    app.conf.partitioning_pools = {"dcb": 5, "entity": 3}
    cp.install(app)
    return app


def test_backoff_follows_the_formula_and_is_capped_at_30s() -> None:
    for retries in range(12):
        low = dcb_backoff(retries, rng=lambda: 0.0)
        high = dcb_backoff(retries, rng=lambda: 1.0)
        assert low == pytest.approx(min(30.0, 0.1 * 2**retries * 0.5))
        assert high == pytest.approx(min(30.0, 0.1 * 2**retries * 1.5))
    assert dcb_backoff(0) == pytest.approx(0.1, abs=0.05)
    assert dcb_backoff(10_000) == 30.0
    with pytest.raises(ValueError):
        dcb_backoff(-1)


def test_commands_and_their_retries_share_one_canonical_key() -> None:
    app = make_app()

    @app.task(name="dcb.reserve", shared=False)
    @with_dcb_retry(scope_key="tenant:{tenant_id}:reservation:{reservation_id}")
    def reserve(tenant_id: str, reservation_id: str, qty: int) -> None: ...

    @app.task(name="dcb.cancel", shared=False)
    @cp.partitioned(dcb_partition_key(lambda a: cp.create_scope_key(a["tenant_id"], "reservation",
                                                                    a["reservation_id"])), pool="dcb")
    def cancel(tenant_id: str, reservation_id: str) -> None: ...

    scope = cp.create_scope_key("T", "reservation", "res-456")
    first = cp.explain_route(app, "dcb.reserve", "T", "res-456", qty=2)
    other = cp.explain_route(app, "dcb.cancel", reservation_id="res-456", tenant_id="T")
    assert first.key == other.key == cp.create_dcb_partition_key(scope) == "dcb:tenant:T:reservation:res-456"
    assert first.pool == "dcb" and first.queue == other.queue
    # the key never doubles its prefix, whichever side adds it
    assert cp.create_dcb_partition_key(first.key) == first.key


def test_a_scope_may_be_a_literal_a_template_or_a_function() -> None:
    assert dcb_partition_key("tenant:T:global:g")({}) == "dcb:tenant:T:global:g"
    assert dcb_partition_key("tenant:{t}:x:{i}")({"t": "T", "i": 7}) == "dcb:tenant:T:x:7"
    assert dcb_partition_key(lambda a: f"tenant:{a['t']}:x:1")({"t": "A"}) == "dcb:tenant:A:x:1"
    with pytest.raises(PartitionKeyError, match="needs argument 'i'"):
        dcb_partition_key("tenant:{t}:x:{i}")({"t": "T"})
    with pytest.raises(PartitionKeyError, match="non-empty str"):
        dcb_partition_key(lambda a: "")({})


def test_a_missing_scope_argument_fails_at_publish_time() -> None:
    app = make_app()

    @app.task(name="dcb.bad", shared=False)
    @with_dcb_retry(scope_key="tenant:{tenant_id}:reservation:{reservation_id}")
    def bad(tenant_id: str) -> None: ...

    with pytest.raises(PartitionKeyError, match="reservation_id"):
        cp.explain_route(app, "dcb.bad", "T")


def test_the_decorator_rejects_bad_options_when_declared() -> None:
    with pytest.raises(PartitionConfigError, match="max_attempts"):
        with_dcb_retry(scope_key="s", max_attempts=0)
    with pytest.raises(PartitionConfigError, match="scope_key"):
        with_dcb_retry(scope_key="")
    app = make_app()

    @app.task(name="dcb.plain", shared=False)
    def plain() -> None: ...

    with pytest.raises(PartitionConfigError, match=r"below @app\.task"):
        with_dcb_retry(scope_key="s")(plain)


def test_a_direct_call_lets_the_conflict_through() -> None:
    app = make_app()

    @app.task(name="dcb.direct", shared=False)
    @with_dcb_retry(scope_key="tenant:T:r:1")
    def direct() -> None:
        raise DCBConflict("tenant:T:r:1", expected_version=3, actual_version=4)

    with pytest.raises(DCBConflict) as info:
        direct()
    assert str(info.value) == "DCB conflict on scope 'tenant:T:r:1' (expected version 3, found 4)"


def test_conflict_is_a_partitioning_error_that_survives_pickling() -> None:
    exc = DCBConflict("tenant:T:r:1", 1, 2)
    again = pickle.loads(pickle.dumps(exc))
    assert isinstance(again, PartitioningError)
    assert (again.scope_key, again.expected_version, again.actual_version) == ("tenant:T:r:1", 1, 2)
    assert str(again) == str(exc)
