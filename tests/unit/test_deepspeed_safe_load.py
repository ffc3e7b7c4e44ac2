"""DeepSpeed's shards load with weights_only=True: DeepSpeed's own classes pass, anything else is
refused by file name (a pickled object could run code when a checkpoint is loaded)."""

from __future__ import annotations

import argparse
import os
import pickle

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
deepspeed = pytest.importorskip("deepspeed")


def _engine():
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from trainers.strategies import _weights_only_engine

    return _weights_only_engine(TorchCheckpointEngine(None))


def test_deepspeed_classes_load_and_tensors_match(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    state = {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                      "fp32": torch.arange(6.0)}, "ds_version": "0.18"}
    torch.save(state, path)
    loaded = _engine().load(str(path), map_location="cpu")
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    assert isinstance(loaded["optimizer_state_dict"]["loss_scaler"], LossScaler)
    torch.testing.assert_close(loaded["optimizer_state_dict"]["fp32"], torch.arange(6.0))


def test_a_shard_with_other_pickled_objects_is_refused_by_name(tmp_path):
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"mp_rank_00_model_states\.pt: refused.*Namespace"):
        _engine().load(str(path))
