"""Instance loss (004 §4.2): values and gradients against cross-entropy written out, the shared
classifier in the model, and checkpoints that carry it."""

from __future__ import annotations

import torch
import pytest

from itmatch.config import ModelConfig, load_config
from itmatch.data.batch import Batch
from itmatch.losses import instance_loss
from itmatch.models import build_model
from itmatch.state import TrainState, load_model, save_checkpoint


def test_matches_softmax_cross_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    img_logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    txt_logits = torch.randn(9, 7, generator=g, dtype=torch.float64, requires_grad=True)
    img_cls, txt_cls = torch.tensor([0, 3, 5, 6]), torch.tensor([0, 0, 3, 3, 5, 6, 6, 1, 2])
    out = instance_loss(img_logits, img_cls, txt_logits, txt_cls)

    def by_hand(logits, cls):
        return sum(-torch.log(torch.exp(logits[i, c]) / torch.exp(logits[i]).sum()) for i, c in enumerate(cls)) / len(cls)

    want_v, want_t = by_hand(img_logits, img_cls), by_hand(txt_logits, txt_cls)
    torch.testing.assert_close(out["visual"].double(), want_v, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["textual"].double(), want_t, rtol=1e-6, atol=1e-7)
    got = torch.autograd.grad(out["visual"] + out["textual"], (img_logits, txt_logits))
    want = torch.autograd.grad(want_v + want_t, (img_logits, txt_logits))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_one_classifier_shared_by_both_sides(tmp_path):
    cfg = ModelConfig(hidden_dim=8, embed_dim=4, dropout=0.0)
    model = build_model(6, 5, cfg, n_classes=11).eval()
    x_img, x_txt = torch.randn(3, 6), torch.randn(2, 5)
    out = model(Batch.of(x_img, x_txt))
    img, img_logits, txt_logits = out["img"], out["img_logits"], out["txt_logits"]
    f_img, f_txt = model.image.net(x_img), model.text.net(x_txt)  # features before L2 normalisation
    torch.testing.assert_close(img, torch.nn.functional.normalize(f_img, dim=-1))
    torch.testing.assert_close(img_logits, f_img @ model.classifier.weight.T)  # one W_share, both sides
    torch.testing.assert_close(txt_logits, f_txt @ model.classifier.weight.T)
    assert set(build_model(6, 5, cfg)(Batch.of(torch.randn(3, 6), torch.randn(2, 5)))) == {"img", "txt"}  # no head without classes

    full = load_config(None, ["model.hidden_dim=8", "model.embed_dim=4", "loss.instance_weight=1"])
    save_checkpoint(tmp_path, model=model, cfg=full, train_state=TrainState(), dims=(6, 5))
    loaded, _ = load_model(tmp_path)  # the head's size comes from the checkpoint
    x = torch.randn(2, 6)
    torch.testing.assert_close(loaded.image(x), model.image(x))


def test_cca_refuses_instance_loss():
    with pytest.raises(Exception, match="instance_weight"):
        load_config(None, ["model.name=cca", "loss.instance_weight=1"])


def test_center_loss_by_hand_and_shared_centers(tmp_path):
    from itmatch.losses import center_loss

    cfg = ModelConfig(hidden_dim=8, embed_dim=4, dropout=0.0)
    model = build_model(6, 5, cfg, n_classes=5, heads=("center",)).eval()
    img_cls, txt_cls = torch.tensor([0, 3]), torch.tensor([0, 0, 3])
    extras = model(Batch.of(torch.randn(2, 6), torch.randn(3, 5), image_cls=img_cls, text_cls=txt_cls))
    img, txt = extras.pop("img"), extras.pop("txt")
    assert set(extras) == {"img_center", "txt_center"}  # no classifier asked for
    torch.testing.assert_close(extras["txt_center"][1], model.centers.weight[0])  # one center per class, both sides
    img, txt = img.detach(), txt.detach()
    out = center_loss(img, extras["img_center"].detach(), txt, extras["txt_center"].detach())
    centers = model.centers.weight.detach()
    want_img = sum(0.5 * float(((img[i] - centers[c]) ** 2).sum()) for i, c in enumerate(img_cls)) / 2
    want_txt = sum(0.5 * float(((txt[i] - centers[c]) ** 2).sum()) for i, c in enumerate(txt_cls)) / 3
    assert float(out["center_img"]) == pytest.approx(want_img, rel=1e-5)
    assert float(out["center_txt"]) == pytest.approx(want_txt, rel=1e-5)

    full = load_config(None, ["model.hidden_dim=8", "model.embed_dim=4", "loss.center_weight=0.5"])
    assert full.loss.heads == ("center",)
    save_checkpoint(tmp_path, model=model, cfg=full, train_state=TrainState(), dims=(6, 5))
    loaded, _ = load_model(tmp_path)
    assert loaded.centers is not None and loaded.classifier is None
