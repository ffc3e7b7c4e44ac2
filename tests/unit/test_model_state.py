"""Model shapes and behaviour, LR schedules, and checkpoint round trips."""

import math
import re
import shutil

import pytest
import torch

from itmatch.config import load_config
from itmatch.data.batch import Batch
from itmatch.models import build_model
from itmatch.optim import build_optimizer, build_scheduler
from itmatch.state import TrainState, load_checkpoint, load_model, save_checkpoint


@pytest.mark.parametrize("branch", ["nonlinear", "linear"])
def test_branches_embed_on_the_unit_sphere(branch):
    cfg = load_config(overrides=[f"model.branch={branch}", "model.hidden_dim=16", "model.embed_dim=8"])
    model = build_model(12, 20, cfg.model).eval()
    out = model(Batch.of(torch.randn(5, 12), torch.randn(7, 20)))
    img, txt = out["img"], out["txt"]
    assert img.shape == (5, 8) and txt.shape == (7, 8)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(5))
    layers = [type(m).__name__ for m in model.image.net.modules()]
    if branch == "linear":
        assert "BatchNorm1d" not in layers and "ReLU" not in layers
    else:  # 001 §3.2: FC -> ReLU -> Dropout -> FC -> BN -> L2
        assert layers[1:] == ["Linear", "ReLU", "Dropout", "Linear", "BatchNorm1d"]
    assert isinstance(model.image.input_dropout, torch.nn.Identity)  # model.input_dropout=0: none


def test_input_dropout_masks_the_features_in_training_only():
    """model.input_dropout: the branch sees dropout(x) while training (the same mask a plain
    nn.Dropout draws from the same RNG state), x itself in eval; the parameters and their names
    are those of the branch without it, so checkpoints load either way."""
    keys = ["model.hidden_dim=16", "model.embed_dim=8", "model.dropout=0"]
    plain = build_model(12, 20, load_config(overrides=keys).model)
    masked = build_model(12, 20, load_config(overrides=[*keys, "model.input_dropout=0.5"]).model)
    masked.load_state_dict(plain.state_dict())
    assert masked.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(6, 12)
    plain.eval(), masked.eval()
    torch.testing.assert_close(masked.image(x), plain.image(x))
    plain.train(), masked.train()
    torch.manual_seed(3)
    got = masked.image(x)
    torch.manual_seed(3)
    reference = plain.image(torch.nn.functional.dropout(x, 0.5, training=True))
    torch.testing.assert_close(got, reference)
    assert not torch.allclose(got, plain.image(x))  # the mask changed something


def _lrs(overrides, steps_per_epoch=10, epochs=4):
    cfg = load_config(overrides=["optim.lr=1.0", *overrides])
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optim)
    sched = build_scheduler(opt, cfg.optim, steps_per_epoch, epochs)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_match_their_formulas():
    assert _lrs(["optim.scheduler=constant"]) == [1.0] * 40
    step = _lrs(["optim.scheduler=step", "optim.step_epochs=2", "optim.gamma=0.5"])
    assert step[19] == 1.0 and step[20] == 0.5
    cosine = _lrs(["optim.scheduler=cosine", "optim.warmup_epochs=1"])
    assert cosine[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert cosine[10 + 15] == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))


def test_checkpoint_round_trip_restores_everything(tmp_path):
    cfg = load_config(overrides=["model.hidden_dim=16", "model.embed_dim=8"])
    model = build_model(6, 4, cfg.model)
    opt = build_optimizer(model.parameters(), cfg.optim)
    sched = build_scheduler(opt, cfg.optim, 5, 3)
    loss = sum(t.sum() for t in model(Batch.of(torch.randn(4, 6), torch.randn(4, 4))).values())
    loss.backward()
    opt.step()
    sched.step()
    state = TrainState(epoch=2, step=9, best_metric=12.5, best_epoch=1, history=[{"val_rsum": 12.5}])
    save_checkpoint(tmp_path, model=model, cfg=cfg, train_state=state, dims=(6, 4), optimizer=opt,
                    scheduler=sched, sampler={"epoch": 2, "offset": 0, "seed": 0})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    payload, cfg2 = load_checkpoint(tmp_path)
    assert cfg2 == cfg and payload["train_state"] == state and payload["sampler"]["epoch"] == 2
    assert payload["optimizer"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    restored, _ = load_model(tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[key], value)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="state.pt"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------- safe, verifiable checkpoints


def _save_small(folder, epoch=1, **extra):
    cfg = load_config(overrides=["model.hidden_dim=8", "model.embed_dim=4"])
    model = build_model(6, 4, cfg.model)
    opt = build_optimizer(model.parameters(), load_config(overrides=["optim.name=sgd"]).optim)
    sched = build_scheduler(opt, cfg.optim, 5, 3)
    return save_checkpoint(folder, model=model, cfg=cfg, train_state=TrainState(epoch=epoch), dims=(6, 4),
                           optimizer=opt, scheduler=sched, sampler={"epoch": epoch, "offset": 0, "seed": 0},
                           extra=extra)


def test_state_loads_with_weights_only_and_numpy_values_become_plain(tmp_path):
    import numpy as np

    from itmatch.state import STATE_FILE

    _save_small(tmp_path, deepspeed={"tag": "ds", "zero_stage": np.int64(2)}, note=np.float32(0.5))
    payload = torch.load(tmp_path / STATE_FILE, weights_only=True)  # would raise on any pickled object
    assert payload["deepspeed"] == {"tag": "ds", "zero_stage": 2} and type(payload["deepspeed"]["zero_stage"]) is int
    assert payload["note"] == 0.5 and payload["optimizer"]["param_groups"][0]["momentum"] == 0.9


def test_state_that_needs_pickling_is_refused_at_save_time(tmp_path):
    import numpy as np

    from itmatch.state import CheckpointError

    with pytest.raises(CheckpointError, match=r"state\.sampler\.rng is a Generator"):
        save_checkpoint(tmp_path, model={}, cfg=load_config(), train_state=TrainState(), dims=(1, 1),
                        sampler={"rng": np.random.default_rng(0)})
    assert not (tmp_path / "state.pt").exists()


def test_pickled_object_in_a_legacy_state_is_refused(tmp_path):
    from itmatch.state import CHECKSUM_FILE, STATE_FILE, CheckpointError

    _save_small(tmp_path)
    (tmp_path / CHECKSUM_FILE).unlink()  # as written before checksums existed
    torch.save({"train_state": TrainState()}, tmp_path / STATE_FILE)  # a dataclass: needs pickling
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE}: cannot load \(UnpicklingError"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_state_is_named_by_its_checksum(tmp_path, damage):
    from itmatch.state import STATE_FILE, CheckpointError

    _save_small(tmp_path)
    path = tmp_path / STATE_FILE
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data[: len(data) // 2] if damage == "truncate" else b"" if damage == "empty" else data))
    with pytest.raises(CheckpointError, match=rf"{path}: sha256 differs") as info:
        load_checkpoint(tmp_path)
    assert "\n" not in str(info.value)


def test_truncated_legacy_state_without_sidecar_is_named(tmp_path):
    from itmatch.state import CHECKSUM_FILE, STATE_FILE, CheckpointError

    _save_small(tmp_path)
    (tmp_path / CHECKSUM_FILE).unlink()
    path = tmp_path / STATE_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{path}: cannot load"):
        load_checkpoint(tmp_path)


def test_sidecar_is_written_last_and_matches(tmp_path):
    import json

    from itmatch.state import CHECKSUM_FILE, file_sha256

    _save_small(tmp_path)
    sums = json.loads((tmp_path / CHECKSUM_FILE).read_text())
    assert sums == {name: file_sha256(tmp_path / name) for name in ("state.pt", "config.yaml")}
    assert (tmp_path / CHECKSUM_FILE).stat().st_mtime_ns >= (tmp_path / "state.pt").stat().st_mtime_ns


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    from itmatch.state import STATE_FILE, CheckpointError, checkpoint_candidates, pick_resume_checkpoint

    for i in (2, 9, 10):
        _save_small(tmp_path / f"checkpoint_{i:02d}" if i < 10 else tmp_path / f"checkpoint_{i}", epoch=i)
    latest = tmp_path / "checkpoint_10"
    state = latest / STATE_FILE
    state.write_bytes(state.read_bytes()[:50])
    candidates = checkpoint_candidates(latest, tmp_path)
    assert [p.name for p in candidates] == ["checkpoint_10", "checkpoint_09", "checkpoint_02"]
    chosen, skipped = pick_resume_checkpoint(candidates)
    assert chosen == tmp_path / "checkpoint_09" and [p for p, _ in skipped] == [latest]
    assert str(state) in skipped[0][1] and load_checkpoint(chosen)[0]["train_state"].epoch == 9
    # a corrupt best/ inside a checkpoint makes it unusable too
    _save_small(tmp_path / "checkpoint_09" / "best")
    (tmp_path / "checkpoint_09" / "best" / STATE_FILE).write_bytes(b"")
    assert pick_resume_checkpoint(candidates)[0] == tmp_path / "checkpoint_02"
    (tmp_path / "checkpoint_02" / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint.*checkpoint_10.*checkpoint_09.*checkpoint_02"):
        pick_resume_checkpoint(candidates)


def _save_ranked(folder, epoch, world=2):
    """A checkpoint as DeepSpeed's ranks write it: each rank its own files under shards/ (in its
    own copy, then uploaded into the shared folder), with its sidecar; rank 0 the state too."""
    from itmatch.state import rank_sums_name, write_rank_sums

    for rank in range(world):
        own = folder.parent / f".rank{rank}-{folder.name}" / "shards"  # the rank's private copy
        (own / "state").mkdir(parents=True)
        (own / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank, epoch]) * 5000)
        if rank == 0:
            (own / "latest").write_text("state")
        write_rank_sums(own, rank)
        shutil.copytree(own, folder / "shards", dirs_exist_ok=True)  # the upload into the shared checkpoint
    cfg = load_config(overrides=["model.hidden_dim=8", "model.embed_dim=4"])
    save_checkpoint(folder, model=build_model(6, 4, cfg.model), cfg=cfg, train_state=TrainState(epoch=epoch),
                    dims=(6, 4), rank_sums=tuple(f"shards/{rank_sums_name(r)}" for r in range(world)))


@pytest.mark.parametrize("damage", ["truncate", "missing_file", "missing_sidecar"])
def test_a_ranks_file_cut_short_by_anothers_crash_is_found_and_the_resume_goes_back(tmp_path, damage):
    """Every rank uploads its own files (DeepSpeed's optimizer shards) into the shared checkpoint;
    a crash of one rank can cut another's upload short. The newest checkpoint then has an intact
    state.pt next to a truncated, or missing, shard of rank 1: it is refused naming that file, and
    the resume takes the checkpoint before it."""
    from itmatch.state import CheckpointError, checkpoint_candidates, pick_resume_checkpoint, verify_checkpoint

    for epoch in (1, 2):
        _save_ranked(tmp_path / f"checkpoint_{epoch:06d}", epoch)
    newest = tmp_path / "checkpoint_000002"
    verify_checkpoint(newest)
    shard = newest / "shards" / "state" / "zero_pp_rank_1_optim_states.pt"
    sidecar = newest / "shards" / "checksums.rank1.json"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        (shard if damage == "missing_file" else sidecar).unlink()
    named = sidecar if damage == "missing_sidecar" else shard
    with pytest.raises(CheckpointError, match=re.escape(str(named))):
        verify_checkpoint(newest)
    chosen, skipped = pick_resume_checkpoint(checkpoint_candidates(None, tmp_path))
    assert chosen == tmp_path / "checkpoint_000001" and [p for p, _ in skipped] == [newest]


def test_latest_checkpoint_outside_the_run_folder_comes_first(tmp_path):
    from itmatch.state import checkpoint_candidates

    assert checkpoint_candidates(tmp_path / "download") == [tmp_path / "download"]
    run = tmp_path / "run"
    for i in (1, 2):
        _save_small(run / f"checkpoint_{i:06d}", epoch=i)
    assert checkpoint_candidates(tmp_path / "download", run)[0] == tmp_path / "download"


def test_a_newer_intact_checkpoint_than_the_listed_one_wins(tmp_path):
    """Ray registers a report asynchronously: a worker killed right after reporting epoch 2 leaves
    Ray listing epoch 1 while checkpoint 2 is complete on disk; resuming from 2 loses nothing."""
    from itmatch.state import checkpoint_candidates, pick_resume_checkpoint

    for i in (1, 2):
        _save_small(tmp_path / f"checkpoint_2026-11-30_16-0{i}-00.000000", epoch=i)
    listed = tmp_path / "checkpoint_2026-11-30_16-01-00.000000"
    candidates = checkpoint_candidates(listed, tmp_path)
    assert [p.name[-12:-10] for p in candidates] == ["02", "01"]
    assert load_checkpoint(pick_resume_checkpoint(candidates)[0])[0]["train_state"].epoch == 2
    assert checkpoint_candidates(None, tmp_path) == candidates
    assert checkpoint_candidates(None, tmp_path / "missing") == []


def test_a_finished_runs_folder_is_read_as_its_best_model(tmp_path):
    """`trainers.evaluate --model runs/NAME` was refused as no checkpoint; trainers.ensemble takes it."""
    from trainers.results import resolve_model

    _save_small(tmp_path / "run" / "best_model")
    model, cfg = resolve_model(str(tmp_path / "run"))
    assert cfg.model.hidden_dim == 8 and tuple(model.dims) == (6, 4)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        resolve_model(str(tmp_path))


def test_evaluate_takes_a_split_as_users_write_it(tmp_path, capsys):
    """`--split dev` was refused (the data stores it as val), and a union such as train+dev too."""
    import json

    from tests.unit.test_readers import write_precomp
    from trainers import evaluate

    _save_small(tmp_path / "ckpt")
    text_encoder = load_checkpoint(tmp_path / "ckpt")[1].data.text_encoder
    write_precomp(tmp_path / "p", {"train": 4, "dev": 3, "test": 2}, dim=6, cap_dim=4, feature_name=text_encoder)
    common = ["--model", str(tmp_path / "ckpt"), "--data", f"precomp:{tmp_path / 'p'}", "--cache-dir",
              str(tmp_path / "cache")]
    counts = {}
    for split in ("dev", "Validation", "train+dev", "val"):
        assert evaluate.main([*common, "--split", split, "--json", str(tmp_path / f"{split}.json")]) == 0, \
            capsys.readouterr().err
        counts[split] = json.loads((tmp_path / f"{split}.json").read_text())
    assert counts["dev"] == counts["Validation"] == counts["val"] != counts["train+dev"]


def test_evaluate_refuses_data_of_the_other_task(tmp_path, capsys):
    """A phrase localization model scored on image-caption data (or the reverse) gave the other
    task's metrics without a word."""
    from trainers import evaluate

    _save_small(tmp_path / "ckpt")
    assert evaluate.main(["--model", str(tmp_path / "ckpt"), "--data", f"shapes-phrases:{tmp_path / 'sp'}",
                          "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "phrases data, but" in err and "is a retrieval model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sp").exists()  # refused before the data was written or read
