"""Pictures a person looks at after a phrase localization run (the counterpart of pictures.py, whose
file names, CSS, escaping, thumbnails and map they reuse; the driver logs them to MLflow):

- embedding_map.png: a 2-D map of a seeded sample of the split's ground-truth regions (blue dots;
  the proposals are left out: they would bury the chains) and all their phrases (red crosses),
  each phrase joined to its own region;
- queries.html: a seeded sample of phrases, self-contained (inline CSS, pictures as base64 JPEG
  data URIs): each phrase (HTML-escaped) over its picture, scaled so its long side is `size`, with
  the ground-truth box in green and the top-k proposals by score in rank colours (#1 red); a table
  of the same boxes as text with their scores and IoU with the truth, whether #1 is a hit
  (IoU >= 0.5, as in the metrics) and the rank of the first hitting proposal. Without pictures
  (features whose source files moved or changed, an unreadable file) the table is all there is,
  and the page says why.

Proposals are ranked by the metrics' scores (`itmatch.eval.phrases.proposal_scores`); ties keep the
picture's proposal order here, while the metrics count them against the phrase. Same inputs and
seed, same page, same map.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from itmatch.eval.pictures import (_CSS, MAP_FILE, PAGE_FILE, EmbeddingMap, _Page, draw_files, embedding_map,
                                    guarded_loader, open_rgb)
from itmatch.phrases.boxes import HIT_IOU, box_iou
from itmatch.phrases.metrics import _numpy

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

log = logging.getLogger("itmatch.pictures")

PictureLoader = Callable[[int], Any]
"""A split's picture row -> a PIL image, encoded bytes or a file path."""
TRUTH_COLOUR = (0, 200, 0)
RANK_COLOURS = ((230, 30, 30), (30, 110, 255), (255, 150, 0), (190, 40, 210), (0, 190, 230), (120, 70, 20))
"""#1, #2, ... proposal colours (cycled past the sixth); none of them reads as the truth's green."""
Scores = Union[torch.Tensor, np.ndarray, Callable[[], Any]]


# ---------------------------------------------------------------------------- the queries


@dataclass
class PhraseQuery:
    """One example phrase: the top-k proposals of its picture by score and how they sit on its box."""

    row: int  # phrase row of the split
    picture: int  # row into split.picture_ids
    top: list[int]  # region rows of the top-k proposals, best first
    scores: list[float]
    ious: list[float]  # IoU of each with the phrase's ground-truth box
    n_proposals: int  # proposals of the picture (the ranking's length)
    first_hit: Optional[int]  # 1-based rank of the best-placed hitting proposal; None: none of them hits

    @property
    def hits(self) -> list[bool]:
        return [iou >= HIT_IOU for iou in self.ious]


def _ranked(split: Any, row: int, scores: np.ndarray, k: int) -> PhraseQuery:
    picture = int(split.phrase_picture[row])
    rows = split.proposal_rows[picture]
    valid = rows >= 0  # padding columns carry meaningless scores
    rows, scores = rows[valid], scores[:len(valid)][valid]
    order = np.argsort(-scores, kind="stable")  # ties keep proposal order; NaN goes last
    ious = box_iou(np.asarray(split.phrase_box[row])[None], split.region_box[rows[order]])[0]
    hit = np.flatnonzero(ious >= HIT_IOU)
    return PhraseQuery(row, picture, [int(r) for r in rows[order[:k]]], [float(s) for s in scores[order[:k]]],
                       [float(i) for i in ious[:k]], len(rows), int(hit[0]) + 1 if len(hit) else None)


def phrase_queries(scores: Any, split: Any, *, n_queries: int = 12, k: int = 3, seed: int = 0) -> list[PhraseQuery]:
    """`n_queries` seeded random phrases of the split (in row order) with their top-k proposals;
    `scores`: [N, P_max] against `split.proposal_rows` of each phrase's picture."""
    scores = _numpy(scores, np.float64)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(split), size=min(n_queries, len(split)), replace=False))
    return [_ranked(split, int(r), scores[r], k) for r in rows]


# ---------------------------------------------------------------------------- drawing boxes


def _pixels(box: Sequence[float], scale: float, width: int, height: int) -> list[int]:
    """A 0-based exclusive box scaled, as the inclusive pixel corners PIL's rectangle draws."""
    x1 = min(max(math.floor(box[0] * scale), 0), width - 1)
    y1 = min(max(math.floor(box[1] * scale), 0), height - 1)
    x2 = min(max(math.ceil(box[2] * scale) - 1, x1), width - 1)
    y2 = min(max(math.ceil(box[3] * scale) - 1, y1), height - 1)
    return [x1, y1, x2, y2]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(10, size // 22))
    except TypeError:  # Pillow < 10.1: the one bitmap size
        return ImageFont.load_default()


def draw_boxes(picture: Any, truth: Sequence[float], boxes: Sequence[Sequence[float]], *, size: int = 320) -> PILImage:
    """The picture scaled so its long side is `size` (small synthetic pictures enlarged, large photos
    reduced), `boxes` (best first) outlined in RANK_COLOURS with "#rank" tags, and the ground-truth
    box in TRUTH_COLOUR on top (a proposal equal to it still shows its tag). Boxes in source pixels."""
    from PIL import Image, ImageDraw

    if picture is None:
        raise ValueError("no picture")
    image = open_rgb(picture)
    scale = size / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                         Image.Resampling.LANCZOS)
    draw, line, font = ImageDraw.Draw(image), max(2, round(size / 110)), _font(size)
    corners = [_pixels(b, scale, *image.size) for b in boxes]
    for rank in reversed(range(len(boxes))):  # #1 drawn last of the proposals: on top of the others
        draw.rectangle(corners[rank], outline=RANK_COLOURS[rank % len(RANK_COLOURS)], width=line)
    draw.rectangle(_pixels(truth, scale, *image.size), outline=TRUTH_COLOUR, width=line)
    for rank in reversed(range(len(boxes))):
        x1, y1 = corners[rank][:2]
        left, top, right, bottom = draw.textbbox((0, 0), f"#{rank + 1}", font=font)
        tag_h = bottom - top + 2
        y = y1 - tag_h if y1 >= tag_h else y1 + line  # above the box where there is room
        draw.rectangle([x1, y, x1 + right - left + 3, y + tag_h], fill=RANK_COLOURS[rank % len(RANK_COLOURS)])
        draw.text((x1 + 2 - left, y + 1 - top), f"#{rank + 1}", fill=(255, 255, 255), font=font)
    return image


# ---------------------------------------------------------------------------- the page


_PHRASE_CSS = """
section.phrase figure img{max-width:none;max-height:none}
section.phrase .ph{width:auto;height:auto;padding:1em;max-width:420px}
table.boxes{border-collapse:collapse;font-size:12px;margin-top:.4em}
table.boxes td,table.boxes th{padding:1px 8px;text-align:right}
table.boxes tr.hit{color:#2a9d3a;font-weight:bold}
.tag{display:inline-block;padding:0 .35em;color:#fff;font-weight:bold}
"""


def _colour(rgb: Sequence[int]) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def _box_text(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):g}" for v in box) + ")"


def _verdict(q: PhraseQuery) -> str:
    top = (f"#1 is a <b>hit</b> (IoU {q.ious[0]:.2f})" if q.hits[0] else f"#1 is a miss (IoU {q.ious[0]:.2f})") \
        if q.top else "no proposals"
    first = f"the first hit ranks {q.first_hit} of {q.n_proposals}" if q.first_hit else \
        f"none of its {q.n_proposals} proposals hits (IoU ≥ {HIT_IOU})"
    return f"{top}; {first}"


def _box_table(q: PhraseQuery, split: Any) -> str:
    rows = [f'<tr class="truth"><td><span class="tag" style="background:{_colour(TRUTH_COLOUR)}">truth</span></td>'
            f"<td></td><td></td><td>{_box_text(split.phrase_box[q.row])}</td></tr>"]
    for i, (r, s, iou, hit) in enumerate(zip(q.top, q.scores, q.ious, q.hits)):
        tag = f'<span class="tag" style="background:{_colour(RANK_COLOURS[i % len(RANK_COLOURS)])}">#{i + 1}</span>'
        rows.append(f'<tr class="{"hit" if hit else "miss"}" data-row="{r}" data-correct="{int(hit)}"><td>{tag}</td>'
                    f"<td>{s:.3f}</td><td>{iou:.2f}</td><td>{_box_text(split.region_box[r])}</td></tr>")
    return ('<table class="boxes"><tr><th>rank</th><th>score</th><th>IoU</th><th>box (x1, y1, x2, y2)</th></tr>'
            + "".join(rows) + "</table>")


def _section(page: _Page, i: int, q: PhraseQuery, split: Any, why: str) -> str:
    name = page.esc(page.image_name(i))
    uri = page.uri(i)
    picture = f'<figure><img src="{uri}" alt="{name}"></figure>' if uri else \
        f'<div class="ph">{name}: {page.esc(why or "could not be read")}; its boxes are listed below</div>'
    return (f'<section class="query phrase" data-query="{q.row}" data-picture="{q.picture}" '
            f'data-hit="{int(bool(q.top) and q.hits[0])}" data-rank="{q.first_hit or 0}">'
            f'<p class="q">“{page.esc(split.texts[q.row])}”</p>'
            f'<p class="meta">phrase row {q.row} of {name}: {_verdict(q)}</p>{picture}{_box_table(q, split)}</section>')


def _legend(k: int) -> str:
    tags = [f'<span class="tag" style="background:{_colour(TRUTH_COLOUR)}">ground truth</span>'] + \
        [f'<span class="tag" style="background:{_colour(RANK_COLOURS[i % len(RANK_COLOURS)])}">#{i + 1}</span>'
         for i in range(k)]
    return f'<p class="legend">{" ".join(tags)}</p>'


def phrase_page(scores: Any, split: Any, path: Path, *, picture_loader: Optional[PictureLoader],
                n_queries: int = 12, k: int = 3, seed: int = 0, title: str = "Example phrase localizations",
                size: int = 320) -> list[PhraseQuery]:
    """Write the example-phrases page of a PhraseSplit to `path`; returns the phrases shown.
    `scores`: [N, P_max] (proposal_scores); `picture_loader`: picture row -> picture (None, or a
    picture that cannot be read: its boxes as text only)."""
    queries = phrase_queries(scores, split, n_queries=n_queries, k=k, seed=seed)

    def drawn(i: int):  # _Page's thumbnails, keyed by query: each is its phrase's own drawing
        q = queries[i]
        return draw_boxes(picture_loader(q.picture), split.phrase_box[q.row],
                          [split.region_box[r] for r in q.top], size=size)

    names = [int(split.picture_ids[q.picture]) for q in queries]
    page = _Page(split.texts, drawn if picture_loader else None, names, size)
    why = "" if picture_loader else "no pixels here"
    body = [_section(page, i, q, split, why) for i, q in enumerate(queries)]
    note = "" if picture_loader else ("<p>Pictures are not shown: their pixels are not available here (the source "
                                      "files moved or changed since the store was built).</p>")
    if page.unreadable:
        note += f"<p>{page.unreadable} picture(s) could not be read; their boxes are listed as text.</p>"
    hits = sum(bool(q.top) and q.hits[0] for q in queries)
    text = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{page.esc(title)}</title><style>{_CSS}{_PHRASE_CSS}</style></head><body>"
            f"<h1>{page.esc(title)}</h1><p>{len(queries)} of {len(split):,} phrases, drawn with seed {seed}, each "
            f"with the top {k} proposals of its picture by score; #1 is a hit (IoU ≥ {HIT_IOU} with the ground "
            f"truth) for {hits}.</p>{_legend(k)}{note}" + "\n".join(body) + "</body></html>\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    return queries


# ---------------------------------------------------------------------------- the map


def phrase_map(region_emb: Any, phrase_emb: Any, split: Any, path: Path, *, max_images: int = 200,
               seed: int = 0) -> EmbeddingMap:
    """pictures.py's embedding map of the split's ground-truth regions (group id >= 0) and their
    phrases; the returned `image_rows` are region rows of the split."""
    truth = np.flatnonzero(np.asarray(split.image_ids) >= 0)
    own = np.searchsorted(truth, np.asarray(split.caption_image))  # every phrase's region is a truth row
    points = embedding_map(_numpy(region_emb)[truth], _numpy(phrase_emb), own, path, max_images=max_images,
                           seed=seed, labels=("region", "phrase"))
    return replace(points, image_rows=truth[points.image_rows])


# ---------------------------------------------------------------------------- a store, a model


def _source_corpus(text: str) -> Any:
    """The phrase corpus a store was built from, read as it is now; None where it is not on disk
    (a synthetic set is never generated for a picture)."""
    from itmatch.data.sources import DataError, parse_source
    from itmatch.phrases.entities import read_entities
    from itmatch.phrases.synthetic import MARKER

    source = parse_source(text)
    try:
        if source.scheme == "shapes-phrases":
            return read_entities(source.location, check_sizes=False) \
                if (Path(source.location) / MARKER).is_file() else None
        if source.scheme == "entities":  # sizes: checked when the store was built, whose name it must have
            return read_entities(source.location, image_dir=source.options.get("images"),
                                 proposals=source.options.get("proposals"), check_sizes=False)
    except (DataError, OSError) as exc:
        log.warning("phrase pictures: cannot read %s: %s", text, exc)
    return None


def phrase_picture_loader(split: Any, store: Any) -> Optional[PictureLoader]:
    """Pictures of a PhraseSplit's picture rows: a raw split's own bytes, else the source's files
    where the source read now is the one the store was built from (same cache key: files not
    moved or changed); None otherwise: no picture beats a wrong one."""
    if hasattr(split, "picture_bytes"):
        return lambda p: split.picture_bytes[int(p)].as_py()
    from itmatch.data.phrase_store import cache_name

    manifest = store.manifest
    corpus = _source_corpus(manifest["source"])
    if corpus is None or cache_name(corpus, manifest["image_encoder"], manifest["text_encoder"]) \
            != Path(store.root).name:
        log.warning("phrase pictures without pictures: %s as read from %s is not the data the store %s was built "
                    "from", manifest["source"], Path.cwd(), store.root)
        return None
    paths = dict(zip(corpus.images.column("image_id").to_pylist(), corpus.images.column("path").to_pylist()))
    return lambda p: paths[int(split.picture_ids[int(p)])]


def write_phrase_pictures(region_emb: Any, phrase_emb: Any, scores: Scores, split: Any, folder: Path, *,
                          picture_loader: Optional[PictureLoader], n_queries: int = 12, k: int = 3,
                          max_images: int = 200, seed: int = 0,
                          title: str = "Example phrase localizations") -> dict[str, Path]:
    """The map and the page of a PhraseSplit into `folder`; returns the files written. `scores`:
    [N, P_max], or a function computing them (run inside the page's drawing, so a failing scorer
    costs the page only). A picture that cannot be drawn is a warning (its stale file removed),
    never an error, as in pictures.write_pictures."""
    return draw_files(folder, {
        MAP_FILE: lambda p: phrase_map(region_emb, phrase_emb, split, p, max_images=max_images, seed=seed),
        PAGE_FILE: lambda p: phrase_page(scores() if callable(scores) else scores, split, p,
                                         picture_loader=picture_loader, n_queries=n_queries, k=k, seed=seed,
                                         title=title)})


def _model_scores(model: torch.nn.Module, region_emb: torch.Tensor, phrase_emb: torch.Tensor,
                  split: Any) -> torch.Tensor:
    """The metrics' [N, P_max] scores, the model in eval mode meanwhile (its learned pair score)."""
    from itmatch.eval.phrases import proposal_scores

    was_training = model.training
    model.eval()
    try:
        return proposal_scores(model, region_emb, phrase_emb, split.proposal_rows, split.phrase_picture)
    finally:
        model.train(was_training)


def model_phrase_pictures(model: torch.nn.Module, store: Any, split_name: str, folder: Path, *,
                          embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None, n_queries: int = 12,
                          k: int = 3, max_images: int = 200, seed: int = 0, device: str = "cpu",
                          title: str = "Example phrase localizations") -> dict[str, Path]:
    """A trained model's pictures of a PhraseStore's split (see `write_phrase_pictures`);
    `embeddings`: the split's (region, phrase) embeddings when the caller has them, else the model
    embeds it."""
    from itmatch.eval.evaluate import embed_split

    split = store.split(split_name)
    region_emb, phrase_emb = embeddings if embeddings is not None else embed_split(model, split, device=device)
    loader = guarded_loader(lambda: phrase_picture_loader(split, store), store)
    return write_phrase_pictures(region_emb, phrase_emb, lambda: _model_scores(model, region_emb, phrase_emb, split),
                                 split, folder, picture_loader=loader, n_queries=n_queries, k=k,
                                 max_images=max_images, seed=seed, title=title)


__all__ = ["PhraseQuery", "PictureLoader", "RANK_COLOURS", "TRUTH_COLOUR", "draw_boxes", "model_phrase_pictures",
           "phrase_map", "phrase_page", "phrase_picture_loader", "phrase_queries", "write_phrase_pictures"]
