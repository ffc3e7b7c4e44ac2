"""Write the synthetic shapes scenes in the Flickr30K Entities layout, so phrase localization runs offline.

`write_shapes_entities(out_dir)` first writes the shapes dataset itself (`itmatch.data.synthetic.
make_shapes`: `images/shapes_NNNNNN.png` and `dataset_shapes.json`, same seed, same scenes), then:

    Sentences/<i>.txt     `n_captions` captions per image; every object is one phrase built from its
                          attributes ("[/EN#21/other the small red disc] in the top left corner"),
                          a chain per object across the captions; where two or more objects share a
                          shape, some captions also name them together ("two circles"), a plural
                          chain whose boxes are those objects'; some captions open with a notvisual
                          phrase ("[/EN#0/notvisual a picture] of") or end on the scene chain
                          ("on [/EN#29/scene a plain background]"), which has no box (<scene>1)
    Annotations/<i>.xml   the image's <filename> and <size>; one <object> per shape with its box
                          (1-based inclusive VOC pixels) named by its own chain and by the plural
                          chain it belongs to; one box-less <object> for the scene chain
    train.txt val.txt test.txt   the shapes dataset's splits
    proposals.parquet     per image, `jitter_per_region` boxes jittered around every ground-truth
                          region (each object, each plural's enclosing box) and `random_proposals`
                          random boxes, shuffled (their order says nothing)
    dataset_sentences.json  those captions (markup removed) as image-caption data in the Karpathy
                          format, ids shared with the Entities reader (`itmatch.phrases.sentences`):
                          the image-sentence side of 001 Eq. 8 on the same scenes

Image i has id i; chain ids are 10 * i + 1 + k for object k, 10 * i + 8 for the plural chain and
10 * i + 9 for the scene. An object's box is the tight box of the pixels `_render` draws for it
(rendered alone, in `boxes`' 0-based exclusive convention). Everything is deterministic in `seed`
(its own numpy streams per image, apart from those of the scenes), and the writer is idempotent:
`shapes_entities.json` (written last) records the parameters; rerunning with the same ones is a no-op.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from itmatch.files import atomic_write_text
from itmatch.data.synthetic import POSITIONS, SHAPE_PLURALS, _check_range, _noun_phrase, _render, make_shapes
from itmatch.phrases.boxes import clip_boxes, enclosing_box, to_inclusive
from itmatch.phrases.entities import ANNOTATIONS_DIR, PROPOSALS_FILE, SENTENCES_DIR, write_proposals
from itmatch.phrases.sentences import SENTENCES_JSON, write_sentences_json

FORMAT_VERSION = 1
MARKER = "shapes_entities.json"
_POSITION_WORDS = {name: words for name, words in POSITIONS.values()}
_COUNTS = {2: "two", 3: "three"}
MAX_PER_IMAGE = 1000
"""Bound on captions and proposals per image: a slip (an extra zero or three) is refused up front
rather than writing millions of boxes per picture (the proposals table grows as images x this)."""


def shape_box(obj: dict[str, Any], image_size: int) -> np.ndarray:
    """The tight pixel box ([4], 0-based exclusive) of one scene object as `_render` draws it."""
    scene = {"background": [0, 0, 0], "objects": [dict(obj, rgb=[255, 255, 255])]}
    bbox = _render(scene, image_size).convert("L").getbbox()
    if bbox is None:  # pragma: no cover - every object covers pixels
        raise ValueError(f"shape_box: object {obj} draws no pixels at image_size={image_size}")
    return np.array(bbox, dtype=np.float64)


def _plural(objects: list[dict[str, Any]]) -> list[int]:
    """The objects of the most frequent repeated shape (at most one plural chain per image)."""
    shapes = [o["shape"] for o in objects]
    repeated = [s for s in dict.fromkeys(shapes) if shapes.count(s) > 1]
    return [k for k, s in enumerate(shapes) if s == repeated[0]] if repeated else []


def _mark(eid: int, kind: str, words: str) -> str:
    return f"[/EN#{eid}/{kind} {words}]"


def _caption(rng: np.random.Generator, objects: list[dict[str, Any]], ids: dict[str, Any], plural: list[int]) -> str:
    parts = []
    for k in [int(k) for k in rng.permutation(len(objects))]:
        o = objects[k]
        words = _noun_phrase(rng, o, with_size=bool(rng.random() < 0.75))
        if rng.random() < 0.5:
            words = "the " + words.split(" ", 1)[1]
        where = f" {_POSITION_WORDS[o['position']][int(rng.integers(3))]}" if rng.random() < 0.75 else ""
        parts.append(_mark(ids["objects"][k], "other", words) + where)
    text = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
    if plural and rng.random() < 0.5:
        noun = SHAPE_PLURALS[objects[plural[0]]["shape"]]
        text = _mark(ids["plural"], "other", f"{_COUNTS[len(plural)]} {noun}") + " : " + text
    if rng.random() < 0.3:
        text = _mark(0, "notvisual", "a picture") + " of " + text
    if rng.random() < 0.3:
        text += " on " + _mark(ids["scene"], "scene", "a plain background")
    return text + " ."


def _annotation_xml(filename: str, size: int, boxes: np.ndarray, ids: dict[str, Any], plural: list[int]) -> str:
    head = (f"<annotation>\n<filename>{escape(filename)}</filename>\n"
            f"<size>\n<width>{size}</width>\n<height>{size}</height>\n<depth>3</depth>\n</size>\n")
    rows = [head]
    for k, box in enumerate(to_inclusive(boxes).astype(int).tolist()):
        names = [ids["objects"][k]] + ([ids["plural"]] if k in plural else [])
        rows.append("<object>\n" + "".join(f"<name>{n}</name>\n" for n in names)
                    + "<bndbox>\n" + "".join(f"<{t}>{v}</{t}>\n" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
                    + "</bndbox>\n</object>\n")
    rows.append(f"<object>\n<name>{ids['scene']}</name>\n<nobndbox>0</nobndbox>\n<scene>1</scene>\n</object>\n")
    return "".join(rows) + "</annotation>\n"


def synthetic_proposals(rng: np.random.Generator, regions: np.ndarray, image_size: int, *, jitter_per_region: int,
                        random_proposals: int, jitter: float = 0.2, min_side: float = 4.0) -> np.ndarray:
    """[P, 4] proposals: boxes jittered around each region (centre shift and log-scale noise of
    `jitter` times the side) and uniform random boxes, integer pixels, clipped, shuffled."""
    regions = np.asarray(regions, np.float64).reshape(-1, 4)
    centre = (regions[:, :2] + regions[:, 2:]) / 2
    side = regions[:, 2:] - regions[:, :2]
    n = jitter_per_region
    c = np.repeat(centre, n, axis=0) + rng.normal(0, jitter, (len(regions) * n, 2)) * np.repeat(side, n, axis=0)
    s = np.repeat(side, n, axis=0) * np.exp(rng.normal(0, jitter, (len(regions) * n, 2)))
    jittered = np.concatenate([c - s / 2, c + s / 2], axis=1)
    corners = np.sort(rng.uniform(0, image_size, (random_proposals, 2, 2)), axis=1)  # [P, (lo, hi), (x, y)]
    random = np.concatenate([corners[:, 0], corners[:, 1]], axis=1)
    boxes = np.round(clip_boxes(np.concatenate([jittered, random]), image_size, image_size))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], np.minimum(boxes[:, :2] + min_side, image_size))
    boxes[:, :2] = np.minimum(boxes[:, :2], boxes[:, 2:] - min_side)
    return boxes[rng.permutation(len(boxes))]


def _write_image(out_dir: Path, entry: dict[str, Any], params: dict[str, Any]) -> np.ndarray:
    """Sentences and Annotations of one image; returns its proposals."""
    i, objects, size = int(entry["imgid"]), entry["objects"], params["image_size"]
    rng = np.random.default_rng([params["seed"], 7, i])
    plural = _plural(objects)
    ids = {"objects": [10 * i + 1 + k for k in range(len(objects))], "plural": 10 * i + 8, "scene": 10 * i + 9}
    boxes = np.stack([shape_box(o, size) for o in objects])
    captions = [_caption(rng, objects, ids, plural) for _ in range(params["n_captions"])]
    atomic_write_text(out_dir / SENTENCES_DIR / f"{i}.txt", "\n".join(captions) + "\n")
    atomic_write_text(out_dir / ANNOTATIONS_DIR / f"{i}.xml", _annotation_xml(entry["filename"], size, boxes, ids,
                                                                                plural))
    regions = np.concatenate([boxes, enclosing_box(boxes[plural])[None]]) if plural else boxes
    return synthetic_proposals(rng, regions, size, jitter_per_region=params["jitter_per_region"],
                               random_proposals=params["random_proposals"])


def _done(out_dir: Path, params: dict[str, Any]) -> bool:
    try:
        return json.loads((out_dir / MARKER).read_text()) == params and (out_dir / PROPOSALS_FILE).is_file()
    except (OSError, ValueError):
        return False


def write_shapes_entities(out_dir: str | Path, n_images: int = 200, *, seed: int = 0, image_size: int = 128,
                          n_captions: int = 3, jitter_per_region: int = 8, random_proposals: int = 24,
                          val_fraction: float = 0.1, test_fraction: float = 0.1) -> Path:
    """Write (once) the shapes scenes as a Flickr30K Entities folder at `out_dir` and return it;
    `read_entities(out_dir)` reads it (images included: `out_dir/images`)."""
    out_dir = Path(out_dir)
    for option, value, low in (("n_captions", n_captions, 1), ("jitter_per_region", jitter_per_region, 0),
                               ("random_proposals", random_proposals, 0)):
        _check_range(option, value, low, MAX_PER_IMAGE)
    json_path = make_shapes(out_dir, n_images, seed=seed, image_size=image_size, val_fraction=val_fraction,
                            test_fraction=test_fraction)
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    params = {"version": FORMAT_VERSION, "shapes": doc["params"], "seed": int(doc["params"]["seed"]),
              "image_size": int(doc["params"]["image_size"]), "n_captions": int(n_captions),
              "jitter_per_region": int(jitter_per_region), "random_proposals": int(random_proposals)}
    if _done(out_dir, params):
        if not (out_dir / SENTENCES_JSON).is_file():  # a folder written before the file existed
            write_sentences_json(out_dir)
        return out_dir
    (out_dir / MARKER).unlink(missing_ok=True)
    for sub in (SENTENCES_DIR, ANNOTATIONS_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    entries = doc["images"]
    proposals = [_write_image(out_dir, entry, params) for entry in entries]
    write_proposals(out_dir / PROPOSALS_FILE, [int(e["imgid"]) for e in entries], proposals)
    for split in ("train", "val", "test"):
        atomic_write_text(out_dir / f"{split}.txt",
                          "".join(f"{e['imgid']}\n" for e in entries if e["split"] == split))
    write_sentences_json(out_dir)
    atomic_write_text(out_dir / MARKER, json.dumps(params, indent=2))
    return out_dir


__all__ = ["shape_box", "synthetic_proposals", "write_shapes_entities"]
