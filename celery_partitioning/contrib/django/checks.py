"""The Django system check: the Celery app's partitioning settings and its task registry.

W001 says why no app has partitioning, because the fix differs: in a Django project the usual
cause is that the Celery app module was never imported (Django imports ``proj/__init__.py``,
and only that imports ``proj/celery.py``), not a missing ``install(app)``.
"""

from __future__ import annotations

from typing import Any

from django.core import checks

__all__ = ["check_partitioned_tasks", "not_installed"]


def check_partitioned_tasks(app_configs: Any = None, **_: Any) -> list[checks.CheckMessage]:
    """Django system check: the current Celery app's partitioning settings and registry."""
    from celery import current_app

    from ...errors import PartitioningError
    from ...state import STATE_ATTRIBUTE
    from ...validation import assert_valid_partition_keys

    app = current_app._get_current_object()
    if STATE_ATTRIBUTE not in vars(app):
        return [not_installed(app)]
    # Celery's Django fixup runs the system checks when the task modules are imported
    # (import_modules → validate_models → run_checks): importing them from here re-enters
    # this check. The flag on the app stops that recursion; the outer call does the work.
    if vars(app).get("_celery_partitioning_checking"):
        return []
    app._celery_partitioning_checking = True
    try:
        app.loader.import_default_modules()
    finally:
        app._celery_partitioning_checking = False
    try:
        assert_valid_partition_keys(app)
    except PartitioningError as exc:
        lines = [line.strip()[2:] for line in str(exc).splitlines()[1:] if line.strip()]
        return [checks.Error(line or str(exc), id="celery_partitioning.E001") for line in lines or [str(exc)]]
    return []


def not_installed(app: Any) -> checks.Warning:
    """W001 for ``app``, the current Celery app, which has no partitioning installed."""
    package = _project_package()
    if _is_celery_fallback(app):
        return checks.Warning(
            "no Celery app with celery_partitioning installed was imported: this process "
            f"has only Celery's fallback app, so {package}/celery.py never ran",
            hint=f"add `from .celery import app as celery_app` to {package}/__init__.py, as "
                 "Celery's Django guide does (and in the celery.py, "
                 f"`os.environ.setdefault(\"DJANGO_SETTINGS_MODULE\", \"{package}.settings\")` "
                 "before creating the app)",
            id="celery_partitioning.W001",
        )
    return checks.Warning(
        f"the Celery app {app.main or '<unnamed>'!r} has no celery_partitioning installed",
        hint=f"call celery_partitioning.install(app) in {package}/celery.py, after "
             "app.config_from_object(...)",
        id="celery_partitioning.W001",
    )


def _is_celery_fallback(app: Any) -> bool:
    """Whether ``app`` is the app Celery makes up when no app was created: named "default" and
    not set as current, which every ``Celery(...)`` is unless told otherwise."""
    return bool(app.main == "default" and not app.set_as_current)


def _project_package() -> str:
    """The package holding the settings module (``proj`` for ``proj.settings``), else "proj"."""
    from django.conf import settings

    module = getattr(settings, "SETTINGS_MODULE", None) or ""
    return module.rpartition(".")[0] or "proj"
