"""A private Redis Sentinel setup for tests: one master, one replica, three sentinels on loopback.

Every process is a ``redis-server`` of our own, started through ``Processes`` (killed by pid
after the test) in a temporary directory. :meth:`SentinelSetup.kill_master` SIGKILLs the
master; the sentinels then promote the replica (``down-after-milliseconds`` 1 s unless told);
:meth:`SentinelSetup.rejoin_old_master` brings the old master back as the new one's replica.
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tests.reliability.conftest import PrivateRedis, free_port
from tests.support.procs import Processes, wait_for

__all__ = ["SentinelSetup", "MASTER_NAME"]

#: The name the sentinels monitor the master under (``master_name`` transport option).
MASTER_NAME = "cpmaster"


class SentinelSetup:
    """Master + replica + three sentinels, all with passwords (data and sentinel)."""

    def __init__(self, processes: Processes, directory: Path, *, password: str = "data-pw",
                 sentinel_password: str = "sentinel-pw", quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 10000) -> None:
        self.processes = processes
        self.dir = directory
        self.password = password
        self.sentinel_password = sentinel_password
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        # No delay before a full sync's transfer (5 s by default): a restarted master catches
        # up as a replica without waiting for more replicas to join the transfer.
        auth = ("--requirepass", password, "--masterauth", password,
                "--repl-diskless-sync-delay", "0")
        (directory / "master").mkdir()
        (directory / "replica").mkdir()
        self.master = PrivateRedis(processes, directory / "master", *auth)
        self.replica = PrivateRedis(processes, directory / "replica", *auth)
        self.sentinel_ports = [free_port() for _ in range(3)]

    # -- URLs and clients --------------------------------------------------------------

    def url(self, db: int = 0) -> str:
        """The ``sentinel://`` broker URL (every sentinel, ``;``-separated, as kombu reads it)."""
        return ";".join(f"sentinel://:{self.password}@127.0.0.1:{port}/{db}"
                        for port in self.sentinel_ports)

    def transport_options(self) -> dict[str, object]:
        """Celery's ``broker_transport_options`` for this setup."""
        return {"master_name": MASTER_NAME,
                "sentinel_kwargs": {"password": self.sentinel_password}}

    def sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, password=self.sentinel_password,
                           socket_timeout=1, socket_connect_timeout=1)

    def master_address(self) -> tuple[str, int] | None:
        """What the first answering sentinel says the master is."""
        for port in self.sentinel_ports:
            try:
                host, master_port = self.sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
                return (host.decode() if isinstance(host, bytes) else str(host)), int(master_port)
            except (redis.RedisError, TypeError):
                continue
        return None

    def client(self, port: int | None = None, db: int = 0) -> redis.Redis:
        """A plain client to the current master (or to ``port``)."""
        if port is None:
            address = self.master_address()
            assert address is not None, "no sentinel knows a master"
            port = address[1]
        return redis.Redis(host="127.0.0.1", port=port, db=db, password=self.password,
                           socket_timeout=2, socket_connect_timeout=1)

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        self.master.start()
        self.replica.extra += ["--replicaof", "127.0.0.1", str(self.master.port)]
        self.replica.start()
        wait_for(self._replica_in_sync, 15, "the replica to sync with the master")
        for port in self.sentinel_ports:
            self._start_sentinel(port)
        wait_for(self._sentinels_ready, 20, "three sentinels that see the master, the replica "
                 "and each other")

    def _start_sentinel(self, port: int) -> None:
        folder = self.dir / f"sentinel-{port}"
        folder.mkdir()
        conf = folder / "sentinel.conf"
        conf.write_text("\n".join([
            f"port {port}", "bind 127.0.0.1", "protected-mode no", f"dir {folder}",
            f"requirepass {self.sentinel_password}",
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} {self.quorum}",
            f"sentinel auth-pass {MASTER_NAME} {self.password}",
            f"sentinel down-after-milliseconds {MASTER_NAME} {self.down_after_ms}",
            f"sentinel failover-timeout {MASTER_NAME} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]) + "\n")
        self.processes.start([self.master.binary, str(conf), "--sentinel"],
                             log=folder / "sentinel.log")

    def _replica_in_sync(self) -> bool:
        return self._in_sync(self.replica.port)

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            try:
                state = self.sentinel(port).sentinel_master(MASTER_NAME)
            except redis.RedisError:
                return False
            if int(state.get("num-slaves", 0)) < 1 or int(state.get("num-other-sentinels", 0)) < 2:
                return False
        return True

    def replicated(self, timeout_ms: int = 2000) -> bool:
        """Wait until the replica has every write the master took so far (``WAIT 1``)."""
        return int(self.client().execute_command("WAIT", 1, timeout_ms)) >= 1

    def replica_caught_up(self) -> bool:
        """Whether the replica has every write the master had a moment ago (by replication
        offset: ``WAIT`` on a fresh connection waits for nothing)."""
        try:
            wrote = int(self.client(self.master.port).info("replication")["master_repl_offset"])
            has = int(self.client(self.replica.port).info("replication")["slave_repl_offset"])
        except (redis.RedisError, KeyError, ValueError):
            return False
        return has >= wrote

    def replica_proc_signal(self, signum: int) -> None:
        """Send ``signum`` to the replica's process (SIGSTOP/SIGCONT: a host that stalls)."""
        assert self.replica.proc is not None
        self.processes.signal(self.replica.proc, signum)

    def kill_master(self, promoted_within: float = 30) -> float:
        """SIGKILL the master; return the seconds until a sentinel names the replica master."""
        started = time.monotonic()
        self.master.kill()
        wait_for(lambda: self.master_address() == ("127.0.0.1", self.replica.port)
                 and self._is_master(self.replica.port),
                 promoted_within, "the sentinels to promote the replica")
        return time.monotonic() - started

    def rejoin_old_master(self, within: float = 60) -> float:
        """Restart the killed master (same port and data); the sentinels turn it into a replica
        of the new master. Return the seconds until it is in sync."""
        started = time.monotonic()
        address = self.master_address()
        assert address is not None
        # as an operator would: straight back as a replica (the sentinels would also convert
        # it, but only after their own timeouts)
        self.master.extra += ["--replicaof", address[0], str(address[1])]
        self.master.start()
        wait_for(lambda: self._in_sync(self.master.port), within,
                 "the old master to rejoin as a replica of the new one")
        return time.monotonic() - started

    def _in_sync(self, port: int) -> bool:
        try:
            info = self.client(port).info("replication")
        except redis.RedisError:
            return False
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def _is_master(self, port: int) -> bool:
        try:
            return self.client(port).info("replication").get("role") == "master"
        except redis.RedisError:
            return False
