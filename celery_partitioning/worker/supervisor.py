"""The supervisor behind ``celery partitioning worker``: a few processes, many partitions each.

Balanced (the default), every child hosts every selected partition and holds its share
(:func:`share`, ``balancer.py``); with ``--partitions`` the partitions are dealt over the
children instead (:func:`spread`). Children are forked from the supervisor, which has imported
the app, so they share its pages (``forked.py``); each runs a ``celery worker`` (see
:func:`worker_argv`, ``hooks.py``) with ``PARTITIONS_ENV`` naming its partitions.

The supervisor prefixes each child's lines with its label, restarts a child that dies (1 s,
doubling to 30 s while it keeps dying young) and gives the successor the dead child's lease
token so it takes over at once. A child that exits 0 on its own got ``celery control
shutdown``: the others are stopped too. SIGTERM/SIGINT stop every child warmly (SIGKILL after
``stop_timeout`` or a second signal). Killed alone, its children stop warmly (``orphan.py``).

Exit status: 0 every child stopped cleanly; 1 one did not or was killed; 2 bad usage.
"""

from __future__ import annotations

import os
import selectors
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Final

from ..errors import PartitionConfigError
from ..exits import EXIT_OK, EXIT_UNCLEAN
from ..store.lease import new_token
from .forked import ForkedProcess, exit_status, fork_child
from .orphan import ChildOutput
from .runtime import (
    BALANCE_ENV,
    LEASE_TAKEOVER_ENV,
    LEASE_TOKEN_ENV,
    PARTITIONS_ENV,
    PROCESSES_ENV,
    RELAY_ENV,
    SUPERVISOR_PID_ENV,
)
from .selection import PartitionSpec, parse_indexes, parse_partition_spec, select_partitions

__all__ = ["ChildSpec", "PartitionSpec", "spread", "share", "Supervisor", "select_partitions",
           "parse_indexes", "parse_partition_spec", "run_celery", "worker_argv"]


#: First restart delay and its cap (seconds); a child up HEALTHY_AFTER resets the backoff.
BACKOFF_START: Final = 1.0
BACKOFF_MAX: Final = 30.0
HEALTHY_AFTER: Final = 10.0


@dataclass(frozen=True)
class ChildSpec:
    """One worker process and the partitions it hosts (one thread each)."""

    partitions: tuple[PartitionSpec, ...]
    #: Its place among the supervisor's processes (0, 1, ...).
    number: int = 0
    #: Balanced: every process hosts these partitions and holds its share (``share``).
    shared: bool = False

    @property
    def label(self) -> str:
        """How its log lines are prefixed: the partition when it hosts one, else ``w<n>``."""
        return self.partitions[0].label if self._alone else f"w{self.number}"

    @property
    def _alone(self) -> bool:
        """It hosts one partition, and no other process hosts it too."""
        return len(self.partitions) == 1 and not self.shared

    @property
    def node(self) -> str:
        """Its Celery node name (``%h`` is the host)."""
        return f"{self.label}@%h" if self._alone else f"partitions{self.number}@%h"

    @property
    def env_value(self) -> str:
        """``PARTITIONS_ENV``: ``"pool:index,pool:index"``."""
        return ",".join(f"{p.pool}:{p.index}" for p in self.partitions)

    @property
    def describe(self) -> str:
        return ", ".join(p.label for p in self.partitions)


def spread(partitions: Sequence[PartitionSpec], processes: int) -> list[ChildSpec]:
    """Deal the partitions over ``processes`` processes: partition i to process i mod P."""
    _check_processes(partitions, processes)
    return [ChildSpec(tuple(partitions[n::processes]), n) for n in range(processes)]


def share(partitions: Sequence[PartitionSpec], processes: int) -> list[ChildSpec]:
    """Balanced: every process hosts every partition and holds its share (``balancer.py``)."""
    _check_processes(partitions, processes)
    return [ChildSpec(tuple(partitions), number, shared=True) for number in range(processes)]


def _check_processes(partitions: Sequence[PartitionSpec], processes: int) -> None:
    if not partitions:
        raise PartitionConfigError("no partition selected: check --pool and --partitions")
    if not 1 <= processes <= len(partitions):
        raise PartitionConfigError(
            f"--processes {processes}: choose 1 to {len(partitions)} (one process cannot host "
            f"less than one of the {len(partitions)} selected partition(s))")


def worker_argv(spec: ChildSpec, celery_options: Sequence[str], loglevel: str,
                extra: Sequence[str] = (), *, idle_queue: str, events: bool = True) -> list[str]:
    """The ``celery`` arguments of one partition worker process (a ``celery worker``)."""
    return [
        *celery_options, "worker",
        "-Q", idle_queue, "-P", "solo", "-c", "1", "--prefetch-multiplier", "1",
        "--without-gossip", "--without-mingle", *(["-E"] if events else []),
        "-n", spec.node, "-l", loglevel, *extra,
    ]


def run_celery(args: Sequence[str]) -> int:
    """Run ``celery <args>`` in this process (a forked child) and return its exit status."""
    from celery.bin.celery import celery

    sys.argv = ["celery", *args]
    try:
        celery.main(args=list(args), prog_name="celery", auto_envvar_prefix="CELERY")
    except SystemExit as exc:
        return exit_status(exc.code)
    return 0


def _dup_fileno(stream: IO[str]) -> int | None:
    """A private copy of ``stream``'s file descriptor, or None if it has none."""
    try:
        return os.dup(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


@dataclass
class _Child:
    spec: ChildSpec
    proc: ForkedProcess | None = None
    token: str = ""
    previous_token: str = ""
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    #: The read end of its output pipe (None once at its end) and the unfinished last line.
    output_fd: int | None = None
    partial: bytes = b""


class Supervisor:
    """Forks and supervises the partition worker processes until told to stop.
    Single-threaded, so no other thread holds a lock when it forks."""

    def __init__(self, specs: Iterable[ChildSpec], main: Callable[[ChildSpec], int], *,
                 env: Mapping[str, str] | None = None, stop_timeout: float = 60.0,
                 out: IO[str] | None = None) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.main = main
        self.env = dict(os.environ if env is None else env)
        self.stop_timeout = stop_timeout
        self.out = out if out is not None else sys.stdout
        self._selector = selectors.DefaultSelector()
        self._signals = 0
        self._out_fd: int | None = None
        self._out_gone = False

    # -- output -----------------------------------------------------------------------
    def say(self, label: str, line: str) -> None:
        """Print one prefixed line; once our output is gone, drop lines: supervising goes on."""
        if self._out_gone:
            return
        try:
            self.out.write(f"[{label}] {line.rstrip()}\n")
            self.out.flush()
        except (OSError, ValueError):
            self._out_gone = True

    def _line(self, child: _Child, raw: bytes) -> None:
        self.say(child.spec.label, raw.decode("utf-8", "replace"))

    def _pump(self, timeout: float) -> None:
        """Forward what the children printed, waiting up to ``timeout`` for some."""
        if not self._selector.get_map():
            time.sleep(timeout)
            return
        for key, _events in self._selector.select(timeout):
            child: _Child = key.data
            if self._read_output(child) is False:
                self._close_output(child)

    def _read_output(self, child: _Child) -> bool | None:
        """Forward what is in the child's pipe now: True if something was, None if nothing
        is there yet, False at its end."""
        assert child.output_fd is not None
        try:
            data = os.read(child.output_fd, 65536)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        *lines, child.partial = (child.partial + data).split(b"\n")
        for raw in lines:
            self._line(child, raw)
        return bool(data)

    def _read_rest(self, child: _Child) -> None:
        """Forward what an exited child left in its pipe (why it exited) before our line."""
        for _ in range(1024):  # bounded: a grandchild may still write to the pipe
            if child.output_fd is None:
                return
            got = self._read_output(child)
            if got is False:
                self._close_output(child)
                return
            if got is None:
                break
        self._flush_partial(child)

    def _flush_partial(self, child: _Child) -> None:
        """Forward the child's unfinished last line."""
        if child.partial:
            self._line(child, child.partial)
            child.partial = b""

    def _close_output(self, child: _Child) -> None:
        if child.output_fd is None:
            return
        self._flush_partial(child)
        self._selector.unregister(child.output_fd)
        os.close(child.output_fd)
        child.output_fd = None

    def _drain_output(self, seconds: float) -> None:
        """Forward the rest of the children's output (a task's subprocess may hold a pipe
        open: give up after ``seconds``)."""
        deadline = time.monotonic() + seconds
        while self._selector.get_map() and time.monotonic() < deadline:
            self._pump(0.05)
        for child in self.children:
            self._close_output(child)

    # -- children -----------------------------------------------------------------------
    def _start(self, child: _Child) -> None:
        self._close_output(child)  # the previous process's pipe, if it is still open
        child.previous_token, child.token = child.token, new_token()
        env = {**self.env, PARTITIONS_ENV: child.spec.env_value, LEASE_TOKEN_ENV: child.token,
               SUPERVISOR_PID_ENV: str(os.getpid()), PROCESSES_ENV: str(len(self.children))}
        env.pop(LEASE_TAKEOVER_ENV, None)
        if child.spec.shared:
            env[BALANCE_ENV] = "1"
        if child.spec.number:
            env.pop(RELAY_ENV, None)  # one outbox relay per command: in its first process
        if child.previous_token:
            # We saw the previous child exit: its lease (if it held one) is dead.
            env[LEASE_TAKEOVER_ENV] = child.previous_token
        # The child holds its pipe's read end and our output too: if we are killed its writes
        # cannot fail and it prints where we did (orphan.py).
        output = ChildOutput.open(self._out_fd)
        env.update(output.env)
        ours = [c.output_fd for c in self.children if c.output_fd is not None]
        try:
            proc = fork_child(lambda: self.main(child.spec), env=env,
                              output_fd=output.write_fd,
                              close_fds=[*ours, self._selector.fileno()])
        except BaseException:
            os.close(output.read_fd)
            raise
        finally:
            os.close(output.write_fd)
        os.set_blocking(output.read_fd, False)
        child.output_fd, child.partial = output.read_fd, b""
        self._selector.register(output.read_fd, selectors.EVENT_READ, child)
        child.proc, child.started_at, child.restart_at = proc, time.monotonic(), None
        self.say("supervisor", f"started {child.spec.label} (pid {proc.pid}) for "
                               f"{child.spec.describe}")

    def _reap(self, child: _Child) -> None:
        proc = child.proc
        if proc is None or child.restart_at is not None:
            return
        code = proc.poll()
        if code is None:
            return
        self._read_rest(child)
        lived = time.monotonic() - child.started_at
        if code == 0 and not self._signals:
            # A warm stop we did not ask for: `celery control shutdown`; restart nothing.
            self.say("supervisor", f"{child.spec.label} (pid {proc.pid}) stopped on its own "
                                   "(celery control shutdown?): stopping every worker")
            child.proc = None
            self._signals += 1
            return
        if lived >= HEALTHY_AFTER:
            child.failures = 0
        delay = min(BACKOFF_MAX, BACKOFF_START * 2 ** child.failures)
        child.failures += 1
        child.restart_at = time.monotonic() + delay
        how = f"signal {-code}" if code < 0 else f"code {code}"
        self.say("supervisor", f"{child.spec.label} (pid {proc.pid}) exited with {how} after "
                               f"{lived:.1f}s; restarting in {delay:.0f}s")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals += 1

    # -- main loop ----------------------------------------------------------------------
    def run(self) -> int:
        """Start every child and supervise until SIGTERM/SIGINT; return the exit status."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        self._out_fd = _dup_fileno(self.out)
        try:
            labels = ", ".join(c.spec.label for c in self.children)
            self.say("supervisor", f"pid {os.getpid()}: running {len(self.children)} "
                                   f"partition worker(s): {labels}")
            for child in self.children:
                if self._signals:
                    break
                self._start(child)
            while not self._signals:
                now = time.monotonic()
                for child in self.children:
                    self._reap(child)
                    if child.restart_at is not None and now >= child.restart_at:
                        self._start(child)
                self._pump(0.2)
            return self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._out_fd is not None:
                os.close(self._out_fd)
                self._out_fd = None

    def _stop_all(self) -> int:
        self.say("supervisor", "stopping: warm shutdown of every partition worker "
                               f"(up to {self.stop_timeout:.0f}s; signal again to kill)")
        clean = True
        live = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in live:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        seen = self._signals
        deadline = time.monotonic() + self.stop_timeout
        while any(c.proc is not None and c.proc.poll() is None for c in live):
            if time.monotonic() > deadline or self._signals > seen:
                for child in live:
                    if child.proc is not None and child.proc.poll() is None:
                        self.say("supervisor", f"killing {child.spec.label} (pid {child.proc.pid})")
                        child.proc.kill()
                        child.proc.wait()
                        clean = False
                break
            self._pump(0.1)
        # Once every child exited, and its output is read to the end: was its stop clean?
        self._drain_output(2.0)
        for child in live:
            assert child.proc is not None
            code = child.proc.wait()
            # -SIGTERM: a second SIGTERM (the group's and ours) arrived while Python was
            # finalizing, after every task had ended: still clean.
            if code not in (0, -signal.SIGTERM):
                clean = False
                self.say("supervisor", f"{child.spec.label} stopped with code {code}")
        self.say("supervisor", "stopped cleanly" if clean else "stopped; not every worker "
                                                               "stopped cleanly")
        return EXIT_OK if clean else EXIT_UNCLEAN
