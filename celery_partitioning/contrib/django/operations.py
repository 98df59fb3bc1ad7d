"""What the admin pages read and do: the pages' only caller of the status, dead-letter and
pause code that the CLI uses too.

Listing is built for many dead letters: one HVALS per pool, filtered and sorted in memory, and
only the page shown asks for its parked counts (one pipeline of LLENs).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ...cli.deadletters import KeyAction, act_on_key, store_for_app
from ...cli.pausing import pause_target, resume_target
from ...cli.status import PartitionStatus, collect_pauses, collect_status
from ...errors import PartitioningError
from ...message import MessageSummary
from ...state import STATE_ATTRIBUTE, settings_of
from ...store.deadletters import DeadLetterStore
from ...store.letters import DeadLetter, DeadLetterView
from ...store.pausing import Pause
from ...store.skipping import SkipStore

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["Action", "Letter", "PauseAction", "PauseResult", "celery_app",
           "dead_letter", "list_letters", "parked_counts", "partitions", "pause_or_resume",
           "paused", "perform", "pools_of"]

#: What an operator may do to a dead letter from the page.
Action = Literal["replay", "skip", "discard"]
#: What an operator may do to a key or a partition from the page.
PauseAction = Literal["pause", "resume"]


@dataclass(frozen=True)
class Letter:
    """One listed dead letter: parked (``policy == "park"``) or of a skip-policy task."""

    letter: DeadLetter
    parked: tuple[MessageSummary, ...] = field(default=())


@dataclass(frozen=True)
class PauseResult:
    """What a pause or resume did: the pause (new, or in force already), and for a key's
    resume the messages it released (or what still holds them)."""

    action: PauseAction
    pause: Pause
    new: bool = True
    messages: list[MessageSummary] = field(default_factory=list)
    held_by: str | None = None


def celery_app() -> Celery:
    """The Celery app the pages show: ``settings.CELERY_PARTITIONING_APP`` (``"pkg.mod:app"``
    or ``"pkg.mod.app"``) when set, else Celery's current app (as the system check does)."""
    from celery import current_app
    from django.conf import settings
    from django.utils.module_loading import import_string

    named = getattr(settings, "CELERY_PARTITIONING_APP", None)
    if named:
        found: Celery = import_string(str(named).replace(":", "."))
        return found
    current: Celery = current_app._get_current_object()
    return current


def installed(app: Celery) -> bool:
    return STATE_ATTRIBUTE in vars(app)


def pools_of(app: Celery) -> list[str]:
    return list(settings_of(app).pools)


def partitions(app: Celery) -> list[PartitionStatus]:
    """Every partition of every pool, as ``celery partitioning status`` reads them."""
    return collect_status(app)


def paused(app: Celery) -> list[Pause]:
    """Every pause in force: partitions first, then keys (``status`` shows the same)."""
    return collect_pauses(app)


def pause_or_resume(app: Celery, action: PauseAction, pool: str, *, by: str, key: str = "",
                    partition: int | None = None) -> PauseResult:
    """Pause or resume ``key`` of ``pool``, or its partition ``partition``, exactly as the
    ``pause``/``resume`` commands do (a partition's pause does not wait for its holder).
    Raises ``PauseError`` when there is nothing to do."""
    settings_of(app).partitions(pool)  # an unknown pool: PartitionConfigError
    spec = None if key else f"{pool}.{partition}"
    if action == "pause":
        done = pause_target(app, by=by, key=key or None, pool=pool, partition=spec)
        return PauseResult(action, done.pause, done.new)
    resumed, _ = resume_target(app, by=by, key=key or None, pool=pool, partition=spec)
    return PauseResult(action, resumed.pause, True, resumed.released, resumed.held_by)


def describe_pause(result: PauseResult) -> str:
    """One line for the operator and the admin log."""
    pause = result.pause
    if result.action == "pause" and not result.new:
        return f"{pause.what} is paused already (since {pause.at} by {pause.by})"
    if result.action == "pause":
        return (f"paused {pause.what}" + (": its messages are set aside in order" if pause.key
                                          else ": its worker stops between two messages"))
    if pause.key is None:
        return f"resumed {pause.what}: its worker fetches again"
    if result.held_by is not None:
        return f"resumed {pause.what}; its messages stay set aside behind {result.held_by}"
    return (f"resumed {pause.what}: released {len(result.messages)} message(s), in order, "
            "ahead of newer ones")


def pause_dict(result: PauseResult) -> dict[str, Any]:
    pause = result.pause
    return {"action": result.action, "pool": pause.pool, "key": pause.key,
            "partition": pause.partition, "messages": len(result.messages),
            "ids": [m.id for m in result.messages], "paused_by": pause.by, "paused_at": pause.at}


@contextmanager
def _store(app: Celery) -> Iterator[DeadLetterStore]:
    store = store_for_app(app)
    try:
        yield store
    finally:
        store.client.close()


def _records(store: DeadLetterStore, pool: str) -> list[DeadLetter]:
    keys = store.keys
    values = [*store.client.hvals(keys.dead_letters(pool)),
              *store.client.hvals(keys.skipped_dead_letters(pool))]
    return [DeadLetter.from_json(v) for v in values]


def list_letters(app: Celery, *, pool: str = "", key: str = "", task: str = "") -> list[DeadLetter]:
    """Dead letters (parked and skip-policy) of ``pool`` (default all) whose key and task
    contain ``key`` and ``task`` (case-insensitive), oldest failure first."""
    pools = [pool] if pool else pools_of(app)
    key, task = key.lower(), task.lower()
    with _store(app) as store:
        found = [letter for p in pools for letter in _records(store, p)
                 if key in letter.key.lower() and task in letter.task.lower()]
    return sorted(found, key=lambda d: (d.failed_at, d.pool, d.key))


def parked_counts(app: Celery, letters: Sequence[DeadLetter]) -> list[int]:
    """How many messages wait behind each of ``letters`` (0 for skip-policy ones)."""
    with _store(app) as store, store.client.pipeline(transaction=False) as pipe:
        for d in letters:
            pipe.llen(store.keys.parked(d.pool, d.key))
        counts = pipe.execute()
    return [int(c) if d.policy == "park" else 0 for d, c in zip(letters, counts, strict=True)]


def dead_letter(app: Celery, pool: str, key: str, task_id: str = "") -> Letter | None:
    """The parked dead letter of ``key`` with what waits behind it, or the skip-policy one of
    ``task_id``; None when there is none (replayed, skipped or discarded meanwhile)."""
    with _store(app) as store:
        if task_id:
            views = [v for v in SkipStore(store).find([pool], key) if v.dead_letter.id == task_id]
            view: DeadLetterView | None = views[0] if views else None
        else:
            view = store.get(pool, key)
    return None if view is None else Letter(view.dead_letter, view.parked)


def perform(app: Celery, action: Action, pool: str, key: str) -> KeyAction:
    """Replay, skip or discard the dead letter of ``key`` in ``pool`` exactly as the
    ``dead-letters`` command does. Raises ``DeadLetterError`` when there is nothing to do."""
    settings_of(app).partitions(pool)  # an unknown pool: PartitionConfigError
    with _store(app) as store:
        return act_on_key(app, store, pool, key, action)


def describe(result: KeyAction) -> str:
    """One line for the operator and the admin log."""
    count = len(result.messages)
    if result.action == "skip":
        skipped = result.skipped.id if result.skipped is not None else "?"
        return (f"skipped {skipped} of key {result.key!r} (pool {result.pool}) and released "
                f"{count} parked message(s) to {result.queue}; the key is unparked")
    if result.action == "replay":
        return (f"replayed {count} message(s) of key {result.key!r} (pool {result.pool}) to "
                f"{result.queue}; the key is unparked")
    return f"discarded {count} message(s) of key {result.key!r} (pool {result.pool})"


def error_text(exc: Exception) -> str:
    """What the page says of a failure (a Redis one says nothing was changed)."""
    from redis.exceptions import RedisError

    if isinstance(exc, RedisError):
        return (f"Redis (the broker or the partitioning store) cannot be reached: {exc}; "
                "nothing was changed")
    return str(exc) if isinstance(exc, PartitioningError) else f"{type(exc).__name__}: {exc}"


def as_dict(result: KeyAction) -> dict[str, Any]:
    return {"action": result.action, "pool": result.pool, "key": result.key,
            "messages": len(result.messages), "ids": [m.id for m in result.messages],
            "skipped": result.skipped.id if result.skipped is not None else None}
