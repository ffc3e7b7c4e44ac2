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
