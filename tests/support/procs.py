"""Start real processes (celery workers, the CLI) in their own sessions and always reap them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

#: The repository root: test app modules are imported from here.
ROOT = Path(__file__).resolve().parents[2]


def celery_bin() -> str:
    """The ``celery`` script of the running interpreter's environment."""
    candidate = Path(sys.executable).with_name("celery")
    return str(candidate) if candidate.exists() else "celery"


class Processes:
    """A registry of started processes; ``kill_all`` SIGKILLs each one's process group."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
              log: Path | None = None) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(list(argv), env=full_env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        return proc

    def signal(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        """Send ``sig`` to the process group of ``proc`` (the worker and its children)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill_all(self) -> None:
        for proc in self.started:
            self.signal(proc, signal.SIGKILL)
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    """Poll ``condition`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def alive(pid: int) -> bool:
    """Whether process ``pid`` is running (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"
