"""Robust selection: the configuration the search keeps is the one with the best mean validation
score over its seeds, not the luckiest single run (a 100-image validation split moves rsum by ±8
from the seed alone). Pure functions over the trial rows and the re-runs' records, so the rule is
tested against hand-computed tables without Ray.

A score is one run of a configuration: the trial itself (its `train.seed`) or one of its re-runs
(`train.seed` + 1, + 2, ...). With no re-runs every finished trial is a candidate with one score,
which is the plain "best trial by validation score" rule.
"""

from __future__ import annotations

import statistics
from typing import Any, Optional


def top_trials(rows: list[dict], metric: str, top: int) -> list[dict]:
    """The `top` finished trials by validation score; ties go to the first trial id (a restored
    search lists its rows in another order and must pick the same ones)."""
    done = sorted((r for r in rows if r["summary"]), key=lambda r: r["trial_id"])
    return sorted(done, key=lambda r: -r["summary"][f"val_{metric}"])[:top]


def scores(row: dict, reruns: list[dict], metric: str, seed: int) -> list[dict[str, Any]]:
    """One score per finished run of the trial's configuration: the trial first, then its re-runs
    by seed. `seed`: the trial's own train.seed."""
    runs = [(seed, row["summary"])] + sorted((r["seed"], r["summary"]) for r in reruns
                                             if r["trial_id"] == row["trial_id"] and r["summary"])
    return [{"seed": s, "val": summary[f"val_{metric}"], "test": summary["test"].get(metric),
             "run_id": summary.get("run_id"), "model_uri": summary.get("model_uri"),
             "checkpoint": summary.get("best_checkpoint")} for s, summary in runs]


def spread(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); no spread from a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def candidate(row: dict, runs: list[dict]) -> dict[str, Any]:
    """A configuration's seeds summarised; its model is the seed with the best validation score
    (ties: the trial's own run, listed first)."""
    mean, std = spread([s["val"] for s in runs])
    tests = [s["test"] for s in runs if s["test"] is not None]
    return {"trial_id": row["trial_id"], "params": row["params"], "seeds": runs, "n": len(runs),
            "val_mean": mean, "val_std": std, "test_mean": statistics.fmean(tests) if tests else None,
            "model": max(runs, key=lambda s: s["val"])}


def select(rows: list[dict], reruns: list[dict], metric: str, top: int,
           seed_of: dict[str, int]) -> tuple[Optional[dict], list[dict]]:
    """(the chosen candidate or None, every candidate). With `top` > 0 only the `top` trials by
    validation score compete (the ones re-run); otherwise every finished trial, on its one score.
    Best mean wins; ties: the smaller spread (a single score counts as none), then the first trial id."""
    pool = top_trials(rows, metric, top or len(rows))
    cands = [candidate(r, scores(r, reruns, metric, seed_of[r["trial_id"]])) for r in pool]
    ordered = ranked(cands)
    return (ordered[0] if ordered else None), cands


def ranked(cands: list[dict]) -> list[dict]:
    """Candidates best first: mean validation score, then the smaller spread, then the trial id."""
    return sorted(cands, key=lambda c: (-c["val_mean"], c["val_std"] or 0.0, c["trial_id"]))


def ensemble_members(cands: list[dict], top: int) -> list[dict]:
    """The seed runs (with a checkpoint) of the `top` best candidates, best configuration first:
    what `search.ensemble` averages (`search.ensemble_top`)."""
    return [{**s, "trial_id": c["trial_id"]} for c in ranked(cands)[:top] for s in c["seeds"] if s.get("checkpoint")]
