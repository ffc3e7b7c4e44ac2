"""How a model is wrapped, stepped and saved: the training loop never branches on the backend.

`ddp` is PyTorch DistributedDataParallel (gloo on CPU, NCCL on GPU) with optional bf16 autocast.
A DeepSpeed strategy plugs in here with the same methods.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from itmatch.config import Config
from itmatch.dist import globalize_batchnorm
from trainers.dist import WorkerContext


class DDPStrategy:
    def __init__(self, cfg: Config, ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.module: Optional[nn.Module] = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """Move to the worker's device and wrap in DDP when there is more than one worker."""
        self.module = model.to(self.ctx.device)
        if self.ctx.world_size == 1:
            return self.module
        if self.cfg.scaling.sync_batchnorm:
            globalize_batchnorm(self.module)
        device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.cfg.scaling.precision == "bf16"
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=enabled)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> torch.Tensor:
        """Clip (if configured), step, zero; returns the pre-clip gradient norm."""
        clip = self.cfg.optim.grad_clip
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
        if torch.isfinite(norm):
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm


STRATEGIES: dict[str, Callable[[Config, WorkerContext], DDPStrategy]] = {"ddp": DDPStrategy}


def build_strategy(cfg: Config, ctx: WorkerContext) -> DDPStrategy:
    return STRATEGIES[cfg.scaling.strategy](cfg, ctx)
