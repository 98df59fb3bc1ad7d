"""The house rules that keep publishing cheap: a pure core, no broker client on the producer path."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "celery_partitioning"
PURE = ["keys", "hashing", "config", "redis_target", "router", "tasks", "errors", "checkpoint", "compat",
        "failure_policy", "balance"]
#: What the pure core may import besides the standard library and itself.
ALLOWED_THIRD_PARTY = {"kombu", "celery"}


def imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("module", PURE)
def test_the_pure_core_imports_no_broker_client_and_no_django(module: str) -> None:
    roots = imported_roots(PACKAGE / f"{module}.py") - set(sys.stdlib_module_names) - {"__future__"}
    assert roots <= ALLOWED_THIRD_PARTY, f"{module}.py imports {sorted(roots - ALLOWED_THIRD_PARTY)}"


def test_only_contrib_django_imports_django() -> None:
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "django" in imported_roots(p) and "contrib" not in p.parts]
    assert offenders == []


def test_a_producer_import_loads_no_redis_client_and_no_worker_code() -> None:
    code = ("import sys, celery_partitioning; "
            "print(sorted(m for m in sys.modules if m == 'redis' or m.startswith('celery_partitioning.worker')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_install_and_a_publish_load_no_redis_client_and_no_worker_or_store_code() -> None:
    # Given a producer that installs partitioning and publishes a partitioned call
    code = """
import sys
from celery import Celery
import celery_partitioning as cp

app = Celery("producer", broker="memory://", set_as_current=False)
cp.install(app)

@app.task
@cp.partitioned(cp.create_entity_partition_key("Order"), pool="entity")
def on_item_added(order_id, sku):
    pass

app.finalize()
result = on_item_added.delay("ord-1", "sku-1")
assert result.id
print(sorted(m for m in sys.modules if m == "redis" or m.startswith(
    ("celery_partitioning.worker", "celery_partitioning.store", "celery_partitioning.cli"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    # Then neither the Redis client nor any worker, store or CLI module was imported
    assert out.strip() == "[]"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path, *, type_only: bool = False) -> set[str]:
    """Package modules ``path`` imports when it runs, inside functions included (not under
    ``if TYPE_CHECKING:``, which never runs, unless ``type_only``)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if not type_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(n for n in names if _is_module(n)) or None
            if _is_module(target):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("celery_partitioning") and name != module}


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    root = PACKAGE.parent
    return (root / relative).with_suffix(".py").exists() or (root / relative / "__init__.py").exists()


@pytest.mark.parametrize("type_only", [False, True], ids=["at-run-time", "type-only-too"])
def test_the_import_graph_has_no_circle(type_only: bool) -> None:
    # Given every module's imports, those made inside functions included (and, the second
    # time, those made for type hints only: a circle there is a design circle all the same)
    graph = {_module_name(p): _runtime_imports(p, type_only=type_only) for p in PACKAGE.rglob("*.py")}
    # (a package's __init__ re-exporting its children is not a dependency of the children)
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (d.startswith(name + ".") and name in graph)}
    # When we look for a circle
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                circles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # Then there is none: every import points down
    assert circles == []


def test_no_module_is_over_four_hundred_lines() -> None:
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_no_function_is_over_seventy_lines() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 70:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


#: text → the only module(s) that may contain it (one owner per concept).
OWNERS = {
    "redis.Redis(": {"state.py"},
    ".from_url(": {"state.py"},
    "register_script(": {"store/scripts.py"},
    ".eval(": set(),
    '"cp:': set(),
    'f"{self.root}': {"store/keys.py"},
    "_Proxy__": {"compat.py"},
    "._tasks": {"compat.py"},
    "_brpop": {"compat.py"},
    "_in_poll": {"compat.py"},
    "_q_for_pri": {"compat.py"},
    "._raw": {"compat.py"},
    "_delivered": {"compat.py"},
    "._deliver(": {"compat.py"},
    "state.should_stop": {"compat.py"},
    "os._exit(": {"exits.py"},
    # re-publishing a received message, and sending in batches (publish_many, and the
    # outbox relay through the same sender)
    "producer.publish(": {"message.py", "sending.py"},
}


@pytest.mark.parametrize("text", sorted(OWNERS))
def test_each_concept_has_one_owner_module(text: str) -> None:
    found = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if text in p.read_text()}
    assert found <= OWNERS[text], f"{text!r} appears outside its owner: {sorted(found - OWNERS[text])}"


def test_exit_codes_are_defined_in_one_module() -> None:
    defined = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if any(line.startswith("EXIT_") for line in p.read_text().splitlines())}
    assert defined == {"exits.py"}


def test_no_private_celery_or_kombu_member_outside_compat() -> None:
    # Underscore members of objects this package does not own (Celery tasks and apps, kombu
    # channels and messages) are reached through compat.py only.
    pattern = re.compile(r"\.(_get_exec_options|_get_app|_tasks|_raw|_delivered|_deliver|"
                         r"_brpop_\w+|_in_poll|_q_for_pri|_queue_cycle|_conninfo|_Proxy__\w+)\b")
    offenders = {str(p.relative_to(PACKAGE)): pattern.findall(p.read_text())
                 for p in PACKAGE.rglob("*.py") if p.name != "compat.py"}
    assert {name: found for name, found in offenders.items() if found} == {}
