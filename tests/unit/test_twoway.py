"""2-Way Net (002): the model's tied channels and tied dropout, its losses against references
written from their definitions (loops), the config keys that pick it, and a run through the
worker's Trainer outside Ray that retrieves clearly above chance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from itmatch.config import Config, ConfigError, LossConfig, ModelConfig, load_config, save_config
from itmatch.data.batch import Batch
from itmatch.losses import build_objective
from itmatch.losses.twoway import decorrelation, twoway_loss
from itmatch.models import MODELS, build_model
from itmatch.models.twoway import LEAK, TwoWayNet, tied_mask
from itmatch.optim import TOWERS_GROUP, param_groups
from itmatch.state import TrainState, load_checkpoint, load_model, save_checkpoint

TINY = ["model.name=twoway", "model.hidden_dim=12", "model.embed_dim=6"]


def _batch(seed: int = 0, unpaired: bool = False) -> Batch:
    """4 images (6-d) and 9 captions (5-d) of them; `unpaired` adds a caption of an absent image."""
    g = torch.Generator().manual_seed(seed)
    text_gid = [3, 3, 8, 8, 5, 5, 9, 9, 9] + ([42] if unpaired else [])
    return Batch.of(torch.randn(4, 6, generator=g), torch.randn(len(text_gid), 5, generator=g),
                    image_gid=torch.tensor([3, 8, 5, 9]), text_gid=torch.tensor(text_gid))


def _net(dropout: float = 0.0, seed: int = 0) -> TwoWayNet:
    torch.manual_seed(seed)
    model = build_model(6, 5, load_config(None, [*TINY, f"model.dropout={dropout}"]).model)
    with torch.no_grad():  # BN far from its identity initialisation, so the reference sees it used
        for bn in [*model.bn_img, *model.bn_txt]:
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(), bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2)
    return model


# --------------------------------------------------------------------------- the model


def _bn_eval(bn, h):
    return (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _leaky(h):
    return torch.where(h > 0, h, LEAK * h)


def test_channels_are_the_tied_formulas():
    """Eval mode against the channels written out: X→Y uses W_0..W_3, Y→X uses W_3ᵀ..W_0ᵀ."""
    model, batch = _net().eval(), _batch()
    w = [model.weight_0, model.weight_1, model.weight_2, model.weight_3]
    assert [tuple(t.shape) for t in w] == [(12, 6), (6, 12), (12, 6), (5, 12)]
    with torch.no_grad():
        out = model(batch)
        h, hs = batch.images, []
        for i in range(3):
            h = _leaky(_bn_eval(model.bn_img[i], h @ w[i].T))
            hs.append(h)
        y_hat = h @ w[3].T + model.bias_txt
        g, gs = batch.texts, {}
        for i in (2, 1, 0):
            g = _leaky(_bn_eval(model.bn_txt[i], g @ w[i + 1]))  # Wᵀ as a map: g @ (Wᵀ)ᵀ = g @ W
            gs[i] = g
        x_hat = g @ w[0] + model.bias_img
    image_of = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    torch.testing.assert_close(out["recon_txt"], y_hat[image_of])
    torch.testing.assert_close(out["recon_img"], x_hat)
    torch.testing.assert_close(out["target_img"], batch.images[image_of])
    torch.testing.assert_close(out["target_txt"], batch.texts)
    for i in range(3):
        torch.testing.assert_close(out[f"hidden_img_{i + 1}"], hs[i][image_of])
        torch.testing.assert_close(out[f"hidden_txt_{i + 1}"], gs[i])
    # the embedding: the middle layer, centred and L2-normalised (dot products are correlations)
    mid_img, mid_txt = hs[1], gs[1]
    torch.testing.assert_close(out["img"], F.normalize(mid_img - mid_img.mean(1, keepdim=True), dim=1))
    torch.testing.assert_close(out["txt"], F.normalize(mid_txt - mid_txt.mean(1, keepdim=True), dim=1))
    for i in range(4):
        for j in range(9):
            assert float(out["img"][i] @ out["txt"][j]) == pytest.approx(
                float(np.corrcoef(mid_img[i].numpy(), mid_txt[j].numpy())[0, 1]), abs=1e-5)
    torch.testing.assert_close(model.embed_images(batch.images), out["img"])
    torch.testing.assert_close(model.embed_texts(batch.texts), out["txt"])
    want_penalty = sum(float((1 / bn.weight.detach() ** 2).sum()) for bn in [*model.bn_img, *model.bn_txt])
    assert float(out["gamma_penalty"]) == pytest.approx(want_penalty, rel=1e-5)


def test_weights_are_one_tensor_per_mirrored_pair():
    """No weight matrix is duplicated: both channels' gradients land in the same tensors, and
    changing W_0 changes the image→text input layer and the text→image output layer alike."""
    model, batch = _net(), _batch()
    matrices = [(n, p) for n, p in model.named_parameters() if p.dim() == 2]
    assert [n for n, _ in matrices] == ["weight_0", "weight_1", "weight_2", "weight_3"]
    out = model(batch)
    grads = {}
    for name in ("recon_img", "recon_txt"):  # Y→X alone, X→Y alone
        grads[name] = torch.autograd.grad(out[name].square().sum(), [p for _, p in matrices], retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads[name]), name  # each channel reaches every W_i
    both = torch.autograd.grad((out["recon_img"].square().sum() + out["recon_txt"].square().sum()),
                               [p for _, p in matrices])
    for a, b, total in zip(grads["recon_img"], grads["recon_txt"], both):
        torch.testing.assert_close(a + b, total)  # one shared tensor accumulates both channels
    model.eval()
    before = model(batch)
    with torch.no_grad():
        model.weight_0.mul_(2.0)
    after = model(batch)
    assert not torch.allclose(before["hidden_img_1"], after["hidden_img_1"])  # X→Y's first layer
    assert not torch.allclose(before["recon_img"], after["recon_img"])  # Y→X's last layer
    torch.testing.assert_close(before["hidden_txt_1"], after["hidden_txt_1"])  # g_1 is before W_0ᵀ


def test_mirrored_layers_share_one_dropout_mask():
    p = 0.5
    model, batch = _net(dropout=p).train(), _batch(unpaired=True)
    torch.manual_seed(3)
    out = model(batch)
    for i in (1, 2, 3):
        h, g = out[f"hidden_img_{i}"], out[f"hidden_txt_{i}"]
        assert h.shape[0] == 9  # the caption of an absent image takes no part in the pairs
        dropped_h, dropped_g = h == 0, g == 0
        assert torch.equal(dropped_h, dropped_g), i  # same units dropped in h_i and g_i of a pair
        assert 0.2 < float(dropped_h.float().mean()) < 0.8
        # captions of one image carry that image's mask
        assert torch.equal(dropped_g[0], dropped_g[1]) and torch.equal(dropped_g[6], dropped_g[8])
    assert not torch.equal(out["hidden_img_1"][0] == 0, out["hidden_img_1"][2] == 0)  # images: their own
    mask = tied_mask(2000, 50, p, torch.zeros(()))
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / math.sqrt(1 - p)])  # scaled to keep the 2nd moment
    assert float(mask.square().mean()) == pytest.approx(1.0, abs=0.05)
    model.eval()
    assert not (model(batch)["hidden_img_1"] == 0).any()  # no dropout at evaluation


# --------------------------------------------------------------------------- the losses


def _decorr_by_loops(h: torch.Tensor) -> float:
    h = h.detach()
    n, d = h.shape
    c = [[sum(float(h[r, i]) * float(h[r, j]) for r in range(n)) / n for j in range(d)] for i in range(d)]
    frob = math.sqrt(sum(c[i][j] ** 2 for i in range(d) for j in range(d)))
    diag = math.sqrt(sum(c[i][i] ** 2 for i in range(d)))
    return frob - diag


def _sq_mean_by_loops(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    rows, dims = a.shape
    return sum(sum((float(a[r, k]) - float(b[r, k])) ** 2 for k in range(dims)) for r in range(rows)) / rows


def test_loss_equals_the_definition_by_loops():
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    recon_img, target_img, recon_txt, target_txt = r(7, 6), r(7, 6), r(7, 5), r(7, 5)
    hidden = [(r(7, 4), r(7, 4)), (r(7, 3), r(7, 3))]
    gamma = torch.tensor(3.7)
    weights = (0.9, 1.3, 0.25, 0.5, 0.05)
    got = twoway_loss(recon_img, target_img, recon_txt, target_txt, hidden, hidden[1][0], hidden[1][1], gamma,
                      weights=weights)
    want = {"recon_img": _sq_mean_by_loops(recon_img, target_img),
            "recon_txt": _sq_mean_by_loops(recon_txt, target_txt),
            "hidden": sum(_sq_mean_by_loops(a, b) for a, b in hidden),
            "decorr": _decorr_by_loops(hidden[1][0]) + _decorr_by_loops(hidden[1][1]), "gamma": 3.7}
    for key, value in want.items():
        assert float(got[key]) == pytest.approx(value, rel=1e-5), key
    total = sum(w * want[k] for w, k in zip(weights, ("recon_img", "recon_txt", "hidden", "decorr", "gamma")))
    assert float(got["loss"]) == pytest.approx(total, rel=1e-5)
    # a diagonal second-moment matrix has nothing to decorrelate
    assert float(decorrelation(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("all_hidden", [False, True])
def test_objective_term_is_the_weighted_loss_on_the_model_outputs(all_hidden):
    cfg = LossConfig(name="twoway", twoway_recon_img=0.7, twoway_recon_txt=1.1, twoway_hidden=0.3,
                     twoway_decorr=0.2, twoway_gamma=0.01, twoway_all_hidden=all_hidden)
    model, batch = _net(dropout=0.5).train(), _batch(2)
    out = model(batch)
    got = build_objective(cfg)(out, batch)
    layers = (1, 2, 3) if all_hidden else (2,)
    hidden = sum(_sq_mean_by_loops(out[f"hidden_img_{i}"], out[f"hidden_txt_{i}"]) for i in layers)
    want = (0.7 * _sq_mean_by_loops(out["recon_img"], out["target_img"])
            + 1.1 * _sq_mean_by_loops(out["recon_txt"], out["target_txt"]) + 0.3 * hidden
            + 0.2 * (_decorr_by_loops(out["hidden_img_2"]) + _decorr_by_loops(out["hidden_txt_2"]))
            + 0.01 * float(out["gamma_penalty"].detach()))
    assert float(got["loss"].detach()) == pytest.approx(want, rel=1e-5)
    got["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter used (DDP needs it)


class _TwoRanks:
    """Two workers simulated in one process: `cat` returns both ranks' (live) rows, so backward of
    the sum of both ranks' losses sums every rank's gradient into the owner's rows, as
    itmatch.dist.DistGather does; `sum` assumes equally sized shards."""

    world_size = 2

    def __init__(self, shards: dict[int, list[torch.Tensor]]) -> None:
        self.shards = shards

    def cat(self, t):
        return torch.cat(self.shards[id(t)])

    def sum(self, t):
        return t * 2


def test_two_workers_give_the_single_process_loss_and_gradient():
    g = torch.Generator().manual_seed(4)
    full = [torch.randn(8, d, generator=g, requires_grad=True) for d in (6, 6, 5, 5, 4, 4)]
    gamma = torch.tensor(2.0)
    one = twoway_loss(*full[:4], [(full[4], full[5])], full[4], full[5], gamma)
    want = torch.autograd.grad(one["loss"], full)
    halves = [[t[:4], t[4:]] for t in full]
    shards = {id(h[r]): h for h in halves[4:] for r in (0, 1)}
    ranks = [twoway_loss(*(h[r] for h in halves[:4]), [(halves[4][r], halves[5][r])], halves[4][r], halves[5][r],
                         gamma, gather=_TwoRanks(shards)) for r in (0, 1)]
    logged = float(sum(out["loss"].detach() for out in ranks)) / 2  # the mean over workers
    assert logged == pytest.approx(float(one["loss"].detach()), rel=1e-5)
    got = torch.autograd.grad(sum(out["loss"] for out in ranks), full)
    for a, b in zip(got, want):
        torch.testing.assert_close(a / 2, b)  # DDP averages the two workers' gradients


# --------------------------------------------------------------------------- config


def test_config_picks_the_loss_and_rejects_nonsense(tmp_path):
    assert load_config(None, ["model.name=twoway"]).loss.name == "twoway"  # picked automatically
    assert load_config(None, ["model.name=twoway", "loss.name=twoway"]).loss.name == "twoway"
    assert load_config(overrides={"model.name": "twoway", "loss.twoway_hidden": 1.0}).loss.name == "twoway"
    assert Config(model=ModelConfig(name="twoway")).loss.name == "twoway"
    preset = tmp_path / "twoway.yaml"
    preset.write_text("model:\n  name: twoway\nloss:\n  twoway_decorr: 0.1\n")
    cfg = load_config(preset)
    assert (cfg.loss.name, cfg.loss.twoway_decorr, cfg.flat()["loss.name"]) == ("twoway", 0.1, "twoway")
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert load_config(None, ["loss.name=ranking"]).model.name == "embedding"  # the others unchanged
    for bad, match in [(["model.name=twoway", "loss.name=ranking"], "2-Way Net"),
                       (["model.name=twoway", "loss.name=logistic"], "logistic"),
                       (["loss.name=twoway"], "2-Way Net"),
                       (["model.name=similarity", "loss.name=twoway"], "twoway"),
                       (["model.name=twoway", "loss.twoway_hidden=-1"], "twoway_hidden"),
                       (["model.name=twoway", "loss.twoway_gamma=abc"], "twoway_gamma"),
                       (["model.name=twoway", "loss.twoway_recon_img=0", "loss.twoway_recon_txt=0",
                         "loss.twoway_hidden=0"], "regularisers alone"),
                       (["model.name=twoway", "model.dropout=1.0"], "dropout"),
                       (["model.name=twoway", "loss.instance_weight=0.5"], "instance_weight"),
                       (["model.name=twoway", "loss.twoway_hiden=0.5"], "twoway_hidden"),
                       (["model.name=twoway", "model.name=nope"], "model.name")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)


def test_registry_param_groups_and_checkpoint_round_trip(tmp_path):
    cfg = load_config(None, TINY)
    assert MODELS["twoway"] is not None
    model = build_model(6, 5, cfg.model)
    groups = param_groups(model, cfg.optim)
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters())) == 18  # each tensor once
    model(_batch()).get("img").sum().backward()  # a few non-default values in BN running stats
    with torch.no_grad():
        model.weight_1.add_(0.1)
    save_checkpoint(tmp_path, model=model, cfg=cfg, train_state=TrainState(epoch=1), dims=(6, 5))
    payload, saved_cfg = load_checkpoint(tmp_path)
    assert (saved_cfg.model.name, saved_cfg.loss.name) == ("twoway", "twoway")
    assert set(payload["model"]) == set(model.state_dict())
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded, TwoWayNet) and not loaded.training
    batch = _batch(5)
    model.eval()
    torch.testing.assert_close(loaded.embed_images(batch.images), model.embed_images(batch.images))
    torch.testing.assert_close(loaded.embed_texts(batch.texts), model.embed_texts(batch.texts))
    # with an end-to-end text tower the tower's parameters get their own group
    e2e = build_model(6, 0, load_config(None, [*TINY, "model.text_tower=gru", "model.word_dim=8",
                                               "model.text_width=8"]).model)
    groups = param_groups(e2e, cfg.optim)
    assert [g.get("name") for g in groups] == [None, TOWERS_GROUP]
    tower = {id(p) for n, p in e2e.named_parameters() if n.startswith("text_tower.")}
    assert {id(p) for p in groups[1]["params"]} == tower
    assert not tower & {id(p) for p in groups[0]["params"]}


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from itmatch.data.store import prepare

    tmp = tmp_path_factory.mktemp("shapes")
    return prepare(f"synthetic:{tmp / 'shapes'}?n_images=200", cache_dir=tmp / "cache", image_encoder="pixels",
                   text_encoder="hashing", splits=["train", "val", "test"], progress=False)


BASE = ["data.source=x", "data.batch_size=24", "model.hidden_dim=64", "model.embed_dim=16", "optim.lr=1e-3",
        "model.name=twoway"]


def _trainer(store, *overrides: str):
    from trainers.dist import WorkerContext
    from trainers.loop import Trainer

    return Trainer(load_config(None, [*BASE, *overrides]), store, WorkerContext(0, 1, 0, torch.device("cpu")), None)


def _chance_rsum(n_images: int, per_image: int) -> float:
    """Expected rsum of random scores: t2i R@K = K/N; i2t R@K = P(one of the image's captions in
    the top K of all N·c captions)."""
    n_txt = n_images * per_image
    i2t = [1 - math.comb(n_txt - per_image, k) / math.comb(n_txt, k) for k in (1, 5, 10)]
    return 100 * (sum(i2t) + sum(k / n_images for k in (1, 5, 10)))


def test_trains_through_the_local_trainer_above_chance(store, tmp_path):
    trainer = _trainer(store, "train.epochs=5")
    trainer.fit(lambda metrics, save: None)
    history = trainer.state.history
    val = store.split("val")
    chance = _chance_rsum(len(val.image_ids), len(val) // len(val.image_ids))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"train_recon_img", "train_recon_txt", "train_hidden", "train_decorr", "train_gamma"} <= set(history[-1])
    assert trainer.state.best_metric > 1.6 * chance, (trainer.state.best_metric, chance)
    r1_chance = 100 / len(val.image_ids)
    assert history[-1]["val_i2t_r1"] > 2 * r1_chance and history[-1]["val_t2i_r1"] > 2 * r1_chance
    # the trained weights through a checkpoint: same embeddings, same metrics
    save_checkpoint(tmp_path, model=trainer.strategy.full_state_dict(trainer.model), cfg=trainer.cfg,
                    train_state=trainer.state, dims=store.dims)
    loaded, _ = load_model(tmp_path)
    from itmatch.eval.evaluate import evaluate_split

    got = evaluate_split(loaded, val)
    assert got["rsum"] == pytest.approx(history[-1]["val_rsum"])


def test_gradient_cached_step_is_the_one_pass_step(store):
    one, cached = _trainer(store, "train.epochs=1"), _trainer(store, "train.epochs=1", "train.grad_cache_chunk=5")
    for t in (one, cached):
        t.fit(lambda metrics, save: None)
    a, b = one.strategy.full_state_dict(one.model), cached.strategy.full_state_dict(cached.model)
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_end_to_end_text_tower_trains(store):
    """A word-level text tower (GRU) beside cached image features: the towers' plumbing is the
    other models', and the tower learns (its targets are detached, so not by shrinking)."""
    trainer = _trainer(store, "train.epochs=2", "model.text_tower=gru", "model.word_dim=16", "model.text_width=32")
    before = {n: p.detach().clone() for n, p in trainer.model.text_tower.named_parameters()}
    trainer.fit(lambda metrics, save: None)
    after = dict(trainer.model.text_tower.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(math.isfinite(h["train_loss"]) for h in trainer.state.history)
