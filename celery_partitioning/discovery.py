"""Finding a task by name for the router, importing the app's task modules once if needed.

A producer that publishes by name may never have imported the task's module (Django's
autodiscovery is lazy; Celery imports ``imports``/``include`` only in workers), and routing a
partitioned task as unknown would send it to the default queue. So an unknown name makes
``TaskLookup`` import the app's task modules once, finalize the app if allowed, and look
again; a name still unknown is not a task of this app.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from .compat import task_registry

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["TaskLookup"]


class TaskLookup:
    """``lookup(name)`` → the app's task of that name or None; imports task modules once."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._imported = False
        self._lock = threading.RLock()

    def _registered(self, name: str) -> Any:
        # The registry itself: a look-up alone must not finalize the app.
        return task_registry(self.app).get(name)

    def _import_task_modules(self) -> None:
        with self._lock:
            if self._imported:
                return
            self._imported = True  # also guards a task module that publishes while imported
            try:
                self.app.loader.import_default_modules()
                if not self.app.finalized and self.app.autofinalize:
                    self.app.finalize(auto=True)  # evaluates the @app.task / @shared_task just imported
            except BaseException:
                self._imported = False  # a broken task module fails this call, and the next
                raise

    def __call__(self, name: str) -> Any:
        task = self._registered(name)
        if task is None and not self._imported:
            self._import_task_modules()
            task = self._registered(name)
        return task
