"""Highly available brokers, the parts that need no cluster: settings, queue arguments, the
start-up refusal, replica acknowledgements, and a holder whose new master lost its lease."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from celery_partitioning import PartitionConfigError
from celery_partitioning.config import DEFAULT_DELIVERY_LIMIT, read_settings
from celery_partitioning.router import queue_arguments
from celery_partitioning.state import Replicas, redis_client
from celery_partitioning.store.lease import Lease
from celery_partitioning.worker.preflight import guarantee_problems
from tests.support.procs import wait_for

SENTINEL = {"broker_url": "sentinel://:secret@s1:26380/3;sentinel://s2;sentinel://s3:26382/3",
            "broker_transport_options": {"master_name": "mymaster",
                                         "sentinel_kwargs": {"password": "s-secret"}},
            "broker_use_ssl": {"ssl_cert_reqs": "required"}}


def test_a_sentinel_broker_is_the_store_as_kombu_reads_it() -> None:
    store = read_settings(SENTINEL).redis
    assert store is not None and store.is_sentinel
    assert store.sentinels == (("s1", 26380), ("s2", 26379), ("s3", 26382))
    assert store.master_name == "mymaster"
    assert dict(store.sentinel_kwargs) == {"password": "s-secret"}
    assert dict(store.connection_kwargs) == {"db": 3, "password": "secret", "ssl": True,
                                             "ssl_cert_reqs": "required"}
    assert "secret" not in repr(store) and "secret" not in store.describe()


def test_a_list_of_sentinel_urls_reads_as_the_joined_string() -> None:
    listed = read_settings({**SENTINEL, "broker_url": SENTINEL["broker_url"].split(";")}).redis
    assert listed == read_settings(SENTINEL).redis


def test_a_sentinel_store_of_its_own_takes_its_own_transport_options() -> None:
    settings = read_settings({"broker_url": "amqp://x", "partitioning_redis_url": "sentinel://h:1/2",
                              "partitioning_redis_transport_options": {"master_name": "store"}})
    assert settings.redis is not None and settings.redis.master_name == "store"
    assert settings.broker_redis is None
    same = read_settings({**SENTINEL, "partitioning_redis_url": SENTINEL["broker_url"]})
    assert same.redis is not None and same.redis.same_server(same.broker_redis)


@pytest.mark.parametrize(("conf", "setting"), [
    ({"broker_url": "sentinel://h:1"}, "broker_transport_options"),
    ({"partitioning_redis_url": "sentinel://h:1", "broker_url": "amqp://x"},
     "partitioning_redis_transport_options"),
    ({"partitioning_queue_type": "stream"}, "partitioning_queue_type"),
    ({"task_default_queue_type": "mirrored"}, "task_default_queue_type"),
    ({"partitioning_delivery_limit": -1}, "partitioning_delivery_limit"),
    ({"partitioning_wait_for_replicas": -1}, "partitioning_wait_for_replicas"),
    ({"partitioning_wait_for_replicas": 1, "partitioning_wait_for_replicas_timeout": 5},
     "partitioning_wait_for_replicas_timeout"),
    ({"partitioning_allow_degraded": "yes"}, "partitioning_allow_degraded"),
])
def test_bad_ha_settings_name_the_setting(conf: dict[str, Any], setting: str) -> None:
    with pytest.raises(PartitionConfigError, match=setting):
        read_settings(conf)


def test_partition_queues_follow_the_default_queue_type_and_keep_a_single_consumer() -> None:
    assert queue_arguments(read_settings({})) == {"x-single-active-consumer": True}
    quorum = {"x-single-active-consumer": True, "x-queue-type": "quorum",
              "x-delivery-limit": DEFAULT_DELIVERY_LIMIT}
    assert queue_arguments(read_settings({"task_default_queue_type": "quorum"})) == quorum
    assert queue_arguments(read_settings({"partitioning_queue_type": "quorum",
                                          "partitioning_delivery_limit": 500})) == {
        **quorum, "x-delivery-limit": 500}
    # the package's own setting wins over Celery's
    assert queue_arguments(read_settings({"task_default_queue_type": "quorum",
                                          "partitioning_queue_type": "classic"})) == {
        "x-single-active-consumer": True}


@pytest.mark.parametrize(("conf", "scheme", "refused"), [
    ({"broker_url": "redis://h/0"}, "redis", None),
    (SENTINEL, "sentinel", None),
    ({"broker_url": "amqp://x", "partitioning_redis_url": "redis://h/0"}, "amqp", None),
    ({"broker_url": "amqp://x"}, "amqp", "partitioning_redis_url"),
    ({"broker_url": "sqs://"}, "sqs", "broker_url"),
    ({"broker_url": "redis+socket:///tmp/r.sock"}, "redis+socket", "broker_url"),
])
def test_a_setup_that_cannot_keep_a_guarantee_is_named(conf: dict[str, Any], scheme: str,
                                                       refused: str | None) -> None:
    problems = guarantee_problems(read_settings(conf), scheme)
    if refused is None:
        assert problems == []
    else:
        assert problems and problems[0].startswith(refused), problems


def test_quorum_partition_queues_need_celery_5_5() -> None:
    settings = read_settings({"broker_url": "amqp://x", "partitioning_redis_url": "redis://h/0",
                              "partitioning_queue_type": "quorum"})
    assert guarantee_problems(settings, "amqp", (5, 5)) == []
    problems = guarantee_problems(settings, "amqp", (5, 4))
    assert problems and problems[0].startswith("partitioning_queue_type"), problems


def test_a_foreign_transport_on_redis_is_no_problem() -> None:
    # Partition threads fetch with their own Redis client, whatever kombu transport the app
    # names for publishing and remote control.
    conf = {"broker_url": "redis://h/0", "broker_transport": "kombu.transport.redis:Transport"}
    assert guarantee_problems(read_settings(conf), "redis") == []


@pytest.mark.integration
def test_writes_without_the_replica_acknowledgements_asked_for_fail(redis_url: str,
                                                                    namespace: str) -> None:
    # Given a Redis without replicas and a client that wants one acknowledgement per write
    client = redis_client(redis_url, replicas=Replicas(1, 0.05))
    plain = redis.Redis.from_url(redis_url)
    assert int(plain.info("replication")["connected_slaves"]) == 0
    key = f"{namespace}wait"
    # Then reads work, and every kind of write fails after it was applied (not retried)
    assert client.get(key) is None
    with pytest.raises(redis.RedisError, match="acknowledged"):
        client.incr(key)
    with pytest.raises(redis.RedisError, match="acknowledged"), client.pipeline() as pipe:
        pipe.incr(key).incr(key).execute()
    lease = Lease(client, f"{namespace}lease", 5.0, token="unproven")
    with pytest.raises(redis.RedisError, match="acknowledged"):
        lease.try_acquire()
    assert int(plain.get(key) or 0) == 3  # once each: a failed WAIT does not repeat the write
    # And asking for none waits for nothing
    redis_client(redis_url, replicas=Replicas(0, 0.05)).incr(key)


@pytest.mark.integration
def test_a_holder_whose_new_master_has_no_lease_key_fences_itself(redis_url: str,
                                                                  namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"{namespace}lease-failover"
    reasons: list[str] = []
    lease = Lease(client, key, 1.5, token="before", fence=reasons.append)
    assert lease.try_acquire()
    lease.start_heartbeat()
    # When a failover promotes a replica that never got the lease key
    client.delete(key)
    # Then the holder cannot prove its lease and fences itself
    wait_for(lambda: bool(reasons), 10, "the fence")
    assert "lost the lease" in reasons[0]
    # And its restarted successor takes the lease on the new master
    successor = Lease(client, key, 1.5, token="after", takeover="before")
    assert successor.try_acquire()
    successor.release()
    lease.release()
