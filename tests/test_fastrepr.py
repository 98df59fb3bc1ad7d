"""``fastrepr.saferepr`` is Celery's ``saferepr`` (the argsrepr/kwargsrepr headers), on generated data."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from celery_partitioning.fastrepr import saferepr as fast_saferepr

_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                     st.decimals(allow_nan=False), st.binary(max_size=4))
_keys = st.one_of(st.text(max_size=6), st.integers(), st.none(), st.tuples(st.integers()))
_data = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner), st.tuples(inner, inner),
    st.dictionaries(_keys, inner, max_size=4), st.frozensets(st.integers(), max_size=2)),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(_data, st.sampled_from([None, 0, 8, 60, 1024]), st.sampled_from([0, 1, 3, 5]))
def test_fastrepr_is_celerys_saferepr(value: Any, maxlen: int | None, maxlevels: int) -> None:
    assert fast_saferepr(value, maxlen, maxlevels) == saferepr(value, maxlen, maxlevels=maxlevels)


def test_an_event_is_rendered_without_celerys_function(monkeypatch: pytest.MonkeyPatch) -> None:
    import celery_partitioning.fastrepr as fastrepr

    event = {"type": "ItemAdded", "order_id": "ord-1", "qty": 2, "price": Decimal("9.90"),
             "note": "it's \\ \"ü\"", "lines": [{"sku": "s-1", "qty": 1}], "ok": True, "none": None}
    expected = saferepr(((), {"event": event}), 1024)

    def refuse(*_: Any, **__: Any) -> str:
        raise AssertionError("fell back to Celery's saferepr")

    monkeypatch.setattr(fastrepr, "celery_saferepr", refuse)
    assert fast_saferepr(((), {"event": event}), 1024) == expected
