"""Robust selection (tuning/select.py) against hand-computed tables: the configuration with the best
mean validation score over its seeds wins, not the luckiest single run; ties go to the smaller
spread, then the first trial id; the model kept is the best-validation seed of that configuration."""

from __future__ import annotations

import pytest

from tuning import rerun
from tuning.select import ensemble_members, select, spread, top_trials

METRIC = "rsum"


def _summary(val: float, test: float, run: str) -> dict:
    return {"val_rsum": val, "test": {"rsum": test}, "run_id": run, "model_uri": f"runs:/{run}/model",
            "best_checkpoint": f"/runs/{run}/best_model"}


def _trial(tid: str, val, test: float = 0.0) -> dict:
    summary = _summary(val, test, tid) if val is not None else None
    return {"trial_id": tid, "params": {"optim.lr": 1e-3}, "status": "finished" if summary else "stopped",
            "summary": summary}


def _rerun(tid: str, seed: int, val, test: float = 0.0) -> dict:
    summary = _summary(val, test, f"{tid}-s{seed}") if val is not None else None
    return {"trial_id": tid, "seed": seed, "run": f"{tid}-seed{seed}", "summary": summary,
            "status": "finished" if summary else "failed"}


SEEDS = {"a": 0, "b": 0, "c": 0, "d": 0}


def test_best_mean_beats_the_luckiest_single_trial():
    # a: lucky single run 400, seeds 400, 380, 384 -> mean 388, sample std 10.58 (sqrt(112))
    # b: 396, 394, 398                            -> mean 396, sample std 2
    # c: 390 finished but not in the top 2; d: stopped by ASHA
    rows = [_trial("a", 400.0, 390.0), _trial("b", 396.0, 395.0), _trial("c", 390.0), _trial("d", None)]
    reruns = [_rerun("a", 1, 380.0), _rerun("a", 2, 384.0), _rerun("b", 1, 394.0, 393.0),
              _rerun("b", 2, 398.0, 397.0)]
    choice, cands = select(rows, reruns, METRIC, 2, SEEDS)
    assert [c["trial_id"] for c in cands] == ["a", "b"]  # only the top 2 trials compete
    a, b = cands
    assert a["val_mean"] == pytest.approx(388.0) and a["val_std"] == pytest.approx(112 ** 0.5)
    assert b["val_mean"] == pytest.approx(396.0) and b["val_std"] == pytest.approx(2.0)
    assert choice["trial_id"] == "b" and choice["n"] == 3
    assert choice["test_mean"] == pytest.approx((395.0 + 393.0 + 397.0) / 3)
    # the model kept is b's best-validation seed (seed 2, val 398), not the trial's own run
    assert choice["model"] == {"seed": 2, "val": 398.0, "test": 397.0, "run_id": "b-s2", "model_uri": "runs:/b-s2/model",
                               "checkpoint": "/runs/b-s2/best_model"}


def test_equal_means_go_to_the_smaller_spread_then_the_first_trial():
    rows = [_trial("b", 395.0), _trial("a", 390.0), _trial("c", 392.0)]
    reruns = [_rerun("a", 1, 400.0), _rerun("b", 1, 395.0), _rerun("c", 1, 393.0)]
    # means: a 395 (std 7.07), b 395 (std 0), c 392.5
    choice, _ = select(rows, reruns, METRIC, 3, SEEDS)
    assert choice["trial_id"] == "b" and choice["val_std"] == 0.0
    same = [_rerun("a", 1, 400.0), _rerun("c", 1, 390.0)]  # a and c: 390 and 400, 395 ± 7.07
    choice, _ = select([_trial("c", 400.0), _trial("a", 390.0)], same, METRIC, 2, SEEDS)
    assert choice["trial_id"] == "a"  # same mean, same spread: the first trial id, in any row order


def test_seed_ties_keep_the_trials_own_run_and_failed_reruns_do_not_count():
    rows = [_trial("a", 390.0)]
    reruns = [_rerun("a", 1, 390.0), _rerun("a", 2, None)]
    choice, _ = select(rows, reruns, METRIC, 1, SEEDS)
    assert choice["n"] == 2 and [s["seed"] for s in choice["seeds"]] == [0, 1]
    assert choice["model"]["run_id"] == "a"


def test_without_reruns_the_best_single_trial_wins_with_no_spread():
    rows = [_trial("b", 391.0), _trial("a", 391.0), _trial("c", 380.0), _trial("d", None)]
    choice, cands = select(rows, [], METRIC, 0, SEEDS)
    assert choice["trial_id"] == "a" and choice["val_std"] is None and choice["n"] == 1  # tie: first id
    assert len(cands) == 3  # every finished trial competes
    assert select([_trial("d", None)], [], METRIC, 0, SEEDS) == (None, [])


def test_spread_is_the_sample_standard_deviation():
    assert spread([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx((5 / 3) ** 0.5))  # sum sq dev 5, n - 1 = 3
    assert spread([7.0]) == (7.0, None)


def test_top_trials_and_the_rerun_plan():
    rows = [_trial("c", 380.0), _trial("b", 395.0), _trial("a", 395.0), _trial("d", None)]
    top = top_trials(rows, METRIC, 2)
    assert [r["trial_id"] for r in top] == ["a", "b"]
    setup = {"base": {"train.seed": 7}}
    top[1] = {**top[1], "params": {"train.seed": 3}}  # a searched seed is the trial's own
    items = rerun.plan(top, setup, 2)
    assert [(i["trial_id"], i["seed"], i["run"]) for i in items] == [
        ("a", 8, "a-seed8"), ("a", 9, "a-seed9"), ("b", 4, "b-seed4"), ("b", 5, "b-seed5")]
    cfg = rerun.rerun_config({**setup, "base": {"train.seed": 7, "run.name": "s"}, "reruns_dir": "/tmp/r"}, items[0])
    assert cfg.train.seed == 8 and cfg.run.name == "a-seed8" and cfg.run.storage_path == "/tmp/r"
    assert cfg.tracking.registered_model is None  # the search registers its one choice


def test_finished_reruns_are_read_back_not_run_again(tmp_path):
    """A killed search run again: a re-run whose summary.json exists is its record; nothing starts."""
    import json

    import ray

    setup = {"base": {"train.seed": 0}, "reruns_dir": str(tmp_path)}
    items = rerun.plan([_trial("a", 390.0)], setup, 2)
    for k, item in enumerate(items):
        (tmp_path / item["run"]).mkdir()
        (tmp_path / item["run"] / "summary.json").write_text(json.dumps(_summary(380.0 + k, 0.0, item["run"])))
    records = rerun.run_all(items, setup, max_concurrent=1)
    assert [(r["run"], r["status"], r["summary"]["val_rsum"]) for r in records] == [
        ("a-seed1", "finished", 380.0), ("a-seed2", "finished", 381.0)]
    assert not ray.is_initialized()  # no Ray task was needed


def test_ensemble_members_are_the_seed_runs_of_the_best_configurations_best_first():
    """search.ensemble_top: the runs of the top configurations by mean validation score (ties: the
    smaller spread, then the trial id), runs without a checkpoint left out."""
    rows = [_trial("a", 400.0), _trial("b", 396.0), _trial("c", 392.0), _trial("d", 391.0)]
    reruns = [_rerun("a", 1, 380.0), _rerun("b", 1, 394.0), _rerun("c", 1, 398.0), _rerun("d", 1, None)]
    # means: a 390, b 395, c 395 (c's spread 4.24 > b's 1.41), d 391 (one run: its rerun failed)
    _, cands = select(rows, reruns, METRIC, 4, SEEDS)
    got = [(m["trial_id"], m["seed"]) for m in ensemble_members(cands, 3)]
    assert got == [("b", 0), ("b", 1), ("c", 0), ("c", 1), ("d", 0)]
    assert [(m["trial_id"], m["seed"]) for m in ensemble_members(cands, 1)] == [("b", 0), ("b", 1)]
    cands[0]["seeds"][1]["checkpoint"] = None  # a run whose folder is gone: not a member
    assert ("a", 1) not in [(m["trial_id"], m["seed"]) for m in ensemble_members(cands, 4)]
    assert len(ensemble_members(cands, 4)) == 6


def test_rerun_per_takes_the_best_of_each_model_family():
    """search.rerun_per=model.branch: the re-runs, the competition and the ensemble hold the best
    `top` configurations of each branch, even where one family fills the overall top."""
    rows = [_trial("a", 400.0), _trial("b", 399.0), _trial("c", 390.0), _trial("d", 385.0), _trial("e", None)]
    for row, branch in zip(rows, ["linear", "linear", "nonlinear", "nonlinear", "nonlinear"]):
        row["params"] = {"model.branch": branch, "optim.lr": 1e-3}
    assert [r["trial_id"] for r in top_trials(rows, METRIC, 1)] == ["a"]
    assert [r["trial_id"] for r in top_trials(rows, METRIC, 1, "model.branch")] == ["a", "c"]
    assert [r["trial_id"] for r in top_trials(rows, METRIC, 2, "model.branch")] == ["a", "b", "c", "d"]
    reruns = [_rerun("a", 1, 380.0), _rerun("c", 1, 394.0)]  # means: a 390, c 392
    choice, cands = select(rows, reruns, METRIC, 1, {**SEEDS, "e": 0}, "model.branch")
    assert choice["trial_id"] == "c" and [c["trial_id"] for c in cands] == ["a", "c"]
    got = [(m["trial_id"], m["seed"]) for m in ensemble_members(cands, 1, "model.branch")]
    assert got == [("c", 0), ("c", 1), ("a", 0), ("a", 1)]  # best configuration first
    assert [(m["trial_id"], m["seed"]) for m in ensemble_members(cands, 1)] == [("c", 0), ("c", 1)]


def test_a_family_asha_stopped_entirely_is_still_rerun_from_its_best_stopped_trial():
    """ASHA compares trials across branch types: where it stopped every nonlinear trial, the best of
    them by its best validation score so far is re-run to the end with its own seed and the extra
    seeds, competes on those runs alone, and joins the ensemble."""
    rows = [_trial("a", 400.0), _trial("b", 399.0), _trial("c", None), _trial("d", None), _trial("e", None)]
    for row, branch, best in zip(rows, ["linear", "linear", "nonlinear", "nonlinear", "linear"],
                                 [400.0, 399.0, 380.0, 385.0, 390.0]):
        row.update(params={"model.branch": branch}, best_val=best)
    top = top_trials(rows, METRIC, 1, "model.branch")
    assert [r["trial_id"] for r in top] == ["a", "d"]  # d: the better stopped nonlinear trial
    assert top_trials(rows, METRIC, 1) == [rows[0]]  # without rerun_per, finished trials only
    items = rerun.plan(top, {"base": {"train.seed": 0}}, 2)
    assert [(i["trial_id"], i["seed"]) for i in items] == [("a", 1), ("a", 2), ("d", 0), ("d", 1), ("d", 2)]
    reruns = [_rerun("a", 1, 390.0), _rerun("a", 2, 392.0),
              _rerun("d", 0, 396.0), _rerun("d", 1, 394.0), _rerun("d", 2, 398.0)]
    choice, cands = select(rows, reruns, METRIC, 1, {t: 0 for t in "abcde"}, "model.branch")
    assert choice["trial_id"] == "d" and choice["n"] == 3 and choice["val_mean"] == pytest.approx(396.0)
    assert [s["seed"] for s in choice["seeds"]] == [0, 1, 2]  # its own seed comes from a re-run
    got = [(m["trial_id"], m["seed"]) for m in ensemble_members(cands, 1, "model.branch")]
    assert got == [("d", 0), ("d", 1), ("d", 2), ("a", 0), ("a", 1), ("a", 2)]
    failed = [{**r, "summary": None, "status": "failed"} if r["trial_id"] == "d" else r for r in reruns]
    choice, cands = select(rows, failed, METRIC, 1, {t: 0 for t in "abcde"}, "model.branch")
    assert [c["trial_id"] for c in cands] == ["a"]  # no run of d finished: not a candidate
