"""The store's Lua scripts: ``.lua`` files in ``scripts/``, each the concatenation of its parts
(KEYS and ARGV documented in each file's header). Registered scripts run by ``EVALSHA`` and
are loaded again when the server does not know them (a restarted or failed-over Redis).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Final

__all__ = ["SCRIPTS", "Scripts", "script_for", "script_source", "scripts_for"]

#: Script name → the files it is made of, in order.
SCRIPTS: Final = {
    "check": ("message_id", "prelude", "gate", "check"),
    "finished": ("message_id", "prelude", "finished"),
    "dead_letter": ("message_id", "prelude", "dead_letter"),
    "backoff": ("message_id", "prelude", "backoff"),
    "release": ("message_id", "prelude", "release"),
    "lease_acquire": ("lease_acquire",),
    "lease_renew": ("lease_renew",),
    "lease_release": ("lease_release",),
    "resize_begin": ("resize_begin",),
    "resize_gate": ("message_id", "resize_release", "resize_gate"),
    "resize_take": ("resize_take",),
    "resize_poll": ("message_id", "resize_release", "resize_poll"),
    "resize_finish": ("resize_finish",),
}


@cache
def script_source(name: str) -> str:
    """The Lua text of script ``name`` (its parts joined), read from the package once."""
    folder = resources.files(__package__).joinpath("scripts")
    return "\n".join(folder.joinpath(f"{part}.lua").read_text(encoding="utf-8")
                     for part in SCRIPTS[name])


@dataclass(frozen=True)
class Scripts:
    """The store's scripts registered on one client: call ``scripts.check(keys=..., args=...)``."""

    check: Any
    finished: Any
    dead_letter: Any
    backoff: Any
    release: Any
    lease_acquire: Any
    lease_renew: Any
    lease_release: Any
    resize_begin: Any
    resize_gate: Any
    resize_take: Any
    resize_poll: Any
    resize_finish: Any


def script_for(client: Any, name: str) -> Any:
    """Script ``name`` registered on ``client`` (no round trip until the first call)."""
    return client.register_script(script_source(name))


def scripts_for(client: Any) -> Scripts:
    """Every script registered on ``client``."""
    return Scripts(**{name: script_for(client, name) for name in SCRIPTS})
