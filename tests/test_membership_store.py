"""Members of a pool in a real Redis store: beat, expire, leave (no workers)."""

from __future__ import annotations

from typing import Any

import pytest

from celery_partitioning.balance import assign
from celery_partitioning.store.keys import RedisKeys
from celery_partitioning.store.membership import Membership, member_id

pytestmark = pytest.mark.integration


def test_members_beat_expire_and_leave(store_redis: Any, namespace: str) -> None:
    membership = Membership(store_redis, RedisKeys(namespace))
    # Given two members of pool p, one pinned
    a, b = member_id("a", 1), member_id("b", 2)
    membership.beat(["p"], a, ttl=30)
    since = membership.beat(["p"], b, ttl=30, pinned=[0])
    live = membership.live("p")
    assert [m.id for m in live] == [a, b]
    assert live[1].pinned == (0,) and not live[1].balanced and live[0].balanced
    # When b beats again, its start time is kept
    membership.beat(["p"], b, ttl=30, since_ms=since, pinned=[0])
    assert membership.live("p")[1].since_ms == since
    # When a member's beat is older than its TTL, it is gone and removed from the hash
    store_redis.hset(RedisKeys(namespace).members("p"), "dead:3", membership.live("p")[0]
                     .to_json().replace(a, "dead:3").replace('"ttl_ms":30000', '"ttl_ms":-1'))
    assert [m.id for m in membership.live("p")] == [a, b]
    assert not store_redis.hexists(RedisKeys(namespace).members("p"), "dead:3")
    # When a leaves warmly, it is gone at once
    membership.leave(["p"], a)
    assert [m.id for m in membership.live("p")] == [b]


def test_every_member_computes_the_same_assignment_from_the_store(store_redis: Any,
                                                                  namespace: str) -> None:
    membership = Membership(store_redis, RedisKeys(namespace))
    for node in ("w1", "w2", "w3"):
        membership.beat(["entity"], member_id(node, 7), ttl=30)
    members = [m.id for m in membership.live("entity")]
    views = [assign(range(12), list(reversed(members)) if i else members, {}) for i in range(2)]
    assert views[0].owners == views[1].owners
    assert sorted(len(views[0].of(m)) for m in members) == [4, 4, 4]


def test_balancers_of_three_members_share_a_pool_and_follow_joins_and_leaves(
        store_redis: Any, namespace: str) -> None:
    from celery_partitioning.worker.balancer import Balancer

    keys = RedisKeys(namespace)

    def balancer(name: str) -> Balancer:
        return Balancer(store_redis, keys, {"entity": 12}, lambda p, i: f"{namespace}q.{p}.{i}",
                        member=member_id(name, 1), ttl=30)

    # Given two members
    a, b = balancer("a"), balancer("b")
    for member in (a, b, a):  # a beats again once b is known
        member.refresh()
    assert sorted(a.share("entity") + b.share("entity")) == list(range(12))
    assert len(a.share("entity")) == len(b.share("entity")) == 6
    # When a third joins, then after one beat each the shares are 4/4/4 and disjoint
    c = balancer("c")
    for member in (c, a, b):
        member.refresh()
    shares = [m.share("entity") for m in (a, b, c)]
    assert sorted(i for s in shares for i in s) == list(range(12)) and [len(s) for s in shares] == [4, 4, 4]
    assert all(c.wants("entity", i) for i in shares[2]) and not a.wants("entity", shares[2][0])
    # When b leaves warmly, a and c take its share at their next beat
    b.leave()
    for member in (a, c):
        member.refresh()
    assert sorted(a.share("entity") + c.share("entity")) == list(range(12))


def test_balanced_members_leave_a_pinned_members_partitions_to_it(store_redis: Any,
                                                                  namespace: str) -> None:
    from celery_partitioning.worker.balancer import Balancer

    keys = RedisKeys(namespace)

    def balancer(name: str, pinned: list[int] | None = None) -> Balancer:
        return Balancer(store_redis, keys, {"entity": 12}, lambda p, i: f"{namespace}q.{p}.{i}",
                        member=member_id(name, 1), ttl=30,
                        pinned={"entity": pinned} if pinned is not None else None)

    # Given a member pinned to 0-3 (`--partitions 0-3`) and two balanced members
    pinned, a, b = balancer("pinned", [0, 1, 2, 3]), balancer("a"), balancer("b")
    for member in (pinned, a, b, a, b):
        member.refresh()
    # Then the balanced ones share the other 8, 4 each, and leave 0-3 to the pinned one
    assert pinned.share("entity") == [0, 1, 2, 3]
    assert sorted(a.share("entity") + b.share("entity")) == list(range(4, 12))
    assert len(a.share("entity")) == len(b.share("entity")) == 4
    # When the pinned member leaves, its partitions go to the balanced ones
    pinned.leave()
    for member in (a, b):
        member.refresh()
    assert sorted(a.share("entity") + b.share("entity")) == list(range(12))


def test_a_restarted_process_inherits_its_dead_predecessors_partitions(store_redis: Any,
                                                                        namespace: str) -> None:
    from celery_partitioning.worker.balancer import Balancer

    keys = RedisKeys(namespace)

    def queue(pool: str, index: int) -> str:
        return f"{namespace}q.{pool}.{index}"

    def balancer(name: str, token: str, succeeds: str = "") -> Balancer:
        return Balancer(store_redis, keys, {"entity": 12}, queue, member=member_id(name, 1),
                        ttl=30, token=token, succeeds=succeeds)

    # Given two members holding the leases of their shares
    a, b = balancer("a", "ta"), balancer("b", "tb")
    for member in (a, b, a):
        member.refresh()
    shares = {"a": a.share("entity"), "b": b.share("entity")}
    for name, indexes in shares.items():
        for index in indexes:
            store_redis.set(keys.lease(queue("entity", index)), f"t{name}|{name}|1|node", px=30_000)
    # When a's process dies and its supervisor starts a successor with a's token to take over
    # (a's member record has not expired yet)
    successor = balancer("a2", "ta2", succeeds="ta")
    successor.refresh()
    b.refresh()
    # Then the successor is given a's partitions (it takes their leases at once), b keeps its
    # own, and a's record is gone without waiting for its TTL
    assert successor.share("entity") == shares["a"] and b.share("entity") == shares["b"]
    assert [m.id for m in Membership(store_redis, keys).live("entity")] == [
        member_id("a2", 1), member_id("b", 1)]


def test_the_processes_of_one_command_wait_for_each_other_before_their_first_share(
        store_redis: Any, namespace: str) -> None:
    from celery_partitioning.worker.balancer import Balancer

    keys = RedisKeys(namespace)

    def balancer(name: str, group: str = "", size: int = 0, token: str = "",
                 succeeds: str = "") -> Balancer:
        return Balancer(store_redis, keys, {"entity": 12}, lambda p, i: f"{namespace}q.{p}.{i}",
                        member=member_id(name, 1), ttl=30, group=group, group_size=size,
                        token=token, succeeds=succeeds)

    # Given a member of another command holding the pool alone
    other = balancer("other")
    other.refresh()
    assert other.share("entity") == list(range(12))
    # When the first process of a two-process command beats, it wants nothing yet, and the
    # other member hands nothing over to it
    a = balancer("a", "host:99", 2, token="ta")
    for member in (a, other):
        member.refresh()
    assert a.share("entity") == [] and not a.wants("entity", 0)
    assert other.share("entity") == list(range(12))
    # When its sibling registers, the first assignment counts both: 4/4/4
    b = balancer("b", "host:99", 2, token="tb")
    for member in (b, a, other):
        member.refresh()
    shares = [m.share("entity") for m in (a, b, other)]
    assert sorted(i for s in shares for i in s) == list(range(12)) and [len(s) for s in shares] == [4, 4, 4]
    # When b dies and its supervisor restarts it, the successor does not wait: a is live
    b2 = balancer("b2", "host:99", 2, token="tb2", succeeds="tb")
    b2.refresh()
    assert len(b2.share("entity")) == 4
    # A single-process command does not wait either
    solo = balancer("solo", "host:7", 1)
    solo.refresh()
    assert solo.share("entity") != []


def test_a_waiting_member_joins_after_the_initial_delay_even_without_its_siblings() -> None:
    from celery_partitioning.store.membership import JOIN_DELAY_MS, Member, joined

    # Given a process of a three-process command, alone, started at t=1000
    alone = Member("h:1", "h", 1, 1000, 1000, 30000, group="h:9", group_size=3)
    pinned = Member("h:2", "h", 2, 1000, 1000, 30000, (0,), group="h:8", group_size=3)
    # Then it is left out until JOIN_DELAY_MS has passed (a pinned member never waits)
    assert joined([alone, pinned], 1000 + JOIN_DELAY_MS - 1) == [pinned]
    assert joined([alone, pinned], 1000 + JOIN_DELAY_MS) == [alone, pinned]
    # And an old record (no group) counts at once
    assert Member.from_json('{"id":"h:3","host":"h","pid":3,"since_ms":1,"beat_ms":1,'
                            '"ttl_ms":1}').group_size == 0
