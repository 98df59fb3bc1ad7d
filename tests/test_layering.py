"""The house rules that keep publishing cheap: a pure core, no broker client on the producer path."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "celery_partitioning"
PURE = ["keys", "hashing", "config", "router", "tasks", "errors"]
#: What the pure core may import besides the standard library and itself.
ALLOWED_THIRD_PARTY = {"kombu", "celery"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE)
def test_the_pure_core_imports_no_broker_client_and_no_django(module: str) -> None:
    roots = imported_roots(PACKAGE / f"{module}.py") - set(sys.stdlib_module_names) - {"__future__"}
    assert roots <= ALLOWED_THIRD_PARTY, f"{module}.py imports {sorted(roots - ALLOWED_THIRD_PARTY)}"


def test_only_contrib_django_imports_django() -> None:
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "django" in imported_roots(p) and "contrib" not in p.parts]
    assert offenders == []


def test_a_producer_import_loads_no_redis_client_and_no_worker_code() -> None:
    code = ("import sys, celery_partitioning; "
            "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('celery_partitioning.worker')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
