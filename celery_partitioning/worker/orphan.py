"""A partition child whose supervisor died: keep its output flowing, then stop warmly.

With the supervisor killed alone nobody reads the child's output pipe, and its next write
fails with EPIPE, which Celery turns into an unrecoverable error or a stalled shutdown that
leaves the lease to expire. So each child also holds its pipe's read end (its writes cannot
fail) and a copy of the supervisor's output (``OUTPUT_FDS_ENV``). A thread watches the parent
pid; when it changes, the child pumps its own output, prefixed as the supervisor did, and asks
Celery for a warm shutdown, which releases the lease at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..exits import flush_standard_streams
from .runtime import SUPERVISOR_PID_ENV

__all__ = ["OUTPUT_FDS_ENV", "ChildOutput", "SupervisorWatch", "start_supervisor_watch"]

logger = logging.getLogger("celery_partitioning.worker")

#: Set by the supervisor: ``"<read end of the child's output pipe>,<supervisor output>"``;
#: the second number is empty when the supervisor's output is not a file descriptor.
OUTPUT_FDS_ENV: Final = "CELERY_PARTITIONING_OUTPUT_FDS"
#: How often a child checks that its supervisor is still its parent (seconds).
POLL_INTERVAL: Final = 0.2
#: How long an orphaned child waits at exit for its last output to be forwarded (seconds).
DRAIN_AT_EXIT: Final = 5.0

_watch: SupervisorWatch | None = None


@dataclass(frozen=True)
class ChildOutput:
    """Supervisor side: one child's output pipe and the descriptors the child inherits."""

    read_fd: int
    write_fd: int
    out_fd: int | None

    @classmethod
    def open(cls, out_fd: int | None) -> ChildOutput:
        read_fd, write_fd = os.pipe()
        return cls(read_fd, write_fd, out_fd)

    @property
    def env(self) -> dict[str, str]:
        out = "" if self.out_fd is None else str(self.out_fd)
        return {OUTPUT_FDS_ENV: f"{self.read_fd},{out}"}


def _parse_fds(value: str | None) -> tuple[int | None, int | None]:
    """``"7,4"`` → ``(7, 4)``; descriptors that are missing, malformed or closed → None."""
    def usable(text: str) -> int | None:
        if not text.strip().isdigit():
            return None
        fd = int(text)
        try:
            os.fstat(fd)
            os.set_inheritable(fd, False)  # a task's own subprocesses must not hold them
        except OSError:
            return None
        return fd

    held, _, out = (value or "").partition(",")
    return usable(held), usable(out)


class SupervisorWatch:
    """Child side: notices the supervisor is gone, takes its output over, stops warmly."""

    def __init__(self, supervisor_pid: int, label: str, fds: str | None,
                 on_gone: Callable[[], None]) -> None:
        self.supervisor_pid = supervisor_pid
        self.label = label
        self.held_fd, self.out_fd = _parse_fds(fds)
        self.on_gone = on_gone
        self._write_lock = threading.Lock()
        self._pumps: list[threading.Thread] = []

    def start(self) -> None:
        threading.Thread(target=self._watch, name="partition-supervisor-watch", daemon=True).start()

    def _watch(self) -> None:
        while os.getppid() == self.supervisor_pid:
            time.sleep(POLL_INTERVAL)
        self._take_over_output()
        # Logged first: once the stop is asked for, this daemon thread may die with the process.
        logger.warning("%s supervisor (pid %d) is gone: warm shutdown", self.label,
                       self.supervisor_pid)
        self.on_gone()

    def _take_over_output(self) -> None:
        target = self.out_fd if self.out_fd is not None else os.open(os.devnull, os.O_WRONLY)
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1, inheritable=True)
        os.dup2(write_fd, 2, inheritable=True)
        os.close(write_fd)
        # fds 1 and 2 moved: the old pipe's pump ends at EOF after what was never read.
        sources = [read_fd] if self.held_fd is None else [self.held_fd, read_fd]
        self._pumps = [threading.Thread(target=self._pump, args=(fd, target),
                                        name="partition-output", daemon=True) for fd in sources]
        for pump in self._pumps:
            pump.start()
        atexit.register(self._drain_at_exit)

    def _drain_at_exit(self) -> None:
        """Forward the child's last lines: daemon threads die with the interpreter."""
        flush_standard_streams()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # the last write ends of our pipe close: the pumps reach EOF
        os.dup2(devnull, 2)
        os.close(devnull)
        deadline = time.monotonic() + DRAIN_AT_EXIT
        for pump in self._pumps:
            pump.join(max(0.0, deadline - time.monotonic()))

    def _pump(self, source: int, target: int) -> None:
        writable = True
        with os.fdopen(source, "rb") as stream:
            for raw in iter(stream.readline, b""):
                if not writable:
                    continue  # keep reading, so the child's writes never block
                line = f"[{self.label}] {raw.decode('utf-8', 'replace').rstrip()}\n".encode()
                try:
                    with self._write_lock:
                        while line:
                            line = line[os.write(target, line):]
                except OSError:
                    writable = False


def start_supervisor_watch(label: str, on_gone: Callable[[], None]) -> SupervisorWatch | None:
    """In a supervisor's child: start watching it (once); None when not under a supervisor."""
    global _watch
    parent = os.environ.get(SUPERVISOR_PID_ENV, "")
    if _watch is None and parent.isdigit():
        _watch = SupervisorWatch(int(parent), label, os.environ.get(OUTPUT_FDS_ENV), on_gone)
        _watch.start()
    return _watch
