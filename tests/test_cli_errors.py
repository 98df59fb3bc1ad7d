"""Every `celery partitioning` command, run as the real program, on an invalid setting:
one line naming the setting and the fix, exit status 2, and help still works."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.apps.harness import Harness
from tests.support.procs import Processes

COMMANDS = [
    ("worker",),
    ("worker", "--dry-run"),
    ("status",),
    ("status", "--json"),
    ("route", "Order:ord-1"),
    ("purge", "-f"),
    ("dead-letters", "list"),
    ("dead-letters", "replay", "--key", "Order:ord-1"),
    ("dead-letters", "discard", "--key", "Order:ord-1"),
]

BAD_POOLS = ("setting partitioning_pools (Django: CELERY_PARTITIONING_POOLS) gives pool 'p' "
             "the partition count 0; use an int from 1 to 4096")
BAD_LEASE_TTL = ("setting partitioning_lease_ttl (Django: CELERY_PARTITIONING_LEASE_TTL) is 0.0; "
                 "use a number of seconds from 1 to 3600")


def _harness(tmp_path: Path, partitions: int = 2, lease_ttl: float = 2.0) -> Harness:
    # Nothing is dialled: the setting is refused before any broker is.
    return Harness("redis://127.0.0.1:1/0", "redis://127.0.0.1:1/0", "cpw-bad:", partitions,
                   tmp_path, Processes(), lease_ttl=lease_ttl)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_invalid_setting_is_one_line_and_exit_2(tmp_path: Path, command: tuple[str, ...]) -> None:
    result = _harness(tmp_path, partitions=0).cli(*command)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [f"Error: {BAD_POOLS}"]
    assert "Traceback" not in result.stdout + result.stderr


def test_each_invalid_setting_is_named(tmp_path: Path) -> None:
    result = _harness(tmp_path, lease_ttl=0).cli("status")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"Error: {BAD_LEASE_TTL}"]


@pytest.mark.parametrize("command", [("status",), ("purge",), ("dead-letters", "list")], ids=" ".join)
def test_help_works_even_with_an_invalid_setting(tmp_path: Path, command: tuple[str, ...]) -> None:
    result = _harness(tmp_path, partitions=0).cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: celery partitioning " + " ".join(command))
