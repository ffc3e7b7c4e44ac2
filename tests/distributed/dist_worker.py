"""One rank of the cross-worker parity tests (tests/distributed/test_dist_parity.py), a real process on gloo.

    python tests/distributed/dist_worker.py RANK WORLD_SIZE STORE_FILE CASES.pt OUT.pt [gloo|nccl] [bf16]

With nccl each rank uses cuda:RANK (a GPU test needs one GPU per rank); bf16 runs the model cases'
forward under bf16 autocast, as the trainer does with scaling.precision=bf16.

Each case holds the global batch and each rank's row ranges; this rank computes the loss on its
rows with `DistGather` (and, for model cases, a DDP model with global BatchNorm) and saves the
loss terms and the gradients it ends up with.
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.distributed as dist

from itmatch.config import LossConfig, ModelConfig
from itmatch.data.batch import Batch, Boxes
from itmatch.accumulate import cached_step
from itmatch.dist import DistGather, average_gradients, globalize_batchnorm
from itmatch.losses import build_objective, infonce_loss, ranking_loss
from itmatch.models.two_branch import EmbeddingNet

LOSSES = {"ranking": ranking_loss, "infonce": infonce_loss}


DEVICE = torch.device("cpu")
BF16 = False


def _mine(t: torch.Tensor, bounds: list[int], rank: int) -> torch.Tensor:
    return t[bounds[rank]:bounds[rank + 1]].to(DEVICE)


def model_objective(case: dict, outputs: dict, batch: Batch, gather) -> dict:
    """The training objective (itmatch.losses.objective) the case names: the same on both sides."""
    return build_objective(LossConfig(**case["objective"]))(outputs, batch, gather=gather)


class ToyTower(torch.nn.Module):
    """A trainable stand-in for a CNN / text encoder (features -> features, optional dropout)."""

    trainable = True

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Tanh(), torch.nn.Dropout(dropout))
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def model_with_towers(dims: tuple[int, int], model: dict, n_classes: int = 0, heads=("instance",),
                      dropout: float = 0.0) -> EmbeddingNet:
    """The embedding network with trainable towers in front of its branches, seeded."""
    torch.manual_seed(0)
    net = EmbeddingNet(*dims, ModelConfig(**model), n_classes, heads)
    net.image_tower, net.text_tower = ToyTower(dims[0], dropout), ToyTower(dims[1], dropout)
    return net


def gradcache_case(case: dict, rank: int, gather: DistGather) -> dict:
    """Gradient caching on this rank's shard, mining over every rank's rows, gradients averaged
    over ranks by itmatch.dist (no DDP wrapper)."""
    net = globalize_batchnorm(model_with_towers((case["img"].shape[1], case["txt"].shape[1]), case["model"],
                                                case.get("n_classes", 0), case.get("heads", ("instance",))).to(DEVICE))
    img_gid, txt_gid = _mine(case["img_gid"], case["img_bounds"], rank), _mine(case["txt_gid"], case["txt_bounds"], rank)
    batch = Batch.of(_mine(case["img"], case["img_bounds"], rank), _mine(case["txt"], case["txt_bounds"], rank),
                     image_gid=img_gid, text_gid=txt_gid)
    out = cached_step(net, batch, build_objective(LossConfig(**case["objective"])), chunk=case["chunk"], gather=gather)
    average_gradients(list(net.parameters()))
    return {"terms": {k: v.detach().cpu() for k, v in out.items()},
            "grads": {n: p.grad.cpu().clone() for n, p in net.named_parameters()}}


def embedding_case(case: dict, rank: int, gather: DistGather) -> dict:
    img = _mine(case["img"], case["img_bounds"], rank).clone().requires_grad_(True)
    txt = _mine(case["txt"], case["txt_bounds"], rank).clone().requires_grad_(True)
    img_gid, txt_gid = _mine(case["img_gid"], case["img_bounds"], rank), _mine(case["txt_gid"], case["txt_bounds"], rank)
    with _counted(dist, "all_gather") as gathers:
        out = LOSSES[case["loss"]](img, img_gid, txt, txt_gid, gather=gather, **case["kwargs"])
    out["loss"].backward()
    zero_if_unused = lambda t: torch.zeros_like(t) if t.grad is None else t.grad  # noqa: E731 (a term may skip a side)
    return {"terms": {k: v.detach().cpu() for k, v in out.items()}, "all_gathers": gathers[0],
            "img_grad": zero_if_unused(img).cpu(), "txt_grad": zero_if_unused(txt).cpu()}


@contextlib.contextmanager
def _counted(module, name: str):
    """How many times `module.name` is called inside the block (yields a one-item list)."""
    real, calls = getattr(module, name), [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(module, name, counting)
    try:
        yield calls
    finally:
        setattr(module, name, real)


def model_case(case: dict, rank: int, gather: DistGather) -> dict:
    torch.manual_seed(0)
    net = EmbeddingNet(case["img"].shape[1], case["txt"].shape[1], ModelConfig(**case["model"]), case.get("n_classes", 0),
                       case.get("heads", ("instance",)))
    device_ids = [DEVICE.index] if DEVICE.type == "cuda" else None
    model = torch.nn.parallel.DistributedDataParallel(globalize_batchnorm(net).to(DEVICE), device_ids=device_ids)
    img_gid, txt_gid = _mine(case["img_gid"], case["img_bounds"], rank), _mine(case["txt_gid"], case["txt_bounds"], rank)
    batch = Batch.of(_mine(case["img"], case["img_bounds"], rank), _mine(case["txt"], case["txt_bounds"], rank),
                     image_gid=img_gid, text_gid=txt_gid)  # classes = group ids here
    if "boxes" in case:  # a region-phrase batch: this rank's rows' pictures and boxes
        b = case["boxes"]
        batch.boxes = Boxes(*(_mine(b[k], case[f"{side}_bounds"], rank) for k, side in (
            ("image_picture", "img"), ("image_box", "img"), ("text_picture", "txt"), ("text_box", "txt"))))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=BF16):
        outputs = model(batch)
    out = model_objective(case, outputs, batch, gather)
    out["loss"].backward()
    return {"terms": {k: v.detach().cpu() for k, v in out.items()},
            "grads": {n: p.grad.cpu().clone() for n, p in net.named_parameters()},
            "buffers": {n: b.cpu().clone() for n, b in net.named_buffers()}}


def batchnorm_layer(channels: int) -> torch.nn.BatchNorm1d:
    """A BatchNorm1d with distinct, deterministic affine parameters (the same on every rank)."""
    bn = torch.nn.BatchNorm1d(channels)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, channels))
    return bn


def batchnorm_case(case: dict, rank: int, gather: DistGather) -> dict:
    """Global BatchNorm alone on this rank's rows of [N, C] or [N, C, L] inputs (a text CNN's),
    loss = sum(out * coef): its outputs, input gradient, summed parameter gradients, buffers."""
    bn = globalize_batchnorm(torch.nn.Sequential(batchnorm_layer(case["x"].shape[1]))).to(DEVICE)
    x = _mine(case["x"], case["bounds"], rank).clone().requires_grad_(True)
    out = bn(x)
    (out * _mine(case["coef"], case["bounds"], rank)).sum().backward()
    for p in bn.parameters():  # each rank's loss is its rows' share: the global gradient is the sum
        dist.all_reduce(p.grad)
    return {"out": out.detach().cpu(), "x_grad": x.grad.cpu(),
            "grads": {n: p.grad.cpu().clone() for n, p in bn.named_parameters()},
            "buffers": {n: b.cpu().clone() for n, b in bn.named_buffers()}}


def main() -> None:
    global DEVICE, BF16
    rank, world, store, cases_path, out_path = int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:6]
    backend = sys.argv[6] if len(sys.argv) > 6 else "gloo"
    BF16 = len(sys.argv) > 7 and sys.argv[7] == "bf16"
    if backend == "nccl":
        DEVICE = torch.device("cuda", rank)
        torch.cuda.set_device(DEVICE)
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    gather = DistGather()
    results = {}
    for name, case in torch.load(cases_path, weights_only=False).items():
        run = (gradcache_case if "chunk" in case else model_case if "model" in case else
               batchnorm_case if "coef" in case else embedding_case)
        results[name] = run(case, rank, gather)
    torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
