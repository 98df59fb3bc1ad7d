"""Declaring partitioned tasks: ``partitioned`` / ``projection`` and key binding (pure)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .checkpoint import CheckpointField, check_checkpoint, checkpointed, wrapper_chain
from .compat import proxy_internals
from .errors import PartitionConfigError, PartitionKeyError
from .failure_policy import on_failure_problem
from .keys import KeyFunction, argument_names, call_on_arguments

__all__ = ["PartitionSpec", "partitioned", "projection", "spec_of", "pools_used_by", "KeyBinder"]

T = TypeVar("T")

#: Attribute under which a decorated function carries its PartitionSpec.
SPEC_ATTRIBUTE: Final = "__partitioning__"


@dataclass(frozen=True)
class PartitionSpec:
    """How one task is partitioned: its key function, pool, projection name and checkpoint."""

    key: KeyFunction | None
    pool: str | None
    projection: str | None = None
    #: The event position (argument name or function), MESSAGE_ID, or None (no checkpoint).
    checkpoint: CheckpointField | None = None
    #: ``"park"`` / ``"skip"`` (``ON_FAILURE_POLICIES``); None: the setting
    #: ``partitioning_on_failure``.
    on_failure: str | None = None

    @property
    def effective_pool(self) -> str | None:
        """The pool given, else the strategy of a helper-made key function."""
        if self.pool is not None:
            return self.pool
        strategy = getattr(self.key, "strategy", None)
        return strategy if isinstance(strategy, str) else None


def _check_key(key: object, where: str) -> None:
    if not callable(key):
        raise PartitionConfigError(
            f"{where}: key must be a function of the call's arguments returning a str "
            f"(for example create_entity_partition_key('Order')), got {key!r}"
        )


def _check_pool(pool: object, where: str) -> None:
    if not isinstance(pool, str) or not pool:
        raise PartitionConfigError(
            f"{where}: pool must be a pool name such as 'entity' or 'global', got {pool!r}"
        )


def _check_on_failure(value: object, where: str) -> None:
    problem = on_failure_problem(value)
    if problem is not None:
        raise PartitionConfigError(f"{where}: {problem}")


def _function_behind(obj: Any) -> Callable[..., Any]:
    """The plain function a task, a task proxy or a function stands for."""
    from celery.app.task import Task
    from celery.local import Proxy

    if isinstance(obj, Proxy):
        # ``@app.task`` before finalization: PromiseProxy(app._task_from_fun, (fun,)).
        args, local = proxy_internals(obj)
        if args and inspect.isfunction(args[0]):
            fun: Callable[..., Any] = args[0]
            return fun
        # ``@shared_task``: Proxy(task_by_cons) whose closure holds ``fun``.
        code = getattr(local, "__code__", None)
        closure = getattr(local, "__closure__", None) or ()
        if code is not None and "fun" in code.co_freevars:
            cell = closure[code.co_freevars.index("fun")].cell_contents
            if inspect.isfunction(cell):
                return cell
        raise PartitionConfigError(
            f"cannot find the function behind {obj!r}; put @partitioned/@projection "
            "directly above the function, below @app.task"
        )
    if isinstance(obj, Task):
        run = obj.run
        return run.__func__ if inspect.ismethod(run) else run
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        return obj
    raise PartitionConfigError(
        f"@partitioned/@projection decorate a task function or a Celery task, got {obj!r}"
    )


def _attach(obj: T, spec: PartitionSpec) -> T:
    if spec.checkpoint is not None:
        # The body must run inside the checkpoint's transaction: wrap the function itself,
        # before Celery makes a task of it.
        if not inspect.isfunction(obj):
            raise PartitionConfigError(
                f"checkpoint=: put @partitioned/@projection directly above the function, below "
                f"@app.task / @shared_task (it wraps the task body), got {obj!r}"
            )
        wrapped = checkpointed(obj, spec.checkpoint, spec.projection)
        setattr(wrapped, SPEC_ATTRIBUTE, spec)
        return wrapped  # type: ignore[return-value]
    fun = _function_behind(obj)
    if inspect.ismethod(fun):
        fun = fun.__func__
    setattr(fun, SPEC_ATTRIBUTE, spec)
    return obj


def partitioned(
    key: KeyFunction, *, pool: str, checkpoint: CheckpointField | None = None,
    on_failure: str | None = None,
) -> Callable[[T], T]:
    """Route every call of the decorated task by ``key`` onto a partition of ``pool``.

    Works above or below ``@app.task`` / ``@shared_task``::

        @app.task
        @partitioned(create_entity_partition_key("Order"), pool="entity")
        def order_summary_on_item_added(order_id, sku, qty): ...

    ``checkpoint`` (an argument name or a function of the arguments giving the event
    position, or ``MESSAGE_ID``) runs the body in one transaction with its checkpoint row
    (see ``celery_partitioning.checkpoint``); then the decorator must sit below ``@app.task``.

    ``on_failure``: what a message that failed for good does to its key: ``"park"`` it behind
    the dead letter until an operator replays, skips or discards, or ``"skip"``: the message is
    dead-lettered and the key goes on. Default: the setting ``partitioning_on_failure``.
    """
    _check_key(key, "@partitioned")
    _check_pool(pool, "@partitioned")
    _check_on_failure(on_failure, "@partitioned")
    if checkpoint is not None:
        check_checkpoint(checkpoint, "@partitioned")
    spec = PartitionSpec(key=key, pool=pool, checkpoint=checkpoint, on_failure=on_failure)

    return lambda obj: _attach(obj, spec)


def projection(
    name: str, *, key: KeyFunction | None = None, pool: str | None = None,
    checkpoint: CheckpointField | None = None, on_failure: str | None = None,
) -> Callable[[T], T]:
    """Mark a task as the projection ``name``, partitioned by ``key`` on ``pool``.

    A projection without a key is accepted here and reported by
    ``assert_valid_partition_keys`` (and at worker start). Without ``pool``, a key made
    by a helper uses its strategy's pool (``create_entity_partition_key`` → ``entity``).
    ``checkpoint``: as for ``partitioned``; the checkpoint row is per (``name``, key).
    ``on_failure``: as for ``partitioned``.
    """
    if not isinstance(name, str) or not name:
        raise PartitionConfigError(f"@projection: name must be a non-empty str, got {name!r}")
    if key is not None:
        _check_key(key, f"@projection({name!r})")
    if pool is not None:
        _check_pool(pool, f"@projection({name!r})")
    _check_on_failure(on_failure, f"@projection({name!r})")
    if checkpoint is not None:
        check_checkpoint(checkpoint, f"@projection({name!r})")
    spec = PartitionSpec(key=key, pool=pool, projection=name, checkpoint=checkpoint,
                         on_failure=on_failure)

    return lambda obj: _attach(obj, spec)


def _static_attr(cls: type, name: str) -> Any:
    value = inspect.getattr_static(cls, name, None)
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    return value


def spec_of(task: Any) -> PartitionSpec | None:
    """The PartitionSpec of a task, or None when the task is not partitioned.

    Class-based tasks declare ``partition_key``, ``partition_pool``, ``projection_name`` and
    ``partition_on_failure`` class attributes; decorated functions carry the spec.
    """
    cls = type(task)
    key, pool, name = (
        _static_attr(cls, "partition_key"),
        _static_attr(cls, "partition_pool"),
        _static_attr(cls, "projection_name"),
    )
    if key is not None or pool is not None or name is not None:
        return PartitionSpec(key=key, pool=pool, projection=name,
                             on_failure=_static_attr(cls, "partition_on_failure"))
    for fun in wrapper_chain(getattr(task, "run", None)):
        spec = getattr(fun, SPEC_ATTRIBUTE, None)
        if isinstance(spec, PartitionSpec):
            return spec
    return None


def pools_used_by(tasks: Iterable[Any]) -> list[str]:
    """The pools some partitioned task among ``tasks`` runs on (sorted)."""
    used = {spec.effective_pool for spec in map(spec_of, tasks) if spec is not None}
    return sorted(pool for pool in used if pool is not None)


def _checker(params: list[inspect.Parameter]) -> Callable[..., None] | None:
    """A function that does nothing, with ``params``' names and kinds: calling it makes Python
    check a call against the signature. None when the parameters cannot be written as a def."""
    kinds = inspect.Parameter
    parts: list[str] = []
    for index, param in enumerate(params):
        if param.kind is kinds.KEYWORD_ONLY and (
                index == 0 or params[index - 1].kind not in (kinds.KEYWORD_ONLY,
                                                              kinds.VAR_POSITIONAL)):
            parts.append("*")
        stars = "*" if param.kind is kinds.VAR_POSITIONAL else "**" if param.kind is kinds.VAR_KEYWORD else ""
        text = stars + param.name
        if param.default is not param.empty and param.kind not in (kinds.VAR_POSITIONAL,
                                                                   kinds.VAR_KEYWORD):
            text += "=None"  # the value is never used: only whether it may be left out
        parts.append(text)
        if param.kind is kinds.POSITIONAL_ONLY and (
                index + 1 == len(params) or params[index + 1].kind is not kinds.POSITIONAL_ONLY):
            parts.append("/")
    namespace: dict[str, Any] = {}
    try:
        exec(f"def check({', '.join(parts)}): pass", namespace)  # names from a Signature
    except SyntaxError:
        return None
    check: Callable[..., None] = namespace["check"]
    return check


class KeyBinder:
    """Computes a task call's partition key: binds the arguments by name, calls the key function.

    Binding follows Python's own rules (``inspect.Signature.bind``) for the common
    parameter kinds, precomputed once per task, because it runs on every publish: a call
    is first checked by calling a do-nothing function with the task's parameters (Python
    binds in C), then named by two dict updates; a call Python refuses (or that the fast
    path does not cover) takes the step-by-step binding, which gives the reason.
    """

    __slots__ = (
        "_check",
        "_defaults",
        "_keyword",
        "_positional",
        "_positional_index",
        "_required",
        "_signature",
        "_var_keyword",
        "_var_positional",
        "_where",
        "key",
        "task_name",
    )

    def __init__(self, task_name: str, key: KeyFunction, run: Callable[..., Any]) -> None:
        self.task_name = task_name
        self.key = key
        self._where = f"task {task_name}: key function {key!r}"
        try:
            self._signature: inspect.Signature | None = inspect.signature(run)
        except (TypeError, ValueError):
            self._signature = None
        kinds = inspect.Parameter
        params = list(self._signature.parameters.values()) if self._signature else []
        self._positional = tuple(
            p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
        )
        self._positional_index = {name: i for i, name in enumerate(self._positional)}
        self._keyword = frozenset(
            p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
        )
        variadic = (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)
        self._defaults = {p.name: p.default for p in params
                          if p.default is not p.empty and p.kind not in variadic}
        self._required = frozenset(
            p.name for p in params if p.default is p.empty and p.kind not in variadic
        )
        self._var_positional = next((p.name for p in params if p.kind is kinds.VAR_POSITIONAL), None)
        self._var_keyword = next((p.name for p in params if p.kind is kinds.VAR_KEYWORD), None)
        if self._var_positional is not None:
            self._defaults[self._var_positional] = ()
        self._check = (_checker(params) if self._signature is not None
                       and self._var_positional is None else None)

    def _mismatch(self, problem: str) -> PartitionKeyError:
        return PartitionKeyError(
            f"task {self.task_name}: the call does not match its signature "
            f"{self._signature}: {problem}; nothing was published"
        )

    def arguments(self, args: Any, kwargs: Any) -> dict[str, Any]:
        """The call's arguments by parameter name, defaults applied, ``**kwargs`` flattened."""
        args = () if args is None else args
        kwargs = {} if kwargs is None else kwargs
        if not (type(args) is tuple and type(kwargs) is dict) and (  # the usual call, checked fast
                not isinstance(args, (list, tuple)) or not isinstance(kwargs, Mapping)):
            raise PartitionKeyError(
                f"task {self.task_name}: args must be a list or tuple and kwargs a mapping, "
                f"got {type(args).__name__} and {type(kwargs).__name__}"
            )
        check = self._check
        if check is not None:
            try:
                check(*args, **kwargs)
            except TypeError:
                pass  # the step-by-step binding below names the problem
            else:
                # Python accepted the call, so the binding below would name each argument
                # like this, in this order: defaults, positional arguments, keywords.
                named = self._defaults.copy()
                named.update(zip(self._positional, args, strict=False))
                named.update(kwargs)
                return named
        if self._signature is None:
            if args:
                raise PartitionKeyError(
                    f"task {self.task_name}: its signature cannot be read, "
                    "so pass the arguments by keyword"
                )
            return dict(kwargs)
        named = dict(self._defaults)
        given = len(args)
        if given > len(self._positional):
            if self._var_positional is None:
                raise self._mismatch(
                    f"takes {len(self._positional)} positional argument(s) but {given} were given"
                )
            named[self._var_positional] = tuple(args[len(self._positional):])
        named.update(zip(self._positional, args, strict=False))
        for name, value in kwargs.items():
            if name in self._keyword:
                if self._positional_index.get(name, given) < given:
                    raise self._mismatch(f"multiple values for argument {name!r}")
                named[name] = value
            elif self._var_keyword is not None:
                named[name] = value
            else:
                raise self._mismatch(f"got an unexpected keyword argument {name!r}")
        if not self._required <= named.keys():
            missing = sorted(self._required - named.keys())
            raise self._mismatch(f"missing a required argument: {', '.join(map(repr, missing))}")
        return named

    def __call__(self, args: Any, kwargs: Any) -> str:
        return self.key_of(self.arguments(args, kwargs))

    def key_of(self, named: Mapping[str, Any]) -> str:
        """The key of a call whose arguments are already bound by name (``arguments``)."""
        key = call_on_arguments(self._where, self.key, named)
        if type(key) is not str or not key:
            raise PartitionKeyError(
                f"{self._where} returned {key!r} on arguments ({argument_names(named)}); it must "
                "return a non-empty str; nothing was published")
        return key
