"""Run Django code against tests/apps/admin_site in a subprocess (settings are per process).

The subprocess gets the test's failures_app environment (broker, store, namespace), so the
pages read and change exactly the keys the test set up.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.support.failures import env_of
from tests.support.procs import ROOT

__all__ = ["PRELUDE", "django_env", "run_django"]

#: Set up Django, migrate the SQLite file, and import what the scripts use.
PRELUDE = """
import json, os, time
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.test.utils import setup_test_environment
setup_test_environment()
OPERATE = Permission.objects.get(codename="operate_partitions",
                                 content_type__app_label="celery_partitioning")
"""


def django_env(fa: ModuleType, db: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, **env_of(fa), "DJANGO_SETTINGS_MODULE": "tests.apps.admin_site",
            "CP_ADMIN_DB": str(db), "PYTHONPATH": str(ROOT), **extra}


def run_django(fa: ModuleType, db: Path, script: str, timeout: float = 180,
               **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``PRELUDE + script`` with ``python -c``; its stdout and stderr are returned."""
    return subprocess.run([sys.executable, "-c", PRELUDE + script], cwd=ROOT,
                          env=django_env(fa, db, **extra), capture_output=True, text=True,
                          timeout=timeout, check=False)
