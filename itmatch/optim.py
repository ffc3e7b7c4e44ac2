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
    return OPTIMIZERS[cfg.name](params, cfg)


def _decay(cfg: OptimConfig, steps_per_epoch: int, total: int) -> Callable[[int], float]:
    if cfg.scheduler == "constant":
        return lambda step: 1.0
    if cfg.scheduler == "step":
        every = cfg.step_epochs * steps_per_epoch
        return lambda step: cfg.gamma ** (step // every)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


SCHEDULERS = ("constant", "cosine", "step")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """Linear warm-up for `warmup_epochs`, then the named decay; stepped once per optimizer step."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    total = max(steps_per_epoch * epochs - warmup, 1)
    decay = _decay(cfg, steps_per_epoch, total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(step - warmup)

    return LambdaLR(optimizer, factor)
