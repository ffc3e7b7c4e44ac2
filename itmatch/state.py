"""Training state and checkpoint files.

A checkpoint folder holds `state.pt` (model, optimizer, scheduler, sampler and `TrainState`) and
`config.yaml` (the resolved config). Random streams are re-derived from (seed, rank, epoch) at the
start of every epoch (see `epoch_seed`), so a resume at an epoch boundary replays exactly without
saving per-rank generator states. Files are written to a temporary name and renamed, so a crash
mid-write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from itmatch.config import Config, validate

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"


@dataclass
class TrainState:
    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps taken."""
    samples_seen: int = 0
    best_metric: Optional[float] = None
    best_epoch: Optional[int] = None
    history: list[dict[str, float]] = field(default_factory=list)

    def improved(self, value: float) -> bool:
        return self.best_metric is None or value > self.best_metric


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """One seed per (run seed, rank, epoch): dropout differs across ranks and epochs, replays on resume."""
    return (seed * 1_000_003 + rank * 7919 + epoch) % (2**63 - 1)


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _state_dict(obj: Any) -> Optional[dict]:
    return obj if obj is None or isinstance(obj, dict) else obj.state_dict()


def save_checkpoint(
    folder: str | Path,
    *,
    model: torch.nn.Module | dict,
    cfg: Config,
    train_state: TrainState,
    dims: tuple[int, int],
    optimizer: Optional[torch.optim.Optimizer | dict] = None,
    scheduler: Optional[Any] = None,
    sampler: Optional[dict] = None,
    extra: Optional[dict] = None,
) -> Path:
    """Write state.pt and config.yaml atomically. optimizer/scheduler: objects or their state dicts
    (None where a backend keeps them elsewhere, e.g. DeepSpeed shards); extra: backend notes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model if isinstance(model, dict) else model.state_dict(),
        "dims": list(dims),
        "train_state": asdict(train_state),
        "optimizer": _state_dict(optimizer),
        "scheduler": _state_dict(scheduler),
        "sampler": sampler,
        **(extra or {}),
    }
    _atomic_save(payload, folder / STATE_FILE)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CONFIG_FILE}.")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(cfg.model_dump(), f, sort_keys=False)
    os.replace(tmp, folder / CONFIG_FILE)
    return folder


def load_checkpoint(folder: str | Path) -> tuple[dict, Config]:
    folder = Path(folder)
    state_path, config_path = folder / STATE_FILE, folder / CONFIG_FILE
    for path in (state_path, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {folder}: missing {path.name}")
    payload = torch.load(state_path, map_location="cpu", weights_only=False)
    cfg = validate(yaml.safe_load(config_path.read_text()), where=str(config_path))
    payload["train_state"] = TrainState(**payload["train_state"])
    return payload, cfg


def load_model(folder: str | Path) -> tuple[torch.nn.Module, Config]:
    """The model of a checkpoint, in eval mode, on CPU."""
    from itmatch.models import build_model, heads_in

    payload, cfg = load_checkpoint(folder)
    n_classes, heads = heads_in(payload["model"])  # training heads (instance classifier, centers), if any
    model = build_model(*payload["dims"], cfg.model, n_classes=n_classes, heads=heads)
    model.load_state_dict(payload["model"])
    return model.eval(), cfg
