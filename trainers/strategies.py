"""How a model is wrapped, stepped, consolidated and checkpointed: the loop never branches on backend.

`scaling.strategy` picks one:
- `ddp`: PyTorch DistributedDataParallel (gloo on CPU, NCCL on GPU), optional bf16 autocast.
- `deepspeed`: a DeepSpeed engine with ZeRO stage `scaling.zero_stage` (0-3), fp32 or bf16
  (bf16 = bf16 weights and activations with fp32 master weights in the optimizer).

Both take the same optimizer and per-step schedule (itmatch.optim), so switching backend changes
nothing else in a config. With more than one worker, BatchNorm is replaced by its global-batch
version (itmatch.dist) so N workers optimise the single-process objective.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from itmatch.accumulate import DIRECT, Passes, cached_step
from itmatch.config import Config
from itmatch.dist import DistGather, any_worker, average_gradients, globalize_batchnorm
from itmatch.optim import param_groups
from trainers.dist import WorkerContext

MakeOptimizer = Callable[[list[dict]], torch.optim.Optimizer]
"""Builds the optimizer from parameter groups (itmatch.optim.param_groups of the prepared model)."""
MakeScheduler = Callable[[torch.optim.Optimizer], Any]
DS_DIR = "deepspeed"
DS_TAG = "state"


def _float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached fp32 CPU copy of the weights (what evaluation, `best/` and MLflow use)."""
    return {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
            if torch.is_tensor(v) else v  # a module's extra state (a word tower's vocabulary)
            for k, v in module.state_dict().items()}


class DDPStrategy:
    saves_on_every_rank = False
    """Only rank 0 writes a checkpoint: every rank holds the same full state."""

    def __init__(self, cfg: Config, ctx: WorkerContext) -> None:
        self.cfg, self.ctx = cfg, ctx
        # Gradient caching backpropagates several times per update: no DDP wrapper (its reducer
        # expects one backward per forward); `step` averages the gradients instead.
        self.manual_sync = bool(cfg.train.grad_cache_chunk)

    def _prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.ctx.device)
        if self.ctx.world_size > 1 and self.cfg.scaling.sync_batchnorm:
            globalize_batchnorm(model)
        return model

    def setup(self, model: nn.Module, make_optimizer: MakeOptimizer,
              make_scheduler: MakeScheduler) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        model = self._prepare(model)
        optimizer = make_optimizer(param_groups(model, self.cfg.optim))
        scheduler = make_scheduler(optimizer)
        if self.ctx.world_size > 1 and not self.manual_sync:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            # Towers frozen for a stage get no gradients then: DDP must not wait for them.
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                        find_unused_parameters=self.cfg.model.tower_frozen_epochs > 0)
        return model, optimizer, scheduler

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.cfg.scaling.precision == "bf16"
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=enabled)

    def input_dtype(self, model: nn.Module) -> torch.dtype:
        return torch.float32  # autocast casts inside the forward

    def backward_step(self, model: nn.Module, loss: torch.Tensor, optimizer, scheduler) -> torch.Tensor:
        """Backward, clip (if configured), step, zero; returns the pre-clip gradient norm.
        A non-finite norm skips the update (and the schedule) rather than corrupting the weights."""
        loss.backward()
        return self.step(model, optimizer, scheduler)

    def passes(self, model: nn.Module) -> Passes:
        """How a pass outside the model's own forward runs (gradient caching's chunks, Stage I's
        tower cache): here directly on the unwrapped modules."""
        return DIRECT

    def cached_step(self, model: nn.Module, batch, objective, *, chunk: int, gather, epoch: int) -> dict:
        """Forward and backward with gradient caching on the towers (itmatch.accumulate); the
        update is `step`'s."""
        return cached_step(self.unwrap(model), batch, objective, chunk=chunk, gather=gather, epoch=epoch,
                           autocast=self.autocast, passes=self.passes(model))

    def step(self, model: nn.Module, optimizer, scheduler) -> torch.Tensor:
        """The update from gradients already in the parameters (averaged over workers here when
        there is no DDP wrapper to do it)."""
        params = [p for p in self.unwrap(model).parameters() if p.requires_grad]
        if self.manual_sync:
            average_gradients(params)
        for p in params:  # a tower frozen for a stage: a zero gradient, as DeepSpeed gives it, so the
            if p.grad is None:  # optimizer's state (Adam's step count) is the same under both backends
                p.grad = torch.zeros_like(p)
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
        if torch.isfinite(norm):
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return _float_state(self.unwrap(model))

    def save_state(self, folder: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
        """What state.pt holds besides the weights (called on the ranks that save)."""
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}

    def load_state(self, folder: Path, payload: dict, model: nn.Module, optimizer, scheduler) -> None:
        self.unwrap(model).load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])


class DeepSpeedStrategy(DDPStrategy):
    """DeepSpeed ZeRO 0-3. Every rank writes its shards with `save_checkpoint` into the same
    `deepspeed/` folder of one Ray checkpoint (Ray merges the workers' folders); resume loads them
    back on every rank. ZeRO-3 weights are gathered for evaluation and the saved `model` weights."""

    saves_on_every_rank = True

    def __init__(self, cfg: Config, ctx: WorkerContext) -> None:
        super().__init__(cfg, ctx)
        # Must precede the first deepspeed import in this process.
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if ctx.device.type == "cuda" else "cpu")

    def ds_config(self) -> dict[str, Any]:
        s = self.cfg.scaling
        return {
            # Batches are built by our sampler (one micro-batch per worker per step); DeepSpeed
            # only needs consistent numbers here.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "train_batch_size": self.ctx.world_size,
            "gradient_clipping": self.cfg.optim.grad_clip or 0.0,
            "zero_optimization": {"stage": s.zero_stage},
            "bf16": {"enabled": s.precision == "bf16"},
            # Our optimizers come from itmatch.optim (torch Adam/AdamW/SGD), which ZeRO accepts
            # only with this flag; DeepSpeed's fused Adam would compile a C++ op on CPU.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }

    def setup(self, model: nn.Module, make_optimizer: MakeOptimizer,
              make_scheduler: MakeScheduler) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if self.ctx.device.type == "cpu":
            _skip_shm_comm_build()
        model = self._prepare(model)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, self.cfg.optim), optimizer=make_optimizer,
            lr_scheduler=make_scheduler,
            config=self.ds_config(), dist_init_required=False)
        engine.checkpoint_engine = _weights_only_engine(engine.checkpoint_engine)
        return engine, optimizer, scheduler

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # bf16 weights: inputs are cast instead (input_dtype)

    def input_dtype(self, model: nn.Module) -> torch.dtype:
        return torch.bfloat16 if self.cfg.scaling.precision == "bf16" else torch.float32

    def backward_step(self, model: nn.Module, loss: torch.Tensor, optimizer, scheduler) -> torch.Tensor:
        model.backward(loss)
        return self.step(model, optimizer, scheduler)

    def step(self, model: nn.Module, optimizer, scheduler) -> torch.Tensor:
        model.step()  # clips, steps the optimizer and the schedule, zeroes gradients
        norm = model.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def passes(self, model: nn.Module) -> Passes:
        """Through the engine (_EnginePasses), so ZeRO-3 gathers the weights of every pass."""
        return _EnginePasses(model, self.cfg.scaling.zero_stage, self.input_dtype(model), self.ctx)

    def cached_step(self, model: nn.Module, batch, objective, *, chunk: int, gather, epoch: int) -> dict:
        """Gradient caching through the engine (_EnginePasses): every pass with a graph goes through
        it, the backward passes accumulate locally and the step's gradients are reduced once."""
        return cached_step(self.unwrap(model), batch.cast_inputs(self.input_dtype(model)), objective, chunk=chunk,
                           gather=gather, epoch=epoch, autocast=self.autocast, passes=self.passes(model))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective under ZeRO-3 (every rank must call it): gathers the partitioned weights."""
        import deepspeed

        module = self.unwrap(model)
        gathered = (deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
                    if self.cfg.scaling.zero_stage == 3 else contextlib.nullcontext())
        with gathered:
            return _float_state(module)

    def save_state(self, folder: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
        model.save_checkpoint(str(folder / DS_DIR), tag=DS_TAG)
        # shards: every rank writes its own files there (trainers.loop.Trainer.save checksums them)
        return {"optimizer": None, "scheduler": None, "shards": DS_DIR,
                "deepspeed": {"tag": DS_TAG, "zero_stage": self.cfg.scaling.zero_stage}}

    def load_state(self, folder: Path, payload: dict, model: nn.Module, optimizer, scheduler) -> None:
        path, _ = model.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG)
        if path is None:
            raise FileNotFoundError(f"checkpoint {folder}: no DeepSpeed state under {DS_DIR}/{DS_TAG}")


class _EnginePasses(Passes):
    """Gradient caching's passes through a DeepSpeed engine, as gradient accumulation over micro-
    steps that all belong to one update:

    - every pass (the towers' chunks, the branches and heads on the cached features) is a forward
      of the engine (its module's `forward` is that pass for the call), so DeepSpeed's per-forward
      work runs as for any micro-batch: ZeRO-3's parameter gathering and backward hooks, the
      optimizer's backward bookkeeping;
    - every backward is `engine.backward` with `scale_wrt_gas=False` (the objective is already the
      global batch's; a tower chunk backpropagates sum(features * d loss / d features), whose
      gradient is exactly its rows of d loss / d features), inside one reduction window:
      `coalesce_grad_reduction` under ZeRO 1-3, `no_sync` then one `allreduce_gradients` under
      ZeRO-0. Gradients accumulate locally (whole, as under DDP) and are averaged over workers once,
      at the step's one accumulation boundary; `engine.step()` then clips and updates once.
      (Marking only the last backward as the boundary, without the window, is wrong under ZeRO-3:
      its reduced gradient partitions are copied on the first micro-step and added to afterwards,
      and the towers' parameters, first touched by a later micro-step, would add to the previous
      step's gradients.)
    - under ZeRO-3 every worker runs as many chunks per tower (the most any worker needs; extra
      chunks get a zero gradient), because each chunk's forward and backward gather the weights
      collectively."""

    def __init__(self, engine, zero_stage: int, dtype: torch.dtype, ctx: WorkerContext) -> None:
        self.engine, self.zero_stage, self.feature_dtype, self.ctx = engine, zero_stage, dtype, ctx

    def chunks(self, n: int) -> int:
        if self.zero_stage < 3 or self.ctx.world_size == 1:
            return n
        return max(DistGather().sizes(n, self.ctx.device))

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        module = self.engine.module
        # An instance attribute (a plain function: a Module would be registered as a submodule),
        # which nn.Module.__call__, with its hooks, runs in place of the class's forward.
        module.forward = lambda *a: fn(*a)
        try:
            return self.engine(*args)
        finally:
            del module.forward

    def backpropagates(self, loss: torch.Tensor) -> bool:
        # Gradients are reduced inside the step here, so a non-finite loss (dropped by the loop,
        # train.nonfinite=skip) must not reach them: no worker backpropagates it.
        return not any_worker(not bool(torch.isfinite(loss.detach())), self.ctx.device)

    def backward(self, out: torch.Tensor, grad: Optional[torch.Tensor] = None) -> None:
        loss = out if grad is None else (out.float() * grad.float()).sum()
        self.engine.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def reduction(self):
        if self.zero_stage > 0:
            with self.engine.coalesce_grad_reduction():
                yield
            return
        with self.engine.no_sync():
            yield
        self.engine.allreduce_gradients()


# The only non-tensor objects DeepSpeed's own shards pickle (ZeRO 0-3, fp32 and bf16, DeepSpeed 0.18):
# with these allowed, its shards load with torch.load(weights_only=True) like our state.pt.
DS_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum",
                   "deepspeed.utils.tensor_fragment.fragment_address")


def _safe_globals() -> list:
    import importlib

    found = []
    for dotted in DS_SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: the load names what it lacks
            pass
    return found


def _weights_only_engine(engine):
    """DeepSpeed's TorchCheckpointEngine loads shards with weights_only=False, which runs any pickled
    code in a checkpoint. Loading goes through weights_only=True with DeepSpeed's few classes allowed;
    a shard holding anything else is refused, naming the file and the object."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine) is not TorchCheckpointEngine:  # a user-chosen engine (e.g. Nebula): leave it
        return engine

    def load(path: str, map_location=None):
        try:
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as exc:
            culprit = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise pickle.UnpicklingError(
                f"{path}: refused to load a DeepSpeed shard holding {culprit.group(1) if culprit else 'an object'}"
                " (only tensors and DeepSpeed's own classes are loaded: a pickled object can run code)") from exc

    engine.load = load
    return engine


class ClosedFormStrategy(DDPStrategy):
    """Models fitted in one step (CCA): no optimizer and no gradient sync; every rank fits the same
    model on the same data (deterministic float64), so there is nothing to communicate."""

    def setup(self, model: nn.Module, make_optimizer: MakeOptimizer,
              make_scheduler: MakeScheduler) -> tuple[nn.Module, None, None]:
        return model.to(self.ctx.device), None, None

    def save_state(self, folder: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
        return {"optimizer": None, "scheduler": None}

    def load_state(self, folder: Path, payload: dict, model: nn.Module, optimizer, scheduler) -> None:
        self.unwrap(model).load_state_dict(payload["model"])


def _skip_shm_comm_build() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce op on first use (~33 s on 2 cores,
    STACK.md). Our collectives go through gloo, so the op is never needed: don't build it."""
    import importlib

    # importlib, not `import deepspeed.comm.torch as m`: deepspeed.comm has an attribute `torch`
    # (the torch package), which that statement would return instead of the submodule.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def consolidate_zero_checkpoint(folder: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a checkpoint's DeepSpeed shards (any ZeRO stage), without a process group."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(Path(folder) / DS_DIR), tag=DS_TAG)


STRATEGIES: dict[str, Callable[[Config, WorkerContext], DDPStrategy]] = {
    "ddp": DDPStrategy, "deepspeed": DeepSpeedStrategy}


def build_strategy(cfg: Config, ctx: WorkerContext, closed_form: bool = False) -> DDPStrategy:
    """The configured backend, or the closed-form one for models that are fitted, not trained."""
    return ClosedFormStrategy(cfg, ctx) if closed_form else STRATEGIES[cfg.scaling.strategy](cfg, ctx)
