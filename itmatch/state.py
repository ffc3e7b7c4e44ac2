"""Training state and checkpoint files.

A checkpoint folder holds `state.pt` (model, optimizer, scheduler, sampler and `TrainState`) and
`config.yaml` (the resolved config), then `checksums.json` (their sha256, written last), and where
every rank writes files of its own (DeepSpeed's shards), each rank's `checksums.rank<R>.json` beside
them, which `checksums.json` requires by name: ranks upload their files to the shared checkpoint
one by one, so a rank cut short by another's crash leaves a gap that is found, not loaded. Loading
uses `torch.load(weights_only=True)`: the state is tensors and plain Python values only, never
pickled objects, and a file whose checksum does not match is refused by name. A resume whose
latest checkpoint is damaged takes the newest intact one beside it (`pick_resume_checkpoint`).
Random streams are re-derived from (seed, rank, epoch) at the start of every epoch (see
`epoch_seed`), so a resume at an epoch boundary replays exactly without saving per-rank generator
states. Files are written to a temporary name and renamed, so a crash mid-write never leaves a
truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml

from itmatch.config import Config, read_saved_config
from itmatch.files import atomic_write, atomic_write_text

STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
CHECKSUM_FILE = "checksums.json"
CHECKPOINT_PREFIX = "checkpoint_"
RANK_SUMS = re.compile(r"checksums\.rank\d+\.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: missing, truncated, corrupt or holding pickled objects."""


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
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
    rank_sums: tuple[str, ...] = (),
) -> Path:
    """Write state.pt and config.yaml atomically. optimizer/scheduler: objects or their state dicts
    (None where a backend keeps them elsewhere, e.g. DeepSpeed shards); extra: backend notes;
    rank_sums: every rank's `write_rank_sums` file (relative), and any other checksum file inside it
    (the best weights' folder), which the checkpoint needs whole."""
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
    _atomic_save(plain_state(payload), folder / STATE_FILE)
    atomic_write_text(folder / CONFIG_FILE, yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    # Last, so a checkpoint with a sidecar has both files complete.
    sums: dict[str, Optional[str]] = {name: file_sha256(folder / name) for name in (STATE_FILE, CONFIG_FILE)}
    sums.update({name: None for name in rank_sums})  # None: a rank's own sidecar, checked file by file
    atomic_write_text(folder / CHECKSUM_FILE, json.dumps(sums, indent=2))
    return folder


def rank_sums_name(rank: int) -> str:
    return f"checksums.rank{rank}.json"


def write_rank_sums(folder: str | Path, rank: int) -> None:
    """The sha256 of the files under `folder` (a rank's own copy of the checkpoint's backend folder,
    e.g. its DeepSpeed shards), in `checksums.rank<R>.json` there. Where ranks share one folder,
    call it once they have all written (DeepSpeed's save ends with a barrier): then it lists theirs
    too, complete; the other sidecars and their temporaries (hidden) are left out."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not RANK_SUMS.fullmatch(p.name) and not p.name.startswith("."))
    sums = {str(p.relative_to(folder)): file_sha256(p) for p in files}
    atomic_write_text(folder / rank_sums_name(rank), json.dumps(sums, indent=2))


_PLAIN_LEAVES = (torch.Tensor, torch.dtype, torch.Size, torch.device, str, bytes, int, float, bool, type(None))


def plain_state(obj: Any, where: str = "state") -> Any:
    """`obj` with numpy values turned into Python/tensor ones, so `torch.load(weights_only=True)`
    reads it back; anything else that would need pickling is refused here, at save time, by name."""
    if isinstance(obj, _PLAIN_LEAVES):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, dict):
        return {k: plain_state(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise CheckpointError(f"checkpoint field {where} is a {type(obj).__name__}, which would need pickling; "
                          "store it as tensors and plain values")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(folder: str | Path) -> None:
    """Raise naming the file if a checkpoint's files are missing or differ from their checksums.
    A checkpoint written before the sidecar existed is checked by loading its state.pt."""
    folder = Path(folder)
    for name in (STATE_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint {folder}: missing {name}")
    sidecar = folder / CHECKSUM_FILE
    if not sidecar.is_file():  # written before checksums existed: loading it is the only check
        _load_state(folder / STATE_FILE)
        return
    for name, expected in _read_sums(sidecar).items():
        if expected is None:  # a rank's sidecar: it must be there, and so must every file it lists
            if not (folder / name).is_file():
                raise CheckpointError(f"{folder / name}: missing: a rank's files (or the best weights) did not all "
                                      "reach the checkpoint")
            for inner, sha in _read_sums(folder / name).items():
                _check_file((folder / name).parent / inner, sha, folder / name)
        else:
            _check_file(folder / name, expected, sidecar)


def _read_sums(sidecar: Path) -> dict[str, Optional[str]]:
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{sidecar}: unreadable checksum file ({exc})") from exc


def _check_file(path: Path, expected: str, sidecar: Path) -> None:
    if not path.is_file() or file_sha256(path) != expected:
        size = path.stat().st_size if path.is_file() else "missing"
        raise CheckpointError(f"{path}: sha256 differs from {sidecar.name} (size {size}): truncated or corrupt")


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for a bad file
        first = re.sub(r"\x1b\[[0-9;]*m", "", (str(exc).splitlines() or [""])[0])  # torch bolds its advice
        raise CheckpointError(f"{path}: cannot load ({type(exc).__name__}: {first})") from exc


def _peek_state(folder: str | Path, read: Callable[[dict], Any]) -> Any:
    """`read` of a checkpoint's state.pt, loaded without its tensors (mapped); None where it cannot
    be read or holds no such field (damaged or foreign: named when it is loaded)."""
    try:
        return read(torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - missing, truncated, foreign
        return None


def checkpoint_dims(folder: str | Path) -> Optional[tuple[int, int]]:
    """The feature widths a checkpoint's network takes; None where its state.pt cannot be read (what
    a resume then does with it is its own business)."""
    return _peek_state(folder, lambda payload: tuple(int(d) for d in payload["dims"]))


def load_checkpoint(folder: str | Path) -> tuple[dict, Config]:
    folder = Path(folder)
    state_path, config_path = folder / STATE_FILE, folder / CONFIG_FILE
    verify_checkpoint(folder)
    payload = _load_state(state_path)
    _check_payload(payload, state_path)
    cfg = _read_config(config_path)
    payload["train_state"] = TrainState(**payload["train_state"])
    return payload, cfg


def _check_payload(payload: Any, path: Path) -> None:
    """Refuse a state.pt that loads but is not a checkpoint (another program's tensors or dict,
    e.g. written by hand with matching checksums): its missing fields were a KeyError traceback."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not an itmatch checkpoint (holds a {type(payload).__name__}, not its fields)")
    for name, kind in (("model", dict), ("dims", (list, tuple)), ("train_state", dict)):
        if not isinstance(payload.get(name), kind):
            raise CheckpointError(f"{path}: not an itmatch checkpoint: field {name!r} is "
                                  f"{type(payload.get(name)).__name__ if name in payload else 'missing'}")
    dims = payload["dims"]
    if len(dims) != 2 or not all(isinstance(d, int) and d >= 0 for d in dims):  # 0: raw inputs, no features
        raise CheckpointError(f"{path}: field 'dims' = {dims!r}: expected two feature widths (image, text)")
    unknown = set(payload["train_state"]) - set(TrainState.__dataclass_fields__)
    if unknown:
        raise CheckpointError(f"{path}: field 'train_state' has unknown keys {sorted(unknown)}")


def _read_config(path: Path) -> Config:
    """The checkpoint's config.yaml: broken YAML was a traceback, and an empty mapping (`{}`) read
    as every default -- a network other than the one its state.pt holds, evaluated without a word."""
    try:
        return read_saved_config(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML's own first line names no place
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        first = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {first}{where})") from exc


def load_model(folder: str | Path) -> tuple[torch.nn.Module, Config]:
    """The model of a checkpoint (or of an ensemble folder: its members'), in eval mode, on CPU;
    an ensemble's config is its first member's."""
    from itmatch.models import build_model, heads_in
    from itmatch.models.ensemble import Ensemble, is_ensemble, saved_hubness, saved_weights

    if is_ensemble(folder):
        loaded = [load_model(member) for member in _members(Path(folder))]
        try:
            model = Ensemble([model for model, _ in loaded], saved_weights(folder), saved_hubness(folder))
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{Path(folder) / 'ensemble.json'}: {exc}") from exc
        return model.eval(), loaded[0][1]
    payload, cfg = load_checkpoint(folder)
    n_classes, heads = heads_in(payload["model"])  # training heads (instance classifier, centers), if any
    try:
        model = build_model(*payload["dims"], cfg.model, n_classes=n_classes, heads=heads)
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:  # weights of another network than config.yaml's
        raise CheckpointError(_misfit(Path(folder), cfg, exc)) from exc
    return model.eval(), cfg


def _misfit(folder: Path, cfg: Config, exc: Exception) -> str:
    """One line for weights that do not fit the network config.yaml describes: the keys that name
    the network, and torch's first concrete complaint (its first line is only a header)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith("Error(s) in loading")), type(exc).__name__)
    m = cfg.model
    return (f"{folder / STATE_FILE}: its weights do not fit the network {folder / CONFIG_FILE} describes "
            f"(model.name={m.name!r}, model.branch={m.branch!r}, model.hidden_dim={m.hidden_dim}, "
            f"model.embed_dim={m.embed_dim}): {detail[:300]}")


def _members(folder: Path) -> list[Path]:
    """An ensemble's member folders from its ensemble.json: a broken or hand-edited file (no
    `members`, a string for the list) was a traceback or a member folder named by one letter."""
    from itmatch.models.ensemble import ENSEMBLE_FILE, member_folders

    path = folder / ENSEMBLE_FILE
    try:
        record = json.loads(path.read_text())
        members = record.get("members") if isinstance(record, dict) else None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
        raise CheckpointError(f"{path}: field 'members' = {members!r}: expected a list of member folder names")
    return member_folders(folder)


def _checkpoint_order(folder: Path) -> tuple:
    """Ray names checkpoints by index or timestamp: compare digit runs as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", folder.name))


def checkpoint_candidates(latest: Optional[str | Path], run_folder: Optional[str | Path] = None) -> list[Path]:
    """Every checkpoint a run could resume from, newest first: the run folder's `checkpoint_*` folders
    and `latest`, the one Ray lists. Ray Train registers a reported checkpoint asynchronously, so a
    worker that dies right after reporting leaves a complete checkpoint newer than the one Ray lists:
    it ranks by its name like the others. A `latest` outside the run folder (a download) comes first."""
    run = Path(run_folder) if run_folder is not None and Path(run_folder).is_dir() else None
    found = [] if run is None else [p for p in run.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()]
    if latest is None:
        return sorted(found, key=_resume_order, reverse=True)
    latest = Path(latest)
    inside = run is not None and latest.parent.resolve() == run.resolve()
    others = [p for p in found if p.name != latest.name]
    if inside:
        return sorted([latest, *others], key=_resume_order, reverse=True)
    return [latest, *sorted(others, key=_resume_order, reverse=True)]


def _resume_order(folder: Path) -> tuple:
    """Newest = most epochs trained, then by name. Names alone mislead in a run folder that holds
    both kinds: Ray Train names checkpoints by timestamp (`checkpoint_2026-...`), one worker trained
    in process by epoch (`checkpoint_000003`), and scaling.worker_group may change on resume; by
    name, a worker group's epoch-2 checkpoint outranked the in-process epoch-3 one for good (prune
    keeps the numbered ones only), and every resume trained epoch 3 again."""
    return (_stored_epoch(folder), _checkpoint_order(folder))


def _stored_epoch(folder: Path) -> float:
    """Epochs completed by the checkpoint's TrainState. One whose state.pt cannot be read ranks first,
    as the newest did when it was cut short: the resume then names it as skipped
    (pick_resume_checkpoint) rather than passing it over unsaid."""
    epoch = _peek_state(folder, lambda payload: int(payload["train_state"]["epoch"]))
    return float("inf") if epoch is None else epoch


DAMAGED_DIR = "damaged"


def set_aside(damaged: list[Path], run_folder: Path) -> Path:
    """Move checkpoints that failed their checksums into `run_folder/damaged/<n>/` (renames, same
    file system) before a run starts over: left in place, the new run's checkpoints of the same
    epochs and its pruning would delete them, and the best weights travelling inside them, which
    may be intact. A later resume does not look there."""
    folder = Path(run_folder) / DAMAGED_DIR
    folder.mkdir(exist_ok=True)
    target = folder / str(sum(1 for _ in folder.iterdir()) + 1)
    target.mkdir()
    for path in damaged:
        path.rename(target / path.name)
    return target


def pick_resume_checkpoint(candidates: list[Path]) -> tuple[Path, list[tuple[Path, str]]]:
    """The first candidate (newest first) whose files pass their checksums, and the ones skipped
    with why. Raises CheckpointError naming every candidate when none is intact."""
    skipped: list[tuple[Path, str]] = []
    for folder in candidates:
        try:
            verify_checkpoint(folder)
            for inner in Path(folder).iterdir():  # e.g. the best weights travelling inside it
                if (inner / STATE_FILE).is_file():
                    verify_checkpoint(inner)
        except (CheckpointError, FileNotFoundError) as exc:
            skipped.append((Path(folder), str(exc)))
            continue
        return Path(folder), skipped
    raise CheckpointError("no intact checkpoint to resume from: " + "; ".join(r for _, r in skipped))
