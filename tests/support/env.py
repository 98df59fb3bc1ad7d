"""What a test may do when something it needs is missing: skip on a laptop, fail in CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["in_ci", "missing"]


def in_ci() -> bool:
    """True under ``CI=true`` (CI runs on a machine that must have every tool)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> NoReturn:
    """Skip the test because ``what`` is missing; under CI fail it instead."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: a missing tool fails the run)", pytrace=False)
    pytest.skip(what)
