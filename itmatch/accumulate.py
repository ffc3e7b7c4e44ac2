"""Mining over a global batch larger than memory: gradient caching on the towers (GradCache).

Top-K hard-negative mining needs every embedding of the global batch at once, so plain gradient
accumulation (K micro-batches, each mining only its own rows) changes the objective. Here the
towers, which hold nearly all the activation memory, run in chunks twice:

1. every chunk through its tower without a graph -> the batch's tower features (RNG state saved
   per chunk, so dropout / drop-connect are replayed exactly in step 3);
2. the branches, heads and objective on the whole batch of features (cross-worker gathers and
   global BatchNorm as usual), backward -> the branches' gradients and d loss / d features;
3. every chunk through its tower again, now with a graph, backward with its rows of d loss /
   d features -> the towers' gradients.

The gradients equal one pass over the whole batch (tested against it with 2 and 3 processes),
while the towers' activations never exceed one chunk. Exact when the towers' BatchNorm uses fixed
statistics (model.tower_batchnorm=frozen, the default): batch statistics would be per chunk.

`embed_rows` is step 1 over a whole table (Stage I's tower cache, trainers/loop.py).

`Passes` says how the passes with a graph run and backpropagate: by default directly on the
unwrapped model (the DDP strategy averages the gradients afterwards); a DeepSpeed engine routes
them through itself and reduces once per step (trainers.strategies).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from itmatch.data.batch import Batch, Inputs, move
from itmatch.losses.gather import LOCAL, Gather


def _rows(x: Inputs, start: int, stop: int) -> Inputs:
    return {k: v[start:stop] for k, v in x.items()} if isinstance(x, dict) else x[start:stop]


def _length(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _rng_state(device: torch.device) -> tuple:
    """The CPU generator's state and, on a GPU, that GPU's (its dropout draws from it). Only that
    one: every GPU's would put a CUDA context of this process on each GPU the node shows it."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None), device


def _set_rng_state(state: tuple) -> None:
    cpu, gpu, device = state
    torch.set_rng_state(cpu)
    if gpu is not None:
        torch.cuda.set_rng_state(gpu, device)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


class Passes:
    """How `cached_step` runs its passes and backpropagates. This default calls the modules and
    `Tensor.backward` directly, on a model no wrapper reduces (the DDP strategy averages the
    gradients over workers afterwards); trainers.strategies routes them through a DeepSpeed engine."""

    feature_dtype: torch.dtype = torch.float32
    """The cached tower features' dtype as the branches take them (autocast casts inside)."""

    def chunks(self, n: int) -> int:
        """How many chunks a tower runs when this worker's rows need `n`: more where every worker
        must run as many (ZeRO-3 gathers weights per chunk); the extra ones carry a zero gradient."""
        return n

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def backpropagates(self, loss: Tensor) -> bool:
        """False skips every backward pass of the step (a non-finite loss the caller will drop)."""
        return True

    def backward(self, out: Tensor, grad: Optional[Tensor] = None) -> None:
        out.backward(grad)

    def reduction(self) -> AbstractContextManager:
        """Around every backward pass of one step: its gradients are reduced over workers at most
        once, on exit (here: not at all, the caller averages them)."""
        return nullcontext()


DIRECT = Passes()


def _chunks(inputs: Inputs, chunk: int, count: int) -> list[tuple[int, int, bool]]:
    """(start, stop, real) for this worker's rows, then padding up to `count` chunks (the first
    rows again, whose outputs are dropped / get zero gradients)."""
    n = _length(inputs)
    real = [(start, min(start + chunk, n), True) for start in range(0, n, chunk)]
    return real + [(0, min(chunk, n), False)] * (count - len(real))


def _features_without_graph(tower: nn.Module, inputs: Inputs, chunks: list, passes: Passes,
                            autocast: Callable[[], AbstractContextManager]) -> tuple[Tensor, list]:
    """Step 1: the tower's features, chunk by chunk, and the RNG state before each chunk. Padding
    chunks leave the RNG where they found it, so padding changes no random draw of the step."""
    states, parts = [], []
    with torch.no_grad():
        for start, stop, real in chunks:
            states.append(_rng_state(_device(tower)))
            with autocast():
                features = passes.forward(tower, _rows(inputs, start, stop))
            if real:
                parts.append(features)
            else:
                _set_rng_state(states[-1])
    return torch.cat(parts), states


def _tower_backward(tower: nn.Module, inputs: Inputs, chunks: list, states: list, grad: Tensor, passes: Passes,
                    autocast: Callable[[], AbstractContextManager]) -> None:
    """Step 3: each chunk again with a graph (same RNG as step 1), backward with its feature grads."""
    for (start, stop, real), state in zip(chunks, states):
        _set_rng_state(state)
        with autocast():
            features = passes.forward(tower, _rows(inputs, start, stop))
        rows = grad[start:stop] if real else torch.zeros_like(grad[:stop - start])
        passes.backward(features, rows.to(features.dtype))


def cached_step(model: nn.Module, batch: Batch, objective, *, chunk: int, gather: Gather = LOCAL, epoch: int = 0,
                autocast: Callable[[], AbstractContextManager] = nullcontext,
                passes: Passes = DIRECT) -> dict[str, Tensor]:
    """Forward and backward of `objective` on `batch` with the towers run `chunk` rows at a time;
    leaves the gradients in the (unwrapped) model's parameters (`passes` may reduce them) and
    returns the objective's terms. `model` must not be wrapped by DDP."""
    towers = [(model.image_tower, batch.images), (model.text_tower, batch.texts)]
    if batch.tower_outputs:  # Stage I on the tower cache: step 1 is done, and the frozen towers need no step 3
        trains, plans, cached = [False, False], [], []
        features = [batch.images.to(passes.feature_dtype), batch.texts.to(passes.feature_dtype)]
    else:
        # A frozen tower (Stage I, or not trained at all) needs no step 3.
        trains = [not model.towers_frozen and any(p.requires_grad for p in t.parameters()) for t, _ in towers]
        plans = [_chunks(x, chunk, passes.chunks(-(-_length(x) // chunk))) for _, x in towers]
        cached = [_features_without_graph(t, x, plan, passes, autocast) for (t, x), plan in zip(towers, plans)]
        features = [f.detach().to(passes.feature_dtype).requires_grad_(g) for (f, _), g in zip(cached, trains)]
    with autocast():
        outputs = passes.forward(model.from_features, *features, batch)
    out = objective(outputs, batch, gather=gather, epoch=epoch)
    if not passes.backpropagates(out["loss"]):
        return out
    with passes.reduction():
        passes.backward(out["loss"])
        after = _rng_state(out["loss"].device)  # step 3 replays the towers' draws; what follows continues from here
        for (tower, inputs), plan, (_, states), f, g in zip(towers, plans, cached, features, trains):
            if g:
                _tower_backward(tower, inputs, plan, states, f.grad, passes, autocast)
        _set_rng_state(after)
    return out


def embed_rows(tower: nn.Module, inputs_of: Callable[[int, int], list[Inputs]], n: int, *, chunk: int,
               passes: Passes = DIRECT, autocast: Callable[[], AbstractContextManager] = nullcontext,
               device: torch.device | str = "cpu", dtype: Optional[torch.dtype] = None) -> list[Tensor]:
    """The tower's outputs for rows [0, n) without a graph, `chunk` rows at a time: one [n, D]
    table per view `inputs_of(start, stop)` returns (Stage I's tower cache). Inputs are prepared
    per chunk (a split's pixels need not fit in memory) and cast to `dtype` as training casts them.
    Every worker runs as many chunks as `passes` asks (ZeRO-3 gathers weights in every forward);
    the extra ones repeat the first rows and are dropped."""
    plan = [(start, min(start + chunk, n), True) for start in range(0, n, chunk)]
    plan += [(0, min(chunk, n), False)] * (passes.chunks(len(plan)) - len(plan))
    tables: list[list[Tensor]] = []
    with torch.no_grad():
        for start, stop, real in plan:
            views = [move(x, torch.device(device), dtype) for x in inputs_of(start, stop)]
            with autocast():
                outputs = [passes.forward(tower, x) for x in views]
            if real:
                tables = tables or [[] for _ in outputs]
                for table, out in zip(tables, outputs):
                    table.append(out.detach())
    return [torch.cat(parts) for parts in tables]


__all__ = ["DIRECT", "Passes", "cached_step", "embed_rows"]
