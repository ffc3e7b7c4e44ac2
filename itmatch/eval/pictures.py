"""Pictures a person looks at after a run, drawn from a split's embeddings (the driver logs them to MLflow):

- embedding_map.png: a 2-D map of a seeded sample of images (blue dots) and all their captions (red
  crosses), each caption joined to its own image by a faint line, as in 003's t-SNE figures
  (sklearn's t-SNE; a PCA projection where scikit-learn is missing, named in the title);
- queries.html: example queries, self-contained (inline CSS, thumbnails as base64 data URIs, so
  the page works when downloaded from MLflow on its own): for caption queries the top-k images,
  the ground-truth image marked (and shown with its rank when it is not among them); for image
  queries the top-k captions, the image's own captions marked. Every caption is HTML-escaped.

The drawing functions take embeddings, each caption's image row (`txt_img`, as in retrieval.py),
the captions and an `image_loader(row) -> PIL image | encoded bytes | file path | None`, so they
run without a model; `model_pictures` is the one call for a trained model and a split. Results are
ranked by the same scores as the metrics (cosine, or the model's learned pair score); ties keep
gallery order here, while the metrics count them against the query. Same inputs and seed, same
queries, same map.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from itmatch.data.images import open_rgb
from itmatch.eval.retrieval import ScoreFn

log = logging.getLogger("itmatch.pictures")

ImageLoader = Callable[[int], Any]
MAP_FILE = "embedding_map.png"
PAGE_FILE = "queries.html"


# ---------------------------------------------------------------------------- the map


@dataclass
class EmbeddingMap:
    """The points of a map: which rows were drawn and where."""

    image_rows: np.ndarray  # [m] image rows drawn
    caption_rows: np.ndarray  # [c] every caption of those images
    image_xy: np.ndarray  # [m, 2]
    caption_xy: np.ndarray  # [c, 2]
    caption_image: np.ndarray  # [c] index into image_rows of each caption's image
    method: str  # "t-SNE" or "PCA"


def _unit_rows(x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    comps = comps * np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])[:, None]  # fixed signs
    out = centred @ comps.T
    return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def project_2d(x: np.ndarray, *, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """[n, 2] coordinates of the rows of x and the method used: t-SNE (scikit-learn, seeded, PCA
    initialisation) when `method` is "auto" or "tsne" and there are enough points, else PCA."""
    if method not in ("auto", "tsne", "pca"):
        raise ValueError(f"method={method!r}; choices: auto, tsne, pca")
    if method != "pca" and len(x) >= 5:
        try:
            from sklearn.manifold import TSNE
            from threadpoolctl import threadpool_limits  # a scikit-learn dependency
        except ImportError:
            if method == "tsne":
                raise
            log.warning("scikit-learn is not installed: the embedding map is a PCA projection, not t-SNE")
        else:
            tsne = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed)
            # One OpenMP thread: seconds for a few thousand points, the same sums on every machine,
            # and no spinning threads fighting a busy machine's cores (measured 10-50x slower).
            with threadpool_limits(limits=1, user_api="openmp"):
                return tsne.fit_transform(x.astype(np.float32)).astype(np.float64), "t-SNE"
    return _pca_2d(x), "PCA"


def map_points(img: Any, txt: Any, txt_img: Any, *, max_images: int = 200, seed: int = 0,
               method: str = "auto") -> EmbeddingMap:
    """A seeded sample of up to `max_images` captioned images and all their captions, projected together."""
    txt_img = np.asarray(txt_img, dtype=np.int64)
    captioned = np.unique(txt_img)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(captioned, size=min(max_images, len(captioned)), replace=False))
    caption_rows = np.flatnonzero(np.isin(txt_img, rows))
    points = np.concatenate([_unit_rows(img)[rows], _unit_rows(txt)[caption_rows]])
    xy, used = project_2d(points, seed=seed, method=method)
    return EmbeddingMap(rows, caption_rows, xy[:len(rows)], xy[len(rows):],
                        np.searchsorted(rows, txt_img[caption_rows]), used)


def embedding_map(img: Any, txt: Any, txt_img: Any, path: Path, *, max_images: int = 200, seed: int = 0,
                  method: str = "auto", links: bool = True,
                  labels: tuple[str, str] = ("image", "caption")) -> EmbeddingMap:
    """Draw `map_points` to a PNG at `path`; returns the points drawn. `labels`: what the two sides
    are called in the legend and title (singular; e.g. region / phrase)."""
    from matplotlib.collections import LineCollection

    from itmatch.eval.plots import _pyplot, _save

    points = map_points(img, txt, txt_img, max_images=max_images, seed=seed, method=method)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6.5))
    if links:
        segments = np.stack([points.caption_xy, points.image_xy[points.caption_image]], axis=1)
        ax.add_collection(LineCollection(segments, colors="0.55", linewidths=0.4, alpha=0.35, zorder=1,
                                         label=f"{labels[1]} – its {labels[0]}"))
    ax.scatter(*points.caption_xy.T, s=9, marker="x", linewidths=0.7, c="tab:red", zorder=2,
               label=f"{labels[1]}s ({len(points.caption_rows):,})")
    ax.scatter(*points.image_xy.T, s=16, marker="o", c="tab:blue", edgecolors="white", linewidths=0.3, zorder=3,
               label=f"{labels[0]}s ({len(points.image_rows):,})")
    ax.set(xticks=[], yticks=[], title=f"{points.method} map of {labels[0]} and {labels[1]} embeddings (seed {seed})")
    ax.legend(loc="best", fontsize=8, markerscale=1.5)
    _save(fig, Path(path))
    return points


# ---------------------------------------------------------------------------- the queries


@dataclass
class Query:
    """One example query: its top-k results (rows), their scores and the correct rows."""

    kind: str  # "t2i" (a caption retrieves images) or "i2t" (an image retrieves captions)
    row: int  # the query's caption row (t2i) or image row (i2t)
    top: list[int]
    scores: list[float]
    truth: list[int]  # the correct results: the caption's image, or the image's captions
    truth_rank: int  # 1-based rank of the best-placed correct result in the whole gallery

    @property
    def hits(self) -> list[bool]:
        return [r in self.truth for r in self.top]


def _scores(queries: torch.Tensor, gallery: torch.Tensor, score_fn: Optional[ScoreFn], images_are_queries: bool,
            chunk: int = 1024) -> torch.Tensor:
    """[q, G] scores of the query rows against the whole gallery (score_fn takes (images, texts))."""
    if score_fn is None:
        return queries @ gallery.T
    blocks = []
    for j in range(0, len(gallery), chunk):
        part = gallery[j:j + chunk]
        blocks.append(score_fn(queries, part) if images_are_queries else score_fn(part, queries).T)
    return torch.cat(blocks, dim=1)


def _ranked(kind: str, rows: np.ndarray, scores: torch.Tensor, truths: list[list[int]], k: int) -> list[Query]:
    out = []
    for row, s, truth in zip(rows, scores.float().cpu().numpy(), truths):
        order = np.argsort(-s, kind="stable")  # ties keep gallery order; NaN goes last
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        out.append(Query(kind, int(row), [int(r) for r in order[:k]], [float(s[r]) for r in order[:k]],
                         truth, int(position[truth].min()) + 1))
    return out


def query_examples(img: Any, txt: Any, txt_img: Any, *, n_queries: int = 12, k: int = 5, seed: int = 0,
                   score_fn: Optional[ScoreFn] = None) -> tuple[list[Query], list[Query]]:
    """(caption queries, image queries): `n_queries` seeded random ones of each, with their top-k."""
    img, txt = torch.as_tensor(np.asarray(img, dtype=np.float32)), torch.as_tensor(np.asarray(txt, dtype=np.float32))
    txt_img = np.asarray(txt_img, dtype=np.int64)
    rng = np.random.default_rng(seed)
    captions = np.sort(rng.choice(len(txt), size=min(n_queries, len(txt)), replace=False))
    captioned = np.unique(txt_img)
    images = np.sort(rng.choice(captioned, size=min(n_queries, len(captioned)), replace=False))
    with torch.no_grad():
        t2i = _scores(txt[captions], img, score_fn, images_are_queries=False)
        i2t = _scores(img[images], txt, score_fn, images_are_queries=True)
    own = [np.flatnonzero(txt_img == i).tolist() for i in images]
    return (_ranked("t2i", captions, t2i, [[int(txt_img[c])] for c in captions], k),
            _ranked("i2t", images, i2t, own, k))


def thumbnail_uri(value: Any, size: int = 160) -> Optional[str]:
    """A JPEG data URI of an image (PIL image, encoded bytes or a file path) fitted in size x size."""
    if value is None:
        return None
    image = open_rgb(value)
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h2{margin-top:1.6em;border-bottom:1px solid #ccc}
section.query{margin:1em 0 1.6em;padding:.6em .8em;background:#fafafa;border:1px solid #e3e3e3}
.q{font-size:15px;margin:.2em 0}.meta,.score{color:#666;font-size:12px}
ol.results{display:flex;flex-wrap:wrap;gap:10px;padding:0;margin:.5em 0;list-style:none}
ol.results li{border:3px solid transparent;padding:3px;background:#fff}
ol.results li.hit{border-color:#2a9d3a}
ol.captions{display:block;list-style:decimal inside}ol.captions li{border-width:0 0 0 5px;margin:2px 0}
figure{margin:0;text-align:center}figure img{display:block;max-width:160px;max-height:160px}
.ph{width:120px;height:90px;display:flex;align-items:center;justify-content:center;background:#ddd;color:#555}
.truth{border:3px dashed #e08a00;display:inline-block;padding:3px;margin-top:.3em}
.mark{color:#2a9d3a;font-weight:bold}
"""


class _Page:
    """HTML fragments of one page; every piece of text goes through `esc`."""

    def __init__(self, texts: Sequence[str], image_loader: Optional[ImageLoader], image_ids: Optional[Sequence[int]],
                 thumb: int) -> None:
        self.texts, self.loader, self.ids, self.thumb = texts, image_loader, image_ids, thumb
        self.uris: dict[int, Optional[str]] = {}
        self.unreadable = 0

    @staticmethod
    def esc(value: Any) -> str:
        return html.escape(str(value), quote=True)

    def image_name(self, row: int) -> str:
        return f"image {int(self.ids[row])}" if self.ids is not None else f"image row {row}"

    def uri(self, row: int) -> Optional[str]:
        if row not in self.uris:
            try:
                self.uris[row] = thumbnail_uri(self.loader(row), self.thumb) if self.loader else None
            except (OSError, ValueError, KeyError) as exc:
                self.unreadable += 1
                log.warning("queries page: %s cannot be shown: %s", self.image_name(row), exc)
                self.uris[row] = None
        return self.uris[row]

    def tile(self, row: int, note: str = "") -> str:
        name = self.esc(self.image_name(row))
        uri = self.uri(row)
        picture = f'<img src="{uri}" alt="{name}">' if uri else f'<div class="ph">{name}</div>'
        return f"<figure>{picture}<figcaption>{name}{note}</figcaption></figure>"

    def caption_query(self, q: Query) -> str:
        truth = q.truth[0]
        mark = " <span class=mark>✓ ground truth</span>"
        items = [f'<li class="{"hit" if hit else "miss"}" data-row="{r}" data-correct="{int(hit)}">'
                 f'{self.tile(r)}<div class="score">#{i + 1} · {s:.3f}{mark if hit else ""}</div></li>'
                 for i, (r, s, hit) in enumerate(zip(q.top, q.scores, q.hits))]
        missing = "" if truth in q.top else \
            f'<div class="truth" data-row="{truth}">{self.tile(truth, f" · ground truth, rank {q.truth_rank}")}</div>'
        return (f'<section class="query t2i" data-query="{q.row}" data-truth="{truth}" data-rank="{q.truth_rank}">'
                f'<p class="q">“{self.esc(self.texts[q.row])}”</p>'
                f'<p class="meta">caption row {q.row} of {self.esc(self.image_name(truth))}; '
                f"its image ranks {q.truth_rank}</p>"
                f'<ol class="results">{"".join(items)}</ol>{missing}</section>')

    def image_query(self, q: Query) -> str:
        items = [f'<li class="{"hit" if hit else "miss"}" data-row="{r}" data-correct="{int(hit)}">'
                 f'{"<span class=mark>✓</span> " if hit else ""}{self.esc(self.texts[r])} '
                 f'<span class="score">{s:.3f}</span></li>' for r, s, hit in zip(q.top, q.scores, q.hits)]
        own = "".join(f"<li>{self.esc(self.texts[r])}</li>" for r in q.truth)
        return (f'<section class="query i2t" data-query="{q.row}" data-rank="{q.truth_rank}">{self.tile(q.row)}'
                f'<p class="meta">its first own caption ranks {q.truth_rank}</p>'
                f'<ol class="results captions">{"".join(items)}</ol>'
                f"<details><summary>its {len(q.truth)} captions</summary><ul>{own}</ul></details></section>")


def _first_hits(queries: list[Query]) -> int:
    return sum(q.hits[0] for q in queries if q.top)


def query_page(img: Any, txt: Any, txt_img: Any, texts: Sequence[str], path: Path, *,
               image_loader: Optional[ImageLoader], image_ids: Optional[Sequence[int]] = None, n_queries: int = 12,
               k: int = 5, seed: int = 0, score_fn: Optional[ScoreFn] = None, title: str = "Example queries",
               thumb: int = 160) -> tuple[list[Query], list[Query]]:
    """Write the example-queries page to `path`; returns the (caption, image) queries shown.
    `image_loader`: image row -> picture (None, or no loader: the page shows image ids instead)."""
    t2i, i2t = query_examples(img, txt, txt_img, n_queries=n_queries, k=k, seed=seed, score_fn=score_fn)
    page = _Page(texts, image_loader, image_ids, thumb)
    body = [f"<h2>Caption → image: top {k} of {len(img):,} images</h2>", *map(page.caption_query, t2i),
            f"<h2>Image → caption: top {k} of {len(txt):,} captions</h2>", *map(page.image_query, i2t)]
    note = "" if image_loader else ("<p>Images are shown by id: their pixels are not available here (precomputed "
                                    "features, or image files moved or changed since the run read them).</p>")
    if page.unreadable:
        note += f"<p>{page.unreadable} image(s) could not be read and are shown by id.</p>"
    text = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{page.esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{page.esc(title)}</h1><p>{len(t2i)} caption queries (correct at rank 1: {_first_hits(t2i)}) and "
            f"{len(i2t)} image queries (correct at rank 1: {_first_hits(i2t)}), drawn with seed {seed}; green: "
            f"correct, dashed orange: the ground truth outside the top {k}.</p>{note}"
            + "\n".join(body) + "</body></html>\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    return t2i, i2t


# ---------------------------------------------------------------------------- a split, a model


def split_image_loader(split: Any, store: Any) -> Optional[ImageLoader]:
    """Pictures of a split's image rows: a raw split's own bytes, else its store's source files or
    bytes (only this split's rows kept). None where there are no pixels (precomputed features) or
    where the source read now is not the one the store was built from (files moved or changed, a
    relative path seen from another folder, a synthetic set not on disk): no picture beats a wrong one."""
    if hasattr(split, "image_bytes"):
        return lambda row: split.image_bytes[int(row)].as_py()
    import pyarrow as pa
    import pyarrow.compute as pc

    from itmatch.data.readers import read_karpathy, read_source
    from itmatch.data.sources import Source, parse_source
    from itmatch.data.store import cache_key
    from itmatch.data.synthetic import JSON_NAME

    manifest = store.manifest
    source = parse_source(manifest["source"])
    if source.scheme == "precomp":
        return None
    if source.scheme == "synthetic":  # read what is on disk; never generate a data set for a picture
        json_path = Path(source.location) / JSON_NAME
        corpus = read_karpathy(Source("karpathy", str(json_path))) if json_path.is_file() else None
    else:
        corpus = read_source(manifest["source"])
    if corpus is None or corpus.payload() == "feature" or \
            cache_key(corpus, manifest["image_encoder"], manifest["text_encoder"]) != Path(store.root).name:
        log.warning("queries page without pictures: %s as read from %s is not the data the store %s was built "
                    "from", manifest["source"], Path.cwd(), store.root)
        return None
    images = corpus.images.filter(pc.is_in(corpus.images.column("image_id"), value_set=pa.array(split.image_ids)))
    at = {int(i): r for r, i in enumerate(images.column("image_id").to_pylist())}
    values = images.column(corpus.payload())
    return lambda row: values[at[int(split.image_ids[int(row)])]].as_py()


def write_pictures(img: Any, txt: Any, split: Any, folder: Path, *, image_loader: Optional[ImageLoader],
                   score_fn: Optional[ScoreFn] = None, n_queries: int = 12, k: int = 5, max_images: int = 200,
                   seed: int = 0, title: str = "Example queries") -> dict[str, Path]:
    """The map and the page of a split (`split`: image_ids, caption_image, texts) into `folder`;
    returns the files written. A picture that cannot be drawn is a warning (its stale file removed),
    never an error: a run must not fail for one."""
    return draw_files(folder, {
        MAP_FILE: lambda p: embedding_map(img, txt, split.caption_image, p, max_images=max_images, seed=seed),
        PAGE_FILE: lambda p: query_page(img, txt, split.caption_image, split.texts, p, image_loader=image_loader,
                                        image_ids=split.image_ids, n_queries=n_queries, k=k, seed=seed,
                                        score_fn=score_fn, title=title)})


def draw_files(folder: Path, jobs: dict[str, Callable[[Path], Any]]) -> dict[str, Path]:
    """Run each `draw(path)` for folder/name; returns the files written. A picture that cannot be
    drawn is a warning (its stale file removed), never an error: a run must not fail for one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, draw in jobs.items():
        path = folder / name
        path.unlink(missing_ok=True)
        try:
            draw(path)
            written[name] = path
        except Exception as exc:  # noqa: BLE001 - a picture is never worth a failed run
            path.unlink(missing_ok=True)
            log.warning("%s not drawn: %s: %s", name, type(exc).__name__, exc)
    return written


def guarded_loader(make: Callable[[], Optional[Callable[[int], Any]]], store: Any) -> Optional[Callable[[int], Any]]:
    """`make()`, or None where reading the pictures fails (a warning): the page still shows its text."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - the page still shows captions, phrases, ids and boxes
        log.warning("queries page without pictures: cannot read the pictures of %s: %s: %s",
                    store.manifest.get("source"), type(exc).__name__, exc)
        return None


def model_pictures(model: torch.nn.Module, store: Any, split_name: str, folder: Path, *,
                   embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None, n_queries: int = 12, k: int = 5,
                   max_images: int = 200, seed: int = 0, device: str = "cpu",
                   title: str = "Example queries") -> dict[str, Path]:
    """A trained model's pictures of a store's split (see `write_pictures`); `embeddings`: the
    split's (image, caption) embeddings when the caller already has them, else the model embeds it."""
    from itmatch.eval.evaluate import _pair_scorer, embed_split

    split = store.split(split_name)
    img, txt = embeddings if embeddings is not None else embed_split(model, split, device=device)
    loader = guarded_loader(lambda: split_image_loader(split, store), store)
    return write_pictures(img, txt, split, folder, image_loader=loader, score_fn=_pair_scorer(model),
                          n_queries=n_queries, k=k, max_images=max_images, seed=seed, title=title)


__all__ = ["EmbeddingMap", "Query", "draw_files", "embedding_map", "guarded_loader", "map_points", "model_pictures", "open_rgb",
           "project_2d", "query_examples", "query_page", "split_image_loader", "thumbnail_uri", "write_pictures"]
