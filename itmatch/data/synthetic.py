"""A deterministic, offline captioned dataset: rendered scenes of shapes with paraphrased captions.

`make_shapes(out_dir)` writes `out_dir/images/shapes_NNNNNN.png` and `out_dir/dataset_shapes.json`
in the Karpathy split format (`{"dataset", "images": [{"filename", "imgid", "split", "sentids",
"sentences": [{"raw", "tokens", "imgid", "sentid"}]}]}`), so `karpathy:` reads it like any other
captioned set. Each image entry also carries the scene it was drawn from (`objects`, `background`)
and the document carries the generation `params`.

A scene has 1-3 shapes on a lightly tinted background. Every shape has four attributes, drawn
independently so that many pairs of images differ in one attribute only (hard negatives):

    shape     circle, square, triangle, star, diamond, hexagon
    colour    red, orange, yellow, green, blue, purple, brown, black   (each jittered a little)
    size      small, large                                             (radius jittered)
    position  a cell of a 3x3 grid: top left ... center ... bottom right (centre jittered)

Five captions per image come from a small grammar: varied templates, word order and synonyms
("a big red disc on the left", "a circle coloured red", "on the left there is ...") and they may
leave out an object's size or position, as people do, but always name each object's colour and shape.

Determinism: all randomness comes from numpy Generators seeded from `seed` (one stream per image,
so image i does not depend on n_images), drawing is PIL's; same parameters -> identical bytes.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from itmatch.files import atomic_write_bytes

FORMAT_VERSION = 1
JSON_NAME = "dataset_shapes.json"
IMAGE_DIR = "images"

SHAPES: dict[str, list[str]] = {
    # canonical name first; the rest are caption synonyms
    "circle": ["circle", "circle", "disc", "round shape"],
    "square": ["square", "square", "square block"],
    "triangle": ["triangle", "triangle", "triangular shape"],
    "star": ["star", "star", "five pointed star"],
    "diamond": ["diamond", "diamond", "rhombus"],
    "hexagon": ["hexagon", "hexagon", "six sided shape"],
}
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                 "diamond": "diamonds", "hexagon": "hexagons"}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 205, 25),
    "green": (40, 155, 60),
    "blue": (35, 75, 205),
    "purple": (130, 50, 170),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
}

SIZES: dict[str, list[str]] = {
    "small": ["small", "small", "little", "tiny"],
    "large": ["large", "large", "big", "huge"],
}

# 3x3 grid: (row, col) -> canonical position name and caption phrases
POSITIONS: dict[tuple[int, int], tuple[str, list[str]]] = {
    (0, 0): ("top left", ["in the top left corner", "at the top left", "in the upper left"]),
    (0, 1): ("top", ["at the top", "near the top", "in the upper middle"]),
    (0, 2): ("top right", ["in the top right corner", "at the top right", "in the upper right"]),
    (1, 0): ("left", ["on the left", "on the left side", "at the left"]),
    (1, 1): ("center", ["in the center", "in the middle", "at the centre"]),
    (1, 2): ("right", ["on the right", "on the right side", "at the right"]),
    (2, 0): ("bottom left", ["in the bottom left corner", "at the bottom left", "in the lower left"]),
    (2, 1): ("bottom", ["at the bottom", "near the bottom", "in the lower middle"]),
    (2, 2): ("bottom right", ["in the bottom right corner", "at the bottom right", "in the lower right"]),
}

NUMBERS = {2: ["two", "two", "a pair of"], 3: ["three"]}
COUNT_NOUNS = ["shapes", "shapes", "objects", "figures"]

_SUPERSAMPLE = 2
# keep every shape inside the centre 224/256 crop that ImageNet-style encoders take (16/256 per side)
_CROP_MARGIN = 0.07
_SIZE_RANGE = {"small": (0.065, 0.095), "large": (0.14, 0.175)}  # "radius" as a fraction of the side
# vertex radius of each shape relative to its nominal radius (so that areas look comparable)
_EXTENT = {"circle": 1.0, "square": 1.15, "triangle": 1.3, "star": 1.35, "diamond": 1.25, "hexagon": 1.1}


# --------------------------------------------------------------------------- scenes


def _sample_scene(rng: np.random.Generator) -> dict[str, Any]:
    base = int(rng.integers(205, 246))
    background = [int(np.clip(base + rng.integers(-12, 13), 0, 255)) for _ in range(3)]
    n_objects = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    objects: list[dict[str, Any]] = []
    shape_names, colour_names = list(SHAPES), list(COLOURS)
    cells = list(POSITIONS)
    for _ in range(n_objects):
        for _attempt in range(60):
            shape = shape_names[int(rng.integers(len(shape_names)))]
            colour = colour_names[int(rng.integers(len(colour_names)))]
            size = "small" if rng.random() < 0.5 else "large"
            row, col = cells[int(rng.integers(len(cells)))]
            lo, hi = _SIZE_RANGE[size]
            radius = float(rng.uniform(lo, hi))
            extent = radius * _EXTENT[shape]
            margin = extent + _CROP_MARGIN
            x = float(np.clip((2 * col + 1) / 6 + rng.uniform(-0.04, 0.04), margin, 1 - margin))
            y = float(np.clip((2 * row + 1) / 6 + rng.uniform(-0.04, 0.04), margin, 1 - margin))
            angle = float(rng.uniform(-20, 20))
            jitter = rng.integers(-18, 19, size=3)
            rgb = [int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255)]
            clash = any(
                (o["shape"], o["colour"]) == (shape, colour)
                or (o["row"], o["col"]) == (row, col)
                or np.hypot(o["x"] - x, o["y"] - y) < 0.85 * (o["radius"] * _EXTENT[o["shape"]] + extent)
                for o in objects
            )
            if not clash:
                objects.append({
                    "shape": shape, "colour": colour, "size": size, "position": POSITIONS[(row, col)][0],
                    "row": row, "col": col, "x": round(x, 4), "y": round(y, 4),
                    "radius": round(radius, 4), "angle": round(angle, 2), "rgb": rgb,
                })
                break
    return {"background": background, "objects": objects}


def _polygon(n: int, cx: float, cy: float, r: float, start_deg: float) -> list[tuple[float, float]]:
    t = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return list(zip((cx + r * np.cos(t)).tolist(), (cy + r * np.sin(t)).tolist()))


def _render(scene: dict[str, Any], image_size: int):
    from PIL import Image, ImageDraw

    side = image_size * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), tuple(scene["background"]))
    draw = ImageDraw.Draw(canvas)
    for o in scene["objects"]:
        cx, cy, fill = o["x"] * side, o["y"] * side, tuple(o["rgb"])
        r = o["radius"] * _EXTENT[o["shape"]] * side
        a = o["angle"]
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            draw.polygon(_polygon(4, cx, cy, r, 45 + a), fill=fill)
        elif o["shape"] == "diamond":
            # narrower than tall, so that it never looks like a rotated square
            pts = _polygon(4, cx, cy, r, a)
            pts = [(cx + (px - cx) * 0.7, py) for px, py in pts]
            draw.polygon(pts, fill=fill)
        elif o["shape"] == "triangle":
            draw.polygon(_polygon(3, cx, cy, r, -90 + a), fill=fill)
        elif o["shape"] == "hexagon":
            draw.polygon(_polygon(6, cx, cy, r, a), fill=fill)
        elif o["shape"] == "star":
            outer = _polygon(5, cx, cy, r, -90 + a)
            inner = _polygon(5, cx, cy, r * 0.45, -90 + 36 + a)
            draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
        else:  # pragma: no cover - SHAPES and this function move together
            raise ValueError(f"unknown shape {o['shape']!r}")
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


# --------------------------------------------------------------------------- captions


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _noun_phrase(rng: np.random.Generator, o: dict[str, Any], with_size: bool) -> str:
    shape = _pick(rng, SHAPES[o["shape"]])
    colour = o["colour"]
    size = _pick(rng, SIZES[o["size"]]) + " " if with_size else ""
    form = int(rng.integers(4))
    if form <= 1:  # "a big red disc"
        words = f"{size}{colour} {shape}"
    elif form == 2:  # "a big disc coloured red"
        words = f"{size}{shape} {_pick(rng, ['coloured', 'colored', 'painted', 'in'])} {colour}"
    else:  # "a big red coloured disc" / "a big disc that is red"
        words = (f"{size}{colour} coloured {shape}" if rng.random() < 0.5
                 else f"{size}{shape} that is {colour}")
    return f"{_article(words)} {words}"


def _object_phrase(rng: np.random.Generator, o: dict[str, Any], with_size: bool, with_pos: bool) -> str:
    np_ = _noun_phrase(rng, o, with_size)
    if not with_pos:
        return np_
    pos = _pick(rng, POSITIONS[(o["row"], o["col"])][1])
    return f"{np_} {pos}"


def _join(parts: list[str], rng: np.random.Generator) -> str:
    if len(parts) == 1:
        return parts[0]
    joiners = [" and ", " and ", ", and ", " as well as "] if len(parts) == 2 else [", and ", " and "]
    last = _pick(rng, joiners)
    return ", ".join(parts[:-1]) + last + parts[-1]


def _caption(rng: np.random.Generator, objects: list[dict[str, Any]]) -> str:
    order = list(range(len(objects)))
    if len(order) > 1 and rng.random() < 0.5:
        order = [int(i) for i in rng.permutation(len(order))]
    objs = [objects[i] for i in order]
    with_size = [bool(rng.random() < 0.75) for _ in objs]
    with_pos = [bool(rng.random() < 0.75) for _ in objs]
    n = len(objs)

    if n == 1:
        o = objs[0]
        template = int(rng.integers(6))
        if template == 0 or not with_pos[0]:
            phrase = _object_phrase(rng, o, with_size[0], with_pos[0])
            text = _pick(rng, ["{p}", "there is {p}", "a picture of {p}", "an image showing {p}",
                               "{p} on a plain background", "a drawing of {p}"]).format(p=phrase)
        elif template == 1:
            pos = _pick(rng, POSITIONS[(o["row"], o["col"])][1])
            text = f"{pos}, there is {_noun_phrase(rng, o, with_size[0])}"
        elif template == 2:
            verb = _pick(rng, ["sits", "is placed", "is drawn", "appears"])
            pos = _pick(rng, POSITIONS[(o["row"], o["col"])][1])
            text = f"{_noun_phrase(rng, o, with_size[0])} {verb} {pos}"
        elif template == 3:
            pos = _pick(rng, POSITIONS[(o["row"], o["col"])][1])
            text = f"{pos} of the picture is {_noun_phrase(rng, o, with_size[0])}"
        else:
            text = _pick(rng, ["there is {p}", "{p}", "a single shape: {p}", "one shape, {p}"]).format(
                p=_object_phrase(rng, o, with_size[0], True))
        return _finish(text)

    phrases = [_object_phrase(rng, o, s, p) for o, s, p in zip(objs, with_size, with_pos)]
    count = f"{_pick(rng, NUMBERS[n])} {_pick(rng, COUNT_NOUNS)}"
    template = int(rng.integers(5))
    if template == 0:
        text = _join(phrases, rng)
    elif template == 1:
        text = f"there {'is' if count.startswith('a pair') else 'are'} {count}: {_join(phrases, rng)}"
    elif template == 2:
        text = f"{count} on a plain background, {_join(phrases, rng)}"
    elif template == 3:
        text = f"{phrases[0]}, together with {_join(phrases[1:], rng)}"
    else:
        text = f"a picture of {_join(phrases, rng)}"
    return _finish(text)


def _finish(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[0].upper() + text[1:] + " ."


def tokenize(text: str) -> list[str]:
    """Karpathy-style tokens: lower case words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _captions(rng: np.random.Generator, objects: list[dict[str, Any]], n: int = 5) -> list[str]:
    out: list[str] = []
    for _ in range(n):
        for _attempt in range(20):
            text = _caption(rng, objects)
            if text not in out:
                break
        out.append(text)
    return out


# --------------------------------------------------------------------------- files

# Upper bounds on the generator's options, so that a slip (an extra zero, 1e9) is refused up front
# rather than spending minutes building a permutation and a list of a billion entries before the
# first image, or failing deep in PIL with a MemoryError: a million images is hours of rendering and
# GBs of PNGs, already far beyond what a synthetic check needs; 4096 px is drawn at twice that side
# (_SUPERSAMPLE), 8192^2 RGB = 200 MB per image, and encoders take 224 px anyway.
MAX_IMAGES = 1_000_000
MAX_IMAGE_SIZE = 4096


def _check_range(option: str, value: int, low: int, high: int | None = None) -> None:
    """A ValueError naming `option` and `value` when it is outside [low, high] (callers name the source)."""
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{option}={value}: must be {bound}")


def _check_folder(out_dir: Path) -> Path | None:
    """Refuse an `out_dir` that is, or lies under, a file: mkdir would raise NotADirectoryError
    (or FileExistsError) naming only the images folder below it. Returns the topmost folder of
    `out_dir`'s path that does not exist yet (what a failed first generation removes), or None."""
    missing = None
    for folder in (out_dir, *out_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{folder} is a file, not a folder (the generated images and "
                                 f"{JSON_NAME} are written into a folder)")
            return missing
        missing = folder
    return missing


# What an interrupted make_shapes leaves in its folder: images/ with the images, and the
# temporaries of itmatch.files.atomic_write (".<name>.<16 hex digits>") a kill can leave. Its JSON
# is checked by content (_existing_params): a dataset_shapes.json of someone else's is theirs.
_OWN_IMAGE = re.compile(r"\.?shapes_\d{6}\.png(\.[0-9a-f]{16})?")
_OWN_TOP = re.compile(rf"{IMAGE_DIR}|\.{re.escape(JSON_NAME)}\.[0-9a-f]{{16}}")


def _foreign_files(out_dir: Path) -> list[str]:
    """Entries of an existing `out_dir` that no earlier make_shapes wrote (a few, for the message):
    generated into a user's folder, the dataset would mix with its files, overwrite any named like
    the generated ones and delete a dataset_shapes.json of theirs. A folder whose JSON make_shapes
    wrote (params inside) is ours whatever else it holds (shapes-phrases adds its files to it)."""
    if _existing_params(out_dir / JSON_NAME) is not None or not out_dir.is_dir():
        return []
    foreign = [entry.name for entry in sorted(out_dir.iterdir()) if not _OWN_TOP.fullmatch(entry.name)]
    images = out_dir / IMAGE_DIR
    if images.is_dir():
        foreign += [f"{IMAGE_DIR}/{entry.name}" for entry in sorted(images.iterdir())
                    if not (_OWN_IMAGE.fullmatch(entry.name) and entry.is_file())]
    elif images.exists():
        foreign.append(IMAGE_DIR)  # a file where the images folder goes
    return foreign[:3]


def _existing_params(json_path: Path) -> dict[str, Any] | None:
    """The `params` of a dataset_shapes.json that make_shapes wrote; None for any other file."""
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    params = doc.get("params") if isinstance(doc, dict) and doc.get("dataset") == "shapes" else None
    return params if isinstance(params, dict) else None


def _all_images_present(json_path: Path) -> bool:
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
        root = json_path.parent / IMAGE_DIR
        return all((root / entry["filename"]).is_file() for entry in doc["images"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def make_shapes(out_dir: str | Path, n_images: int = 1200, *, seed: int = 0, image_size: int = 128,
                val_fraction: float = 0.1, test_fraction: float = 0.1) -> Path:
    """Write the shapes dataset under `out_dir` (if not already there) and return its JSON path.

    Idempotent: when `out_dir/dataset_shapes.json` exists with the same parameters (and its images
    are present) nothing is written. Atomic: images are written first and the JSON last, each via a
    temporary file and `os.replace`, so an interrupted run never leaves a JSON naming missing images.
    Only its own: an existing folder holding anything an earlier run did not write (a user's files, a
    dataset_shapes.json of theirs) is refused, naming some. OS errors (not writable, no space) are
    ValueErrors naming `out_dir`; a folder this call created is removed again.
    """
    n_images, seed, image_size = int(n_images), int(seed), int(image_size)
    _check_range("n_images", n_images, 1, MAX_IMAGES)
    _check_range("image_size", image_size, 16, MAX_IMAGE_SIZE)
    _check_range("seed", seed, 0)  # numpy's seeds are non-negative (it says only "expected non-negative integer")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: need each >= 0 and "
                         "their sum < 1 (the rest is the training split)")
    params = {"version": FORMAT_VERSION, "n_images": n_images, "seed": seed, "image_size": image_size,
              "val_fraction": float(val_fraction), "test_fraction": float(test_fraction)}
    out_dir, created = Path(out_dir), None
    try:
        created = _check_folder(out_dir)
        json_path = out_dir / JSON_NAME
        if json_path.is_file() and _existing_params(json_path) == params and _all_images_present(json_path):
            return json_path
        foreign = _foreign_files(out_dir)
        if foreign:
            raise ValueError(f"{out_dir}: holds files that no earlier synthetic run wrote (e.g. {', '.join(foreign)}): "
                             f"the generated images/ and {JSON_NAME} would be mixed with them or replace them; "
                             "give a new or empty folder")
        _write_shapes(out_dir, params, splits=_split_names(n_images, seed, val_fraction, test_fraction))
    except OSError as exc:  # not writable, no space, a name too long: one line naming the folder, not a traceback
        if created is not None:  # a first generation that failed leaves no half-written folder behind
            shutil.rmtree(created, ignore_errors=True)
        where = f": {exc.filename}" if exc.filename and str(exc.filename) != str(out_dir) else ""
        raise ValueError(f"{out_dir}: cannot write the synthetic data there ({exc.strerror or exc}{where})") from None
    return json_path


def _split_names(n_images: int, seed: int, val_fraction: float, test_fraction: float) -> list[str]:
    """Each image's split, drawn from `seed`."""
    n_val = int(round(n_images * val_fraction))
    n_test = int(round(n_images * test_fraction))
    if n_val + n_test >= n_images and n_images > 1:
        raise ValueError(f"n_images={n_images} leaves no training images at val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    order = np.random.default_rng([seed, 0]).permutation(n_images)
    splits = ["train"] * n_images
    for i in order[:n_val]:
        splits[int(i)] = "val"
    for i in order[n_val:n_val + n_test]:
        splits[int(i)] = "test"
    return splits


def _write_shapes(out_dir: Path, params: dict[str, Any], splits: list[str]) -> None:
    """The images, then the JSON naming them (make_shapes)."""
    image_dir, json_path = out_dir / IMAGE_DIR, out_dir / JSON_NAME
    seed, image_size = params["seed"], params["image_size"]
    image_dir.mkdir(parents=True, exist_ok=True)
    if json_path.exists():  # other parameters: never leave it pointing at half-rewritten images
        json_path.unlink()
    entries = []
    for i in range(len(splits)):
        rng = np.random.default_rng([seed, 1, i])
        scene = _sample_scene(rng)
        filename = f"shapes_{i:06d}.png"
        buffer = io.BytesIO()
        _render(scene, image_size).save(buffer, format="PNG")
        atomic_write_bytes(image_dir / filename, buffer.getvalue())
        texts = _captions(rng, scene["objects"])
        sentids = [5 * i + j for j in range(len(texts))]
        entries.append({
            "filename": filename,
            "imgid": i,
            "split": splits[i],
            "sentids": sentids,
            "sentences": [{"raw": t, "tokens": tokenize(t), "imgid": i, "sentid": s}
                          for t, s in zip(texts, sentids)],
            "objects": [{k: v for k, v in o.items() if k not in ("row", "col")} for o in scene["objects"]],
            "background": scene["background"],
        })
    doc = {"dataset": "shapes", "images": entries, "params": params}
    atomic_write_bytes(json_path, json.dumps(doc, separators=(",", ":")).encode("utf-8"))
