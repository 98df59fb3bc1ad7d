"""Adversarial partition key texts: huge, unicode, control characters, glob and separator characters."""

from __future__ import annotations

__all__ = ["ADVERSARIAL_KEYS"]

#: Ids a hostile or careless producer might put where a partition key is read from.
ADVERSARIAL_KEYS: tuple[str, ...] = (
    "*",
    "cp:*",
    "a:b:c",
    "::::",
    "line1\nline2",
    "\r\n*3\r\n$3\r\nDEL\r\n",  # RESP injection attempt
    "tab\there",
    "nul\x00byte",
    "\x1b[31mred\x1b[0m",
    "../../etc/passwd",
    "{0.__class__}{id}",
    "__import__('os').system('true')",
    "${HOME}",
    "' OR 1=1 --",
    "ord-1 ",  # trailing space is a different key
    " ",
    "Ünïcödé 順序 🚀",
    "\u202eevil",  # right-to-left override
    "\ufeffbom",
    "x" * 1_000_000,  # a megabyte of key
    "é" * 10_000,
    "partition.entity.0",
    "celery",
)
