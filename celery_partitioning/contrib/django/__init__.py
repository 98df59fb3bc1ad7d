"""Django integration: add ``"celery_partitioning.contrib.django"`` to ``INSTALLED_APPS``."""
