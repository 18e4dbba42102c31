"""``generate_world``: plan a product world for a seed, render it in parallel, write manifests.

Planning (which products, SKUs, images, injected noise) happens in the calling process from
one generator seeded by ``seed``; every image is then rendered by a job whose generator is
seeded from ``(seed, job kind, job index)`` alone, so a process pool writes byte-identical
files to a single worker (on the same machine and Pillow/libjpeg build: JPEG bytes depend
on the encoder version).

Rate: about 240 images per CPU-second at 128 px (shop images are ~4x cheaper than
cluttered photos and scenes), measured with ``visearch-synth`` and
``benchmarks/synth_baseline.py`` on a shared 2-core x86 machine; the process pool scales it
with cores. ``workers > 1`` starts ``spawn`` processes, so call it from an importable module
or under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from visearch.progress import progress_bar
from visearch.synth.scene import (
    NEAR_DUP_TRANSFORMS,
    Box,
    near_duplicate,
    photo_crop,
    render_scene,
    render_shop,
    to_jpeg,
)
from visearch.synth.spec import CATEGORIES, ProductSpec, sample_products

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHOP_QUALITY = 92
_KIND_PLAN, _KIND_SHOP, _KIND_DUP, _KIND_PHOTO, _KIND_SCENE, _KIND_BACKGROUND = range(6)


@dataclass(frozen=True)
class _Job:
    """One image to render and write.

    Attributes:
        kind: ``"shop"``, ``"dup"`` (a near-duplicate of a shop image), ``"photo"`` or
            ``"scene"``.
        path: the image file, relative to the world folder.
        product: index into the world's products of the (main) product drawn.
        key: the job's index among the jobs of its kind; with the world seed and the kind
            it seeds the job's generator. A shop job's key is its row in the shop images.
        closeup: shop jobs: a close-up shot.
        source: dup jobs: the shop job whose image is edited.
        transform: dup jobs: the edit, one of ``NEAR_DUP_TRANSFORMS``.
    """

    kind: str
    path: str
    product: int
    key: int
    closeup: bool = False
    source: _Job | None = None
    transform: str = ""


class _Rendered(NamedTuple):
    """What a job wrote: the image ``path``, ``boxes`` ``[(product, box)]`` of the products
    drawn in it (the main one first), and the image ``size`` ``(width, height)``."""

    path: str
    boxes: list[tuple[int, Box]]
    size: tuple[int, int]


@dataclass(frozen=True)
class _Renderer:
    """Everything a job needs besides itself; one per rendering process.

    Attributes:
        products: the world's products.
        out: the world folder.
        size: image side in pixels.
        seed: the world seed.
        shop_masks: also write each shop image's and user photo's drawn mask (mask_path).
        photos: decoded background photos for the user photos (empty: procedural clutter).
        distractors: category -> indices of the products of every other category.
    """

    products: list[ProductSpec]
    out: Path
    size: int
    seed: int
    shop_masks: bool
    photos: list[Image.Image]
    distractors: dict[str, list[int]]

    @classmethod
    def create(cls, products: Sequence[ProductSpec], out: str | Path, size: int, seed: int,
               shop_masks: bool, photo_backgrounds: Sequence[str]) -> _Renderer:
        distractors = {
            cat: [i for i, p in enumerate(products) if p.category != cat]
            for cat in {p.category for p in products}
        }
        return cls(products=list(products), out=Path(out), size=size, seed=seed,
                   shop_masks=shop_masks,
                   photos=[_load_photo(Path(p), 4 * size) for p in photo_backgrounds],
                   distractors=distractors)

    def _rng(self, kind: int, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, kind, index])

    def _shop_bytes(self, job: _Job) -> tuple[bytes, Box, Image.Image]:
        """JPEG bytes, tight box and drawn mask (PIL ``L``) of one shop job."""
        image, box, mask = render_shop(self.products[job.product], self.size,
                                       self._rng(_KIND_SHOP, job.key), closeup=job.closeup,
                                       return_mask=True)
        return to_jpeg(image, SHOP_QUALITY), box, mask

    def run(self, job: _Job) -> _Rendered:
        """Render one job and write its file."""
        size = self.size
        if job.kind == "shop":
            data, box, mask = self._shop_bytes(job)
            boxes = [(job.product, box)]
            wh = (size, size)
            if self.shop_masks:
                mask.save(self.out / mask_path(job.path), format="PNG")
        elif job.kind == "dup":
            assert job.source is not None
            src_bytes, src_box, _ = self._shop_bytes(job.source)
            data, box = near_duplicate(src_bytes, src_box, job.transform,
                                       self._rng(_KIND_DUP, job.key))
            boxes = [(job.source.product, box)]
            wh = _jpeg_size(data)
        else:
            rng = self._rng(_KIND_PHOTO if job.kind == "photo" else _KIND_SCENE, job.key)
            photos = self.photos if job.kind == "photo" else []
            background = None
            if photos:
                # its own generator, so the scene's other draws do not depend on the photos
                bg_rng = self._rng(_KIND_BACKGROUND, job.key)
                background = photo_crop(photos[int(bg_rng.integers(len(photos)))], size, bg_rng)
            with_mask = self.shop_masks and job.kind == "photo"
            image, placed, *mask = render_scene(
                self.products, job.product, size, rng,
                distractors=self.distractors[self.products[job.product].category],
                max_distractors=3 if job.kind == "photo" else 4, background=background,
                return_mask=with_mask,
            )
            if with_mask:
                mask[0].save(self.out / mask_path(job.path), format="PNG")
            quality = int(rng.integers(25, 76))
            data = to_jpeg(image, quality)
            boxes = [(p.product, p.box) for p in placed]
            wh = (size, size)
        (self.out / job.path).write_bytes(data)
        return _Rendered(job.path, boxes, wh)


# The renderer of a pool worker process, set once by ``_init_pool_worker`` in that process
# (multiprocessing hands per-process state to tasks only through the initializer); the
# calling process never sets it.
_pool_renderer: _Renderer | None = None


def _init_pool_worker(products: Sequence[ProductSpec], out: str, size: int, seed: int,
                      shop_masks: bool, photo_backgrounds: Sequence[str]) -> None:
    """Build this worker's renderer; its background photos are decoded here, once per
    worker, rather than pickled from the caller."""
    global _pool_renderer
    _pool_renderer = _Renderer.create(products, out, size, seed, shop_masks,
                                      photo_backgrounds)


def _run_in_pool_worker(job: _Job) -> _Rendered:
    assert _pool_renderer is not None, "called outside a pool started by _render"
    return _pool_renderer.run(job)


def _load_photo(path: Path, max_side: int) -> Image.Image:
    """A background photo, decoded once per worker and shrunk to ``max_side``."""
    with Image.open(path) as im:
        im.draft("RGB", (max_side, max_side))
        photo = im.convert("RGB")
    photo.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return photo


def mask_path(image: str) -> str:
    """Where ``generate_world(shop_masks=True)`` writes the drawn mask of shop image or
    user photo ``image`` (both relative to the world folder): ``shop/S00012_1.jpg`` ->
    ``masks/S00012_1.png``, ``photos/Q000003.jpg`` -> ``masks/Q000003.png``."""
    return f"masks/{Path(image).stem}.png"


def _jpeg_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _dump_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def generate_world(
    out: Path,
    *,
    skus: int,
    seed: int,
    image_size: int = 128,
    shop_per_sku: int = 4,
    photos_per_sku: int = 1,
    scenes: int | None = None,
    dup_rate: float = 0.1,
    mislabel_rate: float = 0.03,
    split_rate: float = 0.03,
    val_fraction: float = 0.2,
    workers: int = 1,
    progress: bool = False,
    shop_masks: bool = False,
    photo_backgrounds: Sequence[str | Path] = (),
    colourway_rate: float = 0.0,
) -> dict:
    """Generate a synthetic product world into ``out`` (created if missing).

    Regenerating into the same folder rewrites every manifest and image and deletes other
    ``*.jpg`` files under ``shop/``, ``photos/`` and ``scenes/`` (left from a larger world).

    Args:
        skus: number of SKU ids in the catalog (>= 2). Split products take 2-3 ids each, so
            the number of distinct products is a little lower.
        seed: everything (manifests and image bytes) is a function of the arguments.
        image_size: side of every generated image, pixels (>= 48).
        shop_per_sku: shop images per SKU id (>= 1); near-duplicates come on top.
        photos_per_sku: user photos (queries) per SKU id (>= 0).
        scenes: detection scenes; default ``max(200, skus)``, ``val_fraction`` of them val.
        dup_rate: near-duplicate rows added, as a fraction of shop images.
        mislabel_rate: fraction of shop images that depict another product than their SKU.
        split_rate: ``round(split_rate * skus)`` products are listed under 2-3 SKU ids.
        workers: rendering processes (1 renders in this process).
        progress: show a tqdm bar.
        shop_masks: also write the drawn alpha mask of every original shop image (not of
            the near-duplicate rows) as ``masks/<image stem>.png`` (8-bit grey, 255 =
            product, the floor shadow excluded; its tight box of pixels >= 128 is the
            catalog bbox), and of every user photo the visible part of its product (the
            occluder removed, after the photo's perspective; the query bbox is the box of
            the whole product), see :func:`mask_path`. Every other file is byte-identical
            either way; ``world.json`` records ``"shop_masks": true`` in its params only
            when set.
        photo_backgrounds: image files: the user photos (queries) are rendered on random
            crops of these instead of the procedural clutter (detection scenes keep it),
            for evaluating on real backgrounds the generator never draws. The catalog, the
            truth and every other file are byte-identical either way.
        colourway_rate: probability that a look-alike family is a colourway family (same
            product in different body colours, see :func:`sample_products`); its families
            are listed in ``truth.json`` as ``colourway_families``. At 0 (the default) the
            world is byte-identical to one generated without the option.

    Returns:
        The ``world.json`` content: ``{"format", "params", "counts"}``.

    Writes ``catalog.jsonl``, ``queries.jsonl``, ``detection/{train,val}.json`` (COCO),
    ``truth.json``, ``world.json`` and the images under ``shop/``, ``photos/``, ``scenes/``
    (and ``masks/`` with ``shop_masks``).
    """
    if skus < 2:
        raise ValueError(f"skus must be >= 2, got {skus}")
    if image_size < 48:
        raise ValueError(f"image_size must be >= 48 pixels, got {image_size}")
    if shop_per_sku < 1 or photos_per_sku < 0:
        raise ValueError("shop_per_sku must be >= 1 and photos_per_sku >= 0")
    for name, rate in (("dup_rate", dup_rate), ("mislabel_rate", mislabel_rate),
                       ("split_rate", split_rate), ("val_fraction", val_fraction)):
        if not 0.0 <= rate <= 0.5:
            raise ValueError(f"{name} must be in [0, 0.5], got {rate}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    n_scenes = max(200, skus) if scenes is None else int(scenes)
    if n_scenes < 0:
        raise ValueError(f"scenes must be >= 0, got {scenes}")

    out = Path(out)
    for sub in ("shop", "photos", "scenes", "detection"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, _KIND_PLAN])

    # -- products and SKU ids (split products get 2 or 3 ids) ---------------------------
    n_split = int(round(split_rate * skus))
    extra = [1 + int(rng.uniform() < 0.2) for _ in range(n_split)]  # ids beyond the first
    while sum(extra) >= skus // 2 and extra:
        extra.pop()
    n_products = skus - sum(extra)
    products = sample_products(n_products, rng, colourway_rate=colourway_rate)
    split_products = rng.choice(n_products, size=len(extra), replace=False)
    listings = [(p, 0) for p in range(n_products)]
    for p, e in zip(split_products, extra, strict=True):
        listings += [(int(p), s + 1) for s in range(e)]
    order = rng.permutation(len(listings))
    # fixed-width ids sort in id order (S00012 < S00100), however large the world
    sku_width = max(5, len(str(skus - 1)))
    sku_product: dict[str, int] = {}
    sku_seller: dict[str, int] = {}
    for new_id, li in enumerate(order):
        sku = f"S{new_id:0{sku_width}d}"
        sku_product[sku], sku_seller[sku] = listings[int(li)]
    sku_ids = sorted(sku_product)
    product_skus: dict[int, list[str]] = {}
    for sku in sku_ids:
        product_skus.setdefault(sku_product[sku], []).append(sku)

    # -- shop images, mislabels, near-duplicates -----------------------------------------
    shop_jobs: list[_Job] = []
    shop_sku: list[str] = []
    for sku in sku_ids:
        for j in range(shop_per_sku):
            closeup = shop_per_sku >= 3 and j == shop_per_sku - 1 and rng.uniform() < 0.5
            shop_jobs.append(_Job("shop", f"shop/{sku}_{j + 1}.jpg", sku_product[sku],
                                  key=len(shop_jobs), closeup=bool(closeup)))
            shop_sku.append(sku)
    n_shop = len(shop_jobs)
    n_mis = int(round(mislabel_rate * n_shop))
    mislabelled = []
    mis_rows = set()
    by_category: dict[str, list[int]] = {}
    for i, p in enumerate(products):
        by_category.setdefault(p.category, []).append(i)
    if len({p.family for p in products}) >= 2:
        for r in sorted(int(i) for i in rng.choice(n_shop, size=n_mis, replace=False)):
            filed = products[shop_jobs[r].product]
            # Half the time a product of the same category (the hard case for cleaning);
            # rejection sampling keeps planning O(1) per row at any catalog size.
            pools = [range(n_products)]
            if rng.uniform() < 0.5:
                pools.insert(0, by_category[filed.category])
            true_p = -1
            for pool in pools:
                for _try in range(64):
                    cand = pool[int(rng.integers(len(pool)))]
                    if products[cand].family != filed.family:
                        true_p = cand
                        break
                if true_p >= 0:
                    break
            if true_p < 0:
                continue
            shop_jobs[r] = dataclasses.replace(shop_jobs[r], product=true_p)
            mis_rows.add(r)
            mislabelled.append({"image": shop_jobs[r].path, "filed_sku": shop_sku[r],
                                "true_sku": product_skus[true_p][0]})
    candidates = [r for r in range(n_shop) if r not in mis_rows]
    n_dup = min(int(round(dup_rate * n_shop)), len(candidates))
    dup_sources = sorted(int(candidates[i]) for i in
                         rng.choice(len(candidates), size=n_dup, replace=False))
    transforms = [NEAR_DUP_TRANSFORMS[i % len(NEAR_DUP_TRANSFORMS)] for i in range(n_dup)]
    transforms = [transforms[int(i)] for i in rng.permutation(n_dup)]
    next_index = dict.fromkeys(sku_ids, shop_per_sku)
    dup_jobs: list[_Job] = []
    near_duplicates = []
    for k, (r, t) in enumerate(zip(dup_sources, transforms, strict=True)):
        sku = shop_sku[r]
        next_index[sku] += 1
        path = f"shop/{sku}_{next_index[sku]}.jpg"
        source = shop_jobs[r]
        dup_jobs.append(_Job("dup", path, source.product, key=k, source=source, transform=t))
        near_duplicates.append({"image": path, "source": source.path, "transform": t})

    # -- user photos (queries) and detection scenes --------------------------------------
    pairs = [(sku, k) for sku in sku_ids for k in range(photos_per_sku)]
    photo_jobs: list[_Job] = []
    photo_sku: list[str] = []
    q_width = max(6, len(str(len(pairs))))
    for qi, pi in enumerate(rng.permutation(len(pairs)) if pairs else []):
        sku = pairs[int(pi)][0]
        photo_jobs.append(_Job("photo", f"photos/Q{qi + 1:0{q_width}d}.jpg", sku_product[sku],
                               key=qi))
        photo_sku.append(sku)
    n_val = int(round(val_fraction * n_scenes))
    n_train = n_scenes - n_val
    t_width = max(6, len(str(n_scenes)))
    mains = np.concatenate([rng.permutation(n_products)
                            for _ in range(n_scenes // n_products + 1)])[:n_scenes]
    scene_jobs: list[_Job] = [
        _Job("scene", f"scenes/T{i + 1:0{t_width}d}.jpg" if i < n_train else
             f"scenes/V{i - n_train + 1:0{t_width}d}.jpg", int(mains[i]), key=i)
        for i in range(n_scenes)
    ]

    # -- render ----------------------------------------------------------------------------
    jobs = shop_jobs + dup_jobs + photo_jobs + scene_jobs
    # A world regenerated in place must not keep images of a previous, larger one.
    wanted = {j.path for j in jobs}
    for sub in ("shop", "photos", "scenes"):
        for f in (out / sub).glob("*.jpg"):
            if f"{sub}/{f.name}" not in wanted:
                f.unlink()
    wanted_masks = ({mask_path(j.path) for j in shop_jobs + photo_jobs} if shop_masks
                    else set())
    if shop_masks:
        (out / "masks").mkdir(exist_ok=True)
    if (out / "masks").is_dir():
        for f in (out / "masks").glob("*.png"):
            if f"masks/{f.name}" not in wanted_masks:
                f.unlink()
        if not shop_masks and not any((out / "masks").iterdir()):
            (out / "masks").rmdir()
    backgrounds = [str(Path(p).resolve()) for p in photo_backgrounds]
    results = _render(jobs, products, out, image_size, seed, workers, progress, shop_masks,
                      backgrounds)

    # -- manifests -------------------------------------------------------------------------
    def row(path: str, sku: str, box: Box) -> dict:
        spec = products[sku_product[sku]]
        return {"image": path, "sku": sku, "category": spec.category, "bbox": list(box),
                "attributes": spec.attributes(), "title": spec.title(sku_seller[sku])}

    catalog = [row(j.path, shop_sku[i], results[i].boxes[0][1])
               for i, j in enumerate(shop_jobs)]
    for k, job in enumerate(dup_jobs):
        assert job.source is not None
        # a near-duplicate is filed under the SKU of the shop row it copies
        catalog.append(row(job.path, shop_sku[job.source.key], results[n_shop + k].boxes[0][1]))
    catalog.sort(key=lambda r: (r["sku"], int(r["image"].rsplit("_", 1)[1][:-4])))
    base = n_shop + len(dup_jobs)
    queries = []
    for q, job in enumerate(photo_jobs):
        boxes = results[base + q].boxes
        assert boxes and boxes[0][0] == job.product, "the main product is always visible"
        queries.append(row(job.path, photo_sku[q], boxes[0][1]))
    base += len(photo_jobs)
    cat_id = {c: i + 1 for i, c in enumerate(CATEGORIES)}
    coco_sets = {"train": results[base:base + n_train], "val": results[base + n_train:]}
    n_ann = {}
    for split, res in coco_sets.items():
        coco = _coco(res, products, cat_id)
        n_ann[split] = len(coco["annotations"])
        _dump_json(out / "detection" / f"{split}.json", coco)
    _dump_jsonl(out / "catalog.jsonl", catalog)
    _dump_jsonl(out / "queries.jsonl", queries)

    families: dict[str, list[str]] = {}
    for p, spec in enumerate(products):
        families.setdefault(spec.family, []).extend(product_skus[p])
    fam_products: dict[str, int] = {}
    for spec in products:
        fam_products[spec.family] = fam_products.get(spec.family, 0) + 1
    truth = {
        "seed": seed,
        "categories": list(CATEGORIES),
        "near_duplicates": near_duplicates,
        "mislabelled": mislabelled,
        "split_skus": [{"product": products[p].product, "skus": s}
                       for p, s in sorted(product_skus.items()) if len(s) > 1],
        "lookalike_families": [{"family": f, "skus": sorted(s)} for f, s in families.items()
                               if fam_products[f] > 1],
    }
    if colourway_rate > 0:
        colours: dict[str, set[str]] = {}
        for spec in products:
            colours.setdefault(spec.family, set()).add(spec.color_name)
        truth["colourway_families"] = [
            {"family": f, "skus": sorted(s)} for f, s in families.items()
            if fam_products[f] > 1 and len(colours[f]) > 1]
    _dump_json(out / "truth.json", truth)
    world = {
        "format": FORMAT_VERSION,
        "generator": "visearch.synth",
        "params": {
            "skus": skus, "seed": seed, "image_size": image_size, "shop_per_sku": shop_per_sku,
            "photos_per_sku": photos_per_sku, "scenes": n_scenes, "dup_rate": dup_rate,
            "mislabel_rate": mislabel_rate, "split_rate": split_rate,
            "val_fraction": val_fraction,
            # only when set, so that worlds without masks keep their earlier bytes
            **({"shop_masks": True} if shop_masks else {}),
            **({"colourway_rate": colourway_rate} if colourway_rate > 0 else {}),
            **({"photo_backgrounds": [Path(p).name for p in backgrounds]}
               if backgrounds else {}),
        },
        "counts": {
            "categories": len(CATEGORIES), "products": n_products, "skus": len(sku_ids),
            "families": len(families), "lookalike_families": len(truth["lookalike_families"]),
            "catalog_rows": len(catalog), "shop_images": n_shop,
            "near_duplicates": len(near_duplicates), "mislabelled": len(mislabelled),
            "split_products": len(truth["split_skus"]), "queries": len(queries),
            "scenes_train": n_train, "scenes_val": n_val,
            "annotations_train": n_ann["train"], "annotations_val": n_ann["val"],
            "images": len(jobs),
        },
    }
    _dump_json(out / "world.json", world)
    log.info("synthetic world in %s: %s", out, world["counts"])
    return world


def _render(jobs: list[_Job], products: list[ProductSpec], out: Path, size: int, seed: int,
            workers: int, progress: bool, shop_masks: bool,
            photo_backgrounds: Sequence[str]) -> list[_Rendered]:
    bar = progress_bar(total=len(jobs), desc="render", unit="img", disable=not progress)
    args = (products, str(out), size, seed, shop_masks, tuple(photo_backgrounds))
    try:
        if workers == 1:
            renderer = _Renderer.create(*args)
            results = []
            for job in jobs:
                results.append(renderer.run(job))
                bar.update()
            return results
        # spawn: workers do not inherit the caller's threads (torch, BLAS) or open files.
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(64, len(jobs) // (workers * 8)))
        with ctx.Pool(workers, initializer=_init_pool_worker, initargs=args) as pool:
            results = []
            for res in pool.imap(_run_in_pool_worker, jobs, chunksize=chunk):
                results.append(res)
                bar.update()
            return results
    finally:
        bar.close()


def _coco(results: list[_Rendered], products: list[ProductSpec], cat_id: dict[str, int]) -> dict:
    images, annotations = [], []
    for image_id, (path, boxes, (w, h)) in enumerate(results, start=1):
        images.append({"id": image_id, "file_name": path, "width": w, "height": h})
        for product, (x1, y1, x2, y2) in boxes:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": cat_id[products[product].category],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "iscrowd": 0,
            })
    categories = [{"id": i, "name": c, "supercategory": "product"} for c, i in cat_id.items()]
    return {"info": {"description": "visearch synthetic scenes"}, "images": images,
            "annotations": annotations, "categories": categories}
