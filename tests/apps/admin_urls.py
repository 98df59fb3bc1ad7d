"""URLconf of tests/apps/admin_site: the admin and the partitioning pages, as a project mounts them."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/partitioning/", include("celery_partitioning.contrib.django.urls")),
    path("admin/", admin.site.urls),
]
