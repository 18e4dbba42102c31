"""Catalog deduplication: MD5 for exact copies, then dHash for near-duplicates.

Hashing decodes each image small (JPEG draft mode) in a process pool. Near-duplicates are
the pairs of dHash codes within a Hamming radius, found with a faiss binary index (range
search), never with an all-pairs loop. Duplicates are grouped with union-find and each group
keeps one representative: the largest resolution (width x height), then the earliest
catalog position. Nothing here deletes or rewrites a file: the result lists what to drop.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import imagehash
import numpy as np
from PIL import Image
from tqdm import tqdm

from visearch.errors import ImageDecodeError
from visearch.imageio import decode_pil
from visearch.unionfind import UnionFind

logger = logging.getLogger(__name__)

#: Default dHash size: 16 (256-bit codes). The classic 8 (64 bits) confuses distinct products
#: on plain backgrounds far more often; see benchmarks/bench_cleaning.py.
HASH_SIZE = 16
#: Default Hamming radius (inclusive), for the default 256-bit codes.
RADIUS = 16
#: JPEG draft decode target: dHash shrinks to (hash_size + 1) x hash_size (17 x 16), so a
#: decode of at least 64 px loses nothing it uses.
DRAFT = (64, 64)
#: Multi-index hashing enumerates all flips of up to ``nflip`` bits per sub-code; past this
#: many the enumeration costs more than a flat popcount scan.
_MAX_NFLIP = 3


@dataclass(frozen=True)
class ImageHashes:
    """Hashes of N images, in input order.

    Attributes:
        md5: hex MD5 of each file's bytes ("" when unreadable).
        dhash: ``uint8 [N, hash_size**2 / 8]`` packed dHash bits (zeros when undecodable).
        width, height: ``int64 [N]`` original size in pixels (0 when undecodable).
        errors: input index -> why it could not be hashed.
    """

    md5: list[str]
    dhash: np.ndarray
    width: np.ndarray
    height: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.md5)


@dataclass(frozen=True)
class Removal:
    """One image dropped as a duplicate of ``duplicate_of`` (its group's representative)."""

    image: str
    duplicate_of: str
    kind: str  # "exact" (same bytes) or "near" (dHash within the radius, maybe transitively)
    distance: int  # Hamming distance of the two dHash codes (0 for exact copies)


@dataclass(frozen=True)
class DuplicateGroup:
    """A set of duplicate images: ``keep`` stays, ``members`` (all, keep included) sorted by
    input position."""

    keep: str
    members: list[str]


@dataclass
class DedupResult:
    """What dedup found; ``removed`` lists each image to drop (never the representative)."""

    n_images: int
    groups: list[DuplicateGroup]
    removed: list[Removal]
    errors: list[tuple[str, str]]
    radius: int
    hash_size: int

    @property
    def kept(self) -> int:
        """Images that stay: all hashable images minus the removed ones."""
        return self.n_images - len(self.errors) - len(self.removed)

    @property
    def removed_images(self) -> set[str]:
        return {r.image for r in self.removed}

    def summary(self) -> dict[str, Any]:
        """Counts only, for logs and ``done.json``."""
        return {
            "images": self.n_images,
            "groups": len(self.groups),
            "kept": self.kept,
            "removed": len(self.removed),
            "removed_exact": sum(r.kind == "exact" for r in self.removed),
            "removed_near": sum(r.kind == "near" for r in self.removed),
            "errors": len(self.errors),
            "radius": self.radius,
            "hash_size": self.hash_size,
        }

    def to_dict(self) -> dict[str, Any]:
        """The full, JSON-serialisable report."""
        return {
            **self.summary(),
            "groups_detail": [asdict(g) for g in self.groups],
            "removed_detail": [asdict(r) for r in self.removed],
            "errors_detail": [{"image": i, "reason": r} for i, r in self.errors],
        }


def _hash_one(src: str | os.PathLike[str], hash_size: int, draft: tuple[int, int]) -> tuple:
    """(md5, packed dhash bytes, width, height, error) of one image file."""
    try:
        data = Path(src).read_bytes()
    except OSError as exc:
        return "", b"", 0, 0, f"cannot read {src}: {exc.strerror or exc}"
    md5 = hashlib.md5(data).hexdigest()
    try:
        # The header gives the original size; the draft decode below shrinks it.
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
        img = decode_pil(data, draft=draft)
    except (ImageDecodeError, OSError) as exc:
        return md5, b"", 0, 0, str(exc)
    bits = imagehash.dhash(img, hash_size=hash_size).hash
    return md5, np.packbits(bits.ravel()).tobytes(), width, height, ""


def _hash_chunk(args: tuple[list[str], int, tuple[int, int]]) -> list[tuple]:
    paths, hash_size, draft = args
    return [_hash_one(p, hash_size, draft) for p in paths]


def hash_images(
    paths: Sequence[str | os.PathLike[str]],
    *,
    hash_size: int = HASH_SIZE,
    draft: tuple[int, int] = DRAFT,
    workers: int = 1,
    chunk_size: int = 64,
    progress: bool = False,
) -> ImageHashes:
    """MD5 of the bytes and dHash of the pixels of every image file in ``paths``.

    Args:
        paths: image files, in catalog order.
        hash_size: dHash grid side; the code has ``hash_size**2`` bits (a multiple of 8).
        draft: JPEG draft-mode decode target ``(w, h)``.
        workers: processes; 1 hashes in this process.
        chunk_size: files per task sent to a worker.
        progress: show a tqdm bar.

    Returns:
        ``ImageHashes``; undecodable or unreadable files are listed in ``errors``.
    """
    if hash_size < 2 or (hash_size * hash_size) % 8:
        raise ValueError(f"hash_size**2 must be a multiple of 8 (e.g. 8 or 16), got {hash_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n = len(paths)
    nbytes = hash_size * hash_size // 8
    chunks = [
        ([str(p) for p in paths[i : i + chunk_size]], hash_size, tuple(draft))
        for i in range(0, n, chunk_size)
    ]
    bar = tqdm(total=n, desc="hashing", unit="img", disable=not progress)
    results: list[tuple] = []
    if workers == 1 or len(chunks) <= 1:
        for c in chunks:
            results.extend(_hash_chunk(c))
            bar.update(len(c[0]))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for c, out in zip(chunks, pool.map(_hash_chunk, chunks), strict=True):
                results.extend(out)
                bar.update(len(c[0]))
    bar.close()

    codes = np.zeros((n, nbytes), dtype=np.uint8)
    width = np.zeros(n, dtype=np.int64)
    height = np.zeros(n, dtype=np.int64)
    md5s: list[str] = []
    errors: dict[int, str] = {}
    for i, (md5, code, w, h, err) in enumerate(results):
        md5s.append(md5)
        if err:
            errors[i] = err
            continue
        codes[i] = np.frombuffer(code, dtype=np.uint8)
        width[i], height[i] = w, h
    if errors:
        logger.warning("%d of %d images could not be hashed", len(errors), n)
    return ImageHashes(md5=md5s, dhash=codes, width=width, height=height, errors=errors)


def _check_codes(codes: np.ndarray, name: str) -> np.ndarray:
    codes = np.ascontiguousarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise TypeError(
            f"{name} must be uint8 [N, nbytes] packed bits, got {codes.dtype} {codes.shape}"
        )
    return codes


def multihash_params(n: int, nbits: int, radius: int) -> tuple[int, int, int] | None:
    """``(nhash, b, nflip)`` for an exact ``IndexBinaryMultiHash`` range search at ``radius``
    over ``n`` codes of ``nbits``, or None when a flat scan is the better choice.

    Sub-codes of about log2(n) bits keep buckets near one entry; by pigeonhole, two codes
    within ``radius`` agree within ``radius // nhash`` bits on at least one sub-code, so
    probing that many flips per sub-code is exact.
    """
    b = int(min(max(math.ceil(math.log2(max(n, 2))), 8), 32, nbits))
    nhash = nbits // b
    nflip = radius // nhash
    if nhash < 1 or nflip > _MAX_NFLIP:
        return None
    return nhash, b, nflip


def build_binary_index(
    codes: np.ndarray, *, radius: int, method: str = "auto"
) -> faiss.IndexBinary:
    """A faiss binary index over ``codes`` (``uint8 [N, nbytes]``) that answers range
    searches at Hamming ``radius`` exactly.

    ``method``: "flat" (``IndexBinaryFlat``: popcount scan), "multihash"
    (``IndexBinaryMultiHash``, multi-index hashing) or "auto" (multihash when the flip
    enumeration stays small, else flat; see ``multihash_params``).
    """
    codes = _check_codes(codes, "codes")
    nbits = codes.shape[1] * 8
    if method not in ("auto", "flat", "multihash"):
        raise ValueError(f"method must be 'auto', 'flat' or 'multihash', got {method!r}")
    params = multihash_params(len(codes), nbits, radius) if method != "flat" else None
    if method == "multihash" and params is None:
        raise ValueError(
            f"radius {radius} is too large for exact multi-hash search on {nbits}-bit codes; "
            "use method='flat'"
        )
    if params is None:
        index: faiss.IndexBinary = faiss.IndexBinaryFlat(nbits)
    else:
        nhash, b, nflip = params
        index = faiss.IndexBinaryMultiHash(nbits, nhash, b)
        index.nflip = nflip
    if len(codes):
        index.add(codes)
    return index


def hamming_range_search(
    xb: np.ndarray,
    xq: np.ndarray,
    radius: int,
    *,
    method: str = "auto",
    index: faiss.IndexBinary | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All database codes within Hamming distance ``radius`` (inclusive) of each query.

    Args:
        xb: ``uint8 [N, nbytes]`` database codes (ignored when ``index`` is given).
        xq: ``uint8 [M, nbytes]`` query codes.
        radius: inclusive Hamming radius in bits.
        method: see ``build_binary_index``.
        index: a prebuilt index from ``build_binary_index`` with the same radius.

    Returns:
        faiss range-search layout: ``lims int64 [M+1]``; the results of query ``q`` are
        ``D[lims[q]:lims[q+1]]`` (``int32`` distances) and ``I[...]`` (``int64`` ids).
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    xq = _check_codes(xq, "xq")
    if index is None:
        index = build_binary_index(xb, radius=radius, method=method)
    if len(xq) == 0 or index.ntotal == 0:
        return np.zeros(len(xq) + 1, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
    # faiss binary range search keeps distances strictly below its radius.
    lims, dist, ids = index.range_search(xq, radius + 1)
    return lims.astype(np.int64), dist.astype(np.int32), ids.astype(np.int64)


def hamming_range_pairs(
    codes: np.ndarray,
    radius: int,
    *,
    method: str = "auto",
    batch_size: int = 65536,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of ``codes`` (``uint8 [N, nbytes]``) within Hamming ``radius`` (inclusive).

    Returns:
        ``(i, j, d)``: ``int64 [P]`` row ids with ``i < j``, ``int32 [P]`` distances, sorted
        by ``(i, j)``.
    """
    codes = _check_codes(codes, "codes")
    index = build_binary_index(codes, radius=radius, method=method)
    ii, jj, dd = [], [], []
    starts = range(0, len(codes), batch_size)
    for start in tqdm(starts, desc="hamming search", unit="batch", disable=not progress):
        q = codes[start : start + batch_size]
        lims, dist, ids = hamming_range_search(codes, q, radius, index=index)
        src = start + np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims))
        keep = src < ids
        ii.append(src[keep])
        jj.append(ids[keep])
        dd.append(dist[keep])
    if not ii:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    i, j, d = np.concatenate(ii), np.concatenate(jj), np.concatenate(dd)
    order = np.lexsort((j, i))
    return i[order], j[order], d[order]


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance of packed codes ``uint8 [..., nbytes]`` (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).sum(axis=-1).astype(np.int32)


def find_duplicates(
    hashes: ImageHashes,
    names: Sequence[str],
    *,
    radius: int = RADIUS,
    method: str = "auto",
    progress: bool = False,
) -> DedupResult:
    """Group exact (same MD5) and near (dHash within ``radius``) duplicates.

    Args:
        hashes: from ``hash_images``; input order is catalog order.
        names: one name per image (the catalog's ``image`` field), unique.
        radius: inclusive Hamming radius on the dHash codes; -1 finds exact copies only.
        method: Hamming search index, see ``build_binary_index``.
        progress: show a tqdm bar for the search.

    Returns:
        ``DedupResult``. Representative of each group: largest ``width * height``, then the
        earliest input position. Images that could not be hashed are reported in ``errors``
        and take part in no group.
    """
    n = len(hashes)
    if len(names) != n:
        raise ValueError(f"{len(names)} names for {n} hashed images")
    if len(set(names)) != n:
        raise ValueError("image names must be unique (one catalog image per name)")
    ok = np.array([i not in hashes.errors for i in range(n)], dtype=bool)
    uf = UnionFind(n)

    # Exact copies: same bytes. The first occurrence of each MD5 stands for its copies in
    # the (much costlier) near-duplicate search.
    first_of: dict[str, int] = {}
    for i in np.flatnonzero(ok):
        first = first_of.setdefault(hashes.md5[i], int(i))
        if first != i:
            uf.union(first, int(i))
    unique = np.array(sorted(first_of.values()), dtype=np.int64)

    if radius >= 0 and len(unique) > 1:
        pi, pj, _ = hamming_range_pairs(
            hashes.dhash[unique], radius, method=method, progress=progress
        )
        uf.union_pairs(unique[pi], unique[pj])

    area = hashes.width * hashes.height
    groups: list[DuplicateGroup] = []
    removed: list[Removal] = []
    for members in uf.groups(min_size=2):
        # Largest resolution first, then earliest position (members are sorted ascending).
        keep = max(members, key=lambda m: (int(area[m]), -m))
        groups.append(DuplicateGroup(keep=names[keep], members=[names[m] for m in members]))
        for m in members:
            if m == keep:
                continue
            exact = hashes.md5[m] == hashes.md5[keep]
            dist = 0 if exact else int(hamming_distance(hashes.dhash[m], hashes.dhash[keep]))
            removed.append(Removal(names[m], names[keep], "exact" if exact else "near", dist))
    errors = [(names[i], hashes.errors[i]) for i in sorted(hashes.errors)]
    hash_size = math.isqrt(hashes.dhash.shape[1] * 8)
    result = DedupResult(n, groups, removed, errors, radius, hash_size)
    logger.info("dedup: %s", result.summary())
    return result


def dedup_images(
    paths: Sequence[str | os.PathLike[str]],
    names: Sequence[str] | None = None,
    *,
    radius: int = RADIUS,
    hash_size: int = HASH_SIZE,
    method: str = "auto",
    workers: int = 1,
    progress: bool = False,
) -> DedupResult:
    """Hash ``paths`` (catalog order) and group their duplicates; see ``find_duplicates``.

    ``names`` default to the paths as strings (use the catalog rows' ``image`` field).
    """
    hashes = hash_images(paths, hash_size=hash_size, workers=workers, progress=progress)
    names = [str(p) for p in paths] if names is None else list(names)
    return find_duplicates(hashes, names, radius=radius, method=method, progress=progress)
