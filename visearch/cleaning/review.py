"""The review queue: what cleaning proposes, shown to the catalog's owner, and their decisions.

Three kinds of proposal become ``ReviewItem``s, each with a stable ``id``:

- ``merge:<a>|<b>``: two SKUs merged or proposed for merging (calibrated merging);
- ``duplicate:<image a>|<image b>``: one image under two SKUs (dedup never removes these);
- ``denoise:<image>``: an image denoising removed from its SKU;
- ``tag:<image>``: categories/attributes ``visearch-index tag`` predicted with low
  confidence for a catalog row that lacked them.

A decision is one JSON object per line of a JSONL file, ``{"id", "decision", "kind", ...}``
with ``decision`` "accept" or "reject"; the last line for an id wins. The pipeline applies
them on the next run: an accepted merge merges, a rejected one never does; an accepted
cross-SKU duplicate drops ``image b``; a rejected denoise removal keeps the image.

``render_page`` writes the queue as one self-contained HTML page (images by relative URL):
per item its images, scores, the proposed action, and the command that records a decision;
radio buttons and a button that downloads the chosen decisions as JSONL.
"""

from __future__ import annotations

import html
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DECISIONS = ("accept", "reject")
KINDS = ("merge", "duplicate", "denoise", "tag")


@dataclass(frozen=True)
class ReviewItem:
    """One proposal. ``subjects``: the two SKUs (merge), the two images (duplicate) or the
    one image (denoise); ``images``: SKU -> catalog ``image`` fields to show; ``action``:
    what the pipeline does without a decision ("merged", "proposed", "kept", "removed");
    ``scores``: the evidence, by name; ``reason`` in words."""

    kind: str
    subjects: tuple[str, ...]
    action: str
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    images: dict[str, list[str]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.kind}:{'|'.join(self.subjects)}"


@dataclass(frozen=True)
class Decision:
    """A reviewer's ``decision`` ("accept" or "reject") on item ``id``."""

    id: str
    decision: str
    note: str = ""
    time: float = 0.0

    @property
    def kind(self) -> str:
        return self.id.split(":", 1)[0]

    @property
    def subjects(self) -> tuple[str, ...]:
        return tuple(self.id.split(":", 1)[1].split("|"))


def parse_item_id(item_id: str) -> tuple[str, tuple[str, ...]]:
    """``(kind, subjects)`` of an item id; ValueError naming the valid forms otherwise."""
    kind, sep, rest = item_id.partition(":")
    subjects = tuple(rest.split("|")) if rest else ()
    want = 1 if kind in ("denoise", "tag") else 2
    if not sep or kind not in KINDS or len(subjects) != want or not all(subjects):
        raise ValueError(
            f"bad review item id {item_id!r}; expected 'merge:<sku>|<sku>', "
            "'duplicate:<image>|<image>' or 'denoise:<image>' (ids are on the review page)"
        )
    return kind, subjects


def read_decisions(path: str | os.PathLike[str] | None) -> dict[str, Decision]:
    """Item id -> its latest decision, from a decisions JSONL file ({} when absent)."""
    if path is None or not Path(path).is_file():
        return {}
    out: dict[str, Decision] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            item_id, decision = str(obj["id"]), str(obj["decision"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: not a decision object with 'id' and 'decision' "
                             f"({exc})") from None
        if decision not in DECISIONS:
            raise ValueError(f"{path}:{n}: decision must be one of {DECISIONS}, got {decision!r}")
        parse_item_id(item_id)
        out[item_id] = Decision(item_id, decision, str(obj.get("note", "")),
                                float(obj.get("time", 0.0)))
    return out


def append_decisions(path: str | os.PathLike[str], decisions: Iterable[Decision]) -> int:
    """Append ``decisions`` to the JSONL file at ``path`` (created with its folder); returns
    how many were written. Ids are checked first, so a bad one writes nothing."""
    items = list(decisions)
    for d in items:
        parse_item_id(d.id)
        if d.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {d.decision!r}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for d in items:
            rec = {**asdict(d), "time": d.time or round(time.time(), 3),
                   "kind": d.kind, "subjects": list(d.subjects)}
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    return len(items)


def reviewed_pairs(decisions: Mapping[str, Decision], kind: str, decision: str) -> set[tuple]:
    """The subjects of the ``kind`` items with that ``decision`` (e.g. rejected merges)."""
    return {d.subjects for d in decisions.values() if d.kind == kind and d.decision == decision}


# ---- items from the stages' reports (plain dicts, as the stages write them) -----------------


_MERGE_ACTIONS = {
    "merge": "merged",
    "review": "proposed",
    "accepted": "merged (accepted)",
    "rejected": "not merged (rejected)",
    "blocked": "not merged (would join a rejected pair)",
}


def merge_items(candidates: Iterable[Mapping[str, Any]],
                images: Mapping[str, Sequence[str]]) -> list[ReviewItem]:
    """Items of calibrated-merge candidates (``MergeCandidate`` as dicts); ``images``: SKU
    -> its catalog images."""
    out = []
    for c in candidates:
        if c["decision"] not in _MERGE_ACTIONS:
            continue
        out.append(ReviewItem(
            "merge", (c["a"], c["b"]), _MERGE_ACTIONS[c["decision"]], c["reason"],
            {"confusion_ab": c["confusion_ab"], "confusion_ba": c["confusion_ba"],
             "excess_distance": c["excess_distance"],
             "relative_excess": c.get("relative_excess", float("nan")),
             "false_merge_p": c["false_merge_p"]},
            {s: list(images.get(s, [])) for s in (c["a"], c["b"])}))
    return out


def duplicate_items(pairs: Iterable[Mapping[str, Any]]) -> list[ReviewItem]:
    """Items of dedup's cross-SKU pairs (``CrossSkuPair`` as dicts): kept unless accepted."""
    return [ReviewItem(
        "duplicate", (p["image_a"], p["image_b"]), "kept",
        f"{p['kind']} duplicate across SKUs {p['sku_a']} and {p['sku_b']}: one product "
        "under two SKUs (merge them) or a mislabel",
        {"hamming": p["distance"], "color_distance": p["color_distance"]},
        {p["sku_a"]: [p["image_a"]], p["sku_b"]: [p["image_b"]]}) for p in pairs]


def denoise_items(removed: Iterable[Mapping[str, Any]],
                  images: Mapping[str, Sequence[str]],
                  kept: Iterable[str] = ()) -> list[ReviewItem]:
    """Items of denoising removals (``{"image", "sku", "reason", "distance"}``); the SKU's
    other images are shown beside the removed one. ``kept``: images whose removal a
    reviewer rejected (shown as kept)."""
    kept = set(kept)
    return [ReviewItem(
        "denoise", (r["image"],), "kept (removal rejected)" if r["image"] in kept else "removed",
        f"{r['reason']}: cosine distance {r['distance']:.3f} to the core of {r['sku']}",
        {"distance": r["distance"]},
        {f"{r['sku']} (removed)": [r["image"]],
         r["sku"]: [i for i in images.get(r["sku"], []) if i != r["image"]]}) for r in removed]


def tag_items(proposals: Iterable[Mapping[str, Any]]) -> list[ReviewItem]:
    """Items of low-confidence auto-tags (``{"image", "sku", "fields": {name: {"value",
    "score", "written"}}}``): accepting one writes every proposed value on the next
    ``tag`` run; rejecting one leaves the attributes missing (a category, which a catalog
    row needs, keeps the best guess)."""
    return [ReviewItem(
        "tag", (p["image"],),
        "written" if all(f["written"] for f in p["fields"].values()) else "proposed",
        "auto-tagged with low confidence: " + ", ".join(
            f"{n}={f['value']}" for n, f in p["fields"].items()),
        {n: float(f["score"]) for n, f in p["fields"].items()},
        {p["sku"]: [p["image"]]}) for p in proposals]


# ---- the page ---------------------------------------------------------------------------------

_SCRIPT = """
function saveDecisions() {
  const lines = [];
  for (const el of document.querySelectorAll('input[type=radio]:checked')) {
    if (el.value === 'accept' || el.value === 'reject')
      lines.push(JSON.stringify({id: el.name, decision: el.value, time: Date.now() / 1000}));
  }
  const blob = new Blob([lines.join('\\n') + '\\n'], {type: 'application/jsonl'});
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob); a.download = 'decisions.jsonl'; a.click();
}
"""

_STYLE = """
body{font-family:sans-serif;margin:1em} .item{border:1px solid #ccc;margin:.6em 0;padding:.5em}
.item img{height:96px;margin:2px;border:1px solid #eee} .sku{display:inline-block;margin-right:1em}
.decided{background:#f4f4f4} code{font-size:85%} td{padding:0 .6em}
"""


def render_page(
    items: Sequence[ReviewItem],
    decisions: Mapping[str, Decision],
    image_url: Callable[[str], str],
    *,
    title: str = "visearch cleaning review",
    command: str = "visearch-index review",
) -> str:
    """One HTML page of ``items``: pending ones first, then the decided ones.

    Args:
        items: the queue.
        decisions: item id -> decision already recorded (shown, pre-selected).
        image_url: catalog ``image`` field -> URL for ``<img src>`` (relative to the page).
        command: the CLI shown for recording a decision by hand.
    """
    esc = html.escape
    counts = {k: sum(i.kind == k for i in items) for k in KINDS}
    pending = [i for i in items if i.id not in decisions]
    decided = [i for i in items if i.id in decisions]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p>{counts['merge']} merges, {counts['duplicate']} cross-SKU duplicates, "
             f"{counts['denoise']} denoise removals; {len(pending)} pending, {len(decided)} "
             "decided. Choose accept or reject, then <button onclick='saveDecisions()'>"
             "download decisions.jsonl</button> and append it to the decisions file (or run "
             f"<code>{esc(command)} --accept ID</code> / <code>--reject ID</code>). The next "
             "rebuild applies them.</p>"]
    for heading, group in (("Pending", pending), ("Decided", decided)):
        parts.append(f"<h2>{heading} ({len(group)})</h2>")
        for item in group:
            d = decisions.get(item.id)
            scores = " ".join(f"<td>{esc(k)} <b>{v:.4g}</b></td>" for k, v in item.scores.items())
            radios = "".join(
                f"<label><input type='radio' name='{esc(item.id)}' value='{v}'"
                f"{' checked' if (d and d.decision == v) or (not d and v == '') else ''}>"
                f"{v or 'undecided'}</label> " for v in ("", "accept", "reject"))
            imgs = "".join(
                f"<div class='sku'><div>{esc(sku)}</div>"
                + "".join(f"<img src='{esc(image_url(im))}' title='{esc(im)}'>" for im in ims)
                + "</div>" for sku, ims in item.images.items())
            state = f" (decided: {d.decision})" if d else ""
            parts.append(
                f"<div class='item{' decided' if d else ''}'><div><b>{esc(item.kind)}</b> "
                f"<code>{esc(item.id)}</code>: {esc(item.action)}{esc(state)} — "
                f"{esc(item.reason)}</div><table><tr>{scores}</tr></table>{imgs}"
                f"<div>{radios}</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
