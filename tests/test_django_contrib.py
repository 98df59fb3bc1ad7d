"""The Django AppConfig: `manage.py check` reports every misconfigured partitioned task."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.support.env import missing

try:
    import django  # noqa: F401 - only whether it is installed
except ImportError:
    missing("Django is not installed (pip install -e '.[test]')")

SCRIPT = textwrap.dedent(
    """
    import django
    from django.conf import settings
    settings.configure(INSTALLED_APPS=["celery_partitioning.contrib.django"],
                       CELERY_PARTITIONING_POOLS={"entity": 3}, CELERY_BROKER_URL="memory://")
    from celery import Celery
    import celery_partitioning as cp
    app = Celery("djproj", set_as_current=True)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    cp.install(app)

    @app.task(name="shop.order_summary")
    @cp.projection("orderSummary", key=cp.create_entity_partition_key("Order"))
    def order_summary(order_id): ...

    if {broken}:
        @app.task(name="shop.daily_sales")
        @cp.projection("dailySalesSummary", key=lambda a: cp.GLOBAL_PARTITION_KEY, pool="global")
        def daily_sales(order_id): ...

        @app.task(name="shop.no_key")
        @cp.projection("customerOrderHistory")
        def no_key(customer_id): ...

    django.setup()
    from django.core.management import call_command
    call_command("check")
    print("route:", cp.explain_route(app, "shop.order_summary", "ord-1").queue)
    """
)


def run(broken: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT.replace("{broken}", str(broken))],
                          capture_output=True, text=True, timeout=120)


def test_check_passes_and_django_settings_reach_partitioning() -> None:
    proc = run(broken=False)
    assert proc.returncode == 0, proc.stderr
    assert "System check identified no issues" in proc.stdout
    # CELERY_PARTITIONING_POOLS = {"entity": 3} came through the CELERY namespace.
    assert "route: partition.entity." in proc.stdout


def test_check_lists_every_offender() -> None:
    proc = run(broken=True)
    assert proc.returncode != 0
    assert "SystemCheckError" in proc.stderr
    assert "celery_partitioning.E001" in proc.stderr
    assert "(task shop.daily_sales): unknown pool 'global'" in proc.stderr
    assert "(task shop.no_key): has no partition key" in proc.stderr
