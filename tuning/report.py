"""A finished search's results: the trial table (params, epochs run, best val, status), its plots
(validation score against each searched parameter), and the MLflow bookkeeping: every child run
terminal, the table and plots on the parent run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from trainers.job import SUMMARY_FILE

TRIAL_TAG = "itmatch.trial_id"
# A trial's status -> the MLflow status its run must end with.
RUN_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def trial_row(result, trials_dir: Path) -> dict[str, Any]:
    """One row of the table from Tune's Result and the summary the trial wrote (if it got that far)."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or Path(result.path).name
    path = trials_dir / trial_id / SUMMARY_FILE
    summary = json.loads(path.read_text()) if path.is_file() else None
    status = "failed" if result.error else "finished" if summary else "stopped"
    return {"trial_id": trial_id, "params": result.config["params"], "status": status,
            "epochs": metrics.get("epoch"), "best_val": metrics.get("best_metric"),
            "error": str(result.error)[:300] if result.error else None, "summary": summary}


def run_name(search: str, trial_id: str, params: dict[str, Any]) -> str:
    """A child run's name a person can tell apart: `<search>-<trial id>-lr=0.001,margin=0.2`."""
    short = ",".join(f"{key.rsplit('.', 1)[-1]}={_fmt(value)}" for key, value in sorted(params.items()))
    return f"{search}-{trial_id}-{short}"[:250]


def close_child_runs(parent: dict, rows: list[dict]) -> None:
    """End every child run by its trial's outcome, which only the driver knows: a trial Tune stops
    is killed mid-`fit()` (its run is left RUNNING, or FAILED by the error the stop raises in it)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent["tracking_uri"])
    wanted = {r["trial_id"]: RUN_STATUS[r["status"]] for r in rows}
    children = client.search_runs([parent["experiment_id"]],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent['run_id']}'")
    for run in children:
        status = wanted.get(run.data.tags.get(TRIAL_TAG), "KILLED")
        if run.info.status != status and (run.info.status == "RUNNING" or status != "FINISHED"):
            client.set_terminated(run.info.run_id, status=status)


def table(rows: list[dict], metric: str, best: Optional[dict]) -> str:
    """The trials as a Markdown table, best validation score first."""
    keys = sorted({k for r in rows for k in r["params"]})
    lines = ["| trial | " + " | ".join(keys) + f" | epochs | best val {metric} | test {metric} | status |",
             "|---" * (len(keys) + 5) + "|"]
    for r in sorted(rows, key=lambda r: -(r["best_val"] if r["best_val"] is not None else float("inf"))):
        test = r["summary"]["test"][metric] if r["summary"] else None
        status = "best" if best and r["trial_id"] == best["trial_id"] else r["status"]
        values = " | ".join(_fmt(r["params"].get(k)) for k in keys)
        lines.append(f"| {r['trial_id']} | {values} | {r['epochs']} | {_fmt(r['best_val'])} | {_fmt(test)} | {status} |")
    return "\n".join(lines)


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


def log_parent(parent: dict, rows: list[dict], best: Optional[dict], metric: str, search_dir: Path) -> None:
    """The search's own MLflow run: best score and params, the trial table, plots; then ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(parent["tracking_uri"])
    if best:
        client.log_metric(parent["run_id"], f"best_val_{metric}", best["summary"][f"val_{metric}"])
        client.set_tag(parent["run_id"], "itmatch.best_trial", best["trial_id"])
        for key, value in best["params"].items():
            client.set_tag(parent["run_id"], f"best.{key}", str(value))
    client.log_table(parent["run_id"], data=_columns(rows), artifact_file="trials.json")
    client.log_artifact(parent["run_id"], str(search_dir / "search.json"))
    client.log_artifacts(parent["run_id"], str(search_dir / "plots"), "plots")
    client.set_terminated(parent["run_id"], status="FINISHED" if best else "FAILED")


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = sorted({k for r in rows for k in r["params"]})
    cols: dict[str, list] = {"trial_id": [r["trial_id"] for r in rows], "status": [r["status"] for r in rows],
                             "epochs": [r["epochs"] for r in rows], "best_val": [r["best_val"] for r in rows]}
    cols.update({k: [str(r["params"].get(k)) for r in rows] for k in keys})
    return cols


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)
