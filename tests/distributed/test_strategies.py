"""DDP and DeepSpeed (ZeRO 0-3, fp32/bf16) run the same Trainer to the same weights, and a
DeepSpeed checkpoint written by every rank resumes exactly (issue 3). Two real gloo processes,
no Ray: the Ray path is covered by tests/integration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from itmatch.data.store import prepare
from ranks import job_cfg, run_ranks

WORKER = Path(__file__).with_name("strategy_worker.py")
WORLD = 2
pytestmark = pytest.mark.timeout(600)


def _cfg(tmp: Path, *extra: str, **scaling) -> dict:
    return job_cfg(WORLD, *extra, **scaling)


INSTANCE = ("loss.instance_weight=1.0", "loss.instance_stage1_epochs=1", "loss.center_weight=0.5")


JOBS = {
    "ddp": dict(strategy="ddp"),
    "zero0": dict(strategy="deepspeed", zero_stage=0),
    "zero1": dict(strategy="deepspeed", zero_stage=1),
    "zero2": dict(strategy="deepspeed", zero_stage=2),
    "zero3": dict(strategy="deepspeed", zero_stage=3),
    "zero2-bf16": dict(strategy="deepspeed", zero_stage=2, precision="bf16"),
    "ddp-bf16": dict(strategy="ddp", precision="bf16"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strategies")
    store = prepare(f"synthetic:{tmp / 'shapes'}?n_images=60", cache_dir=tmp / "cache", image_encoder="pixels",
                    text_encoder="hashing", progress=False)
    jobs = [{"name": name, "cfg": _cfg(tmp, **scaling)} for name, scaling in JOBS.items()]
    similarity = ("model.name=similarity", "loss.name=logistic")
    jobs += [{"name": "ddp-similarity", "cfg": _cfg(tmp, *similarity, strategy="ddp")},
             {"name": "zero2-similarity", "cfg": _cfg(tmp, *similarity, strategy="deepspeed", zero_stage=2)}]
    jobs += [{"name": "ddp-instance", "cfg": _cfg(tmp, *INSTANCE, strategy="ddp")},
             {"name": "zero3-instance", "cfg": _cfg(tmp, *INSTANCE, strategy="deepspeed", zero_stage=3)}]
    for stage in (2, 3):  # crash after epoch 2, then the same job resumes from that checkpoint
        cfg = _cfg(tmp, strategy="deepspeed", zero_stage=stage)
        jobs += [{"name": f"zero{stage}-crash", "cfg": cfg, "fail_at": 2},
                 {"name": f"zero{stage}-resumed", "cfg": cfg, "resume_from": f"zero{stage}-crash/epoch2"}]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    logs = run_ranks(WORKER, WORLD, lambda r: [str(r), str(WORLD), str(tmp / "pg"), str(store.root),
                                               str(tmp / "jobs.json"), str(tmp / "out")],
                     timeout=500, env_extra={"DS_ACCELERATOR": "cpu"}, cwd=tmp)
    return tmp / "out", logs


def _final(out: Path, name: str) -> dict:
    return torch.load(out / name / "final.pt", weights_only=False)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_deepspeed_matches_ddp(runs, name):
    out, _ = runs
    ddp, ds = _final(out, "ddp"), _final(out, name)
    assert ddp["weights"].keys() == ds["weights"].keys()
    for key, value in ddp["weights"].items():
        torch.testing.assert_close(ds["weights"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    for a, b in zip(ddp["history"], ds["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_rsum"] == pytest.approx(a["val_rsum"], abs=1e-6)


def test_training_moves_the_weights(runs):
    """Guards the parity above: three epochs change the weights and lower the loss."""
    out, _ = runs
    first = torch.load(out / "ddp" / "epoch1" / "state.pt", weights_only=False)
    final = _final(out, "ddp")
    assert any(not torch.allclose(first["model"][k], v) for k, v in final["weights"].items() if v.is_floating_point())
    losses = [h["train_loss"] for h in final["history"]]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_is_exact(runs, stage):
    out, _ = runs
    straight, resumed = _final(out, f"zero{stage}"), _final(out, f"zero{stage}-resumed")
    for key, value in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=0, atol=0, msg=key)
    assert not (out / f"zero{stage}-crash" / "final.pt").exists()  # it really crashed
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]  # history carried over
    shards = sorted(p.name for p in (out / f"zero{stage}-crash" / "epoch2" / "deepspeed" / "state").iterdir())
    assert any(f"zero_pp_rank_{WORLD - 1}_" in s for s in shards)  # every rank wrote its shard


def test_zero3_checkpoint_consolidates(runs):
    from trainers.strategies import consolidate_zero_checkpoint

    out, _ = runs
    folder = out / "zero3" / "epoch3"
    saved = torch.load(folder / "state.pt", weights_only=False)["model"]
    rebuilt = consolidate_zero_checkpoint(folder)
    for key, value in rebuilt.items():
        torch.testing.assert_close(value.to(saved[key].dtype), saved[key], msg=key)
    assert rebuilt.keys() >= {k for k in saved if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("name", ["zero2-bf16", "ddp-bf16"])
def test_bf16_trains_close_to_fp32(runs, name):
    out, _ = runs
    bf16, fp32 = _final(out, name), _final(out, "ddp")
    losses = [h["train_loss"] for h in bf16["history"]]
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    ref = [h["train_loss"] for h in fp32["history"]]
    assert losses[-1] == pytest.approx(ref[-1], rel=0.1)


def test_shm_comm_op_not_built(runs):
    _, logs = runs
    built = [line for log in logs for line in log.splitlines() if "ShareMemComm" in line or "shm_comm" in line]
    assert not built, built


def test_instance_and_center_losses_two_stages_and_zero3(runs):
    """Stage I (epoch 1) trains the instance (+ center) loss alone; from epoch 2 the ranking loss
    joins. The shared classifier and centers train the same under DDP and ZeRO-3 (partitioned)."""
    out, _ = runs
    ddp, ds = _final(out, "ddp-instance"), _final(out, "zero3-instance")
    stage1, stage2 = ddp["history"][0], ddp["history"][1]
    heads = lambda h: h["train_visual"] + h["train_textual"] + 0.5 * (h["train_center_img"] + h["train_center_txt"])  # noqa: E731
    assert stage1["train_loss"] == pytest.approx(heads(stage1), rel=1e-5)
    ranking = stage2["train_i2t"] + 1.5 * stage2["train_t2i"]  # debug preset: lambda1, lambda2 = 1, 1.5
    assert stage2["train_loss"] == pytest.approx(ranking + heads(stage2), rel=1e-5)
    assert {"classifier.weight", "centers.weight"} <= set(ddp["weights"])
    for key, value in ddp["weights"].items():
        torch.testing.assert_close(ds["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_similarity_network_trains_the_same_under_ddp_and_deepspeed(runs):
    out, _ = runs
    ddp, ds = _final(out, "ddp-similarity"), _final(out, "zero2-similarity")
    losses = [h["train_logistic"] for h in ddp["history"]]
    assert losses[-1] < losses[0] < 0.75  # below log 2 = chance after the first epoch
    assert any(k.startswith("head.") for k in ddp["weights"])
    for key, value in ddp["weights"].items():
        torch.testing.assert_close(ds["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)
