"""Optimizers and per-step learning-rate schedules by name (epochs are converted to steps once)."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from itmatch.config import OptimConfig

OPTIMIZERS: dict[str, Callable[[Iterable, OptimConfig], torch.optim.Optimizer]] = {
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
}


def build_optimizer(params: Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    """`params`: parameters, or the groups of `param_groups`."""
    return OPTIMIZERS[cfg.name](params, cfg)


TOWERS_GROUP = "towers"


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """The trainable parameters in model order, split into the pretrained towers (learning rate
    optim.lr x optim.tower_lr_factor, group name "towers") and the rest (branches, heads). Frozen
    parameters (requires_grad false) are left out. Without towers: one group, as before."""
    towers, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (towers if name.split(".")[0] in ("image_tower", "text_tower") else rest).append(p)
    groups = [{"params": rest}]
    if towers:
        groups.append({"params": towers, "lr": cfg.lr * cfg.tower_lr_factor, "name": TOWERS_GROUP})
    return groups


def _decay(cfg: OptimConfig, steps_per_epoch: int, total: int) -> Callable[[int], float]:
    if cfg.scheduler == "constant":
        return lambda step: 1.0
    if cfg.scheduler == "step":
        every = cfg.step_epochs * steps_per_epoch
        return lambda step: cfg.gamma ** (step // every)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


SCHEDULERS = ("constant", "cosine", "step")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int,
                    towers_frozen_epochs: int = 0) -> LambdaLR:
    """Linear warm-up for `warmup_epochs`, then the named decay; stepped once per optimizer step.
    The towers' group learns nothing for its first `towers_frozen_epochs` (004's Stage I): a
    factor of the step, so a run resumed across the boundary picks it up where it was."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    total = max(steps_per_epoch * epochs - warmup, 1)
    decay = _decay(cfg, steps_per_epoch, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(step - warmup)

    frozen_steps = towers_frozen_epochs * steps_per_epoch
    frozen = lambda step: 0.0 if step < frozen_steps else factor(step)  # noqa: E731
    return LambdaLR(optimizer, [frozen if g.get("name") == TOWERS_GROUP else factor for g in optimizer.param_groups])


def retarget(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg: OptimConfig) -> None:
    """After loading a checkpoint trained with other hyperparameters (PBT's exploit, `run.start_from`):
    this config's learning rate (per group, as `param_groups` sets it) and weight decay, keeping the
    optimizer's moments and the schedule's position. Loading an optimizer's state restores the old
    values, which would silently undo the new config's."""
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        lr = cfg.lr * (cfg.tower_lr_factor if group.get("name") == TOWERS_GROUP else 1.0)
        group["initial_lr"] = lr
        group["weight_decay"] = cfg.weight_decay
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
