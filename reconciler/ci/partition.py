"""Which shard of a sharded `asgctl plan` holds a cell: a stable partition.

`asgctl plan --shard I/N` plans the cells of shard I of N; `asgctl plan --merge` puts the N
partial results back together (`ci.partial`).  A cell belongs to shard
`1 + (first 8 bytes of sha256(name), big-endian) mod N`.

Why a hash of the name and not a slice of the sorted list: a cell's shard depends on its
name and N only, never on which other cells exist, so every job of a CI matrix computes the
same partition on its own, and the merge can check each partial covers exactly its shard's
cells without trusting the partial's word for it.  SHA-256 spreads names like `cell-0001`,
`cell-0002` evenly, so the jobs get about the same work.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

MAX_SHARDS = 256
"""More jobs than any CI matrix runs (GitHub's allows 256); a typo like `1/40000` fails early."""
PARTITION = "sha256(name)[:8] mod N"
"""The partition's name, written into every partial so a merge never mixes two schemes."""
_SPEC = re.compile(r"([0-9]{1,3})/([0-9]{1,3})")


class ShardError(ValueError):
    """A `--shard` value that names no shard."""


def shard_of(key: str, count: int) -> int:
    """The shard (1 to `count`) that holds `key`."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count` (1-based, as a CI matrix counts them)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ShardError(f"shard count {self.count} must be 1 to {MAX_SHARDS}")
        if not 1 <= self.index <= self.count:
            raise ShardError(f"shard {self.index} of {self.count} must be 1 to {self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`2/4` -> Shard(2, 4)."""
        m = _SPEC.fullmatch(text.strip())
        if m is None:
            raise ShardError(f"--shard {text!r}: expected I/N, e.g. 2/4 (shard 2 of 4)")
        return cls(int(m.group(1)), int(m.group(2)))

    def holds(self, key: str) -> bool:
        """Is `key` (a cell name) in this shard?"""
        return shard_of(key, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
