"""Search spaces: a YAML file mapping dotted config keys to distributions, checked against the
config before Ray starts, and turned into Tune's sampling domains."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from itmatch.config import Config, ConfigError, check_key, load_config, read_yaml
from itmatch.data.store import stored_splits

log = logging.getLogger("itmatch.tune")

KINDS = ("uniform", "loguniform", "randint", "choice", "grid")
RANGES = ("uniform", "loguniform", "randint")
SEARCH_OWNS = ("run.name", "run.storage_path", "eval.pictures", "eval.plots", "tracking.", "search.")
"""Keys a trial's config takes from the search (tuning.search.trial_config) or never reads: in a
space they would be overwritten or ignored without a word."""


def _store_inputs(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """What the one store a search or ablation prepares depends on (trainers.train.prepare_store),
    as {key: (what is compared, what is shown)}: towers compare by what they read (pixels or features)."""
    d, m = cfg.data, cfg.model
    plain = {k: (v, v) for k, v in (("data.source", d.source), ("data.cache_dir", d.cache_dir),
                                    ("data.image_encoder", d.image_encoder), ("data.text_encoder", d.text_encoder),
                                    ("data.featurize", d.featurize))}
    return {**plain, "model.image_tower": (m.raw_images, m.image_tower),
            "model.text_tower": (m.text_tower == "features", m.text_tower)}


def check_same_store(base: Config, cfg: Config, where: str) -> None:
    """Every trial or ablation row trains on the data its driver prepared once, for `base`: a
    variant that needs other data (another source, encoder, or features where the base reads pixels)
    would train on the base's data under its own name, and its model would not take its own inputs."""
    old, new = _store_inputs(base), _store_inputs(cfg)
    for key, (value, shown) in new.items():
        if value != old[key][0]:
            raise ConfigError(f"{where}: {key}={shown!r} needs other data than the {old[key][1]!r} every run here "
                              "trains on (the data is prepared once, for the preset); run one command per data setting")
    d, b = cfg.data, base.data
    missing = [s for s in stored_splits(d.train_split, d.val_split, d.test_split)
               if s not in stored_splits(b.train_split, b.val_split, b.test_split)]
    if missing:
        raise ConfigError(f"{where}: split {missing[0]!r} is not among the splits prepared for the preset "
                          f"({', '.join(stored_splits(b.train_split, b.val_split, b.test_split))})")


def load_space(path: str | Path, base: Config) -> dict[str, dict]:
    """The search space file, each entry checked: known kind, and every value it can take (both
    bounds, every choice) accepted by the config on top of the base settings. Values come back as
    the config types them (YAML 1.1 reads `1e-3` as a string; the config reads it as a float)."""
    raw = read_yaml(path) or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: expected a mapping of dotted keys to distributions, got {raw!r}")
    flat = base.flat()
    space = {}
    for key, spec in raw.items():
        if any(key == owned or (owned.endswith(".") and str(key).startswith(owned)) for owned in SEARCH_OWNS):
            raise ConfigError(f"{path}: {key}: the search sets this key for every trial (or does not read it "
                              "there); set it on the command line or in the preset, not in the space")
        inside = [k for k in flat if k.startswith(f"{key}.")]
        if key not in flat and inside:
            raise ConfigError(f"{path}: {key}: a section, not a setting; give its keys their own entries "
                              f"(e.g. {inside[0]}: {{choice: [...]}})")
        if key not in flat:  # else named as "value 0.1 is not valid: override: unknown config key"
            check_key(key, str(path))
        kind, values = _entry(path, key, spec)
        space[key] = {kind: _bounded(path, key, kind, [_typed(path, flat, key, value) for value in values])}
        for value in space[key][kind]:
            check_same_store(base, load_config(None, {**flat, key: value}), f"{path}: {key}")
        if kind in ("uniform", "loguniform"):
            _takes_fractions(path, flat, key, kind, space[key][kind])
    per = base.search.rerun_per
    if per is not None and next(iter(space.get(per, {"": 0}))) not in ("choice", "grid"):
        raise ConfigError(f"{path}: search.rerun_per={per!r} must be a key of this space with choice or grid "
                          f"values (its trials are grouped by value); keys: {', '.join(space)}")
    return space


def _typed(path: str | Path, flat: dict[str, Any], key: str, value: Any) -> Any:
    try:
        return load_config(None, {**flat, key: value}).flat()[key]
    except ConfigError as exc:  # the config's own message, one line per refused key: folded into this one
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[1:]) or str(exc)
        raise ConfigError(f"{path}: {key}: value {value!r} is not valid ({detail})") from None


def _takes_fractions(path: str | Path, flat: dict[str, Any], key: str, kind: str, values: list) -> None:
    """A continuous range samples fractions (745.19): an integer setting would fail in every trial."""
    middle = (float(values[0]) + float(values[1])) / 2 + 1e-3
    try:
        load_config(None, {**flat, key: middle})
    except ConfigError:
        if isinstance(flat.get(key), bool):  # 0 and 1 read as false and true; a fraction as neither
            raise ConfigError(f"{path}: {key}.{kind}: {key} is true or false, and a {kind} range samples "
                              f"fractions; use {{choice: [false, true]}}") from None
        raise ConfigError(f"{path}: {key}.{kind}: {key} takes whole numbers, and a {kind} range samples "
                          f"fractions (e.g. {middle:g}); use {{randint: {values}}} (both bounds included)") from None


def _bounded(path: str | Path, key: str, kind: str, values: list) -> list:
    """A range's bounds in order (Tune would sample an inverted one without a word), a log range's
    above zero."""
    if kind in RANGES and not values[0] < values[1]:
        raise ConfigError(f"{path}: {key}.{kind}: the low bound must be below the high one, got {values}")
    if kind == "loguniform" and values[0] <= 0:
        raise ConfigError(f"{path}: {key}.loguniform: bounds must be above 0, got {values}")
    repeated = [v for i, v in enumerate(values) if v in values[:i]] if kind in ("grid", "choice") else []
    if repeated and kind == "grid":  # every point runs num_samples trials: a repeat trains the same configuration again
        raise ConfigError(f"{path}: {key}.grid: the value {repeated[0]!r} is listed twice (as the config reads "
                          f"them: {values}); each grid point is run num_samples times already")
    if repeated:  # a weighting some mean, a typo others (1e-3 beside 0.001): said either way
        log.warning("%s: %s.choice: the value %r is listed more than once (as the config reads them: %s), so "
                    "it is sampled that many times as often", path, key, repeated[0], values)
    return values


def _entry(path: str | Path, key: str, spec: Any) -> tuple[str, list]:
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS):
        raise ConfigError(f"{path}: {key}: expected one of {{{', '.join(KINDS)}: [...]}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values or (kind in RANGES and len(values) != 2):
        wanted = "[low, high]" if kind in RANGES else "of values"
        raise ConfigError(f"{path}: {key}.{kind}: expected a list ({wanted}), got {values!r}")
    return kind, values


def to_tune(space: dict[str, dict], grid: bool = True) -> dict[str, Any]:
    """Tune domains; `grid=False` (searchers that sample, PBT's mutations) reads a grid as a choice."""
    from ray import tune

    # randint's [lo, hi] includes hi, as the README says (Tune's own randint leaves it out)
    makers = {"uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
              "randint": lambda v: tune.randint(v[0], v[1] + 1), "choice": tune.choice,
              "grid": tune.grid_search if grid else tune.choice}
    return {key: makers[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def has_grid(space: dict[str, dict]) -> bool:
    return any("grid" in spec for spec in space.values())
