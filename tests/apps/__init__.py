"""Celery apps imported by real worker processes in the integration tests."""
