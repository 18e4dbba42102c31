"""Union-find against a breadth-first-search oracle on random graphs."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from visearch.unionfind import UnionFind


def _components_bfs(n: int, edges: list[tuple[int, int]]) -> list[list[int]]:
    adj: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen = [False] * n
    out = []
    for s in range(n):
        if seen[s]:
            continue
        seen[s] = True
        comp, queue = [], deque([s])
        while queue:
            v = queue.popleft()
            comp.append(v)
            for w in adj[v]:
                if not seen[w]:
                    seen[w] = True
                    queue.append(w)
        out.append(sorted(comp))
    return sorted(out, key=lambda c: c[0])


def test_small_groups_by_hand():
    uf = UnionFind(6)
    assert uf.union(0, 3) is True
    assert uf.union(3, 5) is True
    assert uf.union(5, 0) is False  # already one set
    assert uf.union(1, 2) is True
    assert uf.groups() == [[0, 3, 5], [1, 2], [4]]
    assert uf.groups(min_size=2) == [[0, 3, 5], [1, 2]]
    assert uf.connected(0, 5) and not uf.connected(0, 1)
    labels = uf.labels()
    assert labels[0] == labels[3] == labels[5] != labels[1] == labels[2] != labels[4]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_graphs_match_bfs(seed: int):
    rng = np.random.default_rng(seed)
    n = 300
    edges = [tuple(int(v) for v in rng.integers(0, n, 2)) for _ in range(250)]
    uf = UnionFind(n)
    joined = uf.union_pairs(np.array([e[0] for e in edges]), np.array([e[1] for e in edges]))
    expected = _components_bfs(n, edges)
    assert uf.groups() == expected
    # Every successful union removes exactly one set.
    assert joined == n - len(expected)


def test_union_by_size_keeps_the_big_root():
    uf = UnionFind(5)
    uf.union(0, 1)
    uf.union(0, 2)
    big_root = uf.find(0)
    uf.union(3, big_root)  # the singleton joins under the three-element set's root
    assert uf.find(3) == big_root


def test_bad_input():
    with pytest.raises(ValueError):
        UnionFind(-1)
    uf = UnionFind(3)
    with pytest.raises(IndexError):
        uf.find(3)
    with pytest.raises(ValueError):
        uf.union_pairs(np.array([0, 1]), np.array([1]))
