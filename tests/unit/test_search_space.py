"""Search spaces are checked against the config before Ray starts (tuning/search.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from itmatch.config import ConfigError, load_config
from tuning.search import trial_config
from tuning.space import load_space, to_tune

ROOT = Path(__file__).resolve().parents[2]


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["eq6", "regularisation", "infonce", "instance"])
def test_every_shipped_space_is_valid_for_the_debug_preset(name):
    cfg = load_config(ROOT / "configs" / "debug.yaml", ["loss.name=infonce"] if name == "infonce" else [])
    assert load_space(ROOT / "configs" / "search" / f"{name}.yaml", cfg)


def test_shipped_space_is_valid():
    cfg = load_config(None, [])
    space = load_space(ROOT / "configs" / "search" / "eq6.yaml", cfg)
    assert {"loss.margin", "loss.top_k", "loss.lambda2"} <= set(space)
    from ray import tune

    dists = to_tune(space)
    assert isinstance(dists["loss.margin"], tune.search.sample.Float)
    assert isinstance(dists["loss.top_k"], tune.search.sample.Categorical)


@pytest.mark.parametrize("text, needle", [
    ("loss.margn: {uniform: [0.1, 0.2]}\n", "loss.margn"),                # unknown key
    ("loss.margin: {normal: [0.1, 0.2]}\n", "expected one of"),           # unknown kind
    ("loss.margin: {uniform: [0.1]}\n", "[low, high]"),                   # one bound
    ("loss.margin: {uniform: [-0.5, 0.2]}\n", "value -0.5 is not valid"),  # out of the field's range
    ("loss.top_k: {choice: [1, 0]}\n", "value 0 is not valid"),           # one bad choice
    ("scaling.strategy: {choice: [ddp, fsdp]}\n", "'fsdp'"),              # not a backend
    ("- just a list\n", "expected a mapping"),
    ("optim.lr: {loguniform: [1.0e-2, 1.0e-4]}\n", "optim.lr.loguniform: the low bound must be below"),  # inverted
    ("loss.margin: {uniform: [0.2, 0.2]}\n", "loss.margin.uniform: the low bound"),  # empty
    ("loss.top_k: {randint: [10, 2]}\n", "loss.top_k.randint: the low bound"),
    ("loss.lambda2: {loguniform: [0, 1]}\n", "bounds must be above 0"),  # the field allows 0, a log range not
    ("loss.margin: {uniform: [0.1, 0.2]}\nloss.margin: {uniform: [0.3, 0.4]}\n", "found the key 'loss.margin' twice"),
    ("optim.lr: {loguniform: [1.0e-4, .inf]}\n", "finite number"),
    # an integer setting under a continuous range: every trial failed once Ray had started
    ("model.hidden_dim: {uniform: [256, 1024]}\n", "model.hidden_dim takes whole numbers"),
    ("train.epochs: {loguniform: [2, 8]}\n", "use {randint: [2, 8]}"),
    ("model.augment: {uniform: [0, 1]}\n", "model.augment is true or false, and a uniform range samples fractions; "
                                          "use {choice: [false, true]}"),  # was "use {randint: [False, True]}"
    ("loss.top_k: {choice: [yes, 2]}\n", "loss.top_k: value True is not valid"),  # yes was read as 1
    # keys the search sets for every trial, or a trial never reads: overwritten without a word
    ("run.name: {choice: [a, b]}\n", "the search sets this key"),
    ("tracking.registered_model: {choice: [a, b]}\n", "the search sets this key"),
    ("search.num_samples: {choice: [2, 4]}\n", "the search sets this key"),
    ("loss: {choice: [{margin: 0.1}, {margin: 0.2}]}\n", "loss: a section, not a setting"),  # was a KeyError
    # every trial trains on the data the driver prepared once: these trained on it under their own value
    ("data.text_encoder: {choice: [minilm, hashing]}\n", "data.text_encoder='hashing' needs other data"),
    ("data.source: {choice: ['precomp:/a', 'precomp:/b']}\n", "data.source='precomp:/a' needs other data"),
])
def test_bad_space_names_file_key_and_value(tmp_path, text, needle):
    path = _space(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_space(path, load_config(None, []))
    assert str(path) in str(info.value) and needle in str(info.value) and "\n" not in str(info.value)


def test_trial_config_applies_params_over_preset_and_overrides(tmp_path):
    base = load_config(ROOT / "configs" / "debug.yaml", ["loss.margin=0.3", "train.epochs=5"])
    setup = {"base": base.flat(), "trials_dir": str(tmp_path / "trials")}
    cfg = trial_config(setup, {"loss.margin": 0.11, "loss.top_k": None, "scaling.strategy": "deepspeed"}, "t1")
    assert cfg.loss.margin == 0.11 and cfg.loss.top_k is None and cfg.scaling.strategy == "deepspeed"
    assert cfg.train.epochs == 5 and cfg.model.embed_dim == 32  # override and preset kept
    assert cfg.run.name == "t1" and cfg.run.storage_path == str(tmp_path / "trials")
    assert not cfg.tracking.registered_model  # only the search registers, once


def test_relative_paths_are_flagged_only_inside_a_ray_job(monkeypatch):
    from trainers.train import relative_paths_in_job

    cfg = load_config(None, ["run.storage_path=/shared/runs", "tracking.tracking_uri=sqlite:///mlruns.db"])
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert relative_paths_in_job(cfg) == []
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    flagged = relative_paths_in_job(cfg)
    assert any(f.startswith("tracking.tracking_uri=") for f in flagged)
    assert any(f.startswith("data.cache_dir=") for f in flagged)
    assert not any(f.startswith("run.storage_path=") for f in flagged)  # absolute: fine


def test_trial_ids_that_look_like_numbers_stay_names(tmp_path):
    """Tune trial ids are hex + "_" + index; "92334_00000" is a number to YAML 1.1."""
    from itmatch.config import parse_override

    assert parse_override("run.name=92334_00000") == ("run.name", "92334_00000")
    assert parse_override("train.epochs=30") == ("train.epochs", 30)
    setup = {"base": load_config(None, []).flat(), "trials_dir": str(tmp_path)}
    assert trial_config(setup, {}, "92334_00000").run.name == "92334_00000"


def test_space_values_take_the_configs_types(tmp_path):
    """YAML 1.1 reads 1e-3 as a string: the space must hand Tune the float the config reads."""
    path = _space(tmp_path, "optim.lr: {loguniform: [1e-5, 1e-3]}\nloss.top_k: {choice: [null, 5]}\n")
    space = load_space(path, load_config(None, []))
    assert space == {"optim.lr": {"loguniform": [1e-5, 1e-3]}, "loss.top_k": {"choice": [None, 5]}}
    assert all(isinstance(v, float) for v in space["optim.lr"]["loguniform"])


@pytest.mark.parametrize("text, repeated", [("optim.lr: {choice: [0.001, 1e-3, 0.01]}\n", 0.001),
                                            ("loss.top_k: {choice: [5, 5, 10]}\n", 5),
                                            ("loss.top_k: {choice: [5, 10]}\n", None)])
def test_a_choice_listing_a_value_twice_is_said_it_is_sampled_twice_as_often(tmp_path, text, repeated, caplog):
    """1e-3 beside 0.001 is one value as the config reads them: Tune samples it 2 times in 3, unsaid."""
    import logging

    with caplog.at_level(logging.WARNING, logger="itmatch.tune"):
        space = load_space(_space(tmp_path, text), load_config(None, []))
    assert len(next(iter(space.values()))["choice"]) == 3 - (repeated is None)  # kept: a weighting is allowed
    assert (f"the value {repeated!r} is listed more than once" in caplog.text) is (repeated is not None)


@pytest.mark.parametrize("per, ok", [("model.branch", True), ("optim.lr", False), ("loss.margin", False)])
def test_rerun_per_must_be_a_choice_key_of_the_space(tmp_path, per, ok):
    """Trials are grouped by the value of search.rerun_per: a continuous key would put every trial
    in its own group, and a key outside the space in one."""
    path = _space(tmp_path, "model.branch: {choice: [linear, nonlinear]}\noptim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    cfg = load_config(None, [f"search.rerun_per={per}"])
    if ok:
        assert load_space(path, cfg)["model.branch"] == {"choice": ["linear", "nonlinear"]}
        return
    with pytest.raises(ConfigError) as info:
        load_space(path, cfg)
    assert str(path) in str(info.value) and f"search.rerun_per={per!r}" in str(info.value)


def test_the_real_data_space_fits_its_preset():
    """configs/search/flickr8k.yaml under configs/flickr8k_precomp.yaml (the README's search):
    search.rerun_per names a choice key of that space."""
    cfg = load_config(ROOT / "configs" / "flickr8k_precomp.yaml", [])
    space = load_space(ROOT / "configs" / "search" / "flickr8k.yaml", cfg)
    assert cfg.search.rerun_per in space and set(space[cfg.search.rerun_per]["choice"]) == {"linear", "nonlinear"}
    assert cfg.search.ensemble and 0 < cfg.search.ensemble_cca < 1


def test_randint_includes_its_high_bound(tmp_path):
    """`{randint: [lo, hi]}` as documented: Tune's own randint never samples hi (zero_stage 3 was out of reach)."""
    space = load_space(_space(tmp_path, "scaling.zero_stage: {randint: [0, 3]}\nloss.top_k: {randint: [9, 10]}\n"),
                       load_config(None, []))
    dists = to_tune(space)
    assert set(dists["scaling.zero_stage"].sample(size=400)) == {0, 1, 2, 3}
    assert set(dists["loss.top_k"].sample(size=100)) == {9, 10}
    with pytest.raises(ConfigError, match="scaling.zero_stage: value 4 is not valid"):
        load_space(_space(tmp_path, "scaling.zero_stage: {randint: [0, 4]}\n"), load_config(None, []))


@pytest.mark.parametrize("error, status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                                           (SystemExit(143), "KILLED")])
def test_a_search_that_dies_after_its_parent_run_started_ends_that_run(monkeypatch, tmp_path, error, status):
    """It stayed RUNNING forever (a KeyError in a restored search, a space only Tune could refuse)."""
    import ray

    import trainers.tracking
    import trainers.train
    from tuning import search

    ended = []
    monkeypatch.setattr(trainers.train, "init_ray", lambda cfg: None)
    monkeypatch.setattr(trainers.train, "exit_on_sigterm", lambda: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(search.preflight, "check_cluster", lambda cfg: None)
    monkeypatch.setattr(trainers.tracking, "start_run", lambda *a, **k: {"run_id": "p1", "tracking_uri": "x"})
    monkeypatch.setattr(trainers.tracking, "end_run", lambda run, st, if_running=False: ended.append((run["run_id"], st)))

    def dies(*args):
        raise error

    monkeypatch.setattr(search, "_search", dies)
    with pytest.raises(type(error)):
        search.run_search(load_config(None, []), {}, None, tmp_path / "s")
    assert ended == [("p1", status)]
