"""Disjoint sets over ``0..n-1``: union by size, path compression.

Written by hand because neither sklearn nor scipy exposes an incremental union-find
(scipy's ``connected_components`` needs the whole edge list up front; dedup and SKU merging
add edges batch by batch and ask for groups in between).
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Union-find over the integers ``0..n-1``.

    ``union`` and ``find`` run in amortised near-constant time (inverse Ackermann).
    """

    def __init__(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"UnionFind size must be >= 0, got {n}")
        self._parent = np.arange(n, dtype=np.int64)
        self._size = np.ones(n, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._parent)

    def find(self, x: int) -> int:
        """The root of ``x``'s set; compresses the path on the way."""
        parent = self._parent
        root = int(x)
        if not 0 <= root < len(parent):
            raise IndexError(f"element {x} is outside 0..{len(parent) - 1}")
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    def union(self, a: int, b: int) -> bool:
        """Join the sets of ``a`` and ``b``; returns False when they were already one set."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self._size[ra] < self._size[rb]:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._size[ra] += self._size[rb]
        return True

    def union_pairs(self, i: np.ndarray, j: np.ndarray) -> int:
        """Union every pair ``(i[k], j[k])``; returns how many unions joined two sets."""
        i = np.asarray(i, dtype=np.int64).ravel()
        j = np.asarray(j, dtype=np.int64).ravel()
        if i.shape != j.shape:
            raise ValueError(f"pair arrays differ in length: {i.shape} vs {j.shape}")
        return sum(self.union(int(a), int(b)) for a, b in zip(i, j, strict=True))

    def connected(self, a: int, b: int) -> bool:
        """True when ``a`` and ``b`` are in the same set."""
        return self.find(a) == self.find(b)

    def labels(self) -> np.ndarray:
        """``int64 [n]``: each element's root (equal labels mean the same set)."""
        return np.array([self.find(x) for x in range(len(self))], dtype=np.int64)

    def groups(self, *, min_size: int = 1) -> list[list[int]]:
        """The sets with at least ``min_size`` members, each sorted ascending; the list is
        ordered by each set's smallest member."""
        by_root: dict[int, list[int]] = {}
        for x in range(len(self)):
            by_root.setdefault(self.find(x), []).append(x)
        return sorted((g for g in by_root.values() if len(g) >= min_size), key=lambda g: g[0])
