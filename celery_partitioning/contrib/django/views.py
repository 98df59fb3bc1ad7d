"""The admin pages: each pool's partitions, the dead letters, one dead letter with what is
parked behind it, and the actions replay / skip / discard and pause / resume.

Each view is behind ``admin.site.admin_view`` (``urls``). Reading needs staff status; acting
needs ``celery_partitioning.operate_partitions`` (403 otherwise) and goes to Django's admin log
besides the store's dead-letter log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, Final, cast

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST, require_safe
from redis.exceptions import RedisError

from ...errors import PartitioningError
from . import operations as ops
from .checks import not_installed
from .permissions import can_operate

__all__ = ["action", "dead_letter", "dead_letters", "partitions", "pause_action", "PER_PAGE"]

#: Dead letters per page.
PER_PAGE: Final = 50
_ACTIONS: Final = ("replay", "skip", "discard")
_PAUSE_ACTIONS: Final = ("pause", "resume")
_View = Callable[[HttpRequest], HttpResponse]
_read: Callable[[_View], _View] = require_safe
_act: Callable[[_View], _View] = require_POST
#: What reading or acting on the store may raise; shown to the operator, not a 500.
_FAILED: Final = (PartitioningError, RedisError, OSError)


def _context(request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
    # No nav sidebar: it lists models, and an operator may have no model permission at all.
    return {**admin.site.each_context(request), "title": title, "is_nav_sidebar_enabled": False,
            "can_operate": can_operate(request.user), **extra}


def _unavailable(request: HttpRequest, title: str, reason: str) -> HttpResponse:
    return render(request, "celery_partitioning/unavailable.html",
                  _context(request, title, reason=reason), status=503)


def _app_or_reason() -> tuple[Any, str | None]:
    app = ops.celery_app()
    if not ops.installed(app):
        warning = not_installed(app)
        return app, f"{warning.msg} ({warning.hint})"
    return app, None


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


@_read
def partitions(request: HttpRequest) -> HttpResponse:
    """Each pool's partitions: depth, unacked, oldest age, holder, parked keys, backoff."""
    title = "Partitions"
    app, reason = _app_or_reason()
    if reason is not None:
        return _unavailable(request, title, reason)
    try:
        rows = ops.partitions(app)
        paused_keys = [p for p in ops.paused(app) if p.key is not None]
    except _FAILED as exc:
        return _unavailable(request, title, ops.error_text(exc))
    now = time.time()
    shown: list[dict[str, Any]] = [{
        "row": r, "oldest": _seconds(r.oldest_age), "last_take": _seconds(r.last_consumed_age),
        "backoff_due": None if r.backoff_next_due is None else
        _seconds(max(0.0, r.backoff_next_due - now)),
    } for r in rows]
    pools: dict[str, list[dict[str, Any]]] = {}
    for item in shown:
        pools.setdefault(item["row"].pool, []).append(item)
    return render(request, "celery_partitioning/partitions.html", _context(
        request, title, pools=pools, app_name=app.main or "<unnamed>", paused_keys=paused_keys))


@_read
def dead_letters(request: HttpRequest) -> HttpResponse:
    """The dead letters, oldest failure first: searchable by key and task, filterable by pool."""
    title = "Dead letters"
    app, reason = _app_or_reason()
    if reason is not None:
        return _unavailable(request, title, reason)
    pool = request.GET.get("pool", "")
    key, task = request.GET.get("q", "").strip(), request.GET.get("task", "").strip()
    pools = ops.pools_of(app)
    if pool and pool not in pools:
        pool = ""
    try:
        found = ops.list_letters(app, pool=pool, key=key, task=task)
        page = Paginator(found, PER_PAGE).get_page(request.GET.get("page"))
        letters = list(page.object_list)
        counts = ops.parked_counts(app, letters)
    except _FAILED as exc:
        return _unavailable(request, title, ops.error_text(exc))
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "celery_partitioning/dead_letters.html", _context(
        request, title, page=page, rows=list(zip(letters, counts, strict=True)), pools=pools,
        pool=pool, q=key, task=task, total=len(found), query=query.urlencode()))


@_read
def dead_letter(request: HttpRequest) -> HttpResponse:
    """One dead letter: its error, traceback, raw message and the messages parked behind it."""
    pool, key = request.GET.get("pool", ""), request.GET.get("key", "")
    task_id = request.GET.get("id", "")
    title = f"Dead letter of {key}"
    app, reason = _app_or_reason()
    if reason is not None:
        return _unavailable(request, title, reason)
    try:
        found = ops.dead_letter(app, pool, key, task_id) if pool in ops.pools_of(app) else None
    except _FAILED as exc:
        return _unavailable(request, title, ops.error_text(exc))
    raw = None
    if found is not None and found.letter.raw is not None:
        try:
            raw = json.dumps(json.loads(found.letter.raw), indent=2, sort_keys=True)
        except ValueError:
            raw = found.letter.raw
    return render(request, "celery_partitioning/dead_letter.html", _context(
        request, title, pool=pool, key=key, found=found, raw=raw,
        back=reverse("celery_partitioning:dead_letters")), status=200 if found else 404)


def _require_operator(request: HttpRequest) -> None:
    if not can_operate(request.user):
        raise PermissionDenied("operating partitions needs celery_partitioning.operate_partitions")


def _back(request: HttpRequest) -> str:
    target = str(request.POST.get("next", ""))
    if target and url_has_allowed_host_and_scheme(target, {request.get_host()},
                                                  request.is_secure()):
        return target
    return str(reverse("celery_partitioning:dead_letters"))


@_act
def action(request: HttpRequest) -> HttpResponse:
    """Replay, skip or discard one key's dead letter (POST, CSRF-checked, permission needed)."""
    _require_operator(request)
    what, pool, key = (request.POST.get("action", ""), request.POST.get("pool", ""),
                       request.POST.get("key", ""))
    if what not in _ACTIONS or not pool or not key:
        messages.error(request, "an action needs one of replay, skip, discard, a pool and a key")
        return HttpResponseRedirect(_back(request))
    app, reason = _app_or_reason()
    if reason is not None:
        return _unavailable(request, "Dead letters", reason)
    try:
        result = ops.perform(app, cast(ops.Action, what), pool, key)
    except _FAILED as exc:
        messages.error(request, ops.error_text(exc))
        return HttpResponseRedirect(_back(request))
    text = ops.describe(result)
    _record(request, f"{pool}:{key}", f"partition key {key}",
            DELETION if what == "discard" else CHANGE, text=text, data=ops.as_dict(result))
    messages.success(request, text)
    return HttpResponseRedirect(_back(request))


def _record(request: HttpRequest, object_id: str, what: str, flag: int, *, text: str,
            data: dict[str, Any]) -> None:
    """The admin log entry of an action: who, when (the entry's time), what, how many."""
    LogEntry.objects.create(
        user_id=request.user.pk, content_type=None, object_id=object_id[:500],
        object_repr=what[:200], action_flag=flag,
        change_message=f"celery_partitioning {text} {json.dumps(data, sort_keys=True)}")


@_act
def pause_action(request: HttpRequest) -> HttpResponse:
    """Pause or resume a key or a partition (POST, CSRF-checked, permission needed)."""
    _require_operator(request)
    back = str(reverse("celery_partitioning:partitions"))
    what, pool = request.POST.get("action", ""), request.POST.get("pool", "")
    key, part = request.POST.get("key", "").strip(), request.POST.get("partition", "")
    partition = int(part) if part.isdigit() else None
    if what not in _PAUSE_ACTIONS or not pool or bool(key) == (partition is not None):
        messages.error(request, "pause and resume need a pool and either a key or a partition")
        return HttpResponseRedirect(back)
    app, reason = _app_or_reason()
    if reason is not None:
        return _unavailable(request, "Partitions", reason)
    try:
        result = ops.pause_or_resume(app, cast(ops.PauseAction, what), pool, key=key,
                                     partition=partition, by=request.user.get_username())
    except _FAILED as exc:
        messages.error(request, ops.error_text(exc))
        return HttpResponseRedirect(back)
    text = ops.describe_pause(result)
    target = f"partition key {key}" if key else f"partition {pool}.{partition}"
    _record(request, f"{pool}:{key or partition}", target, CHANGE, text=text,
            data=ops.pause_dict(result))
    messages.success(request, text)
    return HttpResponseRedirect(back)
