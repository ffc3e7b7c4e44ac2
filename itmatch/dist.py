"""Every torch.distributed call of the project: the cross-worker gather behind the batch losses and
the small reductions the trainer needs. Nothing here knows about Ray; it works under any launcher
that has initialised the default process group (gloo on CPU, NCCL on GPU).

Cross-worker mining (SPEC §3 "in the batch" = the global batch). Each worker keeps its own rows as
anchors and scores them against every worker's rows, so a worker holds [local, global] scores, never
[global, global]. `DistGather.cat` is differentiable: in backward every worker's gradient with
respect to the gathered rows is summed and each owner keeps its slice. With the loss scaled by
world_size (see losses/ranking.py), DDP's gradient average then equals the single-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from itmatch.losses.gather import LOCAL, Gather


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _padded(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))]).contiguous()


def _all_gather_rows(t: Tensor, sizes: list[int], group) -> Tensor:
    """Rows of every rank, concatenated in rank order; ranks may hold different numbers of rows
    (the sampler shards by image, so caption counts differ). Padded to the largest, then trimmed."""
    rows = max(sizes)
    parts = [t.new_empty((rows, *t.shape[1:])) for _ in sizes]
    torch_dist.all_gather(parts, _padded(t, rows), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherRows(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for a row and hands it to its owner."""

    @staticmethod
    def forward(ctx, t: Tensor, sizes: list[int], rank: int, group) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather_rows(t, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # all_reduce works on every backend (gloo has no reduce_scatter); the embeddings are small
        # next to the parameters DDP all-reduces anyway.
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None, None


class DistGather:
    """`Gather` over the default process group (or `group`). Every method is a collective: all
    ranks call them in the same order, which the loss functions do by construction."""

    def __init__(self, group=None) -> None:
        self.group = group
        self.world_size = torch_dist.get_world_size(group)
        self.rank = torch_dist.get_rank(group)

    def sizes(self, n_local: int, device: torch.device) -> list[int]:
        return self._exchange([n_local], device)[0]

    def layout(self, *n_local: int) -> tuple["DistGather", ...]:
        """Gathers for several row counts at once (a batch's images and captions), bound to every
        rank's counts from one exchange: each exchange is a collective and, on CUDA, a host sync,
        which a loss would otherwise pay for every tensor it gathers (six per Eq. 6 step)."""
        table = self._exchange(list(n_local), _collective_device())
        return tuple(_KnownRows(self.group, sizes) for sizes in table)

    def _exchange(self, n_local: list[int], device: torch.device) -> list[list[int]]:
        """[count][rank]: every rank's row counts (one all_gather, one host sync)."""
        parts = [torch.zeros(len(n_local), dtype=torch.int64, device=device) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, torch.tensor(n_local, dtype=torch.int64, device=device), group=self.group)
        by_rank = torch.stack(parts).tolist()
        return [list(col) for col in zip(*by_rank)]

    def cat(self, t: Tensor) -> Tensor:
        return _GatherRows.apply(t, self.sizes(t.shape[0], t.device), self.rank, self.group)

    def cat_nograd(self, t: Tensor) -> Tensor:
        with torch.no_grad():
            return _all_gather_rows(t.detach(), self.sizes(t.shape[0], t.device), self.group)

    def offset(self, n_local: int) -> int:
        device = _collective_device()
        return sum(self.sizes(n_local, device)[:self.rank])

    def sum(self, t: Tensor) -> Tensor:
        out = t.detach().clone()
        torch_dist.all_reduce(out, group=self.group)
        return out


class _KnownRows(DistGather):
    """A `DistGather` whose every rank's row count is already known (`DistGather.layout`)."""

    def __init__(self, group, sizes: list[int]) -> None:
        super().__init__(group)
        self.known = sizes

    def sizes(self, n_local: int, device: torch.device) -> list[int]:
        if n_local != self.known[self.rank]:  # gathering a tensor the layout was not made for: a bug
            raise ValueError(f"{n_local} local rows, but this gather's layout holds {self.known[self.rank]} "
                             f"on rank {self.rank}")
        return self.known


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of every rank's gradient (each rank's loss uses it)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        out = t.contiguous().clone()
        torch_dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad)
        return grad


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch, on any backend.

    torch's SyncBatchNorm refuses CPU modules under DDP; the branches end in BatchNorm (001 §3.2),
    so without this a worker would normalise with its shard's statistics and N workers would not
    optimise the single-process objective. Two differentiable all-reduces (mean, then the centred
    second moment) keep the variance as accurate as the single-process two-pass one. The state dict
    is BatchNorm1d's, so checkpoints load into the plain layer; outside training it is BatchNorm1d.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed() and torch_dist.get_world_size() > 1):
            return super().forward(x)
        # [N, C] (the branches) or [N, C, L] (a text CNN over word positions): statistics per channel
        # over the rows and positions of every rank
        dims, shape = [0, *range(2, x.dim())], (1, -1, *([1] * (x.dim() - 2)))
        xf = x.float()  # statistics in fp32 also when the weights are bf16 (DeepSpeed bf16)
        n = _AllReduceSum.apply(xf.new_tensor([float(x.numel() // max(x.shape[1], 1))]))
        mean = _AllReduceSum.apply(xf.sum(dim=dims)) / n
        var = _AllReduceSum.apply(((xf - mean.view(shape)) ** 2).sum(dim=dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), m)
        out = (xf - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.float().view(shape) + self.bias.float().view(shape)
        return out.to(x.dtype)


def globalize_batchnorm(model: nn.Module) -> nn.Module:
    """Swap every BatchNorm1d of `model` (in place) for GlobalBatchNorm1d, keeping its state."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm1d:
            held = next(iter([*child.parameters(), *child.buffers()]), None)  # weights or running stats
            new = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats, device=held.device if held is not None else None)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            globalize_batchnorm(child)
    return model


def _collective_device() -> torch.device:
    """NCCL only moves CUDA tensors; gloo only CPU ones."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_for(scope: str) -> Gather:
    """`loss.mining=global` mines over every worker's rows; `local` only over this worker's."""
    if scope == "global" and is_distributed() and torch_dist.get_world_size() > 1:
        return DistGather()
    return LOCAL


def mean_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalars over workers so every rank reports the same numbers."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    t /= torch_dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows of `t`, concatenated in rank order, on every rank (no gradient): what
    each worker computed of a table sharded by contiguous row ranges (Stage I's tower cache).
    Low-precision floats travel as fp32 (gloo has no bf16 all_gather on every version; the round
    trip is exact). Without a process group: `t` itself."""
    if not is_distributed() or torch_dist.get_world_size() == 1:
        return t
    wide = t.dtype in (torch.bfloat16, torch.float16)
    with torch.no_grad():
        src = t.detach().float() if wide else t.detach()
        out = _all_gather_rows(src, DistGather().sizes(t.shape[0], t.device), None)
    return out.to(t.dtype) if wide else out


def average_gradients(params: list[nn.Parameter]) -> None:
    """What DDP's reducer does, for steps that backpropagate more than once per update (gradient
    caching): average every gradient over workers, in flat buckets per dtype and device. A parameter
    without a gradient on this rank contributes zeros (it may have one on another)."""
    if not is_distributed() or torch_dist.get_world_size() == 1:
        return
    world = torch_dist.get_world_size()
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            groups.setdefault((p.dtype, p.device), []).append(p)
    for group in groups.values():
        for p in group:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        torch_dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in group:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()


def any_worker(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. a non-finite loss)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


__all__ = ["DistGather", "GlobalBatchNorm1d", "globalize_batchnorm", "gather_for", "gather_rows", "is_distributed",
           "mean_over_workers", "any_worker"]
