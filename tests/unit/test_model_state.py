"""Model shapes and behaviour, LR schedules, and checkpoint round trips."""

import math

import pytest
import torch

from itmatch.config import load_config
from itmatch.data.batch import Batch
from itmatch.models import build_model
from itmatch.optim import build_optimizer, build_scheduler
from itmatch.state import TrainState, load_checkpoint, load_model, save_checkpoint


@pytest.mark.parametrize("branch", ["nonlinear", "linear"])
def test_branches_embed_on_the_unit_sphere(branch):
    cfg = load_config(overrides=[f"model.branch={branch}", "model.hidden_dim=16", "model.embed_dim=8"])
    model = build_model(12, 20, cfg.model).eval()
    out = model(Batch.of(torch.randn(5, 12), torch.randn(7, 20)))
    img, txt = out["img"], out["txt"]
    assert img.shape == (5, 8) and txt.shape == (7, 8)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(5))
    layers = [type(m).__name__ for m in model.image.modules()]
    if branch == "linear":
        assert "BatchNorm1d" not in layers and "ReLU" not in layers
    else:  # 001 §3.2: FC -> ReLU -> Dropout -> FC -> BN -> L2
        assert layers[2:] == ["Linear", "ReLU", "Dropout", "Linear", "BatchNorm1d"]


def _lrs(overrides, steps_per_epoch=10, epochs=4):
    cfg = load_config(overrides=["optim.lr=1.0", *overrides])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_their_formulas():
    assert _lrs(["optim.scheduler=constant"]) == [1.0] * 40
    step = _lrs(["optim.scheduler=step", "optim.step_epochs=2", "optim.gamma=0.5"])
    assert step[19] == 1.0 and step[20] == 0.5
    cosine = _lrs(["optim.scheduler=cosine", "optim.warmup_epochs=1"])
    assert cosine[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert cosine[10 + 15] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))


def test_checkpoint_round_trip_restores_everything(tmp_path):
    cfg = load_config(overrides=["model.hidden_dim=16", "model.embed_dim=8"])
    model = build_model(6, 4, cfg.model)
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 5, 3)
    loss = sum(t.sum() for t in model(Batch.of(torch.randn(4, 6), torch.randn(4, 4))).values())
    loss.backward()
    opt.step()
    sched.step()
    state = TrainState(epoch=2, step=9, best_metric=12.5, best_epoch=1, history=[{"val_rsum": 12.5}])
    save_checkpoint(tmp_path, model=model, cfg=cfg, train_state=state, dims=(6, 4), optimizer=opt,
                    scheduler=sched, sampler={"epoch": 2, "offset": 0, "seed": 0})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    payload, cfg2 = load_checkpoint(tmp_path)
    assert cfg2 == cfg and payload["train_state"] == state and payload["sampler"]["epoch"] == 2
    assert payload["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    restored, _ = load_model(tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="state.pt"):
        load_checkpoint(tmp_path)
