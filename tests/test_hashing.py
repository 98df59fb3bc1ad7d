"""Routing hash: blake2b-64 + jump consistent hash, checked against an independent C version."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from hashlib import blake2b
from pathlib import Path

import pytest

from celery_partitioning import PartitionConfigError, PartitionKeyError, partition_for
from celery_partitioning.hashing import jump_hash, key_hash
from tests.support.env import missing

#: Published vectors of the jump consistent hash (as used by reference ports such as go-jump).
JUMP_VECTORS = [(1, 1, 0), (42, 57, 43), (0xDEAD10CC, 1, 0), (0xDEAD10CC, 666, 361), (256, 1024, 520)]

#: The table of docs/reference.md: (key, partitions, index). Changing any of these breaks every deployment.
REFERENCE_VECTORS = [
    ("Order:ord-123", 10, 6),
    ("Order:ord-456", 10, 0),
    ("cust-123", 5, 2),
    ("corr-123", 5, 3),
    ("global", 1, 0),
    ("dcb:tenant:T:reservation:res-456", 5, 3),
    ("Order:ord-123", 11, 6),
    ("Order:ord-123", 100, 89),
]

C_SOURCE = r"""
#include <stdint.h>
int32_t jump(uint64_t key, int32_t buckets) {
    int64_t b = -1, j = 0;
    while (j < buckets) {
        b = j;
        key = key * 2862933555777941757ULL + 1;
        j = (b + 1) * ((double)(1LL << 31) / (double)((key >> 33) + 1));
    }
    return (int32_t)b;
}
"""


@pytest.fixture(scope="module")
def c_jump(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], int]:
    """The paper's C code, compiled here: an implementation independent of ours."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        missing("no C compiler to build the reference implementation")
    folder = tmp_path_factory.mktemp("jump")
    source, lib = folder / "jump.c", folder / "libjump.so"
    source.write_text(C_SOURCE)
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    jump = ctypes.CDLL(str(lib)).jump
    jump.argtypes = [ctypes.c_uint64, ctypes.c_int32]
    jump.restype = ctypes.c_int32
    return lambda h, n: int(jump(h, n))


def test_published_jump_vectors() -> None:
    for h, buckets, expected in JUMP_VECTORS:
        assert jump_hash(h, buckets) == expected


def test_matches_the_c_reference_on_many_inputs(c_jump: Callable[[int, int], int]) -> None:
    for i in range(3000):
        h = key_hash(f"key-{i}")
        for buckets in (1, 2, 3, 7, 10, 64, 1000, 4096):
            assert jump_hash(h, buckets) == c_jump(h, buckets), (i, buckets)


def test_key_hash_is_blake2b_64_big_endian() -> None:
    assert key_hash("global") == int.from_bytes(blake2b(b"global", digest_size=8).digest(), "big")
    assert key_hash("é") == int.from_bytes(blake2b("é".encode(), digest_size=8).digest(), "big")


def test_reference_vectors() -> None:
    reference = (Path(__file__).resolve().parents[1] / "docs" / "reference.md").read_text()
    for key, partitions, index in REFERENCE_VECTORS:
        assert partition_for(key, partitions) == index
        assert f"| `{key}` | {partitions} | {index} |" in reference


def test_stable_across_processes_with_different_hash_seeds() -> None:
    code = "from celery_partitioning import partition_for as p; print([p(f'k{i}', 7) for i in range(200)])"
    outputs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("0", "1", "12345")
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([partition_for(f"k{i}", 7) for i in range(200)])


def test_growing_a_pool_moves_about_one_in_n_plus_one_keys() -> None:
    keys = [f"Order:{i}" for i in range(20000)]
    for n in (1, 4, 9):
        moved = sum(partition_for(k, n) != partition_for(k, n + 1) for k in keys)
        assert abs(moved / len(keys) - 1 / (n + 1)) < 0.02
        # Keys only ever move to the new partition.
        assert all(partition_for(k, n + 1) in (partition_for(k, n), n) for k in keys[:2000])


def test_every_partition_is_used() -> None:
    assert {partition_for(f"c-{i}", 10) for i in range(500)} == set(range(10))


@pytest.mark.parametrize("bad", ["", None, 3, b"bytes"])
def test_bad_keys(bad: object) -> None:
    with pytest.raises(PartitionKeyError):
        partition_for(bad, 3)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "3"])
def test_bad_partition_counts(bad: object) -> None:
    with pytest.raises(PartitionConfigError):
        partition_for("k", bad)  # type: ignore[arg-type]
