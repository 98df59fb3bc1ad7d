"""Verification: replay the stored events sequentially, in order, and compare with what the
workers wrote, projection by projection, row by row."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.apps import apps

from .projections import PROJECTIONS, State

__all__ = ["Mismatch", "ProjectionCheck", "replay", "actual_rows", "compare", "verify"]

Rows = dict[str, dict[str, State]]


@dataclass(frozen=True)
class Mismatch:
    projection: str
    row: str
    expected: State | None
    actual: State | None

    def describe(self, width: int = 160) -> str:
        if self.expected is None:
            text = f"unexpected row {self.actual}"
        elif self.actual is None:
            text = "row missing"
        else:
            diffs = [_field_diff(k, self.expected.get(k), self.actual.get(k))
                     for k in sorted(set(self.expected) | set(self.actual))
                     if self.expected.get(k) != self.actual.get(k)]
            text = "; ".join(diffs)
        line = f"{self.projection}[{self.row}] {text}"
        return line if len(line) <= width else line[: width - 3] + "..."


def _field_diff(name: str, expected: Any, actual: Any) -> str:
    """One field's difference; for mappings (order lines), only the entries that differ."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        parts = []
        for key in sorted(set(expected) | set(actual)):
            if key not in expected:
                parts.append(f"extra {key}={actual[key]!r}")
            elif key not in actual:
                parts.append(f"missing {key}={expected[key]!r}")
            elif expected[key] != actual[key]:
                parts.append(f"{key} expected {expected[key]!r}, got {actual[key]!r}")
        return f"{name}: " + ", ".join(parts)
    if isinstance(expected, list) and isinstance(actual, list):
        at = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b),
                  min(len(expected), len(actual)))
        return (f"{name}: from position {at} expected {expected[at:at + 3]!r}, "
                f"got {actual[at:at + 3]!r}")
    return f"{name}: expected {expected!r}, got {actual!r}"


@dataclass
class ProjectionCheck:
    name: str
    rows: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)


def replay(events: Iterable[Mapping[str, Any]]) -> Rows:
    """Every projection computed sequentially from ``events`` (in the order given)."""
    rows: Rows = {p.name: {} for p in PROJECTIONS}
    for event in events:
        for proj in PROJECTIONS:
            if event["type"] in proj.events:
                key = proj.row_key(event)
                rows[proj.name][key] = proj.apply(rows[proj.name].get(key), event)
    return rows


def actual_rows() -> Rows:
    """Every projection as the workers wrote it in the database."""
    rows: Rows = {}
    for proj in PROJECTIONS:
        model = apps.get_model("shop", proj.model)
        pk_name = model._meta.pk.name
        rows[proj.name] = {
            str(row[pk_name]): {k: v for k, v in row.items() if k != pk_name}
            for row in model.objects.values()
        }
    return rows


def compare(expected: Rows, actual: Rows) -> list[ProjectionCheck]:
    """Row-by-row comparison; a row missing, extra or different is one mismatch."""
    checks = []
    for proj in PROJECTIONS:
        want, got = expected.get(proj.name, {}), actual.get(proj.name, {})
        check = ProjectionCheck(proj.name, rows=len(want))
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                check.mismatches.append(Mismatch(proj.name, key, want.get(key), got.get(key)))
        checks.append(check)
    return checks


def verify(events: Iterable[Mapping[str, Any]]) -> list[ProjectionCheck]:
    """Replay ``events`` and compare with the database."""
    return compare(replay(events), actual_rows())
