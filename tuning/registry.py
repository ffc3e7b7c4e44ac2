"""The one home of the search's choices: schedulers and searchers by name (plain dicts, as for
models and losses). The CLI's `--scheduler`/`--search` choices and the `search.*` config keys are
both checked here; an unknown name lists the choices."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from itmatch.config import Config, ConfigError
from trainers.preflight import shapes_weights
from tuning.space import has_grid, to_tune

log = logging.getLogger("itmatch.tune")


def _asha(cfg: Config, space: dict[str, dict], folder: Optional[Path] = None):
    """ASHA on the per-epoch validation score, with every rung before the last epoch: a trial that
    reaches its last epoch is never stopped, so it is evaluated, logged and can be registered.
    (At `max_t` ASHA would stop the trial at its last report, before the code after `fit()`.)
    Its rungs are kept in the search's `folder` (tuning/asha.py), so a restored search goes on
    judging its trials against those that reached a rung before it was stopped."""
    from tuning.asha import RestorableASHA, rungs_path

    last = _shortest_run(cfg, space)
    if last < 2:
        log.warning("search.scheduler=asha with train.epochs=%d: no epoch before the last to stop at; "
                    "running every trial to the end", last)
        return None
    max_t = last - 1
    grace = min(cfg.search.grace_period or max(1, last // 8), max_t)
    if cfg.search.grace_period and cfg.search.grace_period > max_t:  # else read as asked, and the log says nothing
        log.warning("search.grace_period=%d: ASHA's last rung is epoch %d (train.epochs=%d less one, where a trial "
                    "still reaches its end): its one rung is there", cfg.search.grace_period, max_t, last)
    return RestorableASHA(rungs_path(folder) if folder else None, time_attr="epoch", max_t=max_t,
                          grace_period=grace, reduction_factor=cfg.search.reduction_factor, stop_last_trials=False)


def _shortest_run(cfg: Config, space: dict[str, dict]) -> int:
    """The fewest epochs a trial can have: train.epochs, or its lowest value when it is searched."""
    spec = space.get("train.epochs")
    return int(min(next(iter(spec.values())))) if spec else cfg.train.epochs


def _pbt(cfg: Config, space: dict[str, dict], folder: Optional[Path] = None):
    """Population-based training over the same space (grids read as choices), every
    `search.perturbation_interval` epochs."""
    from ray.tune.schedulers import PopulationBasedTraining

    if cfg.search.algorithm != "random":  # Tune refuses at its first trial, after Ray has started
        raise ConfigError(f"search.scheduler=pbt samples its own population and mutates it; it cannot take "
                          f"search.algorithm={cfg.search.algorithm} (use --search random, or another scheduler)")
    shaped = [key for key in space if shapes_weights(key)]
    if shaped:  # a clone loads its donor's checkpoint with new values: it failed in the trial, after Ray started
        raise ConfigError(f"search.scheduler=pbt clones trials' checkpoints under new values, but {shaped[0]} shapes "
                          "the network or its optimizer (a clone could not load its donor's weights); search it "
                          "with another scheduler, or fix it in the preset")
    if cfg.search.perturbation_interval % cfg.run.checkpoint_every:
        raise ConfigError(f"search.scheduler=pbt clones trials by their checkpoints every search.perturbation_interval="
                          f"{cfg.search.perturbation_interval} epochs, but run.checkpoint_every="
                          f"{cfg.run.checkpoint_every} does not divide it")
    _unused_asha_keys(cfg)
    return PopulationBasedTraining(time_attr="epoch", perturbation_interval=cfg.search.perturbation_interval,
                                   hyperparam_mutations={"params": to_tune(space, grid=False)})


def needs_checkpoints(cfg: Config) -> bool:
    """PBT clones trials by the checkpoints they report to Tune; the others need none there."""
    return cfg.search.scheduler == "pbt"


def _fifo(cfg: Config, space: dict[str, dict], folder: Optional[Path] = None) -> None:
    _unused_asha_keys(cfg)
    return None  # Tune's default: every trial runs to the end


def _unused_asha_keys(cfg: Config) -> None:
    """ASHA's settings given (a preset's search section, say) under a scheduler that reads none."""
    defaults = type(cfg.search).model_fields  # a search's config is rebuilt from its flat keys: all "set"
    given = [key for key in ("grace_period", "reduction_factor") if getattr(cfg.search, key) != defaults[key].default]
    if given:
        log.warning("search.scheduler=%s: %s only shape(s) ASHA's rungs; ignored", cfg.search.scheduler,
                    ", ".join(f"search.{key}" for key in given))


def _random(cfg: Config, space: dict[str, dict]):
    """Tune's variant generator: random samples, grids expanded."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=cfg.search.max_concurrent, random_state=cfg.search.seed)


def _optuna(cfg: Config, space: dict[str, dict]):
    """Optuna's TPE sampler; its study is saved with the experiment, so Tuner.restore resumes it."""
    if has_grid(space):
        raise ConfigError("search.algorithm=optuna samples: use {choice: [...]} instead of {grid: [...]} "
                          "(or search.algorithm=random)")
    from optuna.samplers import TPESampler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(sampler=TPESampler(seed=cfg.search.seed)),
                              max_concurrent=cfg.search.max_concurrent)


Factory = Callable[..., Optional[Any]]  # (cfg, space) for searchers; (cfg, space, folder) for schedulers
SCHEDULERS: dict[str, Factory] = {"asha": _asha, "pbt": _pbt, "fifo": _fifo}
SEARCHERS: dict[str, Factory] = {"random": _random, "optuna": _optuna}


def pick(registry: dict[str, Factory], what: str, name: str) -> Factory:
    if name not in registry:
        raise ConfigError(f"unknown {what} {name!r}; choices: {', '.join(sorted(registry))}")
    return registry[name]


def scheduler(cfg: Config, space: dict[str, dict], folder: Optional[Path] = None):
    """The scheduler by name; `folder`: the search's folder, where a scheduler keeps what a
    restored search needs back (ASHA's rungs)."""
    return pick(SCHEDULERS, "search.scheduler", cfg.search.scheduler)(cfg, space, folder)


def searcher(cfg: Config, space: dict[str, dict]):
    return pick(SEARCHERS, "search.algorithm", cfg.search.algorithm)(cfg, space)


def params_space(cfg: Config, space: dict[str, dict]) -> dict[str, Any]:
    """The Tune domains for `params`: grids only where the searcher expands them."""
    return to_tune(space, grid=cfg.search.algorithm == "random")
