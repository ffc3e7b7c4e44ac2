"""A truncated latest checkpoint: the same command resumes from the intact one before it, says so
naming both, and finishes the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ray_cli import ROOT, run_module

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path):
    args = ["--config", str(ROOT / "configs" / "debug.yaml"),
            f"data.source=synthetic:{tmp_path / 'shapes'}?n_images=120", f"data.cache_dir={tmp_path / 'cache'}",
            f"run.storage_path={tmp_path / 'runs'}", "run.name=cut", "run.max_failures=0",
            "run.keep_checkpoints=3", "tracking.enabled=false", "train.epochs=3", "scaling.num_workers=2"]
    crashed = run_module("trainers.train", args, tmp_path, {"ITMATCH_FAIL_AT_EPOCH": "2"})
    assert crashed.returncode != 0
    run = tmp_path / "runs" / "cut"
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2, checkpoints
    state = checkpoints[-1] / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    resumed = run_module("trainers.train", args, tmp_path)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-5000:]
    assert f"checkpoint {checkpoints[-1]} is unusable" in output and f"resuming from {checkpoints[0]}" in output
    assert str(state) in output  # the damaged file is named
    latest = max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    payload = torch.load(latest / "state.pt", weights_only=True)
    assert payload["train_state"]["epoch"] == 3 and len(payload["train_state"]["history"]) == 3
