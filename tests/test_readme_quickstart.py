"""The README's Quick start (Django), run as written in a fresh ``django-admin startproject``.

The files are the README's code blocks, taken verbatim: a block whose first line is
``# <path>`` becomes that file (``(add at the end)`` appends it), ``# python manage.py shell``
is run in the shell. Editing the README changes what runs here. Only the broker is moved, by
lines appended after the README's settings: REDIS_URL's database, every key under this test's
namespace (``global_keyprefix``), deleted afterwards by the ``namespace`` fixture.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.env import missing
from tests.support.procs import ROOT, Processes, celery_bin, wait_for

try:
    import django  # noqa: F401 - only whether it is installed
except ImportError:
    missing("Django is not installed (pip install -e '.[test]')")

README = ROOT / "README.md"
APPEND = " (add at the end)"
SHELL = "python manage.py shell"
INSTALL_LINE = "celery_partitioning.install(app)"


def quickstart() -> str:
    """The README's Quick start section."""
    text = README.read_text()
    start = text.index("## Quick start (Django)")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def marked_blocks() -> dict[str, str]:
    """The Quick start's python blocks by the marker on their first line (``# proj/celery.py``)."""
    blocks: dict[str, str] = {}
    for body in re.findall(r"```python\n(.*?)```", quickstart(), flags=re.S):
        first, _, rest = body.partition("\n")
        assert first.startswith("# "), f"a Quick start block without a '# <file>' marker: {first!r}"
        blocks[first[2:]] = rest
    return blocks


def commands() -> list[str]:
    """The Quick start's shell commands, comments removed."""
    lines: list[str] = []
    for body in re.findall(r"```bash\n(.*?)```", quickstart(), flags=re.S):
        lines += [line.split("#")[0].strip() for line in body.splitlines() if line.strip()]
    return lines


def run(project: Path, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=project, env=user_env(), capture_output=True, text=True,
                          timeout=timeout)


def user_env() -> dict[str, str]:
    """A user's shell: no settings module and no repository on the path (the package is installed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH")}
    return {**env, "PYTHONUNBUFFERED": "1"}


def manage(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(project, [sys.executable, "manage.py", *args])


def build(project: Path, redis_url: str, namespace: str) -> Path:
    """``startproject proj .`` and ``startapp shop`` in ``project``, then the README's blocks."""
    section = quickstart()
    assert "`django-admin startproject proj .`" in section
    assert "`python manage.py startapp shop`" in section
    project.mkdir()
    created = run(project, [sys.executable, "-m", "django", "startproject", "proj", "."])
    assert created.returncode == 0, created.stderr
    app = manage(project, "startapp", "shop")
    assert app.returncode == 0, app.stderr
    files = {marker: body for marker, body in marked_blocks().items() if marker != SHELL}
    assert set(files) == {"proj/settings.py" + APPEND, "proj/celery.py", "proj/__init__.py",
                          "shop/tasks.py"}
    for marker, body in files.items():
        path = project / marker.removesuffix(APPEND)
        if marker.endswith(APPEND):
            path.write_text(path.read_text() + "\n" + body)
        else:
            path.write_text(body)
    with (project / "proj" / "settings.py").open("a") as settings:
        settings.write(
            "\n# tests/test_readme_quickstart.py: REDIS_URL's database, keys under the test's namespace\n"
            f"CELERY_BROKER_URL = CELERY_RESULT_BACKEND = {redis_url!r}\n"
            f"CELERY_BROKER_TRANSPORT_OPTIONS = {{'global_keyprefix': {namespace!r}}}\n"
            f"CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {{'global_keyprefix': {namespace!r}}}\n"
        )
    return project


def consumed_partitions(project: Path) -> set[str]:
    """Queues that ``partitioning status --json`` shows with a consumer."""
    status = run(project, [celery_bin(), "-A", "proj", "partitioning", "status", "--json"])
    if status.returncode != 0:
        return set()
    return {row["queue"] for row in json.loads(status.stdout)["partitions"] if row["consumer"]}


QUEUES = {f"partition.entity.{i}" for i in range(10)} | {"partition.global.0"}


@pytest.mark.integration
def test_the_quick_start_runs_as_written(tmp_path: Path, redis_url: str, namespace: str,
                                         processes: Processes) -> None:
    # Given a fresh Django project made of the README's Quick start
    project = build(tmp_path / "site", redis_url, namespace)
    steps = commands()

    # manage.py check: the partitioned tasks are validated, no warning
    assert "python manage.py check" in steps
    check = manage(project, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "System check identified no issues" in check.stdout
    assert "W001" not in check.stdout + check.stderr

    # partitioning status: every partition of CELERY_PARTITIONING_POOLS, none consumed yet
    assert "celery -A proj partitioning status" in steps
    status = run(project, [celery_bin(), "-A", "proj", "partitioning", "status"])
    assert status.returncode == 0, status.stdout + status.stderr
    assert all(queue in status.stdout for queue in QUEUES), status.stdout
    assert consumed_partitions(project) == set()

    # the partition worker, as the README runs it (one process: a loaded 2-core box)
    worker_command = "celery -A proj partitioning worker"
    assert worker_command in steps
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen([celery_bin(), *worker_command.split()[1:], "--processes", "1"],
                                  cwd=project, env=user_env(), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    processes.started.append(worker)  # the fixture SIGKILLs its process group whatever happens
    try:
        wait_for(lambda: consumed_partitions(project) == QUEUES or worker.poll() is not None,
                 timeout=120, what="the worker to consume every partition")
        assert worker.poll() is None, log.read_text()

        # the README's shell snippet publishes one task and prints its stored result
        shell = manage(project, "shell", "-c", marked_blocks()[SHELL])
        assert shell.returncode == 0, shell.stdout + shell.stderr + log.read_text()
        assert "ord-123: 2 x sku-1" in shell.stdout.splitlines(), shell.stdout
    finally:
        # Stopped by its pid: a warm stop of everything it started, exit status 0
        os.kill(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker did not stop within 60 s of SIGTERM:\n" + log.read_text())
    assert worker.returncode == 0, log.read_text()
    assert "shop.tasks.order_summary_on_item_added" in log.read_text()


def test_w001_names_the_missing_import_when_no_celery_app_was_imported(tmp_path: Path) -> None:
    # Given the Quick start without proj/__init__.py's import (Django never imports celery.py)
    project = build(tmp_path / "site", "redis://127.0.0.1:6379/15", "unused:")
    (project / "proj" / "__init__.py").write_text("")

    check = manage(project, "check")
    out = check.stdout + check.stderr

    assert check.returncode == 0, out
    assert "celery_partitioning.W001" in out
    assert "no Celery app with celery_partitioning installed was imported" in out
    assert "add `from .celery import app as celery_app` to proj/__init__.py" in out
    assert 'os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")' in out
    assert "call celery_partitioning.install(app)" not in out


def test_w001_names_install_when_the_app_has_no_partitioning(tmp_path: Path) -> None:
    # Given the Quick start with the app imported but install(app) left out
    project = build(tmp_path / "site", "redis://127.0.0.1:6379/15", "unused:")
    celery_py = project / "proj" / "celery.py"
    assert INSTALL_LINE in celery_py.read_text()
    celery_py.write_text("\n".join(line for line in celery_py.read_text().splitlines()
                                   if not line.startswith(INSTALL_LINE)) + "\n")

    check = manage(project, "check")
    out = check.stdout + check.stderr

    assert check.returncode == 0, out
    assert "celery_partitioning.W001" in out
    assert "the Celery app 'proj' has no celery_partitioning installed" in out
    assert "call celery_partitioning.install(app) in proj/celery.py" in out
    assert "from .celery import app" not in out
