"""The example-queries page (itmatch/eval/pictures.py) opened in a real browser (issue 15, item 7).

Writes a query page with `itmatch.eval.pictures.query_page` from real Flickr8k-1k test images
(../shared/data/flickr8k-1k: its JPEGs and precomputed features; read in place, never copied), opens
it in headless Chromium (Debian's /usr/bin/chromium, a fresh --user-data-dir, no network use) and,
over the DevTools protocol on --remote-debugging-pipe (no Python dependency), checks with
JavaScript in the loaded page that

- every <img> has loaded and decoded (complete, naturalWidth > 0) and is laid out (width > 0), and
  the page has as many as the HTML holds, each named by the right image id;
- each caption query shows its caption, its top-k images in order, the ground truth marked
  ("✓ ground truth", green border) where it is in the top k, else shown dashed below with its rank;
- each image query shows its picture and top-k captions, its own captions marked with ✓ and a
  green border;

then saves a full-page PNG screenshot to --out. The embeddings are a closed-form ridge map of the
caption features onto the image features (fit on the train split in well under a second): rankings
good enough that the page holds both hits and misses. Prints what it checked with timings; exits 1
on any problem.

    .venv/bin/python bench/pictures_browser.py [--out /tmp/itm-pictures/queries.png] [--queries 12] [--k 5]

tests/integration/test_pictures_browser.py runs the same check (skipped without /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from itmatch.eval import pictures  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k"
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe"]
SPLITS = {"train": "train", "val": "dev", "test": "test"}  # JSON split -> precomp file prefix


# ---------------------------------------------------------------------------- the page


@dataclass
class Page:
    path: Path
    t2i: list  # pictures.Query
    i2t: list
    texts: list[str]
    image_ids: list[int]
    img_tags: int  # <img> elements in the HTML


def flickr_page(path: Path, data: Path = DATA, *, n_queries: int = 12, k: int = 5, seed: int = 0) -> Page:
    """The query page of the Flickr8k-1k test split, real thumbnails, at `path`."""
    meta = json.loads((data / "dataset_flickr8k_1k.json").read_text())["images"]
    test = [m for m in meta if m["split"] == "test"]
    pre = data / "precomp"
    texts = (pre / "test_caps.txt").read_text().splitlines()
    if len(texts) != 5 * len(test) or texts[0].strip() != test[0]["sentences"][0]["raw"].strip():
        raise RuntimeError(f"{pre} and the JSON's test split disagree")
    # Ridge regression of caption features onto (centred) image features, fit on train.
    x, y_img = np.load(pre / "train_caps_minilm.npy"), np.load(pre / "train_ims.npy")
    per = len(x) // len(y_img)
    mean = y_img.mean(axis=0)
    y = np.repeat(y_img - mean, per, axis=0)
    w = np.linalg.solve(x.T @ x + 1.0 * np.eye(x.shape[1]), x.T @ y)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731 - cosine scores, as a model's
    img = unit(np.load(pre / "test_ims.npy") - mean)
    txt = unit(np.load(pre / "test_caps_minilm.npy") @ w)
    txt_img = np.repeat(np.arange(len(test)), 5)
    files = [data / "images" / m["filename"] for m in test]
    ids = [int(m["imgid"]) for m in test]
    t2i, i2t = pictures.query_page(img, txt, txt_img, texts, path, image_loader=lambda row: files[row],
                                   image_ids=ids, n_queries=n_queries, k=k, seed=seed,
                                   title="Flickr8k-1k test: example queries (ridge map, browser check)")
    return Page(Path(path), t2i, i2t, texts, ids, Path(path).read_text(encoding="utf-8").count("<img "))


# ---------------------------------------------------------------------------- the browser


class Chromium:
    """Headless Chromium driven over the DevTools protocol on --remote-debugging-pipe (fd 3: its
    input, fd 4: its output; messages are JSON, each followed by a NUL byte)."""

    def __init__(self, user_data_dir: Path, *, binary: Path = CHROMIUM, log: Optional[Path] = None) -> None:
        to_browser_r, self._w = os.pipe()
        self._r, from_browser_w = os.pipe()
        # Above 10 so that placing them on 3 and 4 in the child cannot overwrite one with the other.
        high_r, high_w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w))
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)

        def place() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        self._log = open(log or os.devnull, "w")
        self.proc = subprocess.Popen([str(binary), *FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     pass_fds=(3, 4), preexec_fn=place, start_new_session=True)
        os.close(high_r)
        os.close(high_w)
        self._buf = b""
        self._next = 0
        self.events: list[dict] = []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from Chromium")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit {self.proc.poll()})")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None,
             timeout: float = 30) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == method and event.get("sessionId") == session:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._log.close()


# What the loaded page shows, read in the page (images awaited with decode()).
PAGE_FACTS_JS = r"""
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.decode().catch(() => null)));
  const text = e => e ? e.textContent.replace(/\s+/g, " ").trim() : null;
  const image = i => { const r = i.getBoundingClientRect();
    return {alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,
            width: r.width, height: r.height}; };
  const li = e => ({row: +e.dataset.row, hit: e.classList.contains("hit"), text: text(e),
                    border: getComputedStyle(e).borderTopColor, img: e.querySelector("img")?.alt ?? null});
  return {
    title: document.title,
    images: imgs.map(image),
    t2i: [...document.querySelectorAll("section.query.t2i")].map(s => ({
      query: +s.dataset.query, truth: +s.dataset.truth, rank: +s.dataset.rank, caption: text(s.querySelector(".q")),
      results: [...s.querySelectorAll("ol.results > li")].map(li),
      truthTile: s.querySelector("div.truth") ? {row: +s.querySelector("div.truth").dataset.row,
        text: text(s.querySelector("div.truth")), border: getComputedStyle(s.querySelector("div.truth")).borderTopStyle,
        img: s.querySelector("div.truth img")?.alt ?? null} : null})),
    i2t: [...document.querySelectorAll("section.query.i2t")].map(s => ({
      query: +s.dataset.query, img: s.querySelector("figure img")?.alt ?? null,
      results: [...s.querySelectorAll("ol.results > li")].map(li)})),
  };
})()
"""
GREEN = "rgb(42, 157, 58)"  # ol.results li.hit's border in pictures._CSS


def open_page(page: Path, screenshot: Path, user_data_dir: Path, *, width: int = 1280, timeout: float = 30,
              log: Optional[Path] = None) -> tuple[dict, dict[str, float]]:
    """Load `page` in headless Chromium, read PAGE_FACTS_JS and save a full-page PNG; returns the
    facts and the seconds of each phase."""
    times: dict[str, float] = {}
    start = time.monotonic()
    browser = Chromium(user_data_dir, log=log)
    try:
        browser.send("Browser.getVersion", timeout=timeout)
        targets = browser.send("Target.getTargets")["targetInfos"]
        target = next(t["targetId"] for t in targets if t["type"] == "page")
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                             "mobile": False}, session=session)
        times["start Chromium"] = time.monotonic() - start
        start = time.monotonic()
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", session, timeout)
        result = browser.send("Runtime.evaluate", {"expression": PAGE_FACTS_JS, "awaitPromise": True,
                                                   "returnByValue": True}, session=session, timeout=timeout)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        facts = result["result"]["value"]
        times["load page + read it (JS)"] = time.monotonic() - start
        start = time.monotonic()
        size = browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}},
            session=session, timeout=timeout)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        facts["page_size"] = [size["width"], size["height"]]
        times["full-page screenshot"] = time.monotonic() - start
    finally:
        start = time.monotonic()
        browser.close()
        times["close Chromium"] = time.monotonic() - start
    return facts, times


# ---------------------------------------------------------------------------- the checks


def problems(facts: dict, page: Page) -> list[str]:
    """What the browser shows that it should not, or misses; [] when the page is right."""
    out = []
    name = lambda row: f"image {page.image_ids[row]}"  # noqa: E731
    images = facts["images"]
    if len(images) != page.img_tags or not images:
        out.append(f"{len(images)} <img> in the DOM, {page.img_tags} in the HTML")
    for i, im in enumerate(images):
        if not (im["complete"] and im["naturalWidth"] > 0 and im["naturalHeight"] > 0 and im["width"] > 0):
            out.append(f"img {i} ({im['alt']}) not shown: {im}")
    if len(facts["t2i"]) != len(page.t2i) or len(facts["i2t"]) != len(page.i2t):
        out.append(f"{len(facts['t2i'])}/{len(facts['i2t'])} query sections, want {len(page.t2i)}/{len(page.i2t)}")
    for q, s in zip(page.t2i, facts["t2i"]):
        where = f"caption query {q.row}"
        if s["query"] != q.row or s["caption"] != f"“{' '.join(page.texts[q.row].split())}”":
            out.append(f"{where}: shows {s['caption']!r} for row {s['query']}")
        if [r["row"] for r in s["results"]] != q.top or [r["img"] for r in s["results"]] != [name(r) for r in q.top]:
            out.append(f"{where}: results {[r['img'] for r in s['results']]}, want {[name(r) for r in q.top]}")
        for r, hit in zip(s["results"], q.hits):
            marked = r["hit"] and "✓ ground truth" in r["text"] and r["border"] == GREEN
            if hit != marked or (not hit and "ground truth" in r["text"]):
                out.append(f"{where}: result {r['row']} marked {marked}, is ground truth {hit}: {r}")
        truth = q.truth[0]
        if truth in q.top:
            if s["truthTile"] is not None:
                out.append(f"{where}: a ground-truth tile below although it is in the top k")
        elif not (s["truthTile"] and s["truthTile"]["row"] == truth and s["truthTile"]["img"] == name(truth)
                  and f"ground truth, rank {q.truth_rank}" in s["truthTile"]["text"]
                  and s["truthTile"]["border"] == "dashed"):
            out.append(f"{where}: ground truth {name(truth)} (rank {q.truth_rank}) not shown below: {s['truthTile']}")
    for q, s in zip(page.i2t, facts["i2t"]):
        where = f"image query {name(q.row)}"
        if s["query"] != q.row or s["img"] != name(q.row):
            out.append(f"{where}: shows picture {s['img']} for row {s['query']}")
        if [r["row"] for r in s["results"]] != q.top:
            out.append(f"{where}: result rows {[r['row'] for r in s['results']]}, want {q.top}")
        for r, hit in zip(s["results"], q.hits):
            if " ".join(page.texts[r["row"]].split()) not in r["text"]:
                out.append(f"{where}: result {r['row']} shows {r['text']!r}")
            marked = r["hit"] and r["text"].startswith("✓") and r["border"] == GREEN
            if hit != marked:
                out.append(f"{where}: caption {r['row']} marked {marked}, is its own {hit}: {r}")
    return out


def screenshot_is_drawn(path: Path) -> str:
    """A short description of the PNG; raises if it is blank (one colour)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").resize((max(1, im.width // 8), max(1, im.height // 8)))
        colours = len(small.getcolors(maxcolors=1 << 24))
        if colours < 50:
            raise RuntimeError(f"{path}: {im.size}, only {colours} colours: blank?")
        return f"{im.width}x{im.height} px, {colours} colours at 1/8 scale"


def summary(page: Page, facts: dict) -> str:
    t2i_hits = sum(sum(q.hits) for q in page.t2i)
    misses = sum(q.truth[0] not in q.top for q in page.t2i)
    i2t_hits = sum(sum(q.hits) for q in page.i2t)
    return (f"{len(facts['images'])} images all loaded; {len(page.t2i)} caption queries ({t2i_hits} ground truth "
            f"marked in the top k, {misses} shown below with their rank), {len(page.i2t)} image queries "
            f"({i2t_hits} own captions marked)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "itm-pictures" / "queries.png",
                        help="screenshot PNG (the page is written beside it as queries.html)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 2
    rows: list[tuple[str, float, str]] = []
    html_path = args.out.with_suffix(".html")
    start = time.monotonic()
    page = flickr_page(html_path, args.data, n_queries=args.queries, k=args.k)
    rows.append(("write the page (itmatch.eval.pictures)", time.monotonic() - start,
                 f"{html_path} ({html_path.stat().st_size / 1e6:.2f} MB, {page.img_tags} <img>)"))
    with tempfile.TemporaryDirectory(prefix="itm-chromium-") as profile:
        facts, times = open_page(html_path, args.out, Path(profile), log=args.out.with_suffix(".chromium.log"))
    rows += [(k, v, "") for k, v in times.items()]
    found = problems(facts, page)
    try:
        shot = screenshot_is_drawn(args.out)
    except RuntimeError as exc:
        found.append(str(exc))
        shot = "blank"
    rows.append(("checks", 0.0, "PASS: " + summary(page, facts) if not found else f"FAIL: {len(found)} problem(s)"))
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'seconds':>7}  result")
    for name, seconds, result in rows:
        print(f"{name:<{width}}  {seconds:7.2f}  {result}")
    for p in found[:30]:
        print("  -", p)
    print(f"screenshot: {args.out} ({shot}; page {facts['page_size'][0]:.0f}x{facts['page_size'][1]:.0f} CSS px)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
