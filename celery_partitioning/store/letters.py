"""A dead letter as stored and listed: the record, its reasons, and the time stamps of records.

Kept apart from the store (``deadletters.py``) that reads and writes them in Redis.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from ..message import MessageSummary

__all__ = ["REASON_DCB_MAX_RETRIES", "REASON_ERROR", "REASON_MALFORMED", "REASON_MAX_RETRIES",
           "DeadLetter", "DeadLetterView", "as_text", "encode_raw", "now_iso"]

#: Reason of a dead letter: the task raised and had no retry policy left to apply.
REASON_ERROR: Final = "ERROR"
#: Reason of a dead letter: ``self.retry()`` / ``autoretry_for`` ran out of retries.
REASON_MAX_RETRIES: Final = "MAX_RETRIES_EXCEEDED"
#: Reason of a dead letter: a ``with_dcb_retry`` task still conflicted on its last attempt.
REASON_DCB_MAX_RETRIES: Final = "DCB_MAX_RETRIES_EXCEEDED"
#: Reason of a dead letter: the message could not be run at all (not a kombu message, an
#: undecodable body, an unknown task); its ``error`` says which.
REASON_MALFORMED: Final = "MALFORMED"


def now_iso() -> str:
    """The current UTC time as stored in records."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def as_text(value: Any) -> str:
    """A Redis reply as text (bytes decoded as UTF-8)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def encode_raw(raw: bytes | str) -> tuple[str, str | None]:
    """``raw`` as a dead letter stores it (the inverse of :meth:`DeadLetter.raw_bytes`): the
    text, and ``"base64"`` when it is not UTF-8."""
    if isinstance(raw, str):
        return raw, None
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


@dataclass(frozen=True)
class DeadLetter:
    """One failed message of a partitioned task, as stored (JSON) and listed."""

    pool: str
    key: str
    task: str
    id: str
    args: str
    kwargs: str
    error: str
    traceback: str
    attempts: int
    failed_at: str
    reason: str = REASON_ERROR
    partition: int | None = None
    queue: str | None = None
    hostname: str | None = None
    #: The original kombu payload (JSON text), re-queued unchanged by replay.
    raw: str | None = None
    #: ``"base64"`` when ``raw`` holds bytes that are not UTF-8 text (a malformed message).
    raw_encoding: str | None = None
    #: The task's failure policy that applied: ``"park"`` (the key waits behind it) or
    #: ``"skip"`` (recorded only; the key went on).
    policy: str = "park"

    def raw_bytes(self) -> bytes | None:
        """The original message exactly as it was received (None when unknown)."""
        if self.raw is None:
            return None
        if self.raw_encoding == "base64":
            return base64.b64decode(self.raw)
        return self.raw.encode("utf-8")

    def summary(self) -> MessageSummary:
        """The failed message as its record lists it."""
        return MessageSummary(self.id, self.task, self.args, self.kwargs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class DeadLetterView:
    """A dead letter with the messages parked behind it (what ``list`` shows)."""

    dead_letter: DeadLetter
    parked: tuple[MessageSummary, ...] = field(default=())

    def as_dict(self, with_raw: bool = False) -> dict[str, Any]:
        data = asdict(self.dead_letter)
        if not with_raw:
            data.pop("raw", None)
        data["parked_count"] = len(self.parked)
        data["parked"] = [asdict(p) for p in self.parked]
        return data
