"""The balanced, sticky assignment of a pool's partitions to member processes (pure)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from celery_partitioning.balance import assign

MEMBERS = [f"m{i}" for i in range(8)]


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[int], list[str], dict[int, str], dict[str, list[int]]]:
    count = draw(st.integers(1, 40))
    partitions = list(range(count))
    members = draw(st.lists(st.sampled_from(MEMBERS), min_size=0, max_size=6, unique=True))
    holders = st.one_of(st.none(), st.sampled_from(MEMBERS))
    current = {p: h for p in partitions if (h := draw(holders)) is not None}
    pinned_members = draw(st.lists(st.sampled_from(members), max_size=2, unique=True)) if members else []
    pinned = {m: draw(st.lists(st.sampled_from(partitions), max_size=3)) for m in pinned_members}
    return partitions, members, current, pinned


#: No wall-clock limits: a property of a pure function, checked on a loaded machine (the
#: default 200 ms deadline and the too-slow health check measure the scheduler, not assign).
UNTIMED = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@UNTIMED
@given(situations())
def test_every_partition_has_one_owner_and_each_balanced_member_its_share(
        situation: tuple[list[int], list[str], dict[int, str], dict[str, list[int]]]) -> None:
    partitions, members, current, pinned = situation
    result = assign(partitions, members, current, pinned)
    pinned_set = {p for ps in pinned.values() for p in ps}
    balanced = [m for m in members if m not in pinned]
    # pinned partitions stay with a member pinned to them
    for index in pinned_set:
        assert index in pinned.get(result.owners[index], [])
    free = [p for p in partitions if p not in pinned_set]
    if not balanced:
        assert set(result.owners) == pinned_set
        return
    # every free partition has exactly one balanced owner
    assert sorted(p for p in result.owners if p not in pinned_set) == free
    assert all(result.owners[p] in balanced for p in free)
    # and the shares differ by at most one: ⌊F/W⌋ or ⌈F/W⌉
    shares = [len([p for p in free if result.owners[p] == m]) for m in balanced]
    low, high = divmod(len(free), len(balanced))
    assert all(s in (low, low + (1 if high else 0)) for s in shares)
    assert sum(shares) == len(free)


@UNTIMED
@given(situations())
def test_only_what_must_move_moves_and_the_result_is_a_fixed_point(
        situation: tuple[list[int], list[str], dict[int, str], dict[str, list[int]]]) -> None:
    partitions, members, current, pinned = situation
    result = assign(partitions, members, current, pinned)
    # a partition moves only away from a member over its share, or from a non-member / nobody
    for before, after in result.moves.values():
        assert before != after
        if before in members and before not in pinned and after not in pinned:
            assert len(result.of(before)) <= len([p for p, h in current.items() if h == before])
    # and assigning again from the result moves nothing
    again = assign(partitions, reversed(members), dict(result.owners), pinned)
    assert again.owners == result.owners and not again.moves


def test_a_join_moves_only_the_newcomers_share_and_a_leave_only_the_leavers() -> None:
    # Given 12 partitions balanced over two members
    two = assign(range(12), ["a", "b"], {})
    assert two.of("a") == [0, 1, 2, 3, 4, 5] and two.of("b") == [6, 7, 8, 9, 10, 11]
    # When a third member joins, then it takes 4, two from each, and nothing else moves
    three = assign(range(12), ["a", "b", "c"], two.owners)
    assert [len(three.of(m)) for m in "abc"] == [4, 4, 4]
    assert set(three.moves) == set(three.of("c"))
    assert all(before in ("a", "b") for before, _ in three.moves.values())
    # When a fourth joins: 3 each, only 3 move
    four = assign(range(12), "abcd", three.owners)
    assert [len(four.of(m)) for m in "abcd"] == [3, 3, 3, 3] and len(four.moves) == 3
    # When b leaves: only b's partitions move
    left = assign(range(12), "acd", four.owners)
    assert set(left.moves) == set(four.of("b"))
    assert sorted(len(left.of(m)) for m in "acd") == [4, 4, 4]


def test_pinned_members_keep_their_partitions_and_take_no_others() -> None:
    result = assign(range(6), ["a", "b", "pin"], {}, pinned={"pin": [0, 1]})
    assert result.of("pin") == [0, 1]
    assert result.of("a") == [2, 3] and result.of("b") == [4, 5]


def test_no_member_means_no_owner() -> None:
    assert assign(range(4), [], {0: "gone"}).owners == {}
