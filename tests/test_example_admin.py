"""The example project starts, passes its checks, and its admin lists every projection (no broker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.procs import ROOT

PROJECT = ROOT / "example_project"

SCRIPT = r"""
from django.contrib.auth.models import User
from django.test import Client
from django.test.utils import setup_test_environment

from shop.projections import PROJECTIONS
from shop.tasks import apply_to_row

setup_test_environment()
apply_to_row("orderSummary", {"type": "OrderCreated", "order_id": "ord-1", "customer_id": "c-1",
                              "correlation_id": "corr-ord-1", "position": 1})
user = User.objects.create_superuser("admin", "admin@example.com", "pw")
client = Client()
client.force_login(user)
index = client.get("/admin/").content.decode()
for projection in PROJECTIONS:
    path = f"/admin/shop/{projection.model.lower()}/"
    response = client.get(path)
    assert response.status_code == 200, (path, response.status_code)
    assert path in index, path
row = client.get("/admin/shop/ordersummary/")
assert b"ord-1" in row.content
print("ADMIN-OK", len(PROJECTIONS))
"""


def _manage(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHOP_DATABASE": str(tmp_path / "admin.sqlite3"),
           "PYTHONPATH": os.pathsep.join([str(PROJECT), str(ROOT)])}
    return subprocess.run([sys.executable, "manage.py", *args], cwd=PROJECT, env=env, check=False,
                          capture_output=True, text=True, timeout=120)


def test_the_project_checks_clean_and_has_no_missing_migrations(tmp_path: Path) -> None:
    check = _manage(["check", "--fail-level", "WARNING"], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    missing = _manage(["makemigrations", "--check", "--dry-run", "shop"], tmp_path)
    assert missing.returncode == 0, missing.stdout + missing.stderr


def test_the_admin_lists_every_projection(tmp_path: Path) -> None:
    migrate = _manage(["migrate", "-v", "0"], tmp_path)
    assert migrate.returncode == 0, migrate.stderr
    shell = _manage(["shell", "-c", SCRIPT], tmp_path)
    assert shell.returncode == 0, shell.stdout + shell.stderr
    assert "ADMIN-OK 6" in shell.stdout
