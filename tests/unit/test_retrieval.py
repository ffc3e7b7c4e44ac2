"""Retrieval metrics against an independent per-query reference loop (SPEC §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itmatch.eval import retrieval
from itmatch.eval.retrieval import (coco_protocols, i2t_ranks, overlap_indicator, retrieval_metrics,
                                    sentence_retrieval, t2i_ranks)


def _data(n_img: int, caps_per_img: list[int] | int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    counts = caps_per_img if isinstance(caps_per_img, list) else [caps_per_img] * n_img
    txt_img = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)])
    img = F.normalize(torch.randn(n_img, dim, generator=g), dim=1)
    # captions near their image so recalls are neither 0 nor 100
    txt = F.normalize(img[txt_img] + 0.9 * torch.randn(len(txt_img), dim, generator=g), dim=1)
    perm = torch.randperm(len(txt_img), generator=g)  # captions in no particular order
    return img.double(), txt[perm].double(), txt_img[perm]


def _reference(img: torch.Tensor, txt: torch.Tensor, txt_img: torch.Tensor) -> dict[str, float]:
    """One query at a time: sort the whole gallery (ties: wrong items first, the pessimistic rank),
    take the position of the first correct item."""
    s = (img @ txt.T).numpy()
    owner = txt_img.numpy()
    i2t, t2i = [], []
    for i in range(len(img)):
        if not (owner == i).any():
            continue
        order = np.lexsort((owner == i, -s[i]))  # last key first: score, then wrong before correct
        i2t.append(1 + int(np.flatnonzero(owner[order] == i)[0]))
    for j in range(len(txt)):
        order = np.lexsort((np.arange(len(img)) == owner[j], -s[:, j]))
        t2i.append(1 + int(np.flatnonzero(order == owner[j])[0]))
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{name}_medr"] = math.floor(float(np.median(ranks)))
        out[f"{name}_meanr"] = sum(ranks) / len(ranks)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("caps", [5, [1, 2, 3, 5, 4, 2, 1, 5, 3, 2] * 6])
def test_metrics_equal_per_query_reference(seed, caps):
    img, txt, txt_img = _data(60, caps, seed=seed)
    got = retrieval_metrics(img, txt, txt_img)
    want = _reference(img, txt, txt_img)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100  # the data is neither trivial nor hopeless


def test_uncaptioned_images_are_gallery_only():
    img, txt, txt_img = _data(30, [2] * 20 + [0] * 10, seed=3)
    got = retrieval_metrics(img, txt, txt_img)
    want = _reference(img, txt, txt_img)
    for k in want:
        assert got[k] == pytest.approx(want[k]), k
    assert len(i2t_ranks(img, txt, txt_img)) == 20  # only captioned images are queries


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_equals_unchunked(chunk):
    img, txt, txt_img = _data(50, 5, seed=1)
    full = retrieval_metrics(img, txt, txt_img, chunk=10**6)
    assert retrieval_metrics(img, txt, txt_img, chunk=chunk) == full
    np.testing.assert_array_equal(i2t_ranks(img, txt, txt_img, chunk=chunk), i2t_ranks(img, txt, txt_img))
    np.testing.assert_array_equal(t2i_ranks(img, txt, txt_img, chunk=chunk), t2i_ranks(img, txt, txt_img))


def test_score_fn_blocks_match_dot_product():
    """A similarity network is scored block by block; with a dot-product score_fn nothing may change."""
    img, txt, txt_img = _data(40, 5, seed=2)
    calls = []

    def score_fn(a, b):
        calls.append((len(a), len(b)))
        return a @ b.T

    got = retrieval_metrics(img, txt, txt_img, chunk=9, score_fn=score_fn)
    assert got == retrieval_metrics(img, txt, txt_img)
    assert max(b for _, b in calls) <= 9 and max(a for a, _ in calls) <= 40  # the gallery is blocked


def test_known_ranks_by_hand():
    # 2 images, 3 captions: caption 0,1 -> image 0, caption 2 -> image 1
    img = torch.eye(2)
    txt = torch.tensor([[0.2, 0.9], [0.8, 0.1], [0.3, 0.7]])
    txt_img = torch.tensor([0, 0, 1])
    # image 0 scores captions 0.2, 0.8, 0.3 -> its best caption (1) is first
    # image 1 scores 0.9, 0.1, 0.7 -> caption 0 (wrong) beats its caption 2: rank 2
    np.testing.assert_array_equal(i2t_ranks(img, txt, txt_img), [1, 2])
    # caption 0: image 0 scores 0.2 < image 1 0.9 -> rank 2; caption 1 -> rank 1; caption 2 -> rank 1
    np.testing.assert_array_equal(t2i_ranks(img, txt, txt_img), [2, 1, 1])
    m = retrieval_metrics(img, txt, txt_img)
    assert m["i2t_r1"] == 50.0 and m["t2i_r1"] == pytest.approx(200 / 3) and m["i2t_r5"] == 100.0
    assert m["i2t_medr"] == 1.0 and m["t2i_meanr"] == pytest.approx(4 / 3)


def test_a_collapsed_model_ranks_last_not_first():
    """Every embedding equal (the collapse hard-negative mining can fall into): each correct item
    ties with every wrong one and ranks behind all of them, in both directions and s2s."""
    img = torch.ones(12, 4) / 2
    txt = torch.ones(24, 4) / 2
    txt_img = torch.arange(12).repeat_interleave(2)
    np.testing.assert_array_equal(i2t_ranks(img, txt, txt_img), [23] * 12)  # 22 wrong captions ahead
    np.testing.assert_array_equal(t2i_ranks(img, txt, txt_img), [12] * 24)  # 11 wrong images ahead
    m = retrieval_metrics(img, txt, txt_img)
    assert m["rsum"] == 0.0 and m == _reference(img, txt, txt_img)
    assert sentence_retrieval(txt, txt_img)["s2s_meanr"] == 23.0  # 22 other-image captions tie ahead


def test_partial_ties_match_the_pessimistic_reference():
    """Scores on a coarse grid tie often; the chunked ranks equal the per-query sort with wrong
    items first among equals."""
    g = torch.Generator().manual_seed(7)
    img = torch.randint(0, 3, (40, 4), generator=g).double()
    txt_img = torch.arange(40).repeat_interleave(2)
    txt = torch.randint(0, 3, (80, 4), generator=g).double()
    assert retrieval_metrics(img, txt, txt_img, chunk=7) == pytest.approx(_reference(img, txt, txt_img))


def test_nan_embeddings_rank_last():
    img, txt, txt_img = _data(20, 2, seed=8)
    img[3] = float("nan")
    i2t, t2i = i2t_ranks(img, txt, txt_img), t2i_ranks(img, txt, txt_img)
    assert i2t[3] == len(txt) - 1  # image 3's 2 captions behind all 38 others
    assert (t2i[(txt_img == 3).numpy()] == len(img)).all()
    assert (t2i[(txt_img != 3).numpy()] >= 2).all()  # the NaN image counts ahead of every caption


def test_coco_protocols_folds():
    img, txt, txt_img = _data(250, 5, seed=4)
    m = coco_protocols(img, txt, txt_img, fold_size=50)
    want_5k = _reference(img, txt, txt_img)
    folds = []
    for f in range(5):
        keep = (txt_img >= 50 * f) & (txt_img < 50 * (f + 1))
        folds.append(_reference(img[50 * f:50 * (f + 1)], txt[keep], txt_img[keep] - 50 * f))
    for k in want_5k:
        assert m[f"5k_{k}"] == pytest.approx(want_5k[k]), k
        assert m[f"1k_{k}"] == pytest.approx(np.mean([fm[k] for fm in folds])), k
    assert m["1k_rsum"] > m["5k_rsum"]  # a 5x smaller gallery is easier


def test_sentence_retrieval_reference():
    _, txt, txt_img = _data(30, [1, 3, 5] * 10, seed=5)
    m = sentence_retrieval(txt, txt_img, chunk=11)
    s = (txt @ txt.T).numpy()
    owner = txt_img.numpy()
    ranks = []
    for q in range(len(txt)):
        others = [j for j in range(len(txt)) if j != q]
        if not any(owner[j] == owner[q] for j in others):
            continue  # a lone caption has nothing to retrieve
        order = sorted(others, key=lambda j: -s[q, j])
        ranks.append(1 + next(p for p, j in enumerate(order) if owner[j] == owner[q]))
    assert len(ranks) == 10 * 3 + 10 * 5  # single-caption images have no partner to retrieve
    assert m["s2s_r1"] == pytest.approx(100 * np.mean(np.array(ranks) <= 1))
    assert m["s2s_r10"] == pytest.approx(100 * np.mean(np.array(ranks) <= 10))
    assert m["s2s_meanr"] == pytest.approx(np.mean(ranks))


def test_sentence_retrieval_with_one_caption_an_image_has_no_metrics_not_nan(recwarn):
    txt = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    assert sentence_retrieval(txt, torch.arange(6)) == {}  # every caption alone: nothing to retrieve
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]  # no mean of nothing


def test_overlap_indicator_orders_separation():
    img, txt, txt_img = _data(100, 5, seed=6)
    near = overlap_indicator(img.float(), txt.float(), txt_img)
    far_txt = F.normalize(img[txt_img].float() + 0.05 * torch.randn(len(txt_img), img.shape[1]), dim=1)
    far = overlap_indicator(img.float(), far_txt, txt_img)
    assert 0.0 <= far < near <= 1.0
    same = overlap_indicator(img.float(), F.normalize(torch.randn_like(txt.float()), dim=1), txt_img)
    assert same > 0.7  # random captions: positive and negative cosines share one distribution


@pytest.mark.parametrize("block_scores, dense_ratio", [(1, 16), (70, 16), (1 << 24, 16), (16, 1), (1 << 24, 1)])
def test_sampled_negative_cosines_are_those_pairs_dot_products(block_scores, dense_ratio):
    """Both ways (the block-matmul read-off for a dense sample, chunked gathers for a sparse one:
    dense_ratio=1 makes 50 pairs of 245 sparse) equal a per-pair loop, in the sample's order, with
    blocks of one image, of a few images (70 scores: 2 images of 35 captions) and of everything, or
    gathers of one and of every pair at a time."""
    from itmatch.eval.retrieval import _sampled_cosines, pair_cosines

    img, txt, txt_img = _data(7, 5, seed=8)
    img, txt = img.float(), txt.float()
    g = torch.Generator().manual_seed(3)
    i, j = torch.randint(7, (50,), generator=g), torch.randint(35, (50,), generator=g)
    got = _sampled_cosines(img, txt, i, j, block_scores=block_scores, dense_ratio=dense_ratio)
    want = torch.tensor([float(torch.dot(img[a], txt[b])) for a, b in zip(i.tolist(), j.tolist())])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    pos, neg = pair_cosines(img, txt, txt_img, max_pairs=100, seed=1)
    torch.testing.assert_close(pos, torch.tensor([float(torch.dot(img[int(txt_img[c])], txt[c])) for c in range(35)]))
    assert len(neg) < 100 and neg.abs().max() <= 1 + 1e-5  # the positive pairs drawn were dropped


def test_group_columns_lists_each_querys_group():
    g = torch.Generator().manual_seed(9)
    cand_gid = torch.randint(0, 8, (50,), generator=g)
    query_gid = torch.tensor([3, 0, 7, 42, 3, 5])  # 42: a group with no candidates
    exclude = torch.tensor([int((cand_gid == 3).nonzero()[1]), 0, 1, 2, 49, int((cand_gid == 5).nonzero()[0])])
    for ex in (None, exclude):
        cols, valid = retrieval.group_columns(query_gid, cand_gid, exclude=ex, pad=-7)
        for q in range(len(query_gid)):
            want = [j for j in range(len(cand_gid))
                    if cand_gid[j] == query_gid[q] and (ex is None or j != ex[q])]
            assert cols[q][valid[q]].tolist() == want  # ascending, the excluded column left out
            assert (cols[q][~valid[q]] == -7).all()
        assert valid.shape[1] == max(valid.sum(dim=1))


def _numpy_ranks(s: np.ndarray, correct: list[np.ndarray], excluded: list[np.ndarray]) -> np.ndarray:
    """Per row: 1 + wrong items not strictly below the best correct score (NaN propagates to best)."""
    ranks = []
    for i, row in enumerate(s):
        best = np.max(row[correct[i]])  # np.max propagates NaN
        wrong = np.ones(len(row), dtype=bool)
        wrong[correct[i]] = wrong[excluded[i]] = False
        ranks.append(1 + int(np.sum(~(row[wrong] < best))))
    return np.array(ranks)


def test_wide_gallery_counts_are_exact(monkeypatch):
    """Galleries wider than one counting run (2,040 columns) with thousands of items ahead, ties
    and NaNs, split into many memory-budget blocks: the same ranks as a plain per-row count."""
    monkeypatch.setattr(retrieval, "BLOCK_BYTES", 64 * 1024)
    g = torch.Generator().manual_seed(11)
    img = torch.randint(-1, 2, (700, 3), generator=g).float()  # a coarse grid: many exact ties
    txt_img = torch.randint(0, 700, (4500,), generator=g)
    txt = torch.randint(-1, 2, (4500, 3), generator=g).float()
    img[5], txt[17] = float("nan"), float("nan")
    s = (img @ txt.T).numpy()
    owner = txt_img.numpy()
    queries = np.unique(owner)
    want_i2t = _numpy_ranks(s[queries], [np.flatnonzero(owner == i) for i in queries], [np.array([], int)] * 700)
    want_t2i = _numpy_ranks(s.T, [np.array([o]) for o in owner], [np.array([], int)] * len(owner))
    np.testing.assert_array_equal(i2t_ranks(img, txt, txt_img), want_i2t)
    np.testing.assert_array_equal(t2i_ranks(img, txt, txt_img), want_t2i)
    assert want_i2t.max() > 4000 and (want_i2t == want_i2t.max()).sum() > 1  # far past 255 per byte lane
    st = (txt @ txt.T).numpy()
    partners = [np.flatnonzero((owner == owner[q]) & (np.arange(len(owner)) != q)) for q in range(len(owner))]
    has = np.array([len(p) > 0 for p in partners])
    want_s2s = _numpy_ranks(st[has], [p for p in partners if len(p)], [np.array([q]) for q in np.flatnonzero(has)])
    assert sentence_retrieval(txt, txt_img)["s2s_meanr"] == pytest.approx(want_s2s.mean())
