"""The admin pages in a real browser: Debian's Chromium driven by Playwright, against Django's
dev server (a subprocess, killed by pid) and a real partition worker on a real Redis.

An operator with the permission logs in, sees the parked key on the partitions page, opens its
dead letter, clicks Skip, and the messages parked behind it run in order; the pages then show
the key unparked. Then they pause another key and the partition from the partitions page (the
partition shows STOPPED once its holder stopped), resume both, and the key's set-aside message
runs. ``CP_SCREENSHOTS=DIR`` saves the pages as PNGs (docs/img was made so).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

from tests.support.django_site import django_env, run_django
from tests.support.env import missing
from tests.support.failures import start_partition_worker
from tests.support.procs import Processes, wait_for
from tests.test_deadletters_integration import orders_on_one_partition, parked_len
from tests.test_skip_integration import runs

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium (Debian's package; never a downloaded one)."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e .[test])")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        except Error as exc:
            missing(f"Chromium at {CHROMIUM} does not start under Playwright: {exc}")
        try:
            yield launched
        finally:
            launched.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def settled(server: subprocess.Popen[bytes], base: str) -> bool:
    """The server exited (its port was taken) or answers."""
    return server.poll() is not None or answers(f"{base}/admin/login/")


def start_site(processes: Processes, fa: ModuleType, db: Path, log: Path) -> str:
    """Django's dev server of tests/apps/admin_site, with an operator user; its base URL."""
    made = run_django(fa, db, 'User.objects.create_user("operator", password="pw", '
                              'is_staff=True).user_permissions.add(OPERATE)\nprint("USER-OK")')
    assert "USER-OK" in made.stdout, made.stdout + made.stderr
    for _ in range(3):  # another process may take the free port before the server binds it
        base = f"http://127.0.0.1:{free_port()}"
        server = processes.start([sys.executable, "-m", "django", "runserver", base[7:],
                                  "--noreload"], env=django_env(fa, db), log=log)
        wait_for(partial(settled, server, base), 60, "the dev server to answer or exit")
        if server.poll() is None:
            return base
    raise AssertionError(f"the dev server did not start; see {log}")


def test_an_operator_skips_a_parked_key_in_the_browser_and_its_parked_messages_run_in_order(
    fa: ModuleType, processes: Processes, tmp_path: Path, browser: Any
) -> None:
    client = redis.Redis.from_url(fa.REDIS_URL, decode_responses=True)
    base = start_site(processes, fa, tmp_path / "db.sqlite3", tmp_path / "server.log")
    shots = os.environ.get("CP_SCREENSHOTS")
    index, (p, q) = orders_on_one_partition(fa, 2)
    key = f"Order:{p}"
    # Given a poison message P0 with four messages of P behind it, and Q on the partition
    client.set(f"{fa.NS}poison:{p}:0", "malformed event")
    fa.step.delay(p, 0)
    fa.step.delay(q, 0)
    for seq in range(1, 5):
        fa.step.delay(p, seq)
    start_partition_worker(processes, fa, "entity", index, tmp_path / "worker.log")
    wait_for(lambda: parked_len(client, fa, p) == 4 and client.llen(f"{fa.NS}rec:Order:{q}") == 2,
             60, "P1-P4 parked and Q done")

    page = browser.new_page(viewport={"width": 1100, "height": 620})
    # When the operator logs in, landing on the partitions page
    page.goto(f"{base}/admin/login/?next=/admin/partitioning/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "pw")
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}/admin/partitioning/")
    # Then the key's partition shows one parked key and its holder, the worker
    row = page.locator(f"table[data-pool=entity] tr[data-partition='{index}']")
    assert row.locator("td.parked").inner_text().strip() == "1"
    assert "pid" in row.locator("td").nth(5).inner_text()
    if shots:
        page.screenshot(path=str(Path(shots) / "partitions.png"))
    # When they follow it to the dead letters and open the key's
    row.locator("td.parked a").click()
    page.wait_for_selector("#cp-dead-letters")
    if shots:
        page.screenshot(path=str(Path(shots) / "dead-letters.png"))
    page.click(f"#cp-dead-letters a:text-is('{key}')")
    page.wait_for_selector("#cp-letter")
    # Then they see the error, the traceback, the raw message and the four parked messages
    assert page.inner_text("#cp-error") == f"ValueError: poison message {key} 0"
    assert "Traceback" in page.inner_text("#cp-traceback")
    assert '"task": "fail.step"' in page.inner_text("#cp-raw")
    assert page.locator("#cp-parked tbody tr").count() == 4
    if shots:
        page.screenshot(path=str(Path(shots) / "dead-letter.png"))
    # When they click Skip
    page.click("button[value=skip]")
    page.wait_for_selector("#cp-not-parked")
    # Then the page says what was done and that the key is no longer parked
    assert "released 4 parked message(s)" in page.inner_text(".messagelist")
    # And P1-P4 run, in order, after P0's one failed start; P0 does not run again
    wait_for(lambda: client.lrange(f"{fa.NS}rec:{key}", -1, -1) == ["end 4"], 60, "P4 to run")
    assert client.lrange(f"{fa.NS}rec:{key}", 0, -1) == ["start 0", *runs(range(1, 5))]
    assert client.lrange(f"{fa.NS}ran", 0, -1) == [
        f"{key} 0", f"Order:{q} 0", *[f"{key} {seq}" for seq in range(1, 5)]]
    # And the partitions page shows nothing parked any more
    page.goto(f"{base}/admin/partitioning/")
    assert row.locator("td.parked").inner_text().strip() == "0"
    page.goto(f"{base}/admin/partitioning/dead-letters/")
    assert page.inner_text("#cp-total").startswith("0 dead letters")
    # When they pause Q with the form, a message of Q arrives, and they pause the partition
    page.goto(f"{base}/admin/partitioning/")
    page.select_option("#cp-pause-key select[name=pool]", "entity")
    page.fill("#cp-pause-key input[name=key]", f"Order:{q}")
    page.click("#cp-pause-key button[value=pause]")
    page.wait_for_selector(f"#cp-paused-keys tr[data-paused-key='Order:{q}']")
    fa.step.delay(q, 1)
    wait_for(lambda: parked_len(client, fa, q) == 1, 60, "Q1 set aside")
    row.locator("button[value=pause]").click()
    # Then the page shows the paused key and, once its holder stopped, the partition STOPPED
    for _ in range(100):
        page.goto(f"{base}/admin/partitioning/")
        if "STOPPED" in row.locator("td.paused").inner_text():
            break
        page.wait_for_timeout(100)
    assert "STOPPED" in row.locator("td.paused").inner_text()
    assert "by operator" in row.locator("td.paused").inner_text()
    if shots:
        page.screenshot(path=str(Path(shots) / "partitions-paused.png"), full_page=True)
    # When they resume the partition, then the key: Q1 runs, after Q0
    row.locator("button[value=resume]").click()
    page.wait_for_selector(".messagelist")
    assert "its worker fetches again" in page.inner_text(".messagelist")
    page.click(f"#cp-paused-keys tr[data-paused-key='Order:{q}'] button[value=resume]")
    page.wait_for_selector(".messagelist")
    assert "released 1 message(s)" in page.inner_text(".messagelist")
    wait_for(lambda: client.lrange(f"{fa.NS}rec:Order:{q}", -1, -1) == ["end 1"], 60, "Q1 to run")
    assert client.lrange(f"{fa.NS}rec:Order:{q}", 0, -1) == runs([0, 1])
