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
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import Tensor, nn

from itmatch.data.batch import Batch, Inputs
from itmatch.losses.gather import LOCAL, Gather


def _rows(x: Inputs, start: int, stop: int) -> Inputs:
    return {k: v[start:stop] for k, v in x.items()} if isinstance(x, dict) else x[start:stop]


def _length(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _features_without_graph(tower: nn.Module, inputs: Inputs, chunk: int,
                            autocast: Callable[[], AbstractContextManager]) -> tuple[Tensor, list]:
    """Step 1: the tower's features, chunk by chunk, and the RNG state before each chunk."""
    states, parts = [], []
    with torch.no_grad():
        for start in range(0, _length(inputs), chunk):
            states.append(_rng_state())
            with autocast():
                parts.append(tower(_rows(inputs, start, start + chunk)))
    return torch.cat(parts), states


def _tower_backward(tower: nn.Module, inputs: Inputs, chunk: int, states: list, grad: Tensor,
                    autocast: Callable[[], AbstractContextManager]) -> None:
    """Step 3: each chunk again with a graph (same RNG as step 1), backward with its feature grads."""
    for i, start in enumerate(range(0, _length(inputs), chunk)):
        _set_rng_state(states[i])
        with autocast():
            features = tower(_rows(inputs, start, start + chunk))
        features.backward(grad[start:start + chunk].to(features.dtype))


def cached_step(model: nn.Module, batch: Batch, objective, *, chunk: int, gather: Gather = LOCAL, epoch: int = 0,
                autocast: Callable[[], AbstractContextManager] = nullcontext) -> dict[str, Tensor]:
    """Forward and backward of `objective` on `batch` with the towers run `chunk` rows at a time;
    leaves the gradients in the (unwrapped) model's parameters and returns the objective's terms.
    `model` must not be wrapped by DDP (its gradients are averaged over workers afterwards)."""
    towers = [(model.image_tower, batch.images), (model.text_tower, batch.texts)]
    # A frozen tower (Stage I, or not trained at all) needs no step 3.
    trains = [not model.towers_frozen and any(p.requires_grad for p in t.parameters()) for t, _ in towers]
    cached = [_features_without_graph(t, x, chunk, autocast) for t, x in towers]
    features = [f.detach().float().requires_grad_(g) for (f, _), g in zip(cached, trains)]
    with autocast():
        outputs = model.from_features(*features, batch)
    out = objective(outputs, batch, gather=gather, epoch=epoch)
    out["loss"].backward()
    after = _rng_state()  # step 3 replays the towers' draws; what follows continues from here
    for (tower, inputs), (_, states), f, g in zip(towers, cached, features, trains):
        if g:
            _tower_backward(tower, inputs, chunk, states, f.grad, autocast)
    _set_rng_state(after)
    return out


__all__ = ["cached_step"]
