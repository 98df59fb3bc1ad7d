"""Benchmarks of celery-partitioning against plain Celery, measured in the same run."""
