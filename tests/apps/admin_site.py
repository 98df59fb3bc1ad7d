"""Django settings for the admin page tests (URLconf: tests/apps/admin_urls.py).

The pages show tests/apps/failures_app (named by ``CELERY_PARTITIONING_APP``; it takes its
broker, store and namespace from CP_REDIS_URL / CP_NS as the workers do). CP_ADMIN_DB: the
SQLite file.
"""

from __future__ import annotations

import os

SECRET_KEY = "admin-pages-test-not-a-secret"
DEBUG = True  # runserver serves the admin's static files
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "celery_partitioning.contrib.django",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.apps.admin_urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": os.environ.get("CP_ADMIN_DB", ":memory:")}}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
STATIC_URL = "static/"
CELERY_PARTITIONING_APP = "tests.apps.failures_app:app"
# The system check looks at Celery's current app; the pages use the setting above.
SILENCED_SYSTEM_CHECKS = ["celery_partitioning.W001"]
