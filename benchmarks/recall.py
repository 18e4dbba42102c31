"""``visearch-bench recall``: retrieval quality over a labelled query set, with ablations.

Every query runs through the engine (in-process, or through the gRPC server with
``--server`` to measure exactly what clients get) once per ablation, in one run:

- ``full``:              detector crop, voted category, k-reciprocal re-ranking
- ``no_rerank``:         the same without re-ranking
- ``whole_image``:       no detector: the whole photo is embedded
- ``detector_category``: search the detector's own category (its argmax class score,
                         read from the vote breakdown), not the voted one
- ``gt_box``:            the ground-truth box as the client's bbox (an upper bound for
                         the detector)
- ``all_categories``:    search the whole index instead of the voted category

A query is correct when a retrieved SKU is its SKU or another SKU of the same product
(``truth.json``'s ``split_skus``). Reports Recall@1/5/10/20, mAP@K, NDCG@K, category
accuracy and the main-object hit rate (IoU >= 0.5), overall and per category, as a
markdown table on stdout, ``report.json``, PNG plots and a failure gallery PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import machine
from visearch.catalog import CatalogRow, read_manifest
from visearch.detection.evaluate import main_object_hit_rate
from visearch.metrics import accuracy, retrieval_metrics
from visearch.progress import progress_bar
from visearch.search.voting import VoteWeights, vote_category

KS = (1, 5, 10, 20)
ABLATIONS = ("full", "no_rerank", "whole_image", "detector_category", "gt_box",
             "all_categories")


# ---- backends: one query in, one plain record out ---------------------------------------


def _record_from(resp: Any, *, grpc_response: bool) -> dict[str, Any]:
    """Normalise an in-process ``SearchResult`` or a gRPC ``SearchResponse``."""
    mo = resp.main_object
    box = [mo.box.x1, mo.box.y1, mo.box.x2, mo.box.y2] if grpc_response else list(mo.box)
    votes = [(v.category, v.detector, v.neighbours, v.combined) for v in resp.category.votes]
    timings = {t.stage: t.ms for t in resp.timings} if grpc_response else dict(resp.timings)
    return {
        "skus": [h.sku for h in resp.results],
        "scores": [float(h.score) for h in resp.results],
        "image_keys": [h.image_key for h in resp.results],
        "category": resp.category.category or None,
        "votes": votes,
        "main_box": [float(v) for v in box],
        "main_source": mo.source,
        "fallback": bool(mo.fallback),
        "timings": timings,
    }


class InProcess:
    """Search with ``visearch.search.pipeline.SearchPipeline`` over the index root's version."""

    def __init__(self, index_root: Path, version: str | None, device: str | None) -> None:
        from visearch.index import IndexRoot
        from visearch.search.pipeline import RerankParams, SearchPipeline

        self.version = IndexRoot(index_root).open(version)
        self.pipeline = SearchPipeline.from_version(
            self.version, device=device, rerank=RerankParams()
        )
        self.name = self.version.version
        manifest = self.version.manifest
        self.catalog_path = manifest.get("inputs", {}).get("catalog_path")

    def search(self, image: bytes, **kw: Any) -> dict[str, Any]:
        return _record_from(self.pipeline.search(image, **kw), grpc_response=False)

    def close(self) -> None:
        self.pipeline.close()


class OverGrpc:
    """Search through a running ``visearch-serve`` with ``server.client.SearchClient``."""

    def __init__(self, target: str, index_root: Path | None) -> None:
        from server.client import SearchClient

        self.client = SearchClient(target, timeout=60.0)
        self.client.wait_ready(timeout=30.0)
        self.name = f"grpc://{target}"
        self.catalog_path = None
        if index_root is not None:
            from visearch.index import IndexRoot

            version = IndexRoot(index_root).open()
            self.catalog_path = version.manifest.get("inputs", {}).get("catalog_path")
            version.close()

    def search(self, image: bytes, **kw: Any) -> dict[str, Any]:
        category = kw.pop("category_hint", None)
        resp = self.client.search(image, category=category, **kw)
        return _record_from(resp, grpc_response=True)

    def close(self) -> None:
        self.client.close()


# ---- the benchmark ----------------------------------------------------------------------


def relevant_skus(queries: list[CatalogRow], truth_path: Path | None) -> list[set[str]]:
    """Per query, its SKU plus every SKU of the same product (split SKUs)."""
    same: dict[str, set[str]] = {}
    if truth_path is not None and truth_path.is_file():
        truth = json.loads(truth_path.read_text())
        for group in truth.get("split_skus", []):
            skus = set(group["skus"])
            for s in skus:
                same[s] = skus
    return [same.get(q.sku, {q.sku}) | {q.sku} for q in queries]


def _detector_category(rec: dict[str, Any]) -> str | None:
    """The category the detector alone would pick: the argmax of its vote share."""
    best = max(rec["votes"], key=lambda v: v[1], default=None)
    return best[0] if best is not None and best[1] > 0 else None


def run_ablation(
    backend: Any,
    name: str,
    queries: list[CatalogRow],
    images: list[bytes],
    top_k: int,
    full: list[dict[str, Any]] | None,
) -> list[dict[str, Any]]:
    """One record per query for ablation ``name``."""
    records = []
    for i, (q, data) in enumerate(
        progress_bar(list(zip(queries, images, strict=True)), desc=name, unit="q", leave=False)
    ):
        kw: dict[str, Any] = {"top_k": top_k}
        if name == "no_rerank":
            kw["rerank"] = False
        elif name == "whole_image":
            kw["skip_detection"] = True
        elif name == "gt_box":
            kw["bbox"] = list(q.bbox) if q.bbox else None
        elif name == "all_categories":
            kw["all_categories"] = True
        elif name == "detector_category":
            assert full is not None
            kw["category_hint"] = _detector_category(full[i])
        t0 = time.perf_counter()
        rec = backend.search(data, **kw)
        rec["latency_ms"] = (time.perf_counter() - t0) * 1000
        records.append(rec)
    return records


def summarise(
    records: list[dict[str, Any]], queries: list[CatalogRow], relevant: list[set[str]]
) -> dict[str, Any]:
    """Overall and per-category metrics of one ablation."""
    mean, per_query = retrieval_metrics(
        [r["skus"] for r in records], relevant, KS,
        scores=[r["scores"] for r in records], per_query=True,
    )
    out: dict[str, Any] = dict(mean)
    out["category_accuracy"] = accuracy([r["category"] or "" for r in records],
                                        [q.category for q in queries])
    out["detector_category_accuracy"] = accuracy(
        [_detector_category(r) or "" for r in records], [q.category for q in queries])
    with_box = [(r, q) for r, q in zip(records, queries, strict=True) if q.bbox]
    out["main_object_hit_rate"] = (
        main_object_hit_rate([r["main_box"] for r, q in with_box], [q.bbox for r, q in with_box])
        if with_box else None
    )
    out["latency_ms_p50"] = float(np.percentile([r["latency_ms"] for r in records], 50))
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        by_cat[q.category].append(i)
    out["per_category"] = {
        cat: {
            "queries": len(idx),
            "recall@1": float(np.mean([per_query[i]["recall@1"] for i in idx])),
            "recall@10": float(np.mean([per_query[i]["recall@10"] for i in idx])),
            "category_accuracy": float(np.mean(
                [records[i]["category"] == queries[i].category for i in idx])),
        }
        for cat, idx in sorted(by_cat.items())
    }
    out["recall@1_per_query"] = [row["recall@1"] for row in per_query]
    return out


#: the detector's share of the category vote in the sweep (neighbours get the rest; 0.5 is
#: ``VoteWeights()``'s equal weights)
VOTE_DETECTOR_SHARES = (0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


def vote_weight_sweep(
    records: list[dict[str, Any]], categories: list[str],
    shares: tuple[float, ...] = VOTE_DETECTOR_SHARES,
) -> list[dict[str, float]]:
    """Category accuracy for each detector share ``w`` of the vote (neighbours ``1 - w``),
    recomputed from every query's vote breakdown without searching again.

    Each record's votes hold the two sources' distributions over categories; they are fed
    back through ``vote_category`` with raw-similarity neighbour weights, which returns those
    distributions unchanged, so the mix, the drop-out of a silent source and the tie rule are
    the serving code's own. The neighbours' softmax temperature is fixed at what served the
    records. Only the category decision is swept: retrieval under another mix would need
    the searches run again.
    """
    out = []
    for w in shares:
        weights = VoteWeights(detector=w, neighbours=1.0 - w, temperature=None)
        chosen = []
        for rec in records:
            det = {c: d for c, d, _, _ in rec["votes"] if d > 0}
            nn = [(c, n) for c, _, n, _ in rec["votes"] if n > 0]
            decision = vote_category(det or None, [c for c, _ in nn], [n for _, n in nn],
                                     weights=weights)
            chosen.append(decision.category or "")
        out.append({"detector_share": w, "category_accuracy": accuracy(chosen, categories)})
    return out


def markdown_table(report: dict[str, Any]) -> str:
    cols = ["recall@1", "recall@5", "recall@10", "recall@20", "map@10", "ndcg@10",
            "category_accuracy", "main_object_hit_rate", "latency_ms_p50"]
    head = "| ablation | " + " | ".join(cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for name, s in report["ablations"].items():
        cells = []
        for c in cols:
            v = s.get(c)
            cells.append("-" if v is None else (f"{v:.1f}" if c.startswith("latency")
                                                else f"{v:.3f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def category_table(summary: dict[str, Any]) -> str:
    lines = ["| category | queries | recall@1 | recall@10 | category_accuracy |",
             "|---|---|---|---|---|"]
    for cat, s in summary["per_category"].items():
        lines.append(f"| {cat} | {s['queries']} | {s['recall@1']:.3f} | {s['recall@10']:.3f} "
                     f"| {s['category_accuracy']:.3f} |")
    return "\n".join(lines)


# ---- pictures ---------------------------------------------------------------------------


def plot_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Recall@K curves per ablation and per-category Recall@1 bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in report["ablations"].items():
        ax.plot(KS, [s[f"recall@{k}"] for k in KS], marker="o", label=name)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_xticks(KS)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Recall@K per ablation")
    fig.tight_layout()
    paths.append(out / "recall_at_k.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    full = report["ablations"][next(iter(report["ablations"]))]
    cats = list(full["per_category"])
    fig, ax = plt.subplots(figsize=(max(6, len(cats) * 0.7), 4))
    x = np.arange(len(cats))
    names = list(report["ablations"])
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [report["ablations"][name]["per_category"][c]["recall@1"] for c in cats]
        ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(cats, rotation=30)
    ax.set_ylabel("Recall@1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Recall@1 per category")
    fig.tight_layout()
    paths.append(out / "recall_per_category.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def failure_gallery(
    records: list[dict[str, Any]],
    queries: list[CatalogRow],
    relevant: list[set[str]],
    gallery_root: Path | None,
    out_path: Path,
    n: int = 16,
    thumb: int = 96,
) -> Path | None:
    """A PNG of the worst queries (no correct SKU in the top 5, lowest top-1 score first
    among them): the photo with the true (green) and chosen (red) boxes, then the top 5
    results, framed green when correct and red when not."""
    from PIL import Image, ImageDraw

    from visearch.errors import ImageDecodeError
    from visearch.imageio import decode_pil

    failed = [i for i, r in enumerate(records) if not set(r["skus"][:5]) & relevant[i]]
    failed.sort(key=lambda i: -(records[i]["scores"][0] if records[i]["scores"] else 0.0))
    failed = failed[:n]
    if not failed:
        return None
    cols = 6
    sheet = Image.new("RGB", (cols * (thumb + 6), len(failed) * (thumb + 18)), "white")
    draw = ImageDraw.Draw(sheet)

    def load(path: Path) -> Image.Image:
        try:
            return decode_pil(path)
        except ImageDecodeError:  # a missing or broken gallery file must not stop the report
            return Image.new("RGB", (thumb, thumb), (200, 200, 200))

    for row, i in enumerate(failed):
        y = row * (thumb + 18)
        q = queries[i]
        img = load(q.path)
        sx, sy = thumb / img.width, thumb / img.height
        img = img.resize((thumb, thumb))
        d = ImageDraw.Draw(img)
        if q.bbox:
            x1, y1, x2, y2 = q.bbox
            d.rectangle([x1 * sx, y1 * sy, x2 * sx, y2 * sy], outline=(0, 200, 0), width=2)
        x1, y1, x2, y2 = records[i]["main_box"]
        d.rectangle([x1 * sx, y1 * sy, x2 * sx, y2 * sy], outline=(230, 0, 0), width=1)
        sheet.paste(img, (3, y + 14))
        draw.text((3, y + 1), f"{q.sku} {q.category}", fill="black")
        for j, (sku, key) in enumerate(zip(records[i]["skus"][:5],
                                           records[i]["image_keys"][:5], strict=False)):
            x = (j + 1) * (thumb + 6) + 3
            path = (gallery_root / key) if gallery_root else Path(key)
            t = load(path).resize((thumb, thumb))
            ok = sku in relevant[i]
            ImageDraw.Draw(t).rectangle([0, 0, thumb - 1, thumb - 1],
                                        outline=(0, 200, 0) if ok else (230, 0, 0), width=3)
            sheet.paste(t, (x, y + 14))
            draw.text((x, y + 1), f"{sku} {records[i]['scores'][j]:.2f}", fill="black")
    sheet.save(out_path)
    return out_path


# ---- CLI ----------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index-root", type=Path, help="index root (in-process, or for paths)")
    p.add_argument("--version", help="index version (default: CURRENT)")
    p.add_argument("--server", help="HOST:PORT of a running visearch-serve (gRPC)")
    p.add_argument("--queries", type=Path, required=True, help="queries.jsonl")
    p.add_argument("--truth", type=Path,
                   help="truth.json (split SKUs count as correct; default: beside queries)")
    p.add_argument("--out", type=Path, default=Path("out/recall"), help="report folder")
    p.add_argument("--ablations", default=",".join(ABLATIONS),
                   help=f"comma-separated subset of {','.join(ABLATIONS)}")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--limit", type=int, help="only the first N queries")
    p.add_argument("--device", help="torch device for in-process runs")
    p.add_argument("--failures", type=int, default=16, help="queries in the failure gallery")


def run(args: argparse.Namespace) -> int:
    if args.server is None and args.index_root is None:
        print("error: give --index-root (in-process) or --server HOST:PORT", file=sys.stderr)
        return 2
    names = [a for a in args.ablations.split(",") if a]
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown:
        print(f"error: unknown ablations {unknown}; valid: {', '.join(ABLATIONS)}",
              file=sys.stderr)
        return 2
    if "detector_category" in names and "full" not in names:
        names.insert(0, "full")
    queries = read_manifest(args.queries).rows[: args.limit]
    truth = args.truth or (args.queries.parent / "truth.json")
    relevant = relevant_skus(queries, truth)
    images = [q.path.read_bytes() for q in queries]
    backend: InProcess | OverGrpc = (
        OverGrpc(args.server, args.index_root) if args.server
        else InProcess(args.index_root, args.version, args.device)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "engine": backend.name,
        "queries": len(queries),
        "query_file": str(args.queries),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "ablations": {},
    }
    all_records: dict[str, list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    try:
        for name in names:
            recs = run_ablation(backend, name, queries, images, args.top_k,
                                all_records.get("full"))
            all_records[name] = recs
            report["ablations"][name] = summarise(recs, queries, relevant)
            s = report["ablations"][name]
            print(f"{name:<18} recall@1 {s['recall@1']:.3f}  recall@10 {s['recall@10']:.3f}"
                  f"  category {s['category_accuracy']:.3f}", flush=True)
    finally:
        backend.close()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    stages: dict[str, list[float]] = defaultdict(list)
    for rec in all_records.get("full", []):
        for stage, ms in rec["timings"].items():
            stages[stage].append(ms)
    report["stage_ms_p50"] = {k: float(np.median(v)) for k, v in stages.items()}
    if "full" in all_records:
        report["vote_weight_sweep"] = vote_weight_sweep(all_records["full"],
                                                        [q.category for q in queries])

    print(f"\n## Recall report: {len(queries)} queries, engine {backend.name}\n")
    print(markdown_table(report))
    first = next(iter(report["ablations"]))
    print(f"\nPer category ({first}):\n")
    print(category_table(report["ablations"][first]))
    if "vote_weight_sweep" in report:
        print("\nCategory accuracy by the detector's share of the vote (full; 0.5 = equal "
              "weights, the default):\n")
        print("| detector share | " + " | ".join(
            f"{r['detector_share']:g}" for r in report["vote_weight_sweep"]) + " |")
        print("|---|" + "---|" * len(report["vote_weight_sweep"]))
        print("| category accuracy | " + " | ".join(
            f"{r['category_accuracy']:.3f}" for r in report["vote_weight_sweep"]) + " |")
    if report["stage_ms_p50"]:
        print("\nMedian stage times (ms, full): " + ", ".join(
            f"{k} {v:.1f}" for k, v in report["stage_ms_p50"].items()))

    gallery_root = Path(backend.catalog_path).parent if backend.catalog_path else None
    plots = plot_report(report, args.out)
    gallery = failure_gallery(all_records[first], queries, relevant, gallery_root,
                              args.out / "failures.png", n=args.failures)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nreport: {args.out / 'report.json'}")
    for path in plots:
        print(f"plot:   {path}")
    if gallery:
        print(f"failures: {gallery}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

