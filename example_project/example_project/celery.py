"""The Celery app, in the standard Django layout: configured only from Django settings."""

from __future__ import annotations

import os

from celery import Celery

import celery_partitioning

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

app = Celery("example_project")
app.config_from_object("django.conf:settings", namespace="CELERY")


# CELERY_SHOP_ORDERING="plain" is the comparison mode of the demo: the same tasks on plain
# Celery routing. Everything else gets per-key FIFO. (Reading app.conf here loads the
# Django settings, which the standard layout allows: DJANGO_SETTINGS_MODULE is set above.)
if app.conf.get("shop_ordering", "partitioned") != "plain":
    celery_partitioning.install(app)

app.autodiscover_tasks()
