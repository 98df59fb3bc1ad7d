"""URLs: the Django admin, where the projections are listed, and the partitioning pages
(partitions, dead letters) next to it."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/partitioning/", include("celery_partitioning.contrib.django.urls")),
    path("admin/", admin.site.urls),
]
