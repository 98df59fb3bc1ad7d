"""Start-up validation of the task registry: every offender listed at once."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from celery.app.routes import MapRoute, prepare
from celery.utils.time import rate

from .checkpoint_runner import checkpoint_problems
from .config import PartitioningSettings
from .errors import PartitionConfigError, PartitioningError
from .failure_policy import on_failure_problem
from .state import partitioning_of, settings_of
from .tasks import spec_of

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["assert_valid_partition_keys", "find_problems", "logged_above"]

logger = logging.getLogger("celery_partitioning")

#: Task options that would send a partitioned task around its partition queue.
_FIXED_OPTIONS = ("queue", "exchange", "routing_key")

_THREAD: Final = ("a partitioned task runs in a partition thread, which cannot be killed or "
                   "interrupted at a time limit; use timeouts inside the task")
#: Task options a partition worker cannot honour → the app setting Celery fills them from, and
#: why. (A value of 0 means "none" to Celery and to this check.)
_UNSUPPORTED_LIMITS = {
    "rate_limit": ("task_default_rate_limit",
                   "a rate limit holds a message back in worker memory while later ones "
                   "overtake it, so a partition worker runs partitioned tasks without one"),
    "time_limit": ("task_time_limit", _THREAD),
    "soft_time_limit": ("task_soft_time_limit", _THREAD),
}


def _routes_problem(name: str, task_routes: Any) -> str | None:
    """Whether a ``task_routes`` map sends ``name`` somewhere (callable routers are not run)."""
    for router in prepare(task_routes):
        if isinstance(router, MapRoute):
            found = router(name, (), {}, {})
            if found:
                return f"task_routes sends it to {found!r}"
    return None


def _limits_problem(task: Any) -> list[str]:
    """``rate_limit`` / ``time_limit`` / ``soft_time_limit`` a partitioned task would not get."""
    app = getattr(task, "app", None)
    conf = getattr(app, "conf", None) if app is not None else None
    problems = []
    for option, (setting, why) in _UNSUPPORTED_LIMITS.items():
        value = getattr(task, option, None)
        if not value or (option == "rate_limit" and not _positive_rate(value)):
            continue
        inherited = conf is not None and conf.get(setting) == value
        where = (f"{option}={value!r} (from the setting {setting}; give the task {option}=0 to "
                 "keep it for other tasks)") if inherited else f"{option}={value!r}"
        problems.append(f"{where}: {why}; remove it")
    return problems


def _positive_rate(value: Any) -> bool:
    try:
        return bool(rate(value) > 0)
    except (TypeError, ValueError):
        return True  # Celery refuses it elsewhere; here it is a limit that would be ignored


def find_problems(tasks: Iterable[Any], settings: PartitioningSettings,
                  task_routes: Any = None) -> list[str]:
    """One line per problem of the partitioned tasks among ``tasks``."""
    problems: list[str] = []
    for task in sorted(tasks, key=lambda t: str(getattr(t, "name", t))):
        spec = spec_of(task)
        if spec is None:
            continue
        name = getattr(task, "name", repr(task))
        what = f"projection {spec.projection!r} (task {name})" if spec.projection else f"task {name}"
        if spec.key is None:
            problems.append(
                f"{what}: has no partition key; pass key=... (e.g. "
                "create_entity_partition_key('Order') or lambda args: GLOBAL_PARTITION_KEY)"
            )
        pool = spec.effective_pool
        if pool is None:
            problems.append(f"{what}: has no pool; pass pool=... (one of {', '.join(settings.pools)})")
        elif pool not in settings.pools:
            problems.append(f"{what}: unknown pool {pool!r}; configured pools are "
                            f"{', '.join(settings.pools)} (setting partitioning_pools)")
        fixed = [f"{opt}={getattr(task, opt)!r}" for opt in _FIXED_OPTIONS
                 if getattr(task, opt, None) is not None]
        if getattr(task, "priority", None) not in (None, 0):
            fixed.append(f"priority={task.priority!r}")
        if fixed:
            problems.append(f"{what}: sets {', '.join(fixed)}, which would bypass or reorder "
                            "its partition; remove it")
        problems.extend(f"{what}: sets {line}" for line in _limits_problem(task))
        policy = on_failure_problem(spec.on_failure)
        if policy is not None:
            problems.append(f"{what}: partition_{policy}")
        routed = _routes_problem(name, task_routes)
        if routed:
            problems.append(f"{what}: {routed}; partitioned tasks are routed by their key, "
                            "remove the entry")
    return problems


def _registry_of(tasks: Any) -> tuple[list[Any], PartitioningSettings, Any, list[str]]:
    from celery import Celery

    if isinstance(tasks, Celery):
        conf = tasks.conf
        extra = []
        if conf.get("task_default_priority") not in (None, 0):
            extra.append(f"setting task_default_priority={conf.task_default_priority!r} gives "
                         "every message a priority, which reorders partition queues; unset it")
        return list(tasks.tasks.values()), settings_of(tasks), conf.get("task_routes"), extra
    listed = list(tasks)
    apps = {id(t.app): t.app for t in listed if getattr(t, "app", None) is not None}
    if len(apps) > 1:
        raise PartitionConfigError("assert_valid_partition_keys: the tasks belong to several apps; "
                                   "validate one app at a time")
    if not apps:
        return listed, PartitioningSettings(), None, []
    app = next(iter(apps.values()))
    return listed, settings_of(app), app.conf.get("task_routes"), []


def assert_valid_partition_keys(tasks: Any) -> None:
    """Raise ``PartitionConfigError`` listing every misconfigured partitioned task of ``tasks``
    (a Celery app, or an iterable of tasks): no key or pool, an unknown pool, a fixed queue,
    exchange, routing key or priority, a rate or time limit, a failure policy, a ``checkpoint=``
    without a store."""
    listed, settings, routes, problems = _registry_of(tasks)
    problems = problems + find_problems(listed, settings, routes) + checkpoint_problems(listed)
    if problems:
        raise PartitionConfigError(
            f"{len(problems)} partitioning problem(s) in the task registry:\n"
            + "\n".join(f"  - {line}" for line in problems)
        )


def check_at_finalize(app: Celery) -> PartitionConfigError | None:
    """Validate when the app is finalized: log the problems and return the error, since a
    signal receiver cannot stop its caller (the router refuses to publish while it stands)."""
    try:
        assert_valid_partition_keys(app)
    except PartitioningError as exc:
        state = partitioning_of(app)
        if state.log_registry_problems:
            logger.error("%s", exc)
            state.registry_problems_logged = True
        return exc if isinstance(exc, PartitionConfigError) else PartitionConfigError(str(exc))
    return None


def logged_above(exc: Exception) -> str:
    """How to refer to an error already logged, without printing its list again."""
    text = str(exc)
    if "\n" in text:
        return f"{text.splitlines()[0].rstrip(':')} (listed above)"
    return "see the error above"


def check_at_worker_start(app: Celery) -> None:
    """Validate at worker start; exit non-zero, printing the list, if invalid (Celery swallows
    a signal receiver's ``Exception``; ``SystemExit`` stops the worker before it consumes)."""
    try:
        assert_valid_partition_keys(app)
    except PartitioningError as exc:
        # Printed once: the check at finalize may have logged the list already.
        if partitioning_of(app).registry_problems_logged:
            raise SystemExit(f"celery-partitioning: refusing to start the worker: "
                             f"{logged_above(exc)}") from None
        raise SystemExit(f"celery-partitioning: refusing to start the worker.\n{exc}") from None
