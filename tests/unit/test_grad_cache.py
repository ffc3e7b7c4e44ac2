"""Gradient caching on the towers (itmatch.accumulate) against one pass over the whole batch: the
same loss and the same gradients for every parameter, whatever the chunk size; dropout in the
towers is replayed exactly between the two passes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from itmatch.accumulate import cached_step
from itmatch.config import LossConfig
from itmatch.data.batch import Batch
from itmatch.losses import build_objective
from itmatch.models.two_branch import EmbeddingNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from dist_worker import model_with_towers as _with_towers  # noqa: E402  (the toy towers, one definition)


def model_with_towers(dims=(10, 7), dropout: float = 0.0, heads=("instance", "center"), n_classes=6) -> EmbeddingNet:
    return _with_towers(dims, dict(hidden_dim=16, embed_dim=8, dropout=0.0), n_classes, heads, dropout)


def toy_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    image_gid = torch.arange(6)
    text_gid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 4, 4, 5, 5])
    return Batch.of(torch.randn(6, 10, generator=g), torch.randn(13, 7, generator=g), image_gid=image_gid,
                    text_gid=text_gid)


OBJECTIVE = LossConfig(margin=0.3, top_k=2, lambda3=0.1, lambda4=0.1, instance_weight=0.5, center_weight=0.2)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [1, 3, 4, 100])
def test_chunked_gradients_equal_one_pass(chunk):
    batch, objective = toy_batch(), build_objective(OBJECTIVE)
    reference = model_with_towers()
    want = objective(reference(batch), batch)
    want["loss"].backward()
    model = model_with_towers()
    got = cached_step(model, batch, objective, chunk=chunk)
    torch.testing.assert_close(got["loss"], want["loss"].detach())
    expected = _grads(reference)
    assert set(_grads(model)) == set(expected) and any(n.startswith("image_tower") for n in expected)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_in_the_towers_is_replayed_between_the_passes():
    model, batch = model_with_towers(dropout=0.5), toy_batch(1)
    seen: list[torch.Tensor] = []
    model.image_tower.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    cached_step(model, batch, build_objective(OBJECTIVE), chunk=4)
    first, second = torch.cat(seen[:2]), torch.cat(seen[2:])  # 6 images in chunks of 4: two per pass
    assert (first == 0).any()  # dropout was active
    torch.testing.assert_close(second, first)


def test_frozen_towers_skip_the_second_pass():
    model, batch = model_with_towers(), toy_batch(2)
    model.freeze_towers(True)
    calls: list[int] = []
    model.text_tower.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    cached_step(model, batch, build_objective(OBJECTIVE), chunk=5)
    assert calls == [5, 5, 3]  # one pass only
    assert all(p.grad is None for p in model.text_tower.parameters())
    assert all(p.grad is not None for p in model.text.parameters())
