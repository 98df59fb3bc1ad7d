"""Django settings of the example shop. Celery is configured here too (``CELERY_*``).

Environment variables (all optional):

``REDIS_URL``            broker (default ``redis://127.0.0.1:6379/0``)
``SHOP_DATABASE``        SQLite file (default ``example_project/db.sqlite3``)
``SHOP_POOLS``           partition pools, ``entity=4,customer=2,saga=2,global=1,dcb=2``
``SHOP_ORDERING``        ``partitioned`` (default) or ``plain`` (plain Celery routing, to compare)
``SHOP_NAMESPACE``       Redis key prefix (kombu ``global_keyprefix``) isolating one run
``SHOP_QUEUE_PREFIX``    partition queue prefix (default ``shop``)
``SHOP_GLOBAL_WRITE_DELAY_MS``  pause between read and write in the global rollup (default 10)
``SHOP_CHECKPOINTS``     ``1`` (default): projections commit a checkpoint with their rows;
                         ``0``: the same tasks without (to show what at-least-once does)
``SHOP_CHAOS``           ``1`` while ``shop_demo --chaos`` runs: workers take part in its kills
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent


def _pools(text: str) -> dict[str, int]:
    pools: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition("=")
        pools[name.strip()] = int(count)
    return pools


SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-shop-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_partitioning.contrib.django",
    "shop",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"
WSGI_APPLICATION = "example_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# SQLite by default. Many worker processes write it at once: WAL lets readers go on while
# one writes, IMMEDIATE transactions take the write lock up front (no upgrade deadlocks),
# and a generous busy timeout makes writers queue instead of failing.
DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("SHOP_DATABASE", str(BASE_DIR / "db.sqlite3")),
        "OPTIONS": {
            "timeout": 60,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        },
    }
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"

# ---- the shop ---------------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SHOP_NAMESPACE = os.environ.get("SHOP_NAMESPACE", "")
SHOP_ORDERING = os.environ.get("SHOP_ORDERING", "partitioned")
SHOP_TENANT = "acme"
SHOP_GLOBAL_WRITE_DELAY_MS = int(os.environ.get("SHOP_GLOBAL_WRITE_DELAY_MS", "10"))
SHOP_CHECKPOINTS = os.environ.get("SHOP_CHECKPOINTS", "1") != "0"
SHOP_CHAOS = os.environ.get("SHOP_CHAOS", "") == "1"
_QUEUE_PREFIX = os.environ.get("SHOP_QUEUE_PREFIX", "shop")

# ---- Celery (read by example_project/celery.py with namespace="CELERY") -------------------
CELERY_BROKER_URL = REDIS_URL
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = (
    {"global_keyprefix": SHOP_NAMESPACE} if SHOP_NAMESPACE else {}
)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Celery's Django fixup closes the database connection after every task unless told to
# reuse it; reconnecting to SQLite (and re-running the PRAGMAs) costs more than the task.
CELERY_DB_REUSE_MAX = 1000
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_PARTITIONING_POOLS = _pools(
    os.environ.get("SHOP_POOLS", "entity=4,customer=2,saga=2,global=1,dcb=2")
)
CELERY_PARTITIONING_QUEUE_PREFIX = _QUEUE_PREFIX
# Checkpoints live in the default database (the projections' own), in a transaction that
# first takes the SQLite write lock of shop.dblock (see LockedCheckpointStore).
CELERY_PARTITIONING_CHECKPOINT_STORE = "shop.dblock:LockedCheckpointStore"
CELERY_PARTITIONING_CHECKPOINT_DATABASE = "default"
#: ``plain`` runs the same tasks through plain Celery routing (one queue, many workers).
CELERY_SHOP_ORDERING = SHOP_ORDERING
CELERY_TASK_DEFAULT_QUEUE = f"{_QUEUE_PREFIX}.plain" if SHOP_ORDERING == "plain" else "celery"
# In the comparison mode partitioning is left out on purpose: do not warn about it.
SILENCED_SYSTEM_CHECKS = ["celery_partitioning.W001"] if SHOP_ORDERING == "plain" else []

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("SHOP_LOG_LEVEL", "WARNING")},
}
