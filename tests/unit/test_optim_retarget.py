"""run.start_from / PBT: a checkpoint's optimizer state is loaded under a config with another
learning rate and weight decay; the moments and schedule position stay, the new values apply."""

from __future__ import annotations

import pytest
import torch

from itmatch.config import load_config
from itmatch.optim import build_optimizer, build_scheduler, param_groups, retarget


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image_tower = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.image_tower(x))


def _setup(model, overrides):
    cfg = load_config(None, {"optim.scheduler": "cosine", "optim.warmup_epochs": 1, **overrides}).optim
    opt = build_optimizer(param_groups(model, cfg), cfg)
    return cfg, opt, build_scheduler(opt, cfg, steps_per_epoch=4, epochs=5)


def _steps(model, opt, sched, n):
    for i in range(n):
        opt.zero_grad()
        model(torch.full((2, 3), float(i + 1))).sum().backward()
        opt.step()
        sched.step()


def test_new_lr_and_decay_apply_from_the_same_schedule_position():
    torch.manual_seed(0)
    model = Net()
    _, opt_a, sched_a = _setup(model, {"optim.lr": 1e-2, "optim.weight_decay": 0.0, "optim.tower_lr_factor": 0.1})
    _steps(model, opt_a, sched_a, 6)
    cfg_b, opt_b, sched_b = _setup(model, {"optim.lr": 3e-3, "optim.weight_decay": 0.05,
                                          "optim.tower_lr_factor": 0.1})
    opt_b.load_state_dict(opt_a.state_dict())
    sched_b.load_state_dict(sched_a.state_dict())
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]  # what loading alone would keep
    retarget(opt_b, sched_b, cfg_b)
    # a reference: the same schedule built with B's values from the start, stepped 6 times
    ref_model = Net()
    _, opt_r, sched_r = _setup(ref_model, {"optim.lr": 3e-3, "optim.weight_decay": 0.05,
                                          "optim.tower_lr_factor": 0.1})
    _steps(ref_model, opt_r, sched_r, 6)
    for ours, ref, name in zip(opt_b.param_groups, opt_r.param_groups, ("branches", "towers")):
        assert ours["lr"] == ref["lr"] and ours["weight_decay"] == 0.05, name
    assert opt_b.param_groups[0]["lr"] != opt_a.param_groups[0]["lr"]
    assert opt_b.param_groups[1]["lr"] == pytest.approx(opt_b.param_groups[0]["lr"] * 0.1)
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    for key in state_a:  # Adam's moments and step count carried over untouched
        torch.testing.assert_close(state_b[key]["exp_avg"], state_a[key]["exp_avg"])
        assert float(state_b[key]["step"]) == 6
    _steps(model, opt_b, sched_b, 1)
    _steps(ref_model, opt_r, sched_r, 1)
    assert [g["lr"] for g in opt_b.param_groups] == [g["lr"] for g in opt_r.param_groups]
