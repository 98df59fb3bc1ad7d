"""URLs of the admin pages; mount them next to the admin, before it::

    urlpatterns = [
        path("admin/partitioning/", include("celery_partitioning.contrib.django.urls")),
        path("admin/", admin.site.urls),
    ]

Every view is wrapped by ``admin.site.admin_view``: staff login (else the admin's login page),
CSRF protection and no caching, as the admin's own pages.
"""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

from . import views

app_name = "celery_partitioning"

urlpatterns = [
    path("", admin.site.admin_view(views.partitions), name="partitions"),
    path("dead-letters/", admin.site.admin_view(views.dead_letters), name="dead_letters"),
    path("dead-letters/one/", admin.site.admin_view(views.dead_letter), name="dead_letter"),
    path("dead-letters/action/", admin.site.admin_view(views.action), name="action"),
    path("pause/", admin.site.admin_view(views.pause_action), name="pause_action"),
]
