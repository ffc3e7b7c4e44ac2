"""The chosen ensemble re-trained on every labelled split (`search.refit`).

Selection needs a validation split; the model that is registered does not. Once the ensemble is
chosen on validation (its members, CCA's weight, the hubness setting), each trained member is
trained again with its own config and seed on `train+val` for its best epoch count, keeping its last
epoch (`train.keep=last`); CCA and the hubness bank are refitted on the same union, the hubness
(k, w) kept as chosen. On five held-out folds of the Flickr8k-1k features this lifted the registered
model's test rsum on every fold, by 0.1-3.6 % (1.10x -> 1.13x CCA on average; BENCHMARKS.md). The
refitted ensemble's validation score measures nothing (the split is in its training data), so it
is registered and promoted on the score the ensemble had before the refit.

Refits are seed re-runs (tuning/rerun.py) with a config of their own: `<trial>-seed<k>-refit` in
the search's reruns folder, read back when a killed search is run again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from itmatch.config import Config
from tuning import rerun

log = logging.getLogger("itmatch.tune")


def union(cfg: Config) -> str:
    return f"{cfg.data.train_split}+{cfg.data.val_split}"


def plan(cfg: Config, runs: list[dict]) -> list[dict[str, Any]]:
    """One re-run item per ensemble member: the member's own config (as it trained, PBT's changes
    included) on the union of splits, for the epochs that it was chosen at."""
    from itmatch.state import load_checkpoint

    items = []
    for s in runs:
        payload, member = load_checkpoint(s["checkpoint"])
        epochs = max(1, int(payload["train_state"].best_epoch or member.train.epochs))
        # from scratch (a PBT member's run.start_from is its donor's checkpoint, trained on train only)
        config = {**member.flat(), "data.train_split": union(cfg), "train.epochs": epochs, "train.keep": "last",
                  "run.start_from": None}
        items.append({"trial_id": s["trial_id"], "params": s.get("params", {}), "seed": s["seed"],
                      "run": f"{rerun.name(s['trial_id'], s['seed'])}-refit", "config": config})
    return items


def refit_ensemble(cfg: Config, runs: list[dict], before: dict[str, Any], setup: dict,
                   search_dir: Path, parent: dict, runner: Optional[Callable] = None) -> Optional[dict[str, Any]]:
    """Re-train the ensemble `before` (trainers.ensemble's summary of `runs`) on the union and log it
    as a child of the search's run; None, with the reason logged, where a refit failed (the search
    then registers `before`). `runner`: how the re-run items are run (Ray tasks)."""
    from trainers.ensemble import build, evaluate_and_log, in_search

    records = (runner or rerun.run_all)(plan(cfg, runs), setup, cfg.search.max_concurrent)
    failed = [r for r in records if r["status"] != "finished"]
    if failed:
        log.error("refit of %s failed (%s): registering the ensemble as chosen, not refitted",
                  failed[0]["run"], failed[0]["error"])
        return None
    members = [r["summary"]["best_checkpoint"] for r in records]
    ens_cfg, folders = build(members, f"{cfg.search.name}-ensemble-refit",
                             [*in_search(cfg, search_dir), f"data.train_split={union(cfg)}"])
    hub = before.get("hubness") or {}
    metric = cfg.train.metric
    summary = evaluate_and_log(ens_cfg, folders, members, tags={"mlflow.parentRunId": parent["run_id"]},
                               cca_weight=cfg.search.ensemble_cca, cca_dim=cfg.search.ensemble_cca_dim,
                               cca_key="search.ensemble_cca_dim",
                               hubness=f"{hub['k']},{hub['weight']}" if hub.get("weight") else "off",
                               selection={"score": before[f"val_{metric}"], "run_id": before.get("run_id")})
    log.info("refitted on %s: test %s %.2f (before the refit %.2f)", union(cfg), metric,
             summary["test"][metric], before["test"][metric])
    return summary


def trained_on(cfg: Config) -> Config:
    """`cfg` as the refitted model was trained: on the union (what its registry version records)."""
    from itmatch.config import load_config

    return load_config(None, {**cfg.flat(), "data.train_split": union(cfg)})
