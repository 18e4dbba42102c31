"""Catalog deduplication: MD5 for exact copies, then a perceptual hash for near-duplicates.

Hashing decodes each image small (JPEG draft mode) in a process pool. Near-duplicates are
the pairs of hash codes within a Hamming radius, found with a faiss binary index (range
search), never with an all-pairs loop. The default hash is imagehash's 256-bit pHash (DCT
signs); 256-bit dHash (adjacent-pixel gradients) is the earlier choice. On plain shop
backgrounds dHash's bits over flat regions are JPEG noise, so a brightness change flips
many of them; pHash keeps the same precision with higher recall (benchmarks/
bench_cleaning.py). Both are grey-scale, so two colourways of one product hash alike: a near
pair must also pass a colour check (``color_distance`` of the images' opponent-colour
signatures) before it counts as a duplicate.

Only duplicates within one SKU are removed. A duplicate pair across two SKUs is the same
image under two ids: the same product listed twice (a merge candidate) or a mislabel; it is
reported in ``DedupResult.cross_sku`` for review and nothing is deleted. Duplicates are
grouped with union-find and each group keeps one representative: the largest resolution
(width x height), then the earliest catalog position. Nothing here deletes or rewrites a
file: the result lists what to drop.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import faiss
import imagehash
import numpy as np
from PIL import Image

from visearch.errors import ImageDecodeError
from visearch.imageio import ImageSource, decode_pil, read_source
from visearch.progress import progress_bar
from visearch.unionfind import UnionFind

if TYPE_CHECKING:
    from visearch.parallel import Runner

logger = logging.getLogger(__name__)

#: Default hash size: 16 (256-bit codes). The classic 8 (64 bits) confuses distinct products
#: on plain backgrounds far more often; see benchmarks/bench_cleaning.py.
HASH_SIZE = 16
#: The perceptual hashes, by name: imagehash's functions of (image, hash_size).
HASH_KINDS = {"phash": imagehash.phash, "dhash": imagehash.dhash}
#: Default hash.
HASH_KIND = "phash"
#: Default Hamming radius (inclusive), for the default 256-bit pHash: on the synthetic world
#: 18 keeps every removal right and finds 0.97 or more of the non-rotated, uncropped copies.
RADIUS = 18
#: The radius of the earlier 256-bit dHash rule.
DHASH_RADIUS = 16
#: JPEG draft decode target: dHash shrinks to 17 x 16 and pHash to 64 x 64 (4 x 16), so a
#: decode of at least 64 px loses nothing they use.
DRAFT = (64, 64)
#: Colour signature grid side: mean opponent chroma over a COLOR_GRID x COLOR_GRID grid.
COLOR_GRID = 4
#: Largest relative chroma difference (``color_distance``) of two near-duplicates. Measured
#: on the synthetic world (benchmarks/bench_cleaning.py): hue shifts of up to 25 degrees
#: reach 0.41, brightness and contrast changes 0.31; distinct products whose hashes collide
#: score 0.48 to 0.97, and colourways of one product more still.
COLOR_TOL = 0.5
#: Chroma norm under which an image counts as grey: relative differences of two nearly grey
#: images are measured against this floor instead of their own (tiny) chroma.
COLOR_FLOOR = 0.1
#: Multi-index hashing enumerates all flips of up to ``nflip`` bits per sub-code; past this
#: many the enumeration costs more than a flat popcount scan.
_MAX_NFLIP = 3


@dataclass(frozen=True)
class ImageHashes:
    """Hashes of N images, in input order.

    Attributes:
        md5: hex MD5 of each file's bytes ("" when unreadable).
        codes: ``uint8 [N, hash_size**2 / 8]`` packed perceptual-hash bits (zeros when
            undecodable); ``kind`` names the hash (a key of ``HASH_KINDS``).
        width, height: ``int64 [N]`` original size in pixels (0 when undecodable).
        errors: input index -> why it could not be hashed.
        color: ``float32 [N, 2 * COLOR_GRID**2]`` colour signature (see
            ``color_signature``; zeros when undecodable, or when built without one).
    """

    md5: list[str]
    codes: np.ndarray
    width: np.ndarray
    height: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    color: np.ndarray | None = None
    kind: str = HASH_KIND

    def __len__(self) -> int:
        return len(self.md5)


@dataclass(frozen=True)
class Removal:
    """One image dropped as a duplicate of ``duplicate_of`` (its group's representative)."""

    image: str
    duplicate_of: str
    kind: str  # "exact" (same bytes) or "near" (hash within the radius, maybe transitively)
    distance: int  # Hamming distance of the two hash codes (0 for exact copies)


@dataclass(frozen=True)
class CrossSkuPair:
    """Two images of different SKUs that are duplicates: reported, never removed.

    The same product under two SKUs (a merge candidate) or a mislabelled image; ``kind``
    "exact" (same bytes) or "near"; ``distance`` the codes' Hamming distance and
    ``color_distance`` the relative chroma difference (``color_distance``).
    """

    image_a: str
    sku_a: str
    image_b: str
    sku_b: str
    kind: str
    distance: int
    color_distance: float


@dataclass(frozen=True)
class DuplicateGroup:
    """A set of duplicate images: ``keep`` stays, ``members`` (all, keep included) sorted by
    input position."""

    keep: str
    members: list[str]


@dataclass
class DedupResult:
    """What dedup found; ``removed`` lists each image to drop (never the representative).

    ``cross_sku``: duplicate pairs across SKUs (kept, for review); ``rejected_by_color``:
    pairs within the Hamming radius that the colour check told apart; ``color_tol`` None
    when the colour check was off.
    """

    n_images: int
    groups: list[DuplicateGroup]
    removed: list[Removal]
    errors: list[tuple[str, str]]
    radius: int
    hash_size: int
    cross_sku: list[CrossSkuPair] = field(default_factory=list)
    rejected_by_color: int = 0
    color_tol: float | None = None
    hash_kind: str = HASH_KIND

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
            "cross_sku_pairs": len(self.cross_sku),
            "rejected_by_color": self.rejected_by_color,
            "radius": self.radius,
            "hash_size": self.hash_size,
            "hash_kind": self.hash_kind,
            "color_tol": self.color_tol,
        }

    def to_dict(self) -> dict[str, Any]:
        """The full, JSON-serialisable report."""
        return {
            **self.summary(),
            "groups_detail": [asdict(g) for g in self.groups],
            "removed_detail": [asdict(r) for r in self.removed],
            "cross_sku_detail": [asdict(p) for p in self.cross_sku],
            "errors_detail": [{"image": i, "reason": r} for i, r in self.errors],
        }


def color_signature(img: Image.Image, grid: int = COLOR_GRID) -> np.ndarray:
    """``float32 [2 * grid**2]``: the mean opponent chroma of each cell of a ``grid`` x
    ``grid`` grid, RGB in 0..1.

    Opponent chroma ``((R - G) / sqrt 2, (R + G - 2B) / sqrt 6)`` is zero for any grey, so
    the signature ignores brightness offsets and the grey background; brightness and
    contrast changes only scale it, and a hue shift rotates it.
    """
    rgb = np.asarray(img.convert("RGB").resize((grid, grid), Image.Resampling.BOX), np.float32)
    rgb = rgb.reshape(-1, 3) / 255.0
    o1 = (rgb[:, 0] - rgb[:, 1]) / np.sqrt(2.0)
    o2 = (rgb[:, 0] + rgb[:, 1] - 2.0 * rgb[:, 2]) / np.sqrt(6.0)
    return np.concatenate([o1, o2]).astype(np.float32)


def color_distance(a: np.ndarray, b: np.ndarray, *, floor: float = COLOR_FLOOR) -> np.ndarray:
    """Relative chroma difference ``|a - b| / max(|a|, |b|, floor)`` of colour signatures
    ``float32 [..., S]`` (broadcasting); ``float32 [...]``, 0 for equal colours.

    Relative, so a uniform brightness or contrast change (which scales chroma) stays small
    at any saturation; ``floor`` keeps two nearly grey images (whose chroma is mostly JPEG
    noise) close.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    scale = np.maximum(np.maximum(np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)), floor)
    return (np.linalg.norm(a - b, axis=-1) / scale).astype(np.float32)


def _hash_one(
    src: ImageSource, hash_size: int, draft: tuple[int, int], kind: str
) -> tuple:
    """(md5, packed hash bytes, width, height, error, colour signature) of one image (a
    file, or an image in the store: a damaged store raises, it is not a bad image)."""
    nocolor = np.zeros(2 * COLOR_GRID * COLOR_GRID, np.float32)
    try:
        data, _ = read_source(src)
    except ImageDecodeError as exc:
        return "", b"", 0, 0, str(exc), nocolor
    md5 = hashlib.md5(data).hexdigest()
    try:
        # The header gives the original size; the draft decode below shrinks it.
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
        img = decode_pil(data, draft=draft)
    except (ImageDecodeError, OSError) as exc:
        return md5, b"", 0, 0, str(exc), nocolor
    bits = HASH_KINDS[kind](img, hash_size=hash_size).hash
    return md5, np.packbits(bits.ravel()).tobytes(), width, height, "", color_signature(img)


def _hash_chunk(args: tuple[list[ImageSource], int, tuple[int, int], str]) -> list[tuple]:
    paths, hash_size, draft, kind = args
    return [_hash_one(p, hash_size, draft, kind) for p in paths]


def hash_images(
    paths: Sequence[ImageSource],
    *,
    hash_size: int = HASH_SIZE,
    kind: str = HASH_KIND,
    draft: tuple[int, int] = DRAFT,
    workers: int = 1,
    chunk_size: int = 64,
    progress: bool = False,
    runner: Runner | None = None,
) -> ImageHashes:
    """MD5 of the bytes, a perceptual hash and a colour signature of the pixels of every
    image file in ``paths``.

    Args:
        paths: image files (or stored images, ``visearch.store.StoredImage``), in catalog
            order.
        hash_size: hash grid side; the code has ``hash_size**2`` bits (a multiple of 8).
        kind: "phash" or "dhash" (``HASH_KINDS``).
        draft: JPEG draft-mode decode target ``(w, h)``.
        workers: processes; 1 hashes in this process.
        runner: a ``visearch.parallel`` runner (e.g. Ray Data) that hashes the chunks
            instead of ``workers`` (same chunks, same hashes).
        chunk_size: files per task sent to a worker.
        progress: show a tqdm bar.

    Returns:
        ``ImageHashes``; undecodable or unreadable files are listed in ``errors``.
    """
    if hash_size < 2 or (hash_size * hash_size) % 8:
        raise ValueError(f"hash_size**2 must be a multiple of 8 (e.g. 8 or 16), got {hash_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if kind not in HASH_KINDS:
        raise ValueError(f"hash kind must be one of {sorted(HASH_KINDS)}, got {kind!r}")
    n = len(paths)
    nbytes = hash_size * hash_size // 8
    chunks = [
        (list(paths[i : i + chunk_size]), hash_size, tuple(draft), kind)
        for i in range(0, n, chunk_size)
    ]
    bar = progress_bar(total=n, desc="hashing", unit="img", disable=not progress)
    results: list[tuple] = []
    if runner is not None:  # a visearch.parallel runner (Ray Data): the same chunks
        for out in runner.map(_hash_chunk, chunks):
            results.extend(out)
        bar.update(n)
    elif workers == 1 or len(chunks) <= 1:
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
    color = np.zeros((n, 2 * COLOR_GRID * COLOR_GRID), dtype=np.float32)
    md5s: list[str] = []
    errors: dict[int, str] = {}
    for i, (md5, code, w, h, err, sig) in enumerate(results):
        md5s.append(md5)
        if err:
            errors[i] = err
            continue
        codes[i] = np.frombuffer(code, dtype=np.uint8)
        width[i], height[i] = w, h
        color[i] = sig
    if errors:
        logger.warning("%d of %d images could not be hashed", len(errors), n)
    return ImageHashes(
        md5=md5s, codes=codes, width=width, height=height, errors=errors, color=color,
        kind=kind,
    )


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
    for start in progress_bar(starts, desc="hamming search", unit="batch", disable=not progress):
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
    skus: Sequence[str] | None = None,
    radius: int = RADIUS,
    color_tol: float | None = COLOR_TOL,
    method: str = "auto",
    progress: bool = False,
) -> DedupResult:
    """Group exact (same MD5) and near (hash within ``radius``, colours alike) duplicates.

    Args:
        hashes: from ``hash_images``; input order is catalog order.
        names: one name per image (the catalog's ``image`` field), unique.
        skus: one SKU per image. Duplicates are grouped (and removed) within a SKU only;
            pairs across SKUs go to ``DedupResult.cross_sku``. None treats every image as one
            SKU (the rule before SKU awareness: any duplicate may be removed).
        radius: inclusive Hamming radius on the hash codes; -1 finds exact copies only.
        color_tol: a near pair counts only when ``color_distance`` of the two colour
            signatures is at most this; None turns the colour check off (the grey-scale
            hash alone). Exact copies need no check.
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
    if skus is not None and len(skus) != n:
        raise ValueError(f"{len(skus)} SKU ids for {n} hashed images; pass one per image")
    if color_tol is not None and hashes.color is None:
        raise ValueError("these hashes carry no colour signature (hash_images makes one); "
                         "pass color_tol=None for the grey-scale rule")
    sku_of = list(skus) if skus is not None else [""] * n
    ok = np.flatnonzero([i not in hashes.errors for i in range(n)]).astype(np.int64)
    uf = UnionFind(n)

    # Candidate pairs (i < j): same bytes, or hash codes within the radius.
    pairs: dict[tuple[int, int], bool] = {}  # -> exact copy
    first_of: dict[str, list[int]] = {}
    for i in ok:
        first_of.setdefault(hashes.md5[i], []).append(int(i))
    for same in first_of.values():
        for k, a in enumerate(same):
            for b in same[k + 1 :]:
                pairs[(a, b)] = True
    if radius >= 0 and len(ok) > 1:
        pi, pj, _ = hamming_range_pairs(hashes.codes[ok], radius, method=method, progress=progress)
        for a, b in zip(ok[pi].tolist(), ok[pj].tolist(), strict=True):
            pairs.setdefault((a, b), False)

    cross: list[CrossSkuPair] = []
    rejected = 0
    for (a, b), exact in sorted(pairs.items()):
        cdist = 0.0
        if hashes.color is not None:
            cdist = float(color_distance(hashes.color[a], hashes.color[b]))
        if not exact and color_tol is not None and cdist > color_tol:
            rejected += 1
            continue
        if sku_of[a] == sku_of[b]:
            uf.union(a, b)
            continue
        dist = 0 if exact else int(hamming_distance(hashes.codes[a], hashes.codes[b]))
        cross.append(CrossSkuPair(names[a], sku_of[a], names[b], sku_of[b],
                                  "exact" if exact else "near", dist, round(cdist, 4)))

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
            dist = 0 if exact else int(hamming_distance(hashes.codes[m], hashes.codes[keep]))
            removed.append(Removal(names[m], names[keep], "exact" if exact else "near", dist))
    errors = [(names[i], hashes.errors[i]) for i in sorted(hashes.errors)]
    hash_size = math.isqrt(hashes.codes.shape[1] * 8)
    result = DedupResult(n, groups, removed, errors, radius, hash_size, cross, rejected,
                         color_tol, hashes.kind)
    logger.info("dedup: %s", result.summary())
    return result


def dedup_images(
    paths: Sequence[ImageSource],
    names: Sequence[str] | None = None,
    *,
    skus: Sequence[str] | None = None,
    radius: int = RADIUS,
    hash_size: int = HASH_SIZE,
    kind: str = HASH_KIND,
    color_tol: float | None = COLOR_TOL,
    method: str = "auto",
    workers: int = 1,
    progress: bool = False,
    runner: Runner | None = None,
) -> DedupResult:
    """Hash ``paths`` (catalog order) and group their duplicates; see ``find_duplicates``.

    ``names`` default to the paths as strings (use the catalog rows' ``image`` field);
    ``skus`` (one per path) keep removals within a SKU.
    """
    hashes = hash_images(paths, hash_size=hash_size, kind=kind, workers=workers,
                         progress=progress, runner=runner)
    names = [str(p) for p in paths] if names is None else list(names)
    return find_duplicates(hashes, names, skus=skus, radius=radius, color_tol=color_tol,
                           method=method, progress=progress)
