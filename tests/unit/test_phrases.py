"""Region-phrase data and evaluation (itmatch.phrases): boxes, the Flickr30K Entities reader, the
synthetic writer, R@K at IoU, Eq. 8 and Algorithm 1's masks, against hand-computed cases and
brute-force loops."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from itmatch.data.sources import DataError
from itmatch.phrases.boxes import (box_area, box_iou, enclosing_box, from_inclusive, label_proposals, merge_boxes,
                                   paired_iou, to_inclusive)
from itmatch.phrases.entities import (boxes_of, padded_proposals, parse_caption, read_entities, read_proposals,
                                      write_proposals)
from itmatch.phrases.metrics import (combine_distances, hit_ranks, localization_hits, localization_recall,
                                     phrase_localization_metrics, random_recall, region_phrase_distance)
from itmatch.phrases.sampling import algorithm1_masks, sample_positive_regions
from itmatch.phrases.synthetic import shape_box, write_shapes_entities


def random_boxes(rng: np.random.Generator, n: int, size: float = 50.0, integer: bool = False) -> np.ndarray:
    lo = rng.uniform(0, size, (n, 2))
    hi = lo + rng.uniform(0, size / 2, (n, 2))
    boxes = np.concatenate([lo, hi], axis=1)
    return np.round(boxes) if integer else boxes


def iou_loop(a, b, one: float = 0.0) -> float:
    """Plummer's getIOU.m (one = 1: inclusive pixel ranges) / the exclusive IoU (one = 0), one pair."""

    def area(x):
        return max(x[2] - x[0] + one, 0) * max(x[3] - x[1] + one, 0)

    w = min(a[2], b[2]) - max(a[0], b[0]) + one
    h = min(a[3], b[3]) - max(a[1], b[1]) + one
    if w <= 0 or h <= 0:
        return 0.0
    union = area(a) + area(b) - w * h
    return w * h / union if union > 0 else 0.0


# --------------------------------------------------------------------------- boxes


def test_iou_hand_cases():
    a = np.array([[0, 0, 10, 10]])
    cases = {(5, 5, 15, 15): 25 / 175, (0, 0, 10, 10): 1.0, (20, 20, 30, 30): 0.0, (10, 0, 20, 10): 0.0,
             (2, 2, 4, 4): 4 / 100, (0, 0, 7, 10): 0.7}
    for b, want in cases.items():
        assert box_iou(a, np.array([b]))[0, 0] == pytest.approx(want)
    # inclusive: touching pixel ranges share column 10 (11 x 11 boxes, an 1 x 11 intersection)
    assert box_iou(a, np.array([[10, 0, 20, 10]]), inclusive=True)[0, 0] == pytest.approx(11 / (121 + 121 - 11))
    assert box_iou(np.zeros((1, 4)), np.zeros((1, 4)))[0, 0] == 0.0  # empty boxes: 0, not NaN
    assert box_area(np.array([[0, 0, 10, 5], [3, 3, 1, 9]])).tolist() == [50, 0]
    assert box_iou(np.zeros((0, 4)), a).shape == (0, 1)


def test_iou_matches_pairwise_loop_and_broadcasts():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 9)
    want = np.array([[iou_loop(x, y) for y in b] for x in a])
    np.testing.assert_allclose(box_iou(a, b), want, atol=1e-12)
    assert (want > 0).any() and (want == 0).any()
    batched = box_iou(np.stack([a, a[::-1]]), np.stack([b, b]))
    np.testing.assert_allclose(batched[1], want[::-1], atol=1e-12)
    np.testing.assert_allclose(paired_iou(a, b[:7]), np.diag(want[:, :7]), atol=1e-12)


def test_inclusive_voc_boxes_convert_to_the_same_iou():
    """Flickr30K / Plummer's eval: 1-based inclusive pixels and "+1" widths; converted boxes give that IoU."""
    rng = np.random.default_rng(1)
    voc_a, voc_b = random_boxes(rng, 6, integer=True) + 1, random_boxes(rng, 8, integer=True) + 1
    plummer = np.array([[iou_loop(x, y, one=1.0) for y in voc_b] for x in voc_a])
    np.testing.assert_allclose(box_iou(voc_a, voc_b, inclusive=True), plummer, atol=1e-12)
    np.testing.assert_allclose(box_iou(from_inclusive(voc_a), from_inclusive(voc_b)), plummer, atol=1e-12)
    assert from_inclusive([[1, 1, 10, 20]]).tolist() == [[0, 0, 10, 20]]  # 10 x 20 pixels either way
    assert from_inclusive([[0, 0, 9, 19]], one_based=False).tolist() == [[0, 0, 10, 20]]
    np.testing.assert_array_equal(to_inclusive(from_inclusive(voc_a)), voc_a)


def test_merge_boxes_encloses_each_group():
    assert enclosing_box([[10, 20, 30, 40], [0, 25, 15, 60]]).tolist() == [0, 20, 30, 60]
    rng = np.random.default_rng(2)
    boxes, groups = random_boxes(rng, 30), rng.integers(0, 6, 30) * 7
    keys, merged = merge_boxes(boxes, groups)
    assert keys.tolist() == sorted(set(groups.tolist()))
    for key, box in zip(keys, merged):
        members = boxes[groups == key]
        assert box.tolist() == [members[:, 0].min(), members[:, 1].min(), members[:, 2].max(), members[:, 3].max()]
    assert merge_boxes(np.zeros((0, 4)), np.zeros(0, np.int64))[1].shape == (0, 4)
    with pytest.raises(ValueError):
        enclosing_box(np.zeros((0, 4)))


def test_label_proposals_thresholds():
    gt = [[0, 0, 10, 10]]
    proposals = [[0, 0, 7, 10], [0, 0, 8, 10], [0, 0, 5, 10], [0, 0, 3, 10], [0, 0, 2, 10], [50, 50, 60, 60]]
    iou, pos, neg = label_proposals(proposals, gt)
    np.testing.assert_allclose(iou[0], [0.7, 0.8, 0.5, 0.3, 0.2, 0.0])
    assert pos[0].tolist() == [True, True, False, False, False, False]  # >= 0.7
    assert neg[0].tolist() == [False, False, False, False, True, True]  # < 0.3
    _, pos, neg = label_proposals(proposals, gt, pos_iou=0.5, neg_iou=0.5)
    assert pos[0].tolist() == [True, True, True, False, False, False]
    assert neg[0].tolist() == [False, False, False, True, True, True]
    with pytest.raises(ValueError, match="neg_iou"):
        label_proposals(proposals, gt, pos_iou=0.3, neg_iou=0.7)


# --------------------------------------------------------------------------- metrics


def test_recall_at_iou_hand_case():
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]])
    proposals = np.array([[[0, 0, 10, 10], [0, 0, 4, 10], [20, 20, 30, 30], [1, 1, 10, 10]]])  # one image
    scores = np.array([[0.1, 0.9, 0.5, 0.3],   # phrase 0: hits 0 and 3 (IoU 1, .81); best hit 0.3 ranks 3rd
                       [0.2, 0.1, 0.4, 0.4]])  # phrase 1: hit 2 only, tied with a non-hit: rank 2
    image = np.array([0, 0])
    hits = localization_hits(gt, proposals, phrase_image=image)
    assert hits.tolist() == [[True, False, False, True], [False, False, True, False]]
    assert hit_ranks(scores, hits).tolist() == [3.0, 2.0]
    m = phrase_localization_metrics(scores, gt, proposals, phrase_image=image)
    assert m == {"phrase_r1": 0.0, "phrase_r5": 100.0, "phrase_r10": 100.0, "phrase_upper": 100.0,
                 "phrase_random_r1": pytest.approx(100 * (2 / 4 + 1 / 4) / 2)}
    # the last proposal padded away: phrase 0 keeps hit 0 (still 3rd), phrase 1's tie is gone (1st),
    # and a phrase whose image has no proposal misses
    valid = np.array([[True, True, True, False], [False] * 4])
    m = phrase_localization_metrics(scores[[0, 1, 1]], gt[[0, 1, 1]], np.concatenate([proposals, proposals]),
                                    phrase_image=np.array([0, 0, 1]), valid=valid)
    assert m["phrase_r1"] == pytest.approx(100 / 3) and m["phrase_r5"] == pytest.approx(200 / 3)
    assert m["phrase_upper"] == pytest.approx(200 / 3)
    assert m["phrase_random_r1"] == pytest.approx(100 * (1 / 3 + 1 / 3 + 0) / 3)
    # a NaN score ranks last; constant scores get no credit from ties
    assert hit_ranks(np.array([[np.nan, 1.0, 0.0]]), np.array([[True, False, False]])).tolist() == [3.0]
    assert hit_ranks(np.array([[0.0, np.nan, 0.0]]), np.array([[True, False, False]])).tolist() == [3.0]
    assert hit_ranks(np.zeros((1, 3)), np.array([[False, True, False]])).tolist() == [3.0]
    assert hit_ranks(np.zeros((1, 3)), np.zeros((1, 3), bool)).tolist() == [math.inf]


def test_random_recall_is_exact():
    assert random_recall(1, 4, 1) == pytest.approx(0.25)
    assert random_recall(1, 4, 2) == pytest.approx(1 - 3 / 6)
    assert random_recall(0, 4, 3) == 0.0 and random_recall(2, 0, 1) == 0.0 and random_recall(3, 4, 2) == 1.0
    for n in range(1, 7):
        for h in range(n + 1):
            for k in (1, 2, 3, 5, 10):
                subsets = list(itertools.combinations(range(n), min(k, n)))
                want = np.mean([any(i < h for i in s) for s in subsets])
                assert random_recall(h, n, k) == pytest.approx(want), (h, n, k)


def test_localization_metrics_match_a_per_phrase_loop():
    rng = np.random.default_rng(3)
    n_images, P, N = 5, 12, 40
    proposals = np.stack([random_boxes(rng, P, 40) for _ in range(n_images)])
    valid = rng.random((n_images, P)) < 0.8
    valid[4] = False  # an image without proposals
    image = rng.integers(0, n_images, N)
    gt = proposals[image, rng.integers(0, P, N)] + rng.normal(0, 1.5, (N, 4))
    scores = rng.normal(size=(N, P))
    m = phrase_localization_metrics(scores, gt, proposals, phrase_image=image, valid=valid)
    recalls, upper, random_r1 = {1: [], 5: [], 10: []}, [], []
    for n in range(N):
        cand = [p for p in range(P) if valid[image[n], p]]
        hit = {p: iou_loop(gt[n], proposals[image[n], p]) >= 0.5 for p in cand}
        ranked = sorted(cand, key=lambda p: -scores[n, p])
        for k in recalls:
            recalls[k].append(any(hit[p] for p in ranked[:k]))
        upper.append(any(hit.values()))
        random_r1.append(sum(hit.values()) / len(cand) if cand else 0.0)
    for k in recalls:
        assert m[f"phrase_r{k}"] == pytest.approx(100 * np.mean(recalls[k]))
    assert m["phrase_upper"] == pytest.approx(100 * np.mean(upper))
    assert m["phrase_random_r1"] == pytest.approx(100 * np.mean(random_r1))
    assert 0 < m["phrase_r1"] < m["phrase_r10"] <= m["phrase_upper"] < 100
    # per-phrase proposals give the same, and scores as a torch tensor are read too
    per_phrase = phrase_localization_metrics(torch.from_numpy(scores), gt, proposals[image], valid=valid[image])
    assert per_phrase == pytest.approx(m)
    assert localization_recall(scores, np.zeros_like(valid[image]))["phrase_upper"] == 0.0


# --------------------------------------------------------------------------- Eq. 8


def test_combine_distances_eq8():
    d = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    d_rp = torch.tensor([[3.0, float("nan")], [0.5, 1.0]])
    out = combine_distances(d, d_rp)  # alpha = 0.2
    torch.testing.assert_close(out, torch.tensor([[0.8 + 0.6, 2.0], [0.5, 0.2]]))
    torch.testing.assert_close(combine_distances(d, d_rp, alpha=0.0), d)
    with pytest.raises(ValueError):
        combine_distances(d, d_rp[:1])


def test_region_phrase_distance_matches_loops():
    g = torch.Generator().manual_seed(0)

    def unit(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)

    regions, phrases = unit(4, 5, 8), unit(7, 8)
    valid = torch.rand(4, 5, generator=g) < 0.7
    valid[0, 0], valid[3] = True, False  # image 3 has no region
    sentence = torch.tensor([0, 0, 1, 2, 2, 2, 4])  # sentence 3 has no phrase
    d_rp = region_phrase_distance(regions, phrases, sentence, 5, region_valid=valid, budget=50)
    for i in range(4):
        for s in range(5):
            members = [m for m in range(7) if sentence[m] == s]
            if not members or not valid[i].any():
                assert torch.isnan(d_rp[i, s])
                continue
            nearest = [min(float((regions[i, r] - phrases[m]).norm()) for r in range(5) if valid[i, r])
                       for m in members]
            assert float(d_rp[i, s]) == pytest.approx(np.mean(nearest), abs=1e-5)


# --------------------------------------------------------------------------- Algorithm 1


def test_algorithm1_masks_match_loops():
    rng = np.random.default_rng(4)
    B, R = 9, 25
    p_img, r_img = rng.integers(0, 3, B), rng.integers(0, 3, R)
    chain = rng.integers(0, 5, B)
    r_box = random_boxes(rng, R, 30)
    p_box = r_box[rng.integers(0, R, B)] + rng.normal(0, 1.5, (B, 4))
    m = algorithm1_masks(p_img, chain, p_box, r_img, r_box)
    for b in range(B):
        for r in range(R):
            iou = iou_loop(p_box[b], r_box[r]) if p_img[b] == r_img[r] else 0.0
            assert m["region_iou"][b, r] == pytest.approx(iou)
            assert m["region_positive"][b, r] == (p_img[b] == r_img[r] and iou >= 0.7)
            assert m["region_negative"][b, r] == (p_img[b] == r_img[r] and iou < 0.3)
        for c in range(B):
            assert m["phrase_negative"][b, c] == (chain[b] != chain[c])
            assert m["phrase_neighbor"][b, c] == (chain[b] == chain[c] and b != c)
    assert m["region_positive"].any() and m["region_negative"].any()
    picks = np.stack([sample_positive_regions(m["region_positive"], np.random.default_rng(s)) for s in range(300)])
    for b in range(B):
        positives = set(np.flatnonzero(m["region_positive"][b]).tolist())
        assert set(picks[:, b].tolist()) == (positives or {-1})  # every positive drawn, nothing else


# --------------------------------------------------------------------------- the reader


SENTENCES = {
    100: ("[/EN#5/people Two men] in [/EN#6/clothing red shirts] play with [/EN#7/other a ball] .\n"
          "[/EN#8/people/other A man] and [/EN#9/people another man] stand in [/EN#10/scene a field] .\n"
          "[/EN#0/notvisual Someone] kicks [/EN#7/other the ball] to [/EN#5/people the players] .\n"),
    200: "[/EN#21/animals A dog] runs .\n",
}
ANNOTATIONS = {
    100: """<annotation><filename>100.jpg</filename>
<size><width>500</width><height>375</height><depth>3</depth></size>
<object><name>8</name><name>5</name>
  <bndbox><xmin>11</xmin><ymin>21</ymin><xmax>60</xmax><ymax>200</ymax></bndbox></object>
<object><name>9</name><name>5</name>
  <bndbox><xmin>101</xmin><ymin>31</ymin><xmax>150</xmax><ymax>210</ymax></bndbox></object>
<object><name>6</name><bndbox><xmin>15</xmin><ymin>50</ymin><xmax>55</xmax><ymax>90</ymax></bndbox></object>
<object><name>6</name><bndbox><xmin>105</xmin><ymin>60</ymin><xmax>145</xmax><ymax>100</ymax></bndbox></object>
<object><name>7</name><bndbox><xmin>70</xmin><ymin>300</ymin><xmax>79</xmax><ymax>309</ymax></bndbox></object>
<object><name>10</name><nobndbox>0</nobndbox><scene>1</scene></object>
</annotation>""",
    200: """<annotation><filename>200.jpg</filename><size><width>64</width><height>48</height></size>
<object><name>21</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>64</xmax><ymax>48</ymax></bndbox></object>
</annotation>""",
}


def write_fixture(root: Path, sentences=SENTENCES, annotations=ANNOTATIONS, splits=None) -> Path:
    (root / "Sentences").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    for image_id, text in sentences.items():
        (root / "Sentences" / f"{image_id}.txt").write_text(text, encoding="utf-8")
    for image_id, text in annotations.items():
        (root / "Annotations" / f"{image_id}.xml").write_text(text, encoding="utf-8")
    for split, ids in (splits or {"train": [200], "test": [100]}).items():
        (root / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_parse_caption():
    c = parse_caption("[/EN#8/people/other A man] , in [/EN#3/clothing a hat], waves .")
    assert c.text == "A man , in a hat , waves ."
    assert [(m.text, m.entity_id, m.types, m.first_word) for m in c.mentions] == [
        ("A man", 8, ("people", "other"), 0), ("a hat", 3, ("clothing",), 4)]


def test_reader_on_a_hand_written_fixture(tmp_path):
    root = write_fixture(tmp_path / "f30k")
    write_proposals(root / "proposals.parquet", [100, 999, 200],
                    [[[0, 0, 60, 200], [100, 30, 150, 210]], [[1, 2, 3, 4]], [[0, 0, 64, 48]]])
    c = read_entities(root)
    assert c.images.column("image_id").to_pylist() == [100, 200]
    assert c.images.column("split").to_pylist() == ["test", "train"]
    assert c.images.column("width").to_pylist() == [500, 64] and c.images.column("path").null_count == 2
    assert c.captions.column("text").to_pylist()[2] == "Someone kicks the ball to the players ."
    phrases = c.phrases.to_pylist()
    # notvisual "Someone" and the box-less scene "a field" are dropped
    assert [p["text"] for p in phrases] == ["Two men", "red shirts", "a ball", "A man", "another man", "the ball",
                                            "the players", "A dog"]
    assert c.dropped == {"notvisual": 1, "no_box": 1}
    by_text = {p["text"]: p for p in phrases}
    # the plural chain 5 is the enclosing box of its two men (VOC 1-based inclusive -> 0-based exclusive)
    assert by_text["Two men"]["box"] == [10, 20, 150, 210] == by_text["the players"]["box"]
    assert by_text["red shirts"]["box"] == [14, 49, 145, 100]
    assert by_text["A man"]["box"] == [10, 20, 60, 200] and by_text["A man"]["types"] == ["people", "other"]
    assert by_text["A dog"]["box"] == [0, 0, 64, 48]
    assert by_text["the ball"]["first_word"] == 2 and by_text["the players"]["first_word"] == 5
    # coreference: same chain (and region) across captions; different entities differ
    assert by_text["Two men"]["chain_id"] == by_text["the players"]["chain_id"] == by_text["the players"]["region_id"]
    assert by_text["a ball"]["chain_id"] == by_text["the ball"]["chain_id"] != by_text["A man"]["chain_id"]
    regions = {r["entity_id"]: r for r in c.regions.to_pylist()}
    assert sorted(regions) == [5, 6, 7, 8, 9, 21]
    assert regions[5]["n_boxes"] == 2 and regions[6]["n_boxes"] == 2 and regions[7]["n_boxes"] == 1
    np.testing.assert_array_equal(boxes_of(c.regions.column("box"))[c.phrases.column("region_id").to_numpy()],
                                  boxes_of(c.phrases.column("box")))
    # proposals: image 999 is not in the corpus; padded per image in the order asked
    assert c.proposals.column("image_id").to_pylist() == [100, 100, 200]
    boxes, valid = padded_proposals(c.proposals, [200, 100])
    assert valid.tolist() == [[True, False], [True, True]] and boxes[1, 1].tolist() == [100, 30, 150, 210]
    test = c.split("test")
    assert test.images.num_rows == 1 and test.phrases.num_rows == 7 and test.proposals.num_rows == 2
    assert read_entities(root, splits=["train"]).phrases.column("text").to_pylist() == ["A dog"]


BAD_CASES = [
    ("Sentences", "[/EN#5/people Two men play .\n", "100.txt", "never closed"),
    ("Sentences", "[/EN#x5/people Two men] play .\n", "100.txt", "'x5'"),
    ("Sentences", "Two men] play .\n", "100.txt", "unmatched ']'"),
    ("Sentences", "[/EN#5 Two men] play .\n", "100.txt", "[/EN#5 Two men]"),
    ("Annotations", ANNOTATIONS[100].replace("<xmin>11</xmin>", "<xmin>eleven</xmin>"), "100.xml", "'eleven'"),
    ("Annotations", ANNOTATIONS[100].replace("<xmax>60</xmax>", "<xmax>5</xmax>"), "100.xml", "max < min"),
    ("Annotations", ANNOTATIONS[100].replace("<name>9</name>", "<name>nine</name>"), "100.xml", "'nine'"),
    ("Annotations", ANNOTATIONS[100].replace("</annotation>", ""), "100.xml", "not well-formed"),
    ("Annotations", ANNOTATIONS[100].replace("<width>500</width>", ""), "100.xml", "<width>"),
]


@pytest.mark.parametrize("folder, text, name, needle", BAD_CASES)
def test_reader_names_the_bad_file_and_value(tmp_path, folder, text, name, needle):
    root = write_fixture(tmp_path / "f30k")
    (root / folder / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_entities(root)
    assert name in str(err.value) and needle in str(err.value)


def test_reader_rejects_missing_files_and_bad_proposals(tmp_path):
    root = write_fixture(tmp_path / "f30k", splits={"train": [100, 200, 300]})
    with pytest.raises(DataError, match=r"300\.txt: missing"):
        read_entities(root)
    root = write_fixture(tmp_path / "ok")
    pq.write_table(pa.table({"image_id": [100, 100], "x1": [0.0, 9.0], "y1": [0.0, 0.0], "x2": [5.0, 3.0],
                             "y2": [5.0, 5.0]}), root / "proposals.parquet")
    with pytest.raises(DataError, match=r"proposals\.parquet: row 1 \(image_id 100\).*9\.0"):
        read_entities(root)
    pq.write_table(pa.table({"image_id": [100], "x1": [0.0]}), root / "proposals.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['y1', 'x2', 'y2'\]"):
        read_proposals(root / "proposals.parquet")


# --------------------------------------------------------------------------- writer -> reader


def test_synthetic_writer_round_trip(tmp_path):
    root = write_shapes_entities(tmp_path / "shapes", 8, seed=3, image_size=64, n_captions=3)
    c = read_entities(root)
    doc = json.loads((root / "dataset_shapes.json").read_text())
    assert c.images.column("image_id").to_pylist() == list(range(8))
    assert c.images.column("split").to_pylist() == [e["split"] for e in doc["images"]]
    assert c.captions.num_rows == 24 and c.dropped["notvisual"] + c.dropped["no_box"] > 0
    regions = c.regions.to_pylist()
    for entry in doc["images"]:
        i, objects = entry["imgid"], entry["objects"]
        own = {r["entity_id"]: r for r in regions if r["image_id"] == i}
        boxes = np.stack([shape_box(o, 64) for o in objects])
        for k in range(len(objects)):  # each object's box survives XML (1-based inclusive) and back
            assert own[10 * i + 1 + k]["box"] == boxes[k].tolist()
        shapes = [o["shape"] for o in objects]
        plural = [k for k, s in enumerate(shapes) if shapes.count(s) > 1]
        if plural:
            assert own[10 * i + 8]["box"] == enclosing_box(boxes[plural]).tolist()
            assert own[10 * i + 8]["n_boxes"] == len(plural)
        # the boxes enclose everything drawn: outside them the image is the plain background
        pixels = np.asarray(Image.open(root / "images" / entry["filename"]).convert("RGB"))
        outside = np.ones(pixels.shape[:2], bool)
        for x1, y1, x2, y2 in boxes.astype(int):
            outside[y1:y2, x1:x2] = False
        assert (pixels[outside] == entry["background"]).all()
    # every phrase names its object's colour; a chain's phrases share one box
    for p in c.phrases.to_pylist():
        i, k = divmod(p["entity_id"], 10)
        if k <= 3:
            assert doc["images"][i]["objects"][k - 1]["colour"] in p["text"]
    ids = c.images.column("image_id").to_numpy()
    props, valid = padded_proposals(c.proposals, ids)
    n_regions = np.bincount(c.regions.column("image_id").to_numpy(), minlength=8)
    assert valid.sum(axis=1).tolist() == (8 * n_regions + 24).tolist()
    assert (props[..., 2:] > props[..., :2])[valid].all() and (props[valid] >= 0).all() and (props[valid] <= 64).all()
    image_row = c.phrases.column("image_id").to_numpy()
    m = phrase_localization_metrics(np.random.default_rng(0).random(valid.shape)[image_row],
                                    boxes_of(c.phrases.column("box")), props, phrase_image=image_row, valid=valid)
    assert m["phrase_upper"] > 90 and 0 < m["phrase_random_r1"] < 50


def test_synthetic_writer_is_deterministic_and_idempotent(tmp_path):
    a = write_shapes_entities(tmp_path / "a", 4, seed=5, image_size=48)
    b = write_shapes_entities(tmp_path / "b", 4, seed=5, image_size=48)
    for rel in ["Sentences/0.txt", "Sentences/3.txt", "Annotations/2.xml", "train.txt"]:
        assert (a / rel).read_text() == (b / rel).read_text()
    assert pq.read_table(a / "proposals.parquet").equals(pq.read_table(b / "proposals.parquet"))
    stamp = (a / "proposals.parquet").stat().st_mtime_ns
    assert write_shapes_entities(tmp_path / "a", 4, seed=5, image_size=48) == a
    assert (a / "proposals.parquet").stat().st_mtime_ns == stamp
    other = write_shapes_entities(tmp_path / "c", 4, seed=6, image_size=48)
    assert (other / "Sentences/0.txt").read_text() != (a / "Sentences/0.txt").read_text()
