"""The training objective: one registry of terms reached from the config, checked against the
pure losses combined by hand (each of those is tested against brute-force references)."""

from __future__ import annotations

import typing

import pytest
import torch

from itmatch.config import LossConfig, ModelConfig, load_config
from itmatch.data.batch import Batch
from itmatch.losses import (MAIN, TERMS, build_objective, center_loss, instance_loss, logistic_loss,
                            ranking_loss)
from itmatch.models import MODELS, build_model


def _batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image_gid = torch.tensor([3, 8, 5, 9])
    text_gid = torch.tensor([3, 3, 8, 8, 5, 5, 9, 9, 9])
    cls = {3: 0, 8: 1, 5: 2, 9: 3}
    return Batch.of(torch.randn(4, 6, generator=g), torch.randn(9, 5, generator=g), image_gid=image_gid,
                    text_gid=text_gid, image_cls=torch.tensor([cls[int(i)] for i in image_gid]),
                    text_cls=torch.tensor([cls[int(i)] for i in text_gid]))


def _model(heads: tuple[str, ...], name: str = "embedding"):
    torch.manual_seed(0)
    return build_model(6, 5, ModelConfig(name=name, hidden_dim=16, embed_dim=8, dropout=0.0), n_classes=4,
                       heads=heads)


@pytest.mark.parametrize("epoch,stage1", [(0, 0), (0, 2), (3, 2)])
def test_ranking_with_both_heads_is_the_weighted_sum(epoch, stage1):
    cfg = LossConfig(margin=0.3, top_k=2, lambda3=0.1, instance_weight=0.7, center_weight=0.2,
                     instance_stage1_epochs=stage1)
    model, batch = _model(("instance", "center")), _batch()
    out = model(batch)
    got = build_objective(cfg)(out, batch, epoch=epoch)
    rank = ranking_loss(out["img"], batch.image_gid, out["txt"], batch.text_gid, lambdas=cfg.lambdas,
                        margin=0.3, top_k=2)["loss"]
    inst = instance_loss(out["img_logits"], batch.image_cls, out["txt_logits"], batch.text_cls)
    cent = center_loss(out["img"], out["img_center"], out["txt"], out["txt_center"])
    main_weight = 0.0 if epoch < stage1 else 1.0
    want = main_weight * rank + 0.7 * (inst["visual"] + inst["textual"]) + 0.2 * (cent["center_img"] + cent["center_txt"])
    torch.testing.assert_close(got["loss"], want)
    assert {"i2t", "t2i", "visual", "textual", "center_img", "center_txt"} <= set(got)
    g_got = torch.autograd.grad(got["loss"], list(model.parameters()), allow_unused=True, retain_graph=True)
    g_want = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b))


def test_without_heads_the_objective_is_the_main_loss():
    model, batch = _model(()), _batch(1)
    out = model(batch)
    got = build_objective(LossConfig(name="infonce", temperature=0.2))(out, batch)
    from itmatch.losses import infonce_loss

    want = infonce_loss(out["img"], batch.image_gid, out["txt"], batch.text_gid, temperature=0.2, weights=(1.0, 1.5))
    torch.testing.assert_close(got["loss"], want["loss"])


def test_logistic_objective_samples_pairs_before_forward_and_scores_them_with_the_head():
    objective = build_objective(LossConfig(name="logistic"))
    model, batch = _model((), name="similarity"), _batch(2)
    torch.manual_seed(5)
    prepared = objective.prepare(batch)
    rows, texts, labels = prepared.pairs
    assert (batch.image_gid[rows[labels == 1]] == batch.text_gid[texts[labels == 1]]).all()
    assert (batch.image_gid[rows[labels == 0]] != batch.text_gid[texts[labels == 0]]).all()
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(objective.prepare(batch).pairs, prepared.pairs))  # replayable
    out = model(prepared)
    with torch.no_grad():
        scores = model.head(out["img"][rows] * out["txt"][texts]).squeeze(-1)
    torch.testing.assert_close(out["pair_scores"], scores)
    torch.testing.assert_close(objective(out, prepared)["loss"], logistic_loss(scores, labels)["loss"])
    assert objective.prepare(batch).pairs is not None and build_objective(LossConfig()).prepare(batch).pairs is None


def test_config_choices_are_the_registries():
    """The config's allowed names and the registries are one list (a new entry needs both)."""
    assert set(typing.get_args(LossConfig.model_fields["name"].annotation)) == set(MAIN)
    assert set(MAIN) | {"instance", "center"} == set(TERMS)
    assert set(typing.get_args(ModelConfig.model_fields["name"].annotation)) == set(MODELS)
    with pytest.raises(KeyError, match="choices"):
        build_objective(LossConfig.model_construct(name="nope"))


def test_every_model_takes_a_batch_and_names_its_outputs():
    batch = _batch(3)
    for name in [n for n in MODELS if n != "single"]:  # single reads pixels and word ids: test_single_network.py
        cfg = load_config(None, [f"model.name={name}", "model.hidden_dim=8", "model.embed_dim=4",
                                 *(["loss.name=logistic"] if name == "similarity" else [])])
        model = build_model(6, 5, cfg.model).eval()
        out = model(batch)
        assert out["img"].shape == (4, 4) and out["txt"].shape == (9, 4), name
        torch.testing.assert_close(model.embed_images(batch.images), out["img"])
        torch.testing.assert_close(model.embed_texts(batch.texts), out["txt"])
