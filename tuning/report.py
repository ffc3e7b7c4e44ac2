"""A finished search's results: the trial table (params, epochs run, best val, status), its plots
(validation score against each searched parameter), and the MLflow bookkeeping: every child run
terminal, the table and plots on the parent run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from trainers.job import SUMMARY_FILE
from tuning.rerun import RERUN_TAG, reason

TRIAL_TAG = "itmatch.trial_id"
# A trial's status -> the MLflow status its run must end with.
RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def trial_row(result, trials_dir: Path) -> dict[str, Any]:
    """One row of the table from Tune's Result and the summary the trial wrote (if it got that far)."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name
    path = trial_folder(trials_dir, trial_id) / SUMMARY_FILE
    summary = json.loads(path.read_text()) if path.is_file() else None
    status = "failed" if result.error else "finished" if summary else "stopped"
    return {"trial_id": trial_id, "params": result.config["params"], "status": status,
            "epochs": int(metrics["epoch"]) if metrics.get("epoch") is not None else None,  # a float once restored
            "best_val": metrics.get("best_metric"),
            "wall_s": metrics.get("time_total_s"),
            "error": reason(result.error) if result.error else None, "summary": summary}


def trial_folder(trials_dir: Path, trial_id: str) -> Path:
    """The trial's run folder: its last PBT generation `<trial>-g<n>` if it has one."""
    generations = [p for p in trials_dir.glob(f"{trial_id}-g*") if p.name.rsplit("-g", 1)[1].isdigit()]
    return max(generations, key=lambda p: int(p.name.rsplit("-g", 1)[1])) if generations else trials_dir / trial_id


def run_name(search: str, trial_id: str, params: dict[str, Any]) -> str:
    """A child run's name a person can tell apart: `<search>-<trial id>-lr=0.001,margin=0.2`."""
    short = ",".join(f"{key.rsplit('.', 1)[-1]}={_fmt(value)}" for key, value in sorted(params.items()))
    return f"{search}-{trial_id}-{short}"[:250]


def close_child_runs(parent: dict, rows: list[dict], reruns: list[dict]) -> None:
    """End every child run by its trial's (or seed re-run's) outcome, which only the driver knows: a
    trial Tune stops is killed mid-`fit()` (its run is left RUNNING, or FAILED by the error the stop
    raises in it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent["tracking_uri"])
    wanted = {r["trial_id"]: RUN_STATUS[r["status"]] for r in rows}
    wanted.update({r["run"]: RUN_STATUS[r["status"]] for r in reruns})
    children = client.search_runs([parent["experiment_id"]],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    for run in children:
        tags = run.data.tags
        status = wanted.get(tags.get(RERUN_TAG) or tags.get(TRIAL_TAG), "KILLED")
        if run.info.status != status and (run.info.status == "RUNNING" or status != "FINISHED"):
            client.set_terminated(run.info.run_id, status=status)


def table(rows: list[dict], metric: str, best: Optional[dict], candidates: Optional[list[dict]] = None) -> str:
    """The trials as a Markdown table, best validation score first; with seed re-runs
    (`candidates`), two more columns: validation mean ± std over the seeds (n) and the test mean."""
    keys = sorted({k for r in rows for k in r["params"]})
    seeds = {c["trial_id"]: c for c in candidates or []}
    extra = f" val {metric} mean ± std (seeds) | test {metric} mean |" if candidates is not None else ""
    lines = ["| trial | " + " | ".join(keys) + f" | epochs | best val {metric} | test {metric} |{extra} status |",
             "|---" * (len(keys) + 5 + (2 if extra else 0)) + "|"]
    for r in sorted(rows, key=lambda r: -(r["best_val"] if r["best_val"] is not None else float("inf"))):
        test = r["summary"]["test"][metric] if r["summary"] else None
        status = "best" if best and r["trial_id"] == best["trial_id"] else r["status"]
        values = " | ".join(_fmt(r["params"].get(k)) for k in keys)
        more = _seed_cells(seeds.get(r["trial_id"])) if extra else ""
        lines.append(f"| {r['trial_id']} | {values} | {r['epochs']} | {_fmt(r['best_val'])} | {_fmt(test)} |"
                     f"{more} {status} |")
    return "\n".join(lines)


def mean_std(c: dict) -> str:
    """`392.1 ± 4.3 (n=3)`; a single score has no spread."""
    std = f" ± {c['val_std']:.1f}" if c["val_std"] is not None else ""
    return f"{c['val_mean']:.1f}{std} (n={c['n']})"


def _seed_cells(c: Optional[dict]) -> str:
    if c is None:
        return " | |"
    return f" {mean_std(c)} | {_fmt(c['test_mean'])} |"


def plot_params(rows: list[dict], metric: str, folder: Path) -> list[Path]:
    """One scatter per searched parameter: best validation score of each trial against its value,
    marked by status (a stopped trial's score is at the epoch it was stopped)."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key in sorted({k for r in rows for k in r["params"]}):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = [r["params"].get(key) for r in rows]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        labels = sorted({str(x) for x in xs})
        for status, marker in (("finished", "o"), ("stopped", "x"), ("failed", "s")):
            pts = [(x if numeric else labels.index(str(x)), r["best_val"]) for x, r in zip(xs, rows)
                   if r["status"] == status and r["best_val"] is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=status)
        if numeric and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best val {metric}")
        ax.legend()
        fig.tight_layout()
        path = folder / f"val_{metric}_vs_{key}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def log_parent(parent: dict, rows: list[dict], best: Optional[dict], metric: str, search_dir: Path,
               candidates: list[dict]) -> None:
    """The search's own MLflow run: the choice (its params, registered seed's score, mean ± std over
    its seeds), the trial and seed tables, plots; then ended."""
    from mlflow.tracking import MlflowClient

    client, run_id = MlflowClient(parent["tracking_uri"]), parent["run_id"]
    if best:
        choice = best["selection"]
        client.log_metric(run_id, f"best_val_{metric}", choice["model"]["val"])
        client.log_metric(run_id, f"best_val_{metric}_mean", choice["val_mean"])
        if choice["val_std"] is not None:
            client.log_metric(run_id, f"best_val_{metric}_std", choice["val_std"])
        client.set_tag(run_id, "itmatch.best_trial", best["trial_id"])
        client.set_tag(run_id, "itmatch.best_seeds", mean_std(choice))
        client.set_tag(run_id, "itmatch.best_seed", str(choice["model"]["seed"]))
        if choice["model"].get("hubness"):
            hub = choice["model"]["hubness"]
            client.set_tag(run_id, "itmatch.best_hubness",
                           f"k={hub['k']} w={hub['weight']}" if hub["weight"] else "none kept")
        if choice["model"].get("refit"):  # what is registered is the choice re-trained on more data
            client.set_tag(run_id, "itmatch.best_refit", f"trained on {choice['model']['refit']['train_split']}; "
                           f"registered run {choice['model']['run_id']}")
        for key, value in best["params"].items():
            client.set_tag(run_id, f"best.{key}", str(value))
    client.log_table(run_id, data=_columns(rows), artifact_file="trials.json")
    if candidates:
        client.log_table(run_id, data=_seed_columns(candidates), artifact_file="seeds.json")
    client.log_artifact(parent["run_id"], str(search_dir / "search.json"))
    client.log_artifacts(parent["run_id"], str(search_dir / "plots"), "plots")
    client.set_terminated(parent["run_id"], status="FINISHED" if best else "FAILED")


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = sorted({k for r in rows for k in r["params"]})
    cols: dict[str, list] = {"trial_id": [r["trial_id"] for r in rows], "status": [r["status"] for r in rows],
                             "epochs": [r["epochs"] for r in rows], "best_val": [r["best_val"] for r in rows]}
    cols.update({k: [str(r["params"].get(k)) for r in rows] for k in keys})
    return cols


def _seed_columns(candidates: list[dict]) -> dict[str, list]:
    """One row per run of each candidate configuration: the seeds behind every mean ± std."""
    runs = [(c, s) for c in candidates for s in c["seeds"]]
    return {"trial_id": [c["trial_id"] for c, _ in runs], "seed": [s["seed"] for _, s in runs],
            "val": [s["val"] for _, s in runs], "test": [s["test"] for _, s in runs],
            "val_mean": [c["val_mean"] for c, _ in runs], "val_std": [c["val_std"] for c, _ in runs]}


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
