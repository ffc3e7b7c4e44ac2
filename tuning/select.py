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


def top_trials(rows: list[dict], metric: str, top: int, per: Optional[str] = None) -> list[dict]:
    """The `top` finished trials by validation score; ties go to the first trial id (a restored
    search lists its rows in another order and must pick the same ones). With `per`, a searched
    key: the `top` of each of its values, and for a value whose trials the scheduler all stopped
    early (ASHA compares across values), its best stopped trials by their best validation score so
    far: re-runs (`tuning.rerun.plan`) then train it to the end with its own seed as well."""
    by_id = sorted(rows, key=lambda r: r["trial_id"])
    done = sorted((r for r in by_id if r["summary"]), key=lambda r: -r["summary"][f"val_{metric}"])
    kept = _top_per(done, top, per)
    if per is None:
        return kept
    seen = {_value(r, per) for r in kept}
    stopped = sorted((r for r in by_id if r["status"] == "stopped" and r.get("best_val") is not None),
                     key=lambda r: -r["best_val"])
    return kept + [r for r in _top_per(stopped, top, per) if _value(r, per) not in seen]


def _value(item: dict, per: str) -> str:
    """A trial's (or candidate's) value of the searched key `per`, as a comparable string."""
    return repr(item["params"].get(per))


def _top_per(ordered: list[dict], top: int, per: Optional[str]) -> list[dict]:
    """The first `top` of `ordered`, or with `per` the first `top` of each value of its params[per]."""
    if per is None:
        return ordered[:top]
    taken: dict[str, int] = {}
    kept = []
    for item in ordered:
        value = _value(item, per)
        if taken.get(value, 0) < top:
            taken[value] = taken.get(value, 0) + 1
            kept.append(item)
    return kept


def scores(row: dict, reruns: list[dict], metric: str, seed: int) -> list[dict[str, Any]]:
    """One score per finished run of the trial's configuration: the trial first (unless the
    scheduler stopped it), then its re-runs by seed. `seed`: the trial's own train.seed."""
    own = [(seed, row["summary"])] if row["summary"] else []
    runs = own + sorted((r["seed"], r["summary"]) for r in reruns if r["trial_id"] == row["trial_id"] and r["summary"])
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
           seed_of: dict[str, int], per: Optional[str] = None) -> tuple[Optional[dict], list[dict]]:
    """(the chosen candidate or None, every candidate). With `top` > 0 only the `top` trials by
    validation score (of each value of `per`) compete, the ones re-run; otherwise every finished
    trial, on its one score. Best mean wins; ties: the smaller spread (a single score counts as
    none), then the first trial id."""
    pool = top_trials(rows, metric, top, per) if top else top_trials(rows, metric, len(rows))
    runs = [(r, scores(r, reruns, metric, seed_of[r["trial_id"]])) for r in pool]
    cands = [candidate(r, s) for r, s in runs if s]  # a stopped trial whose re-runs all failed: none
    ordered = ranked(cands)
    return (ordered[0] if ordered else None), cands


def ranked(cands: list[dict]) -> list[dict]:
    """Candidates best first: mean validation score, then the smaller spread, then the trial id."""
    return sorted(cands, key=lambda c: (-c["val_mean"], c["val_std"] or 0.0, c["trial_id"]))


def ensemble_members(cands: list[dict], top: int, per: Optional[str] = None) -> list[dict]:
    """The seed runs (with a checkpoint) of the `top` best candidates (of each value of `per`), best
    configuration first: what `search.ensemble` averages (`search.ensemble_top`, `search.rerun_per`)."""
    chosen = _top_per(ranked(cands), top, per)
    return [{**s, "trial_id": c["trial_id"], "params": c.get("params", {})} for c in chosen for s in c["seeds"]
            if s.get("checkpoint")]
