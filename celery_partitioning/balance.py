"""Which member process holds which partition of a pool: balanced and sticky (pure).

Every member of a pool computes the same assignment from the same inputs (the live members,
who holds what now, which partitions are pinned), so no coordinator is needed: each member
then gives up what is no longer its own, between two messages, and waits for the leases of
what became its own. The lease stays the only thing that lets a process consume; a moment
where two members disagree (one has seen a join the other has not) costs a wait, never an
overlap.

The rule, in the spirit of Kafka's cooperative-sticky assignor:

- Pinned partitions (``--partitions``) belong to their pinned member; the others are shared by
  the balanced members, each holding ⌊F/W⌋ or ⌈F/W⌉ of the F free partitions.
- The members that hold the most today get the ⌈F/W⌉ quotas (fewer moves); ties by member id.
- A member keeps what it holds up to its quota (lowest indexes first); what is left over, and
  what nobody holds, goes to the members under their quota in member-id order, lowest index
  first. So a join moves only the surplus the newcomer needs, a leave moves only the leaver's
  partitions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["Assignment", "assign"]


@dataclass(frozen=True)
class Assignment:
    """The outcome for one pool: partition index → member id, and what moves."""

    owners: Mapping[int, str]
    #: Partitions whose holder changes: index → (from member or None, to member).
    moves: Mapping[int, tuple[str | None, str]] = field(default_factory=dict)

    def of(self, member: str) -> list[int]:
        """The partitions ``member`` should hold, in index order."""
        return sorted(index for index, owner in self.owners.items() if owner == member)


def assign(partitions: Iterable[int], members: Iterable[str], current: Mapping[int, str],
           pinned: Mapping[str, Iterable[int]] | None = None) -> Assignment:
    """Balance ``partitions`` over the balanced ``members``, keeping ``current`` holders
    where the quotas allow. ``pinned`` maps a member to the partitions it is pinned to (such
    a member takes no other). A partition pinned to two members goes to the lower id."""
    indexes = sorted(set(partitions))
    pins = pinned or {}
    owners: dict[int, str] = {}
    for member in sorted(pins):
        for index in sorted(set(pins[member])):
            if index in indexes and index not in owners:
                owners[index] = member
    balanced = sorted(set(members) - set(pins))
    free = [index for index in indexes if index not in owners]
    if balanced:
        owners.update(_share(free, balanced, current))
    moves = {index: (current.get(index), owner) for index, owner in owners.items()
             if current.get(index) != owner}
    return Assignment(owners, moves)


def _share(free: Sequence[int], members: Sequence[str], current: Mapping[int, str]) -> dict[int, str]:
    held: dict[str, list[int]] = {member: [] for member in members}
    for index in free:
        owner = current.get(index)
        if owner in held:
            held[owner].append(index)
    base, extra = divmod(len(free), len(members))
    by_holding = sorted(members, key=lambda member: (-len(held[member]), member))
    quota = {member: base + (1 if rank < extra else 0) for rank, member in enumerate(by_holding)}
    owners: dict[int, str] = {}
    for member in members:
        for index in held[member][:quota[member]]:
            owners[index] = member
    left = iter(index for index in free if index not in owners)
    for member in members:
        for _ in range(quota[member] - sum(1 for o in owners.values() if o == member)):
            owners[next(left)] = member
    return owners
