"""The demo end to end: real Redis, real workers, a small stream, verified against a replay."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from celery_partitioning.embedded import free_port, redis_answers
from tests.support.procs import ROOT, Processes, wait_for

DEMO = ROOT / "scripts" / "demo.py"

pytestmark = pytest.mark.integration


def _env(redis_url: str, namespace: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        # Every key of the run (queues, leases, counters) lives under the test's namespace, and
        # every process the demo starts inherits this variable: that is how leftovers are found.
        "SHOP_NAMESPACE": namespace,
        "SHOP_DATABASE": str(tmp_path / "shop.sqlite3"),
        **extra,
    }


def _leftovers(namespace: str) -> list[str]:
    """Live processes (not zombies) whose environment carries this run's namespace."""
    marker = f"SHOP_NAMESPACE={namespace}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            status = (entry / "status").read_text()
            if "\nState:\tZ" in status:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {cmdline[:120]}")
        except OSError:
            continue
    return found


def _run_demo(processes: Processes, env: dict[str, str], args: list[str], log: Path,
              timeout: float) -> int:
    proc = processes.start([sys.executable, str(DEMO), *args], env=env, log=log)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"demo did not finish in {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _summary(path: Path, log: Path) -> dict[str, Any]:
    assert path.exists(), log.read_text()[-3000:]
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_partitioned_demo_verifies_with_zero_mismatches(
        redis_url: str, namespace: str, tmp_path: Path, processes: Processes) -> None:
    # Given a small stream on the affinity workers of every pool
    out, log = tmp_path / "summary.json", tmp_path / "demo.log"
    code = _run_demo(processes, _env(redis_url, namespace, tmp_path),
                     ["--events", "500", "--json", str(out), "--log-dir", str(tmp_path / "logs")],
                     log, timeout=150)
    summary = _summary(out, log)
    text = log.read_text()
    # Then it drained, every projection equals the sequential replay, and it says so
    assert code == 0, text[-3000:]
    assert summary["drained"] and summary["verified"], summary
    assert summary["total_mismatches"] == 0, summary["examples"]
    assert set(summary["mismatches"]) == {"orderSummary", "productCatalog", "customerOrderHistory",
                                         "orderWithInventory", "dailySalesSummary",
                                         "inventoryReservation"}
    assert summary["events"] >= 450 and summary["failed"] == 0 and summary["dead_letters"] == 0
    # no worker was killed: no message started twice (retries are attempts, not reruns)
    assert summary["reruns"] == 0, summary
    assert sum(summary["done"].values()) == sum(summary["published"].values()) > 1000
    # every pool did work, and the DCB conflicts happened and were retried to success
    assert set(summary["done"]) == {"entity", "customer", "saga", "global", "dcb"}
    assert summary["dcb_conflicts"] >= 1 and summary["retries"] >= summary["dcb_conflicts"]
    assert "VERIFIED" in text and "mismatches" in text
    # And nothing it started is left running
    assert _leftovers(namespace) == []


def test_with_the_outbox_the_demo_verifies_and_leaves_the_outbox_empty(
        redis_url: str, namespace: str, tmp_path: Path, processes: Processes) -> None:
    # Given the demo storing each batch's tasks in the outbox, in the events' transaction,
    # and an outbox relay publishing them after the commit
    out, log = tmp_path / "summary.json", tmp_path / "demo.log"
    db = tmp_path / "shop.sqlite3"
    code = _run_demo(processes, _env(redis_url, namespace, tmp_path),
                     ["--events", "300", "--publish-with", "outbox", "--json", str(out),
                      "--log-dir", str(tmp_path / "logs")], log, timeout=150)
    summary = _summary(out, log)
    # Then every task was relayed and ran, and every projection equals the sequential replay
    assert code == 0, log.read_text()[-3000:]
    assert summary["drained"] and summary["verified"], summary
    assert summary["total_mismatches"] == 0, summary["examples"]
    assert sum(summary["done"].values()) == sum(summary["published"].values()) > 500
    # and the outbox is empty, and nothing the demo started is left running
    import sqlite3

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM celery_partitioning_outboxmessage").fetchone() == (0,)
    finally:
        conn.close()
    assert _leftovers(namespace) == []


def test_chaos_kills_workers_and_the_checkpoints_keep_every_projection_right(
        redis_url: str, namespace: str, tmp_path: Path, processes: Processes) -> None:
    # Given a small stream on the affinity workers, with projections checkpointed
    out, log = tmp_path / "summary.json", tmp_path / "demo.log"
    code = _run_demo(processes, _env(redis_url, namespace, tmp_path),
                     ["--events", "400", "--chaos", "--kills", "6", "--json", str(out),
                      "--log-dir", str(tmp_path / "logs")], log, timeout=240)
    summary = _summary(out, log)
    text = log.read_text()
    # When 6 partition workers were SIGKILLed during the run (3 right after a commit, before
    # the ack; 2 mid-task on the global rollup; 1 at random: `make demo DEMO_ARGS=--chaos`
    # kills 12), and, the tasks going through the outbox, the process running its relay
    # twice and a producer right after it committed its events
    chaos = summary["chaos"]
    assert chaos["kills"] >= 6 + 3, text[-3000:]
    assert chaos["by_kind"]["relay"] == 2 and chaos["by_kind"]["producer-after-commit"] == 1
    assert chaos["by_kind"].get("mid-task", 0) >= 1 and chaos["by_kind"].get("after-commit", 0) >= 1
    assert text.count("chaos: SIGKILL #") == chaos["kills"]
    # Then messages ran again, the checkpoints skipped at least the ones already committed,
    # and every projection still equals the sequential replay
    assert summary["skipped_by_checkpoint"] >= chaos["by_kind"]["after-commit"]
    assert summary["reruns"] >= summary["skipped_by_checkpoint"]
    assert code == 0, text[-3000:]
    assert summary["drained"] and summary["verified"] and summary["total_mismatches"] == 0
    assert sum(summary["done"].values()) == sum(summary["published"].values())
    assert "VERIFIED" in text and "by the checkpoints" in text
    # and the killed producer's events were relayed and applied; the outbox ends empty
    import sqlite3

    conn = sqlite3.connect(tmp_path / "shop.sqlite3")
    try:
        assert conn.execute("SELECT count(*) FROM shop_ordersummary WHERE order_id = "
                            "'ord-chaos-producer' AND item_count = 1").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM celery_partitioning_outboxmessage").fetchone() == (0,)
    finally:
        conn.close()
    assert _leftovers(namespace) == []


def test_unordered_mode_produces_the_mismatches_partitioning_prevents(
        redis_url: str, namespace: str, tmp_path: Path, processes: Processes) -> None:
    # Given the same kind of stream on plain Celery routing: one queue, 2 x 4 worker processes
    out, log = tmp_path / "summary.json", tmp_path / "demo.log"
    env = _env(redis_url, namespace, tmp_path, SHOP_UNORDERED="1", SHOP_GLOBAL_WRITE_DELAY_MS="30")
    code = _run_demo(processes, env, ["--events", "500", "--json", str(out),
                                      "--log-dir", str(tmp_path / "logs")], log, timeout=150)
    summary = _summary(out, log)
    # Then every task ran, yet the read models differ from the sequential replay
    assert code == 0, log.read_text()[-3000:]
    assert summary["mode"] == "unordered" and summary["drained"]
    assert sum(summary["done"].values()) == sum(summary["published"].values())
    assert summary["total_mismatches"] > 0
    # the global read-modify-write total lost updates (several writers at once)
    assert summary["mismatches"]["dailySalesSummary"] > 0, summary
    assert "DEMONSTRATED" in log.read_text()
    assert _leftovers(namespace) == []


def test_without_a_redis_the_demo_starts_a_private_one_and_stops_everything(
        namespace: str, tmp_path: Path, processes: Processes) -> None:
    # Given nothing listens at REDIS_URL
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert not redis_answers(url)
    out, log = tmp_path / "summary.json", tmp_path / "demo.log"
    # When the demo runs (tiny stream)
    code = _run_demo(processes, _env(url, namespace, tmp_path),
                     ["--events", "150", "--json", str(out), "--log-dir", str(tmp_path / "logs")],
                     log, timeout=150)
    text = log.read_text()
    # Then it started a private redis-server, verified, and left nothing running
    assert code == 0, text[-3000:]
    assert "started a private redis-server" in text
    assert _summary(out, log)["verified"]
    assert _leftovers(namespace) == []


def test_ctrl_c_stops_every_process_the_demo_started(
        namespace: str, tmp_path: Path, processes: Processes) -> None:
    # Given a demo that is running its workers (private Redis, so that is checked too)
    url = f"redis://127.0.0.1:{free_port()}/0"
    log = tmp_path / "demo.log"
    proc = processes.start([sys.executable, str(DEMO), "--events", "3000",
                            "--log-dir", str(tmp_path / "logs")],
                           env=_env(url, namespace, tmp_path), log=log)
    wait_for(lambda: "workers ready" in log.read_text() or proc.poll() is not None, 120,
             "the demo's workers to be ready")
    assert proc.poll() is None, log.read_text()[-3000:]
    assert len(_leftovers(namespace)) > 3  # wrapper, demo, redis-server, workers
    # When Ctrl-C reaches the demo's process group (as from a terminal)
    os.killpg(proc.pid, signal.SIGINT)
    # Then it exits non-zero, saying it stopped, and nothing it started is left running
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() not in (None, 0), log.read_text()[-3000:]
    assert "interrupted" in log.read_text()
    wait_for(lambda: not _leftovers(namespace), 10, "every demo process to exit")
