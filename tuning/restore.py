"""What a search was started with, and what re-running its command may change.

Re-running a search's command restores its Tune experiment (searcher and scheduler state, finished
trials). Tune restores the experiment as it was pickled: a new --space, --num-samples, searcher or
scheduler is silently ignored, while a new trial config reaches only the trials still to run, so the
table would compare trials trained two ways. A restore therefore needs the settings the search was
started with, apart from how it runs (concurrency, re-runs and ensembles after it, tracking).
"""

from __future__ import annotations

import json
import pickletools
from pathlib import Path
from typing import Any, Callable

import yaml

from itmatch.config import Config, ConfigError, read_saved_config, save_config
from itmatch.files import atomic_write_text, read_problem
from trainers.preflight import changed_keys

CONFIG_FILE = "search_config.yaml"
SPACE_FILE = "search_space.json"
# The search.* keys that make the Tune experiment (the rest run after it or only pace it).
EXPERIMENT_KEYS = ("search.num_samples", "search.algorithm", "search.scheduler", "search.grace_period",
                   "search.reduction_factor", "search.perturbation_interval", "search.seed", "search.trial_workers")


def save(cfg: Config, space: dict[str, dict], search_dir: Path) -> None:
    """Record the settings a search starts (or restores) with, for the next restore's check."""
    search_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, search_dir / CONFIG_FILE)
    atomic_write_text(search_dir / SPACE_FILE, json.dumps(space, indent=2, sort_keys=True))


def check(cfg: Config, space: dict[str, dict], search_dir: Path) -> None:
    """Raise ConfigError listing what differs from the settings the search in `search_dir` was started
    with. Nothing to compare (a new search, or one recorded before this check existed): no check."""
    config_path, space_path = search_dir / CONFIG_FILE, search_dir / SPACE_FILE
    if not config_path.is_file() and not space_path.is_file():
        return
    _refuse_half_recorded(config_path, space_path)
    saved = _read(config_path, read_saved_config)
    saved_space = _read(space_path, lambda path: json.loads(path.read_text()))
    diffs = differences(saved, saved_space, cfg, space)
    if diffs:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diffs)
        raise ConfigError(f"{search_dir} holds a search started with other settings, which re-running its command "
                          f"would restore, mixing both: {listed}. Re-run with the saved settings ({config_path.name}, "
                          f"{space_path.name} there), or start a new search with another --name")


def _refuse_half_recorded(*paths: Path) -> None:
    """Both settings files, or a ConfigError naming the one that is gone. `save` writes them together
    before the first trial, so one alone is damage (deleted, moved): skipping the check then let the
    restore run with any space or config, and `save` recorded the new one as if the search began so."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: missing, though the search saved it beside "
                          f"{next(p for p in paths if p not in missing).name}: the restore cannot check what the "
                          "search was started with; restore the file, or start a new search with another --name")


def _read(path: Path, read: Callable[[Path], Any]) -> Any:
    """`read(path)`, a file the search saved; a damaged one is a ConfigError naming it, in one line
    (YAML's own message spans several, quoting the text)."""
    try:
        return read(path)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        if isinstance(exc, ConfigError):
            raise  # names the file already
        raise ConfigError(f"{path}: cannot read the search's saved settings ({read_problem(exc)}); restore the file, "
                          f"or start a new search with another --name") from None


TUNE_DIR = "tune"
TUNER_FILE = "tuner.pkl"  # Tune's own names (ray.tune: _TUNER_PKL, TuneController.CKPT_FILE_TMPL)
STATE_GLOB = "experiment_state-*.json"


def check_tune_state(search_dir: Path) -> None:
    """Raise ConfigError naming the file where the Tune state a restore reads is damaged: a
    truncated tuner.pkl failed with an UnpicklingError traceback, and a garbled experiment state made
    Tune restart the experiment without its param space (a KeyError in every trial). Nothing is
    deleted: the user decides whether the search's results can go."""
    tune_dir = search_dir / TUNE_DIR
    _check_pickle(tune_dir / TUNER_FILE, search_dir)
    states = sorted(tune_dir.glob(STATE_GLOB))
    if states:  # Tune restores the newest, by name (a timestamp)
        _check_state(states[-1], search_dir)


def _check_pickle(path: Path, search_dir: Path) -> None:
    """Walks the pickle's opcodes to its STOP without running any of them (nothing is imported)."""
    try:
        for _ in pickletools.genops(path.read_bytes()):
            pass
    except (OSError, ValueError) as exc:
        raise _damaged(path, search_dir, read_problem(exc)) from None


def _check_state(path: Path, search_dir: Path) -> None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _damaged(path, search_dir, read_problem(exc)) from None
    missing = [k for k in ("runner_data", "trial_data") if not isinstance(state, dict) or k not in state]
    if missing:
        raise _damaged(path, search_dir, f"no {' or '.join(missing)}")


def _damaged(path: Path, search_dir: Path, why: str) -> ConfigError:
    return ConfigError(f"{path}: damaged Tune state ({why}), so the search cannot be resumed: start a new search "
                       f"with another --name, or delete {search_dir} to start this one over (its trials go with it)")


def differences(saved: Config, saved_space: dict, cfg: Config, space: dict[str, dict]) -> list[tuple[str, Any, Any]]:
    """(key, saved, new) for each setting a restore may not change."""
    old, now = saved.flat(), cfg.flat()
    diffs = [(key, old.get(key), now[key]) for key in EXPERIMENT_KEYS if old.get(key) != now[key]]
    diffs += [(key, a, b) for key, a, b in changed_keys(saved, cfg)]  # what every trial trains with
    if old.get("train.epochs") != now["train.epochs"] and not any(d[0] == "train.epochs" for d in diffs):
        diffs.append(("train.epochs", old.get("train.epochs"), now["train.epochs"]))  # the schedulers' horizon
    space = json.loads(json.dumps(space))  # as it reads back (tuples as lists)
    for key in sorted(set(saved_space) | set(space)):
        if saved_space.get(key) != space.get(key):
            diffs.append((f"space {key}", saved_space.get(key), space.get(key)))
    return diffs
