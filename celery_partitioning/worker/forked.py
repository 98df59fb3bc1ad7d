"""A partition worker process forked from the supervisor, which has imported the app.

Forked children share the supervisor's imported pages copy-on-write (Python, Celery, the app),
as a prefork pool's children do: a child costs what it writes (``benchmarks/bench_memory.py``).
Forking is safe because the supervisor is single-threaded and has only imported and checked
the app. The child resets signal handlers, moves its standard streams onto its output pipe,
takes its environment, forgets the supervisor's ``atexit`` handlers and leaves through
:func:`~celery_partitioning.exits.exit_forked_child`: it never returns into the supervisor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping

from .. import compat
from ..exits import exit_forked_child, flush_standard_streams

__all__ = ["ForkedProcess", "fork_child", "exit_status"]


class ForkedProcess:
    """The supervisor's handle on a forked child: ``subprocess.Popen``'s few methods we use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status (negative: killed by that signal) once it exited, else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: it is gone, how is unknown
                self.returncode = 1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit; ``TimeoutError`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"process {self.pid} still runs after {timeout}s")
            time.sleep(0.02)
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def exit_status(code: object) -> int:
    """What ``sys.exit(code)`` would make the process exit with (an ``int`` always: the
    forked child's ``os._exit`` takes nothing else)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _become_child(env: Mapping[str, str], output_fd: int, close_fds: Iterable[int]) -> None:
    compat.clear_exit_handlers()
    compat.run_after_fork_handlers()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd in close_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    # New stream objects on the new descriptors (the supervisor's may be wrapped, e.g. by a
    # test runner). sys.__stdout__/__stderr__, where Celery logs, are on descriptors 1 and 2.
    sys.stdout = open(1, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # noqa: SIM115
    os.environ.clear()
    os.environ.update(env)


def fork_child(main: Callable[[], int], *, env: Mapping[str, str], output_fd: int,
               close_fds: Iterable[int] = ()) -> ForkedProcess:
    """Fork a child that runs ``main()`` with ``env`` as its environment and ``output_fd`` as
    its stdout and stderr, closes ``close_fds`` (the supervisor's own descriptors) and exits
    with what ``main`` returns (or raises as ``SystemExit``; 1 for any other exception)."""
    flush_standard_streams()  # or the child would print the supervisor's pending output
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    code = 1
    try:
        _become_child(env, output_fd, close_fds)
        code = exit_status(main())
    except SystemExit as exc:
        code = exit_status(exc.code)
    except BaseException:  # noqa: BLE001 - whatever it is, the child must not return
        traceback.print_exc()
        code = 1
    finally:
        exit_forked_child(code)
