"""infonce_loss against a per-pair loop written from its definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itmatch.data.batch import Batch
from itmatch.losses import build_objective, infonce_loss
from itmatch.config import LossConfig


def _reference(img, img_gid, txt, txt_gid, temperature, weights, reduction):
    def direction(anchors, a_gid, cands, c_gid):
        total, pairs = anchors.new_zeros(()), 0
        for a in range(len(anchors)):
            negatives = [torch.exp(anchors[a] @ cands[n] / temperature)
                         for n in range(len(cands)) if c_gid[n] != a_gid[a]]
            for p in range(len(cands)):
                if c_gid[p] != a_gid[a]:
                    continue
                pos = torch.exp(anchors[a] @ cands[p] / temperature)
                total = total - torch.log(pos / (pos + sum(negatives, anchors.new_zeros(()))))
                pairs += 1
        return total, pairs

    i2t, pairs = direction(img, img_gid.tolist(), txt, txt_gid.tolist())
    t2i, _ = direction(txt, txt_gid.tolist(), img, img_gid.tolist())
    if reduction == "mean":
        i2t, t2i = i2t / pairs, t2i / pairs
    return {"i2t": i2t, "t2i": t2i, "loss": weights[0] * i2t + weights[1] * t2i}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_values_and_grads_match_loop(seed, reduction):
    g = torch.Generator().manual_seed(seed)
    img_gid = torch.tensor([0, 1, 2, 3, 4, 2])
    txt_gid = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 1])
    img = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    txt = F.normalize(torch.randn(10, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    kwargs = dict(temperature=0.2, weights=(1.0, 0.7), reduction=reduction)
    got = infonce_loss(img, img_gid, txt, txt_gid, **kwargs)
    grads = torch.autograd.grad(got["loss"], (img, txt))
    want = _reference(img, img_gid, txt, txt_gid, **kwargs)
    want_grads = torch.autograd.grad(want["loss"], (img, txt))
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)


def test_no_negatives_gives_zero_not_nan():
    img = F.normalize(torch.randn(2, 4), dim=1).requires_grad_(True)
    txt = F.normalize(torch.randn(3, 4), dim=1).requires_grad_(True)
    out = infonce_loss(img, torch.zeros(2, dtype=torch.long), txt, torch.zeros(3, dtype=torch.long))
    out["loss"].backward()
    assert float(out["loss"].detach()) == 0.0 and torch.isfinite(img.grad).all() and torch.isfinite(txt.grad).all()


def test_perfect_separation_approaches_zero_and_bad_args():
    img = torch.eye(3)
    out = infonce_loss(img, torch.arange(3), img.clone(), torch.arange(3), temperature=0.01)
    assert float(out["loss"]) < 1e-30 or math.isclose(float(out["loss"]), 0.0, abs_tol=1e-30)
    with pytest.raises(ValueError, match="temperature"):
        infonce_loss(img, torch.arange(3), img, torch.arange(3), temperature=0.0)


def test_config_picks_infonce():
    objective = build_objective(LossConfig(name="infonce", temperature=0.1, lambda1=1.0, lambda2=0.5))
    img = F.normalize(torch.randn(4, 3), dim=1)
    txt = F.normalize(torch.randn(4, 3), dim=1)
    ids = torch.arange(4)
    out = objective({"img": img, "txt": txt}, Batch(img, txt, ids, ids, ids, ids))
    assert set(out) == {"loss", "i2t", "t2i"}
    torch.testing.assert_close(out["loss"], out["i2t"] + 0.5 * out["t2i"])
