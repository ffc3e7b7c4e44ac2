"""ranking_loss against an independent brute-force reference (plain loops over every triplet)."""

from __future__ import annotations

import math

import pytest
import torch

from itmatch.losses.ranking import ranking_loss

TERMS = ("i2t", "t2i", "i2i", "t2t")


# --------------------------------------------------------------------------- reference


def _ref_cost(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Scalar cost of one pair; larger = less similar (distance, or −similarity for cosine)."""
    dot = (a * b).sum()
    if metric == "euclidean":
        return torch.sqrt(torch.clamp(2.0 - 2.0 * dot, min=1e-12))
    return -dot


def _ref_term(anchors, a_gid, cands, c_gid, same_set, margin, top_k, metric, allowed=None):
    """Loop over every (anchor, positive, negative) triplet; keep the top_k positive hinges.
    `allowed[a][n]` False: candidate n is no negative of anchor a (a region-phrase batch's mask)."""
    total = anchors.new_zeros(())
    for a in range(len(anchors)):
        for p in range(len(cands)):
            if c_gid[p] != a_gid[a] or (same_set and p == a):
                continue
            d_ap = _ref_cost(anchors[a], cands[p], metric)
            hinges = []
            for n in range(len(cands)):
                if c_gid[n] == a_gid[a] or (allowed is not None and not allowed[a][n]):
                    continue
                h = margin + d_ap - _ref_cost(anchors[a], cands[n], metric)
                if h.item() > 0:
                    hinges.append(h)
            hinges.sort(key=lambda t: t.item(), reverse=True)
            for h in hinges if top_k is None else hinges[:top_k]:
                total = total + h
    return total


def reference(img, img_gid, txt, txt_gid, *, lambdas, margin, top_k, metric, reduction, negatives=None):
    ig, tg = img_gid.tolist(), txt_gid.tolist()
    args = dict(margin=margin, top_k=top_k, metric=metric)
    setups = {
        "i2t": (img, ig, txt, tg, False),
        "t2i": (txt, tg, img, ig, False),
        "i2i": (img, ig, img, ig, True),
        "t2t": (txt, tg, txt, tg, True),
    }
    n_pos_pairs = sum(1 for i in ig for t in tg if i == t)
    out = {}
    for name, lam in zip(TERMS, lambdas):
        mask = (negatives or {}).get(name)
        term = _ref_term(*setups[name], **args, allowed=None if mask is None else mask.tolist()) if lam \
            else img.new_zeros(())
        out[name] = term / n_pos_pairs if reduction == "mean" else term
    out["loss"] = sum(lam * out[name] for name, lam in zip(TERMS, lambdas))
    return out


# --------------------------------------------------------------------------- fixtures


def make_batch(seed: int = 0, dim: int = 8, dtype=torch.float64):
    """6 groups, one image each plus a second image of group 2; 2–5 captions per group."""
    g = torch.Generator().manual_seed(seed)
    img_gid = torch.tensor([0, 1, 2, 3, 4, 5, 2])
    caps_per_group = [2, 5, 3, 4, 2, 3]
    txt_gid = torch.tensor([k for k, n in enumerate(caps_per_group) for _ in range(n)])
    # Captions near their group's image so that both mined and non-violating triplets occur.
    centers = torch.randn(6, dim, generator=g, dtype=dtype)
    img = centers[img_gid] + 0.8 * torch.randn(len(img_gid), dim, generator=g, dtype=dtype)
    txt = centers[txt_gid] + 0.8 * torch.randn(len(txt_gid), dim, generator=g, dtype=dtype)
    # Shuffle the text rows so group members are not contiguous.
    perm = torch.randperm(len(txt_gid), generator=g)
    img = torch.nn.functional.normalize(img, dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(txt[perm], dim=1).requires_grad_()
    return img, img_gid, txt, txt_gid[perm]


def _grads(out, img, txt):
    return torch.autograd.grad(out["loss"], (img, txt), allow_unused=True)


LAMBDAS = [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1.5, 0.2, 0.05)]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("lambdas", LAMBDAS, ids=["i2t", "t2i", "i2i", "t2t", "mixed"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("top_k", [1, 3, None])
def test_matches_brute_force(top_k, metric, reduction, lambdas):
    img, img_gid, txt, txt_gid = make_batch()
    kw = dict(lambdas=lambdas, margin=0.2, top_k=top_k, metric=metric, reduction=reduction)
    got = ranking_loss(img, img_gid, txt, txt_gid, **kw)
    want = reference(img, img_gid, txt, txt_gid, **kw)
    for name in ("loss", *TERMS):
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert want["loss"].item() > 0  # the case actually exercises mined hinges
    for x, g_got, g_want in zip((img, txt), _grads(got, img, txt), _grads(want, img, txt)):
        g_got = torch.zeros_like(x) if g_got is None else g_got
        if g_want is None:  # the reference never touched this input: gradient must be zero
            assert g_got.abs().max().item() == 0
        else:
            torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("top_k", [1, 3, None])
def test_negative_masks_match_brute_force(top_k, metric):
    """A [anchor, candidate] mask of allowed negatives (001 Algorithm 1: a phrase's negative
    regions lie in its picture with IoU < 0.3) against the triplet loop that skips the others."""
    img, img_gid, txt, txt_gid = make_batch(seed=4)
    g = torch.Generator().manual_seed(7)
    negatives = {"t2i": torch.rand(len(txt), len(img), generator=g) < 0.5,
                 "i2i": torch.rand(len(img), len(img), generator=g) < 0.7}
    kw = dict(lambdas=(1, 4, 0.3, 0.1), margin=0.4, top_k=top_k, metric=metric, reduction="mean")
    got = ranking_loss(img, img_gid, txt, txt_gid, negatives=negatives, **kw)
    want = reference(img, img_gid, txt, txt_gid, negatives=negatives, **kw)
    unmasked = ranking_loss(img, img_gid, txt, txt_gid, **kw)
    for name in ("loss", *TERMS):
        torch.testing.assert_close(got[name], want[name], msg=name)
    assert got["t2i"] < unmasked["t2i"] and got["i2t"] == unmasked["i2t"]  # only the masked terms change
    for g_got, g_want in zip(_grads(got, img, txt), _grads(want, img, txt)):
        torch.testing.assert_close(g_got, g_want)
    with pytest.raises(ValueError, match="t2i"):
        ranking_loss(img, img_gid, txt, txt_gid, negatives={"t2i": negatives["t2i"][:, :3]}, **kw)
    with pytest.raises(ValueError, match="unknown term"):
        ranking_loss(img, img_gid, txt, txt_gid, negatives={"x2y": negatives["t2i"]}, **kw)


def test_top_k_keeps_only_positive_hinges():
    # Small margin: most hinges are negative, so summing the K "largest" including negative
    # ones would lower the loss below the reference; the kept hinges must all be > 0.
    img, img_gid, txt, txt_gid = make_batch(seed=3)
    kw = dict(lambdas=(1, 1, 1, 1), margin=0.01, metric="euclidean", reduction="sum")
    by_k = {k: ranking_loss(img, img_gid, txt, txt_gid, top_k=k, **kw)["loss"] for k in (1, 2, 5)}
    for k, val in by_k.items():
        ref = reference(img, img_gid, txt, txt_gid, top_k=k, **kw)["loss"]
        torch.testing.assert_close(val, ref)
        assert val.item() >= 0
    assert by_k[1].item() <= by_k[2].item() <= by_k[5].item()


def test_top_k_larger_than_negatives_equals_all():
    img, img_gid, txt, txt_gid = make_batch(seed=1)
    kw = dict(lambdas=(1, 1.5, 0.2, 0.05), margin=0.3, metric="cosine", reduction="mean")
    n_cand = len(img) + len(txt)  # more than any anchor's number of negatives
    for name in ("loss", *TERMS):
        torch.testing.assert_close(
            ranking_loss(img, img_gid, txt, txt_gid, top_k=n_cand, **kw)[name],
            ranking_loss(img, img_gid, txt, txt_gid, top_k=None, **kw)[name],
        )


def _tiny_case():
    # 2 groups in 2-D. x0 == y0 (identical image/text of group 0); y1 == x1 for group 1,
    # plus a second caption y2 of group 1.
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)
    txt = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=torch.float64)
    return img, torch.tensor([0, 1]), txt, torch.tensor([0, 1, 1])


def test_hand_computed_cosine():
    # Dots: x0·y0=1, x0·y1=.8, x0·y2=0; x1·y0=.8, x1·y1=1, x1·y2=.6; y1·y2=.6, y0·y1=.8, y0·y2=0.
    # Cosine hinge m + s(a,n) − s(a,p), m = 0.5:
    # i2t: (x0,y0): negs y1 -> .5+.8-1=.3, y2 -> .5+0-1<0        => .3
    #      (x1,y1): neg y0 -> .5+.8-1=.3; (x1,y2): neg y0 -> .5+.8-.6=.7 => i2t = 1.3
    # t2i: (y0,x0): neg x1 -> .3; (y1,x1): neg x0 -> .3; (y2,x1): .5+0-.6<0 => t2i = 0.6
    # i2i: no group has two images                                          => i2i = 0
    # t2t: (y1,y2): neg y0 -> .5+.8-.6=.7; (y2,y1): .5+0-.6<0; y0 alone      => t2t = 0.7
    # loss = 1*1.3 + 1.5*0.6 + 0.2*0 + 0.05*0.7 = 2.235 (sum); mean divides by P = 3 pairs
    # (x0,y0), (x1,y1), (x1,y2).
    img, ig, txt, tg = _tiny_case()
    kw = dict(lambdas=(1, 1.5, 0.2, 0.05), margin=0.5, top_k=10, metric="cosine")
    out = ranking_loss(img, ig, txt, tg, reduction="sum", **kw)
    expect = {"i2t": 1.3, "t2i": 0.6, "i2i": 0.0, "t2t": 0.7, "loss": 2.235}
    for name, val in expect.items():
        assert out[name].item() == pytest.approx(val, abs=1e-12), name
    mean = ranking_loss(img, ig, txt, tg, reduction="mean", **kw)
    assert mean["loss"].item() == pytest.approx(2.235 / 3, abs=1e-12)


def test_hand_computed_euclidean_identical_pair():
    # Only x0 == y0 (group 0) and x1 == y1 (group 1), x1 = (.8, .6); m = 0.7.
    # d(pos) = sqrt(max(2 - 2*1, 1e-12)) = 1e-6; d(neg) = sqrt(2 - 2*.8) = sqrt(.4).
    # Each of the 2 image anchors and 2 text anchors has one triplet with hinge
    # .7 + 1e-6 - sqrt(.4) ≈ 0.067545; i2t = t2i = 2 * that; loss(λ=(1,1.5,..)) = 2.5 * i2t.
    img = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64, requires_grad=True)
    txt = img.detach().clone().requires_grad_()
    gid = torch.tensor([0, 1])
    out = ranking_loss(img, gid, txt, gid, margin=0.7, reduction="sum", lambdas=(1, 1.5, 1, 1))
    hinge = 0.7 + 1e-6 - math.sqrt(0.4)
    assert out["i2t"].item() == pytest.approx(2 * hinge, abs=1e-12)
    assert out["t2i"].item() == pytest.approx(2 * hinge, abs=1e-12)
    assert out["loss"].item() == pytest.approx(5 * hinge, abs=1e-12)
    assert out["i2i"].item() == 0 and out["t2t"].item() == 0
    grads = torch.autograd.grad(out["loss"], (img, txt))
    assert all(torch.isfinite(g).all() for g in grads)


def test_no_positive_pairs_gives_zero_not_nan():
    img, _, txt, _ = make_batch()
    img_gid = torch.arange(len(img))  # images in groups no caption belongs to
    txt_gid = torch.arange(len(txt)) % 3 + 100
    out = ranking_loss(img, img_gid, txt, txt_gid, lambdas=(1, 1, 1, 1), reduction="mean")
    for name in ("loss", *TERMS):
        assert out[name].item() == 0, name
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out["loss"], (img, txt)))


def test_zero_lambda_terms_are_zero_and_default_runs_float32():
    img, img_gid, txt, txt_gid = make_batch(dtype=torch.float32)
    out = ranking_loss(img, img_gid, txt, txt_gid)  # defaults: λ = (1, 1.5, 0, 0)
    assert out["i2i"].item() == 0 and out["t2t"].item() == 0
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], out["i2t"] + 1.5 * out["t2i"])


@pytest.mark.parametrize(
    "kw", [dict(metric="dot"), dict(reduction="avg"), dict(top_k=0), dict(lambdas=(1, 1))]
)
def test_rejects_bad_arguments(kw):
    img, img_gid, txt, txt_gid = make_batch()
    with pytest.raises(ValueError):
        ranking_loss(img, img_gid, txt, txt_gid, **kw)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_anchors_with_fewer_negatives_than_top_k(metric):
    """K below the number of candidates but above some anchors' negatives (a group holding most
    captions): those anchors keep all their hinges, the others K, as in the brute force."""
    g = torch.Generator().manual_seed(5)
    img_gid = torch.tensor([0, 1, 1, 2])
    txt_gid = torch.tensor([1] * 10 + [0, 0, 2, 2, 2, 0])
    img = torch.nn.functional.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(16, 6, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    kw = dict(lambdas=(1, 1.5, 0.5, 0.5), margin=0.6, top_k=8, metric=metric, reduction="sum")
    got, want = ranking_loss(img, img_gid, txt, txt_gid, **kw), reference(img, img_gid, txt, txt_gid, **kw)
    for name in ("loss", *TERMS):
        torch.testing.assert_close(got[name], want[name], msg=name)
    for g_got, g_want in zip(_grads(got, img, txt), _grads(want, img, txt)):
        torch.testing.assert_close(g_got, g_want)
