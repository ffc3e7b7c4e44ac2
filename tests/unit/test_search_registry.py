"""The search's choices have one home (tuning/registry.py): the CLI offers exactly those, unknown
names list them, and each scheduler/searcher behaves as the search needs (ASHA never stops a trial
at its last epoch, Optuna refuses grids, concurrent trials share the CPUs)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from itmatch.config import ConfigError, load_config
from tuning import registry
from tuning.search import build_parser, resolve, share_cpus

ROOT = Path(__file__).resolve().parents[2]
SPACE = {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "loss.top_k": {"choice": [1, 10]}}


def _choices(flag: str) -> list[str]:
    action = next(a for a in build_parser()._actions if flag in a.option_strings)
    return list(action.choices)


def test_cli_choices_are_the_registries():
    assert _choices("--scheduler") == sorted(registry.SCHEDULERS) == ["asha", "fifo", "pbt"]
    assert _choices("--search") == sorted(registry.SEARCHERS) == ["optuna", "random"]


@pytest.mark.parametrize("key, name", [("search.scheduler", "hyperband"), ("search.algorithm", "bohb")])
def test_unknown_name_lists_the_choices(tmp_path, key, name):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {uniform: [0.001, 0.01]}\n")
    args = build_parser().parse_args(["--space", str(space), f"{key}={name}", f"run.storage_path={tmp_path}"])
    with pytest.raises(ConfigError) as info:
        resolve(args)
    registry_ = registry.SCHEDULERS if key == "search.scheduler" else registry.SEARCHERS
    assert name in str(info.value) and ", ".join(sorted(registry_)) in str(info.value)


def test_flags_override_search_keys_of_the_preset(tmp_path):
    preset = tmp_path / "preset.yaml"
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {uniform: [0.001, 0.01]}\n")
    preset.write_text(f"search:\n  space: {space}\n  name: fromfile\n  num_samples: 5\n  scheduler: fifo\n"
                      f"run:\n  storage_path: rel/runs\n")
    cfg, parsed = resolve(build_parser().parse_args(["--config", str(preset), "--num-samples", "3"]))
    assert cfg.search.num_samples == 3 and cfg.search.scheduler == "fifo" and cfg.search.name == "fromfile"
    assert cfg.run.name == "fromfile" and list(parsed) == ["optim.lr"]
    # every store path absolute: a trial runs in its own folder, a job in a temporary copy
    assert cfg.run.storage_path == str(Path("rel/runs").resolve())
    assert Path(cfg.data.cache_dir).is_absolute() and Path(cfg.tracking.artifact_location).is_absolute()
    assert cfg.tracking.tracking_uri == f"sqlite:///{Path('mlruns.db').resolve()}"


def test_missing_space_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no search space"):
        resolve(build_parser().parse_args([f"run.storage_path={tmp_path}"]))


def _asha(epochs: int, **search):
    cfg = load_config(None, {"train.epochs": epochs, **{f"search.{k}": v for k, v in search.items()}})
    scheduler = registry.scheduler(cfg, SPACE)
    if scheduler is not None:
        scheduler.set_search_properties("best_metric", "max")
    return scheduler


def _report(scheduler, trial, epoch: int, score: float) -> str:
    return scheduler.on_trial_result(None, trial, {"epoch": epoch, "best_metric": score})


def test_asha_stops_weak_trials_at_a_rung_but_never_at_the_last_epoch():
    from ray.tune.schedulers import TrialScheduler

    scheduler = _asha(2, grace_period=1, reduction_factor=2)
    good, weak, late = (SimpleNamespace(trial_id=name) for name in ("good", "weak", "late"))
    for trial in (good, weak, late):
        scheduler.on_trial_add(None, trial)
    assert _report(scheduler, good, 1, 300.0) == TrialScheduler.CONTINUE
    assert _report(scheduler, weak, 1, 10.0) == TrialScheduler.STOP  # below the rung's cutoff
    # At its last epoch a trial goes on to its evaluation and logging, even the worst one.
    assert _report(scheduler, good, 2, 310.0) == TrialScheduler.CONTINUE
    assert _report(scheduler, late, 1, 305.0) == TrialScheduler.CONTINUE
    assert _report(scheduler, late, 2, 1.0) == TrialScheduler.CONTINUE


def _restarted_asha(folder: Path | None):
    """The preset-like ASHA of a search in `folder`, as Tuner.restore builds it: from the Tuner
    pickled when the search began (empty rungs), then handed the metric."""
    import pickle

    cfg = load_config(None, {"train.epochs": 3, "search.grace_period": 1, "search.reduction_factor": 2})
    fresh = pickle.loads(pickle.dumps(registry.scheduler(cfg, SPACE, folder)))
    fresh.set_search_properties("best_metric", "max")
    return fresh


@pytest.mark.parametrize("kept", [True, False])
def test_a_restored_search_judges_its_trials_against_the_rungs_before_the_stop(tmp_path, kept):
    """Tune restores a search's trials and searcher but not its scheduler: without the rungs kept in
    the search's folder (tuning/asha.py), a weak trial reaching a rung first after a restore
    passes it unopposed."""
    from ray.tune.schedulers import TrialScheduler

    folder = tmp_path if kept else None
    before = _restarted_asha(folder)
    trials = {name: SimpleNamespace(trial_id=name) for name in ("a", "b", "weak", "strong")}
    for trial in trials.values():
        before.on_trial_add(None, trial)
    for name, score in (("a", 300.0), ("b", 310.0)):  # rung 1 (epoch 1), then rung 2 (epoch 2)
        assert _report(before, trials[name], 1, score) == _report(before, trials[name], 2, score) == \
            TrialScheduler.CONTINUE
    after = _restarted_asha(folder)  # the search killed and restored
    for trial in trials.values():
        after.on_trial_add(None, trial)
    weak = _report(after, trials["weak"], 1, 10.0)
    assert weak == (TrialScheduler.STOP if kept else TrialScheduler.CONTINUE)
    assert _report(after, trials["strong"], 1, 400.0) == TrialScheduler.CONTINUE
    if kept:  # the file holds every record, the new ones too
        assert after.rungs() == _restarted_asha(folder).rungs()
        assert {"a", "b", "weak", "strong"} <= set(dict(after.rungs()[0])[1])


def test_asha_rungs_lie_before_the_last_epoch():
    for epochs in (2, 3, 9, 20):
        rungs = [m for m, _ in _asha(epochs)._brackets[0]._rungs]
        assert rungs and max(rungs) < epochs, (epochs, rungs)
    assert _asha(1) is None  # nothing to stop at: every trial runs to the end
    cfg = load_config(None, {"train.epochs": 20})
    searched = registry.scheduler(cfg, {"train.epochs": {"choice": [30, 4, 10]}})
    assert max(m for m, _ in searched._brackets[0]._rungs) < 4  # before the shortest trial's last epoch


@pytest.mark.parametrize("keys, scheduler, warned", [
    ({"search.grace_period": 30}, "asha", "search.grace_period=30: ASHA's last rung is epoch 19"),
    ({"search.grace_period": 4}, "asha", None),
    ({"search.grace_period": 4}, "fifo", "search.scheduler=fifo: search.grace_period only"),
    ({"search.reduction_factor": 2.0}, "pbt", "search.scheduler=pbt: search.reduction_factor only"),
    ({}, "fifo", None),
])
def test_asha_settings_that_cannot_act_as_given_are_said(keys, scheduler, warned, caplog):
    cfg = load_config(None, {"train.epochs": 20, "search.scheduler": scheduler, **keys})
    cfg = load_config(None, cfg.flat())  # as tuning.search rebuilds it: every key then counts as given
    with caplog.at_level("WARNING", logger="itmatch.tune"):
        registry.scheduler(cfg, SPACE)
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if warned and m.startswith(warned)] if warned else not said, said


def test_pbt_mutates_the_searched_params_per_epoch():
    from ray.tune.schedulers import PopulationBasedTraining

    cfg = load_config(None, ["search.scheduler=pbt", "search.perturbation_interval=2"])
    pbt = registry.scheduler(cfg, {**SPACE, "loss.margin": {"grid": [0.1, 0.2]}})
    assert isinstance(pbt, PopulationBasedTraining)
    assert pbt._time_attr == "epoch" and pbt._perturbation_interval == 2
    assert set(pbt._hyperparam_mutations["params"]) == {"optim.lr", "loss.top_k", "loss.margin"}


def test_pbt_with_a_searcher_is_refused_in_one_line_before_ray(tmp_path, capsys):
    """Tune refuses PBT beside any search algorithm only when it adds the first trial, with a traceback
    after Ray has started; the search command says so at once."""
    import ray

    from tuning import search

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {loguniform: [1.0e-4, 1.0e-2]}\n")
    code = search.main(["--config", str(ROOT / "configs" / "debug.yaml"), "--space", str(space),
                        "--search", "optuna", "--scheduler", "pbt", f"run.storage_path={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "search.scheduler=pbt" in err[0] and "search.algorithm=optuna" in err[0]
    assert not ray.is_initialized()
    assert registry.scheduler(load_config(None, ["search.scheduler=pbt", "search.algorithm=random"]), SPACE)


@pytest.mark.parametrize("key, values", [("model.hidden_dim", [32, 64]), ("optim.name", ["adam", "sgd"]),
                                         ("model.branch", ["linear", "nonlinear"])])
def test_pbt_refuses_keys_that_shape_the_weights(key, values):
    """A clone loads its donor's checkpoint under new values: a size mismatch in the trial, after Ray."""
    cfg = load_config(None, ["search.scheduler=pbt", "search.algorithm=random"])
    with pytest.raises(ConfigError, match=f"search.scheduler=pbt .* but {key} shapes the network"):
        registry.scheduler(cfg, {**SPACE, key: {"choice": values}})
    assert registry.scheduler(cfg, {**SPACE, "model.dropout": {"uniform": [0.1, 0.3]}})  # no shape: mutable


def test_optuna_samples_and_refuses_grids():
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    cfg = load_config(None, ["search.algorithm=optuna", "search.max_concurrent=2", "search.seed=3"])
    searcher = registry.searcher(cfg, SPACE)
    assert isinstance(searcher, ConcurrencyLimiter) and isinstance(searcher.searcher, OptunaSearch)
    assert searcher.max_concurrent == 2
    with pytest.raises(ConfigError, match="grid"):
        registry.searcher(cfg, {"loss.margin": {"grid": [0.1, 0.2]}})
    assert "grid_search" not in str(registry.params_space(cfg, {"loss.margin": {"grid": [0.1, 0.2]}}))


@pytest.mark.parametrize("nodes, workers, concurrent, expected", [
    ([2], 2, 1, None),     # one trial: the trainer's own default (trainers.job.cpus_per_worker)
    ([2], 2, 2, 0.5),      # two 2-worker trials on 2 CPUs: half a CPU each
    ([16], 2, 3, 2),       # whole CPUs above one
    ([2], 3, 2, 0.33),
    ([8, 8], 1, 3, 4),     # two nodes: 16 / 3 = 5 each would fit two trials, not three
    ([3, 3], 2, 2, 1),
])
def test_concurrent_trials_share_the_cpus(nodes, workers, concurrent, expected):
    cfg = load_config(None, {"scaling.num_workers": workers, "search.max_concurrent": concurrent})
    shared = share_cpus(cfg, [{"CPU": float(n)} for n in nodes]).scaling.cpus_per_worker
    assert shared == expected
    if expected:  # every worker of every trial placed at once, node by node
        assert sum(int(n / shared + 1e-9) for n in nodes) >= workers * concurrent
    explicit = load_config(None, {"scaling.cpus_per_worker": 1.0, "search.max_concurrent": 2})
    assert share_cpus(explicit, [{"CPU": 2.0}]).scaling.cpus_per_worker == 1.0  # the user's setting wins (trials queue)


def test_gpu_trials_share_the_cpus_of_the_gpu_nodes():
    """ray_cluster.yaml's shape: an 8-CPU head without GPUs, 8-CPU workers with one GPU each."""
    nodes = [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]
    cfg = load_config(None, {"scaling.num_workers": 1, "search.max_concurrent": 2, "scaling.use_gpu": True})
    assert share_cpus(cfg, nodes).scaling.cpus_per_worker == 8  # not 24 / 2 = 12: no node has 12
    three = load_config(None, {"scaling.num_workers": 1, "search.max_concurrent": 3, "scaling.use_gpu": True})
    assert share_cpus(three, nodes).scaling.cpus_per_worker == 8  # two GPUs: the third trial queues


def test_rerun_flags_override_their_keys(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {uniform: [0.001, 0.01]}\n")
    base = ["--space", str(space), f"run.storage_path={tmp_path}", "search.rerun_top=5", "search.rerun_seeds=4"]
    cfg, _ = resolve(build_parser().parse_args(base))
    assert (cfg.search.rerun_top, cfg.search.rerun_seeds) == (5, 4)
    cfg, _ = resolve(build_parser().parse_args([*base, "--rerun-top", "2", "--rerun-seeds", "1"]))
    assert (cfg.search.rerun_top, cfg.search.rerun_seeds) == (2, 1)
    assert load_config(None, {}).search.rerun_top == 0  # default: no re-runs, the best single trial
    with pytest.raises(ConfigError):
        load_config(None, ["search.rerun_seeds=0"])


def test_overrides_may_follow_a_flag(tmp_path, capsys):
    """`--name sx search.num_samples=3 --num-samples 2` was `unrecognized arguments: search.num_samples=3`."""
    import json

    from tuning import search

    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {uniform: [0.001, 0.01]}\n")
    assert search.main(["--space", str(space), "--name", "sx", "search.num_samples=3", "--num-samples", "2",
                        "loss.top_k=4", "--print-config", f"run.storage_path={tmp_path}"]) == 0
    config = json.loads(capsys.readouterr().out)["config"]
    assert config["search"]["num_samples"] == 2 and config["loss"]["top_k"] == 4 and config["search"]["name"] == "sx"
