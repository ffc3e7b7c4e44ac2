"""The similarity network (001 §3.3) and its logistic loss (Eq. 7), against loops written from
their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itmatch.config import ModelConfig, load_config
from itmatch.data.batch import Batch
from itmatch.data.store import FeatureSplit
from itmatch.eval.evaluate import evaluate_split
from itmatch.eval.retrieval import retrieval_metrics
from itmatch.losses import logistic_loss, sample_pairs
from itmatch.models import build_model


def _net():
    torch.manual_seed(0)
    return build_model(6, 5, ModelConfig(name="similarity", hidden_dim=16, embed_dim=8, dropout=0.0)).eval()


def test_score_matrix_equals_per_pair_head():
    net = _net()
    assert hasattr(net, "score_matrix")  # evaluation ranks by the head (itmatch.eval.evaluate)
    out = net(Batch.of(torch.randn(7, 6), torch.randn(11, 5)))
    img, txt = out["img"], out["txt"]
    full = net.score_matrix(img, txt, block=3)
    for i in range(7):
        for j in range(11):
            with torch.no_grad():
                want = net.head(img[i] * txt[j])  # the element-wise product through the MLP
            assert float(full[i, j]) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    pairs = (torch.tensor([0, 6]), torch.tensor([10, 3]), torch.tensor([1, 0]))
    scores = net(Batch.of(torch.randn(7, 6), torch.randn(11, 5), pairs=pairs))["pair_scores"]
    assert scores.shape == (2,)


def test_logistic_loss_by_hand():
    scores = torch.tensor([2.0, -1.0, 0.5, 0.0], requires_grad=True)
    labels = torch.tensor([1, 0, 0, 1])
    out = logistic_loss(scores, labels)
    want = sum(math.log(1 + math.exp(-z * p)) for z, p in zip([1, -1, -1, 1], [2.0, -1.0, 0.5, 0.0])) / 4
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-6)
    out["loss"].backward()
    sig = torch.sigmoid(torch.tensor([2.0, -1.0, 0.5, 0.0]))
    torch.testing.assert_close(scores.grad, (sig - labels.float()) / 4)  # d/dp of the mean


def test_sample_pairs_one_negative_per_positive():
    img_gid = torch.tensor([10, 11, 12, 13])
    txt_gid = torch.tensor([10, 10, 11, 12, 12, 13])
    g = torch.Generator().manual_seed(0)
    rows, texts, labels = sample_pairs(img_gid, txt_gid, generator=g)
    assert labels.tolist() == [1] * 6 + [0] * 6
    assert (img_gid[rows[:6]] == txt_gid).all()  # positives: each caption with its own image
    assert (img_gid[rows[6:]] != txt_gid[texts[6:]]).all()  # negatives: another group's image
    assert texts.tolist() == list(range(6)) * 2
    again = sample_pairs(img_gid, txt_gid, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(again, (rows, texts, labels)))  # seeded: replayable
    rows, texts, labels = sample_pairs(torch.tensor([5]), torch.tensor([5, 5]))
    assert labels.tolist() == [1, 1]  # one image only: no negative to draw


def test_evaluation_ranks_by_the_head_not_cosine():
    net = _net()
    rng = np.random.default_rng(0)
    split = FeatureSplit(image_ids=np.arange(10), image_feats=rng.standard_normal((10, 6), dtype=np.float32),
                         caption_ids=np.arange(20), caption_image=np.repeat(np.arange(10), 2),
                         caption_feats=rng.standard_normal((20, 5), dtype=np.float32), texts=[""] * 20)
    got = evaluate_split(net, split, chunk=4, sentences=False)
    with torch.no_grad():
        out = net(Batch.of(torch.from_numpy(split.image_feats), torch.from_numpy(split.caption_feats)))
        img, txt = out["img"], out["txt"]
    want = retrieval_metrics(img, txt, torch.from_numpy(split.caption_image), score_fn=net.score_matrix)
    cosine = retrieval_metrics(img, txt, torch.from_numpy(split.caption_image))
    assert got == pytest.approx(want)
    assert got != pytest.approx(cosine)


def test_config_pairs_model_and_loss():
    load_config(None, ["model.name=similarity", "loss.name=logistic"])
    with pytest.raises(Exception, match="logistic"):
        load_config(None, ["model.name=similarity"])
    with pytest.raises(Exception, match="logistic"):
        load_config(None, ["loss.name=logistic"])
