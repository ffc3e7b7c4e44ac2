"""The example-queries page (itmatch/eval/pictures.py) in a real browser: written from real
Flickr8k-1k test images, opened in headless Chromium, and read with JavaScript in the loaded page:
every <img> loaded and laid out, each query's caption, results, ground-truth marks and the dashed
ground-truth tile where it ranks outside the top k; a full-page screenshot is drawn. The same check
as bench/pictures_browser.py (whose code it runs). Skipped where Debian's chromium is not installed
(`apt-get install -y chromium`), as on CI machines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import pictures_browser as pb  # noqa: E402

pytestmark = [pytest.mark.skipif(not pb.CHROMIUM.exists(), reason=f"needs headless Chromium at {pb.CHROMIUM} "
                                 "(apt-get install -y chromium); not installed on this machine"),
              pytest.mark.skipif(not pb.DATA.is_dir(), reason=f"needs {pb.DATA} (../shared/data/flickr8k-1k)")]


@pytest.mark.timeout(120)
def test_query_page_shows_its_images_captions_and_ground_truth_in_chromium(tmp_path):
    page = pb.flickr_page(tmp_path / "queries.html", n_queries=6, k=4)
    # The seeded sample holds both kinds of caption query, so both ways of marking the truth are checked.
    assert any(q.truth[0] in q.top for q in page.t2i) and any(q.truth[0] not in q.top for q in page.t2i)
    facts, _ = pb.open_page(page.path, tmp_path / "queries.png", tmp_path / "profile",
                            log=tmp_path / "chromium.log")
    assert pb.problems(facts, page) == []
    assert len(facts["images"]) == page.img_tags >= 6 * 4 + 6
    pb.screenshot_is_drawn(tmp_path / "queries.png")


@pytest.mark.timeout(120)
def test_phrase_page_shows_each_picture_with_its_boxes_in_chromium(tmp_path):
    """Phrase localization's page (itmatch/eval/phrase_pictures.py) on synthetic scenes: every
    phrase's picture, drawn with its boxes at 320 pixels on the long side, loads and is laid out."""
    import torch

    from itmatch.config import load_config
    from itmatch.data.raw import prepare_inputs
    from itmatch.eval.evaluate import embed_split
    from itmatch.eval.phrase_pictures import model_phrase_pictures
    from itmatch.models import build_model

    source = f"shapes-phrases:{tmp_path / 'shapes'}?n_images=40&seed=2"
    store = prepare_inputs(source, cache_dir=tmp_path / "cache", raw_images=False, image_encoder="pixels",
                           text_encoder="hashing", splits=["test"])
    torch.manual_seed(0)
    model = build_model(*store.dims, load_config(None, [f"data.source={source}"]).model)
    written = model_phrase_pictures(model, store, "test", tmp_path / "pictures", n_queries=5, k=3,
                                    embeddings=embed_split(model, store.split("test")))
    facts, _ = pb.open_page(written["queries.html"], tmp_path / "phrases.png", tmp_path / "profile",
                            log=tmp_path / "chromium.log")
    html = written["queries.html"].read_text()
    assert html.count('<section class="query phrase"') == 5 and len(facts["images"]) == 5
    for im in facts["images"]:
        assert im["complete"] and max(im["naturalWidth"], im["naturalHeight"]) == 320 and im["width"] > 0, im
    pb.screenshot_is_drawn(tmp_path / "phrases.png")
