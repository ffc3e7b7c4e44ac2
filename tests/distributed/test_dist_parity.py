"""Cross-worker mining equals one process on the concatenated batch (issue 3).

Real processes on gloo (2 and 3 ranks, unequal row counts, every group's captions split across
ranks): each rank computes the loss on its rows with `DistGather`; the loss averaged over ranks
and each rank's gradients (divided by world size, as DDP's average does for parameters) must equal
the single-process loss on the concatenated batch, for every term of Eq. 6, every mining mode, and
InfoNCE. A DDP model with global BatchNorm must end with the single-process parameter gradients.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from itmatch.config import LossConfig, ModelConfig
from itmatch.data.batch import Batch, Boxes
from itmatch.losses import LOCAL, build_objective, infonce_loss, ranking_loss
from itmatch.models.two_branch import EmbeddingNet

from dist_worker import batchnorm_layer, model_objective, model_with_towers  # the same objective and model on both sides
from ranks import run_ranks
WORKER = Path(__file__).with_name("dist_worker.py")
LOSSES = {"ranking": ranking_loss, "infonce": infonce_loss}
TOL = dict(rtol=1e-4, atol=1e-6)


def _bounds(n: int, world: int, g: torch.Generator) -> list[int]:
    """Unequal contiguous shards, each at least one row."""
    cuts = sorted(torch.randperm(n - 1, generator=g)[:world - 1].add(1).tolist())
    return [0, *cuts, n]


def _batch(world: int, seed: int, dim: int = 8, unit: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    n_groups = 9
    # images: every group once plus a few repeats (regions of one phrase), so i2i has positives too
    img_gid = torch.cat([torch.arange(n_groups), torch.randint(n_groups, (4,), generator=g)])
    img_gid = img_gid[torch.randperm(len(img_gid), generator=g)]
    txt_gid = torch.repeat_interleave(torch.arange(n_groups), torch.randint(2, 5, (n_groups,), generator=g))
    txt_gid = txt_gid[torch.randperm(len(txt_gid), generator=g)]  # a group's captions land on several ranks
    img, txt = torch.randn(len(img_gid), dim, generator=g), torch.randn(len(txt_gid), dim, generator=g)
    if unit:
        img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    return {"img": img, "img_gid": img_gid, "txt": txt, "txt_gid": txt_gid,
            "img_bounds": _bounds(len(img_gid), world, g), "txt_bounds": _bounds(len(txt_gid), world, g)}


def _phrase_batch(world: int, seed: int, dim: int = 12) -> dict:
    """A region-phrase batch (001 Algorithm 1): 3 pictures of 2 chains each, every chain's ground
    truth, proposals jittered around them and random ones (unique negative groups), a few proposals
    again as their chain's augmented positives, 2-4 phrases per chain; rows shuffled so pictures
    straddle ranks. The objective narrows a phrase's negative regions by picture and IoU."""
    g = torch.Generator().manual_seed(seed)
    chain_picture = torch.arange(3).repeat_interleave(2)
    lo = torch.rand(6, 2, generator=g) * 30
    truth = torch.cat([lo, lo + 10 + torch.rand(6, 2, generator=g) * 10], dim=1)
    jitter = truth.repeat_interleave(3, dim=0) + torch.randn(18, 4, generator=g) * 4
    jitter = torch.cat([jitter[:, :2], torch.maximum(jitter[:, 2:], jitter[:, :2] + 1)], dim=1)
    rand_lo = torch.rand(6, 2, generator=g) * 40
    proposals = torch.cat([jitter, torch.cat([rand_lo, rand_lo + 5 + torch.rand(6, 2, generator=g) * 15], dim=1)])
    prop_picture = torch.cat([chain_picture.repeat_interleave(3), torch.arange(3).repeat(2)])
    again = torch.tensor([0, 4, 7, 12])  # jittered proposals also taken as their chain's positives
    img_gid = torch.cat([torch.arange(6), -1 - torch.arange(len(proposals)), again // 3])
    image_box = torch.cat([truth, proposals, jitter[again]])
    image_picture = torch.cat([chain_picture, prop_picture, chain_picture[again // 3]])
    txt_gid = torch.repeat_interleave(torch.arange(6), torch.randint(2, 5, (6,), generator=g))
    img_perm, txt_perm = torch.randperm(len(img_gid), generator=g), torch.randperm(len(txt_gid), generator=g)
    img_gid, image_box, image_picture, txt_gid = img_gid[img_perm], image_box[img_perm], image_picture[img_perm], \
        txt_gid[txt_perm]
    boxes = {"image_picture": image_picture, "image_box": image_box, "text_picture": chain_picture[txt_gid],
             "text_box": truth[txt_gid]}
    return {"img": torch.randn(len(img_gid), dim, generator=g), "img_gid": img_gid,
            "txt": torch.randn(len(txt_gid), dim, generator=g), "txt_gid": txt_gid, "boxes": boxes,
            "img_bounds": _bounds(len(img_gid), world, g), "txt_bounds": _bounds(len(txt_gid), world, g)}


def _cases(world: int) -> dict[str, dict]:
    cases = {}
    for t, lambdas in enumerate([(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]):
        for top_k in (1, 3, None):
            for metric in ("euclidean", "cosine"):
                name = f"ranking-term{t}-k{top_k}-{metric}"
                kwargs = dict(lambdas=lambdas, margin=0.4, top_k=top_k, metric=metric, reduction="mean")
                cases[name] = {"loss": "ranking", "kwargs": kwargs, **_batch(world, len(cases))}
    for reduction in ("sum", "mean"):
        kwargs = dict(lambdas=(1.0, 1.5, 0.2, 0.1), margin=0.3, top_k=2, reduction=reduction)
        cases[f"ranking-all-{reduction}"] = {"loss": "ranking", "kwargs": kwargs, **_batch(world, 100)}
        kwargs = dict(temperature=0.1, weights=(1.0, 0.5), reduction=reduction)
        cases[f"infonce-{reduction}"] = {"loss": "infonce", "kwargs": kwargs, **_batch(world, 200)}
    model = dict(hidden_dim=16, embed_dim=8, dropout=0.0)
    # Model cases run the training objective (LossConfig fields) on the model's named outputs.
    ranking = dict(lambda1=1.0, lambda2=1.5, lambda3=0.2, lambda4=0.2, margin=0.3, top_k=3)
    cases["model-ranking"] = {"model": model, **_batch(world, 300, dim=12, unit=False), "objective": ranking}
    cases["model-infonce"] = {"model": model, **_batch(world, 301, dim=12, unit=False),
                              "objective": dict(name="infonce", temperature=0.1)}
    cases["model-instance"] = {"model": model, "n_classes": 9,  # 9 groups in _batch
                               **_batch(world, 302, dim=12, unit=False),
                               "objective": dict(margin=0.3, top_k=3, instance_weight=1.0)}
    cases["model-center"] = {"model": model, "n_classes": 9, "heads": ("instance", "center"),
                             **_batch(world, 303, dim=12, unit=False),
                             "objective": dict(margin=0.3, top_k=3, instance_weight=1.0, center_weight=1.0)}
    cases["model-phrases"] = {"model": model, **_phrase_batch(world, 310),
                              "objective": dict(lambda1=1.0, lambda2=4.0, lambda3=0.1, lambda4=0.1, margin=0.3,
                                                top_k=3)}
    for chunk in (1, 3):  # gradient caching: towers in chunks, mining over the global batch
        cases[f"gradcache-chunk{chunk}"] = {"model": model, "n_classes": 9, "heads": ("instance", "center"),
                                            "chunk": chunk, **_batch(world, 304 + chunk, dim=12, unit=False),
                                            "objective": dict(margin=0.3, top_k=3, lambda3=0.2, instance_weight=1.0,
                                                              center_weight=0.5)}
    for shape in ((13, 6), (13, 6, 5)):  # a branch's [N, C]; a text CNN's [N, C, L]
        g = torch.Generator().manual_seed(len(shape))
        cases[f"batchnorm-{len(shape)}d"] = {"x": torch.randn(*shape, generator=g) * 3 + 1,
                                             "coef": torch.randn(*shape, generator=g),
                                             "bounds": _bounds(shape[0], world, g)}
    return cases


def _launch(world: int, tmp: Path, backend: str = "gloo", precision: str = "fp32"):
    cases = _cases(world)
    torch.save(cases, tmp / "cases.pt")
    run_ranks(WORKER, world, lambda r: [str(r), str(world), str(tmp / "store"), str(tmp / "cases.pt"),
                                        str(tmp / f"out{r}.pt"), backend, precision], timeout=240)
    return world, cases, [torch.load(tmp / f"out{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def distributed(request, tmp_path_factory):
    return _launch(request.param, tmp_path_factory.mktemp(f"dist{request.param}"))


def _case_names() -> list[str]:
    return list(_cases(2))


@pytest.mark.parametrize("name", [n for n in _case_names() if not n.startswith(("model", "gradcache", "batchnorm"))])
def test_loss_and_embedding_grads_equal_single_process(distributed, name):
    world, cases, outs = distributed
    case = cases[name]
    img = case["img"].clone().requires_grad_(True)
    txt = case["txt"].clone().requires_grad_(True)
    ref = LOSSES[case["loss"]](img, case["img_gid"], txt, case["txt_gid"], **case["kwargs"])
    ref["loss"].backward()
    assert float(ref["loss"].detach()) > 0  # the case exercises something
    for key, value in ref.items():
        mean_over_ranks = torch.stack([o[name]["terms"][key] for o in outs]).mean()
        torch.testing.assert_close(mean_over_ranks, value.detach(), **TOL, msg=f"{name} {key}")
    for side, t in (("img", img), ("txt", txt)):
        grad = torch.zeros_like(t) if t.grad is None else t.grad
        bounds = case[f"{side}_bounds"]
        got = torch.cat([o[name][f"{side}_grad"] for o in outs]) / world  # DDP averages over ranks
        torch.testing.assert_close(got, grad, **TOL, msg=f"{name} {side} grad")
        assert len(got) == bounds[-1]
    # the four gathers of rows (embeddings and group ids) and one exchange of both row counts before
    # them, not one per gather: each is a collective and, on CUDA, a host sync
    assert [o[name]["all_gathers"] for o in outs] == [5] * world


def _reference_model_loss(case: dict, bf16: bool = False):
    torch.manual_seed(0)
    net = EmbeddingNet(case["img"].shape[1], case["txt"].shape[1], ModelConfig(**case["model"]), case.get("n_classes", 0),
                       case.get("heads", ("instance",)))
    batch = Batch.of(case["img"], case["txt"], image_gid=case["img_gid"], text_gid=case["txt_gid"])
    if "boxes" in case:
        batch.boxes = Boxes(**case["boxes"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        outputs = net(batch)
    ref = model_objective(case, outputs, batch, LOCAL)
    ref["loss"].backward()
    return net, ref


@pytest.mark.parametrize("name", ["model-ranking", "model-infonce", "model-instance", "model-center",
                                  "model-phrases"])
def test_ddp_model_grads_and_batchnorm_equal_single_process(distributed, name):
    world, cases, outs = distributed
    case = cases[name]
    net, ref = _reference_model_loss(case)
    for o in outs:  # DDP leaves the averaged gradient on every rank
        for n, p in net.named_parameters():
            torch.testing.assert_close(o[name]["grads"][n], p.grad, **TOL, msg=f"{name} {n}")
        for n, b in net.named_buffers():
            torch.testing.assert_close(o[name]["buffers"][n], b, **TOL, msg=f"{name} buffer {n}")
    torch.testing.assert_close(torch.stack([o[name]["terms"]["loss"] for o in outs]).mean(), ref["loss"].detach(), **TOL)


@pytest.mark.parametrize("name", ["gradcache-chunk1", "gradcache-chunk3"])
def test_grad_cache_over_workers_equals_one_pass_over_the_global_batch(distributed, name):
    """Each rank runs its towers in chunks and mines over every rank's rows; after averaging, the
    gradients are those of one process taking the concatenated batch in one pass."""
    world, cases, outs = distributed
    case = cases[name]
    net = model_with_towers((case["img"].shape[1], case["txt"].shape[1]), case["model"], case["n_classes"],
                            case["heads"])
    batch = Batch.of(case["img"], case["txt"], image_gid=case["img_gid"], text_gid=case["txt_gid"])
    ref = build_objective(LossConfig(**case["objective"]))(net(batch), batch)
    ref["loss"].backward()
    assert any(n.startswith("image_tower") for n, p in net.named_parameters() if p.grad is not None)
    for o in outs:
        for n, p in net.named_parameters():
            torch.testing.assert_close(o[name]["grads"][n], p.grad, **TOL, msg=f"{name} {n}")
    torch.testing.assert_close(torch.stack([o[name]["terms"]["loss"] for o in outs]).mean(), ref["loss"].detach(), **TOL)


@pytest.mark.parametrize("name", ["batchnorm-2d", "batchnorm-3d"])
def test_global_batchnorm_equals_one_process_on_rows_and_positions(distributed, name):
    """GlobalBatchNorm1d on each rank's rows: outputs, input gradients, parameter gradients and
    running statistics of torch's BatchNorm1d on the whole batch, also for [N, C, L] inputs (its
    statistics per channel over rows and positions)."""
    world, cases, outs = distributed
    case = cases[name]
    bn = batchnorm_layer(case["x"].shape[1])
    x = case["x"].clone().requires_grad_(True)
    out = bn(x)
    (out * case["coef"]).sum().backward()
    torch.testing.assert_close(torch.cat([o[name]["out"] for o in outs]), out.detach(), **TOL)
    torch.testing.assert_close(torch.cat([o[name]["x_grad"] for o in outs]), x.grad, **TOL)
    for o in outs:
        for n, p in bn.named_parameters():
            torch.testing.assert_close(o[name]["grads"][f"0.{n}"], p.grad, **TOL, msg=f"{name} {n}")
        for n, b in bn.named_buffers():
            torch.testing.assert_close(o[name]["buffers"][f"0.{n}"], b, **TOL, msg=f"{name} buffer {n}")


def test_local_batchnorm_would_differ(distributed):
    """Guards the test above: with per-worker BatchNorm statistics the gradients do not match,
    so the global BatchNorm is what makes them equal."""
    world, cases, outs = distributed
    case = cases["model-ranking"]
    torch.manual_seed(0)
    net = EmbeddingNet(case["img"].shape[1], case["txt"].shape[1], ModelConfig(**case["model"]))
    b = case["img_bounds"]
    h = net.image.net[:-1](case["img"]).detach()  # the activations BatchNorm normalises
    norm = lambda x: (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)  # noqa: E731
    per_shard = torch.cat([norm(h[b[r]:b[r + 1]]) for r in range(world)])
    assert not torch.allclose(per_shard, norm(h), atol=1e-2)


def _check_bf16_run(world: int, cases: dict, outs: list) -> None:
    """Embedding cases exact to fp32 tolerance; the DDP model's gradients under bf16 autocast close
    to one process under bf16 autocast (on the CPU: bf16 rounding differs by device and order)."""
    for name in (n for n in cases if not n.startswith(("model", "gradcache", "batchnorm"))):
        case = cases[name]
        img, txt = case["img"].clone().requires_grad_(True), case["txt"].clone().requires_grad_(True)
        ref = LOSSES[case["loss"]](img, case["img_gid"], txt, case["txt_gid"], **case["kwargs"])
        ref["loss"].backward()
        got = torch.stack([o[name]["terms"]["loss"] for o in outs]).mean()
        torch.testing.assert_close(got, ref["loss"].detach(), rtol=1e-4, atol=1e-5, msg=name)
        want = torch.zeros_like(img) if img.grad is None else img.grad
        torch.testing.assert_close(torch.cat([o[name]["img_grad"] for o in outs]) / world, want, rtol=1e-3, atol=1e-5)
    for name in ("model-ranking", "model-infonce", "model-instance", "model-center"):
        net, _ = _reference_model_loss(cases[name], bf16=True)
        for o in outs:
            for n, p in net.named_parameters():
                torch.testing.assert_close(o[name]["grads"][n], p.grad, rtol=5e-2, atol=5e-3, msg=f"{name} {n}")


def test_gloo_bf16_parity(tmp_path):
    """The CPU twin of the NCCL + bf16 check below."""
    _check_bf16_run(*_launch(2, tmp_path, backend="gloo", precision="bf16"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL parity needs 2 GPUs (one per rank)")
def test_nccl_bf16_parity(tmp_path):
    _check_bf16_run(*_launch(2, tmp_path, backend="nccl", precision="bf16"))
