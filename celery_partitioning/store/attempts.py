"""The in-place retry attempt record of a task id: retries made, when the next is due, and the
arguments a retry changed. Kept in Redis so a worker SIGKILLed during a backoff resumes it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from .keys import RedisKeys

__all__ = ["ATTEMPTS_TTL", "AttemptRecord", "AttemptStore"]

#: How long an attempt record outlives its last retry (seconds).
ATTEMPTS_TTL: Final = 7 * 24 * 3600


@dataclass(frozen=True)
class AttemptRecord:
    """Retries made so far, when the next attempt is due (epoch s), changed arguments."""

    retries: int
    resume_at: float
    #: The serialized arguments a retry gave (``{"content_type", "encoding", "body"}``).
    call: dict[str, str] | None = None
    #: The token of the copy set aside with its key during the backoff (``store/backoff.py``):
    #: any other delivery of the task id is older, and is dropped.
    token: str | None = None

    def to_json(self) -> str:
        record: dict[str, Any] = {"retries": self.retries, "resume_at": self.resume_at}
        if self.call is not None:
            record["call"] = self.call
        if self.token is not None:
            record["token"] = self.token
        return json.dumps(record)

    @classmethod
    def parse(cls, raw: str | bytes | None) -> AttemptRecord | None:
        """The record in ``raw`` (as stored), or None when absent or unreadable."""
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            call, token = data.get("call"), data.get("token")
            return cls(int(data["retries"]), float(data["resume_at"]),
                       call if isinstance(call, dict) else None,
                       token if isinstance(token, str) else None)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


class AttemptStore:
    """Attempt records of one app namespace on one Redis client."""

    def __init__(self, client: Any, keys: RedisKeys) -> None:
        self.client = client
        self.keys = keys

    def save(self, task_id: str, record: AttemptRecord) -> None:
        self.client.set(self.keys.attempts(task_id), record.to_json(), ex=ATTEMPTS_TTL)

    def load_raw(self, task_id: str) -> bytes | None:
        value: bytes | None = self.client.get(self.keys.attempts(task_id))
        return value

    def forget(self, task_id: str) -> None:
        self.client.delete(self.keys.attempts(task_id))
