"""Key helpers: the seed's key formats, and every bad input named."""

from __future__ import annotations

import pytest

from celery_partitioning import (
    GLOBAL_PARTITION_KEY,
    PartitionConfigError,
    PartitionKeyError,
    create_customer_partition_key,
    create_dcb_partition_key,
    create_entity_partition_key,
    create_saga_partition_key,
    create_scope_key,
    get_recommended_parallelism,
)
from celery_partitioning.keys import KeyFunction


def test_global_key_is_the_constant_global() -> None:
    assert GLOBAL_PARTITION_KEY == "global"


@pytest.mark.parametrize(
    ("entity", "args", "expected"),
    [
        ("Order", {"order_id": "ord-123"}, "Order:ord-123"),
        ("Order", {"orderId": "ord-123"}, "Order:ord-123"),
        ("Order", {"stream_id": "s-1", "order_id": "ord-123"}, "Order:s-1"),
        ("Order", {"streamId": "s-2"}, "Order:s-2"),
        ("OrderLine", {"order_line_id": "l-9"}, "OrderLine:l-9"),
        ("OrderLine", {"orderLineId": "l-9"}, "OrderLine:l-9"),
        ("Product", {"product_id": 42}, "Product:42"),
        ("Order", {"order_id": None, "orderId": "o-2"}, "Order:o-2"),
    ],
)
def test_entity_key_reads_the_first_present_id(entity: str, args: dict[str, object], expected: str) -> None:
    assert create_entity_partition_key(entity)(args) == expected


def test_entity_key_with_explicit_field_reads_only_that_field() -> None:
    key = create_entity_partition_key("Order", field="aggregate")
    assert key({"aggregate": "a-1", "order_id": "o"}) == "Order:a-1"
    with pytest.raises(PartitionKeyError, match="'aggregate'"):
        key({"order_id": "o"})


def test_entity_key_names_missing_fields_and_what_it_saw() -> None:
    with pytest.raises(PartitionKeyError) as err:
        create_entity_partition_key("Order")({"sku": "x", "qty": 1})
    message = str(err.value)
    assert "'order_id'" in message and "'stream_id'" in message and "['qty', 'sku']" in message


@pytest.mark.parametrize(
    ("key", "args", "named"),
    [
        (create_entity_partition_key("Order"), {"order_id": None, "sku": "x"}, "'order_id' is"),
        (create_entity_partition_key("Order", field="ref"), {"ref": None}, "'ref' is"),
        (create_customer_partition_key(), {"customer_id": None}, "'customer_id' is"),
        (create_saga_partition_key(), {"correlation_id": None, "correlationId": None},
         "'correlation_id' and 'correlationId' are"),
    ],
)
def test_an_id_passed_as_none_is_named_as_present_but_none(
        key: KeyFunction, args: dict[str, object], named: str) -> None:
    with pytest.raises(PartitionKeyError) as err:
        key(args)
    message = str(err.value)
    assert f"argument {named} present but None" in message
    assert "none of the arguments" not in message


def test_a_present_none_does_not_hide_a_later_present_id() -> None:
    assert create_entity_partition_key("Order")({"stream_id": None, "order_id": "o-1"}) == "Order:o-1"


@pytest.mark.parametrize("bad", ["", 1.5, True, ["o"], {"a": 1}])
def test_entity_key_rejects_bad_id_values(bad: object) -> None:
    with pytest.raises(PartitionKeyError):
        create_entity_partition_key("Order")({"order_id": bad})


@pytest.mark.parametrize("bad", ["", "  ", None, 3, "Or:der"])
def test_entity_type_must_be_a_plain_name(bad: object) -> None:
    with pytest.raises(PartitionKeyError):
        create_entity_partition_key(bad)  # type: ignore[arg-type]


def test_key_functions_reject_non_mappings() -> None:
    with pytest.raises(PartitionKeyError, match="mapping"):
        create_customer_partition_key()(["cust-1"])  # type: ignore[arg-type]


def test_customer_and_saga_keys() -> None:
    assert create_customer_partition_key()({"customer_id": "cust-123"}) == "cust-123"
    assert create_customer_partition_key()({"customerId": "cust-123"}) == "cust-123"
    assert create_customer_partition_key("buyer_ref")({"buyerRef": "b-1"}) == "b-1"
    assert create_saga_partition_key()({"correlation_id": "corr-123"}) == "corr-123"
    assert create_saga_partition_key()({"correlationId": "corr-123"}) == "corr-123"
    with pytest.raises(PartitionKeyError, match="correlation_id"):
        create_saga_partition_key()({"customer_id": "c"})


def test_key_functions_have_readable_reprs_and_strategies() -> None:
    key = create_entity_partition_key("Order")
    assert repr(key) == "create_entity_partition_key('Order')"
    assert key.strategy == "entity"
    assert create_customer_partition_key().strategy == "customer"
    assert create_saga_partition_key().strategy == "saga"


def test_dcb_and_scope_keys() -> None:
    scope = create_scope_key("T", "reservation", "res-456")
    assert scope == "tenant:T:reservation:res-456"
    assert create_dcb_partition_key(scope) == "dcb:tenant:T:reservation:res-456"
    # One canonical string: prefixing twice is a no-op.
    assert create_dcb_partition_key(create_dcb_partition_key(scope)) == "dcb:" + scope
    assert create_scope_key("T", "entity", "Order:ord-123") == "tenant:T:entity:Order:ord-123"


@pytest.mark.parametrize(
    ("tenant", "kind", "ident"),
    [("T:1", "reservation", "r"), ("T", "res:ervation", "r"), ("", "r", "x"), ("T", "r", ""), ("T", None, "x")],
)
def test_scope_key_rejects_separators_and_empties(tenant: object, kind: object, ident: object) -> None:
    with pytest.raises(PartitionKeyError):
        create_scope_key(tenant, kind, ident)  # type: ignore[arg-type]


def test_dcb_key_rejects_empty() -> None:
    with pytest.raises(PartitionKeyError):
        create_dcb_partition_key("")


def test_recommended_parallelism() -> None:
    assert [get_recommended_parallelism(s) for s in ("entity", "customer", "saga", "global", "dcb")] == [
        10, 5, 5, 1, 5,
    ]
    with pytest.raises(PartitionConfigError, match="unknown partition strategy 'tenant'"):
        get_recommended_parallelism("tenant")
