"""Partition key helpers: build the key a message is routed by (pure)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import PartitionConfigError, PartitionKeyError

__all__ = ["GLOBAL_PARTITION_KEY", "KeyFunction", "create_entity_partition_key",
           "create_customer_partition_key", "create_saga_partition_key",
           "create_dcb_partition_key", "create_scope_key", "get_recommended_parallelism",
           "entity_type_of", "RECOMMENDED_PARALLELISM"]

#: The key of a global rollup: every message of it runs on one partition, one at a time.
GLOBAL_PARTITION_KEY: Final = "global"

#: Prefix of every DCB (dynamic consistency boundary) partition key.
DCB_PREFIX: Final = "dcb:"

#: Partitions recommended per strategy (the default pool sizes).
RECOMMENDED_PARALLELISM: Final[Mapping[str, int]] = {
    "entity": 10,
    "customer": 5,
    "saga": 5,
    "global": 1,
    "dcb": 5,
}

#: A key function: the call's arguments by parameter name → a non-empty partition key.
KeyFunction = Callable[[Mapping[str, Any]], str]


def argument_names(named: Mapping[str, Any]) -> str:
    """A call's argument names, for error messages (a ``**kwargs`` name may be non-str)."""
    return ", ".join(sorted(map(str, named))) or "no arguments"


def call_on_arguments(where: str, function: Callable[[Mapping[str, Any]], Any],
                      named: Mapping[str, Any]) -> Any:
    """``function(named)``, a user's function of a call's arguments; what it raises becomes a
    ``PartitionKeyError`` naming ``where`` and the arguments."""
    try:
        return function(named)
    except PartitionKeyError as exc:
        raise PartitionKeyError(f"{where} failed on arguments ({argument_names(named)}): {exc}; "
                                "nothing was published") from None
    except Exception as exc:
        raise PartitionKeyError(f"{where} raised {type(exc).__name__}: {exc} on arguments "
                                f"({argument_names(named)}); nothing was published") from exc


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _camel(name: str) -> str:
    return name[:1].lower() + name[1:]


def _camel_of_snake(field: str) -> str:
    head, *rest = field.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PartitionKeyError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _id_text(value: object) -> str | None:
    """An identifier as key text: a non-empty str, or an int; anything else is None."""
    if isinstance(value, str):
        return value if value else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _read_id(args: Mapping[str, Any], fields: tuple[str, ...], describe: str) -> str:
    present_none: list[str] = []
    try:
        for field in fields:
            value = args.get(field)
            if value is None:
                if field in args:
                    present_none.append(field)
                continue
            if type(value) is str and value:
                return value
            text = _id_text(value)
            if text is None:
                raise PartitionKeyError(
                    f"{describe}: argument {field!r} must be a non-empty str or an int, got {value!r}"
                )
            return text
    except AttributeError:
        raise PartitionKeyError(
            f"{describe} takes a mapping of the call's arguments, got {type(args).__name__}"
        ) from None
    if present_none:
        raise PartitionKeyError(
            f"{describe}: argument {' and '.join(map(repr, present_none))} "
            f"{'is' if len(present_none) == 1 else 'are'} present but None; "
            "pass the id (a non-empty str or an int)"
        )
    raise PartitionKeyError(
        f"{describe}: none of the arguments {', '.join(map(repr, fields))} is present; "
        f"the call has {sorted(map(str, args)) or 'no arguments'}"
    )


@dataclass(frozen=True)
class _FieldKey:
    """A key function that reads an id from one of several argument names: ``prefix + id``."""

    describe: str
    fields: tuple[str, ...]
    prefix: str
    #: The strategy this key belongs to; a projection without ``pool=`` uses that pool.
    strategy: str

    def __call__(self, args: Mapping[str, Any]) -> str:
        return self.prefix + _read_id(args, self.fields, self.describe)

    def __repr__(self) -> str:
        return self.describe


def create_entity_partition_key(entity_type: str, field: str | None = None) -> KeyFunction:
    """Key function for per-entity ordering: ``Order`` + ``order_id="ord-123"`` → ``Order:ord-123``.

    The id is ``field`` when given, else the first present of ``stream_id``,
    ``<snake_type>_id``, ``streamId``, ``<camelType>Id``.
    """
    _check_name("entity_type", entity_type)
    if ":" in entity_type:
        raise PartitionKeyError(f"entity_type {entity_type!r} must not contain ':'")
    if field is not None:
        fields: tuple[str, ...] = (_check_name("field", field),)
    else:
        fields = ("stream_id", f"{_snake(entity_type)}_id", "streamId", f"{_camel(entity_type)}Id")
    describe = f"create_entity_partition_key({entity_type!r}" + (
        f", field={field!r})" if field is not None else ")"
    )
    return _FieldKey(describe, fields, entity_type + ":", "entity")


def entity_type_of(key_function: object) -> str | None:
    """The entity type of a key function made by :func:`create_entity_partition_key`, else None."""
    if isinstance(key_function, _FieldKey) and key_function.strategy == "entity":
        return key_function.prefix[:-1]
    return None


def _plain_key(factory: str, field: str, strategy: str) -> KeyFunction:
    _check_name("field", field)
    camel = _camel_of_snake(field)
    fields = (field,) if camel == field else (field, camel)
    return _FieldKey(f"{factory}(field={field!r})", fields, "", strategy)


def create_customer_partition_key(field: str = "customer_id") -> KeyFunction:
    """Key function for per-customer ordering: ``customer_id="cust-123"`` → ``cust-123``."""
    return _plain_key("create_customer_partition_key", field, "customer")


def create_saga_partition_key(field: str = "correlation_id") -> KeyFunction:
    """Key function for causal order across a saga: ``correlation_id="corr-123"`` → ``corr-123``."""
    return _plain_key("create_saga_partition_key", field, "saga")


def create_dcb_partition_key(scope_key: str) -> str:
    """The partition key of a DCB scope: ``tenant:T:reservation:r1`` → ``dcb:tenant:T:reservation:r1``.

    Idempotent: a key that already starts with ``dcb:`` is returned as it is, so commands
    and their conflict retries always agree on one key.
    """
    _check_name("scope_key", scope_key)
    return scope_key if scope_key.startswith(DCB_PREFIX) else DCB_PREFIX + scope_key


def create_scope_key(tenant_id: str, scope_type: str, scope_id: str) -> str:
    """A DCB scope key: ``("T", "reservation", "res-456")`` → ``tenant:T:reservation:res-456``."""
    for what, value in (("tenant_id", tenant_id), ("scope_type", scope_type)):
        _check_name(what, value)
        if ":" in value:
            raise PartitionKeyError(f"{what} {value!r} must not contain ':' (it separates the scope key)")
    _check_name("scope_id", scope_id)
    return f"tenant:{tenant_id}:{scope_type}:{scope_id}"


def get_recommended_parallelism(strategy: str) -> int:
    """Recommended number of partitions for a strategy: entity 10, customer 5, saga 5, global 1, dcb 5."""
    try:
        return RECOMMENDED_PARALLELISM[strategy]
    except (KeyError, TypeError):
        raise PartitionConfigError(
            f"unknown partition strategy {strategy!r}; "
            f"choose one of {', '.join(RECOMMENDED_PARALLELISM)}"
        ) from None
