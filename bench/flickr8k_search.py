"""The README's real-data search, timed, beside CCA and a standalone run, in one session:

    .venv/bin/python bench/flickr8k_search.py [--rerun-top 2 --rerun-seeds 2 [--ensemble]] [key=value ...]

1. CCA (`model.name=cca`) through `trainers.train` on the same data (the baseline to beat on test),
   and the same CCA with the hubness correction the search's ensemble gets (`trainers.ensemble
   --hubness auto`: chosen on validation), for a like-for-like comparison, and CCA fitted on
   train+val (what the preset's refit trains on);
2. `python -m tuning.search --config configs/flickr8k_precomp.yaml --space configs/search/flickr8k.yaml
   --num-samples 16 --search optuna --scheduler asha` (+ re-run flags), wall time of the command;
3. the chosen trial's configuration (its own seed and worker count) alone through `trainers.train`:
   the per-trial overhead is the trial's run (MLflow start -> summary.json: fit + test; trials log no
   model) against the standalone run's (fit + test + log_model), and the standalone command's whole
   wall time (Ray start and shutdown included).
Prints the trial table, the selection and the comparison as Markdown. Writes only to a temp folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from flickr8k_precomp import run as train_run  # noqa: E402  (trainers.train with tmp paths)

SEARCH = ["--config", "configs/flickr8k_precomp.yaml", "--space", "configs/search/flickr8k.yaml",
          "--num-samples", "16", "--search", "optuna", "--scheduler", "asha"]


def tmp_paths(tmp: Path) -> list[str]:
    return [f"run.storage_path={tmp / 'runs'}", f"data.cache_dir={tmp / 'cache'}",
            f"tracking.tracking_uri=sqlite:///{tmp / 'mlruns.db'}", f"tracking.artifact_location={tmp / 'art'}"]


def run_search(tmp: Path, extra: list[str]) -> tuple[dict, float, str]:
    args = [sys.executable, "-m", "tuning.search", *SEARCH, "--name", "bench", *extra, *tmp_paths(tmp)]
    print("$", " ".join(args[1:]), flush=True)
    start = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-4000:])
    return json.loads((tmp / "runs" / "bench" / "search.json").read_text()), elapsed, done.stdout


def corrected(tmp: Path, run: str, overrides: list[str]) -> dict:
    """`trainers.ensemble RUN --hubness auto`: a run with the search's hubness correction, chosen
    on validation the same way (here: CCA, so the comparison is like for like as well)."""
    args = [sys.executable, "-m", "trainers.ensemble", str(tmp / "runs" / run), "--name", f"{run}-hubness",
            "--hubness", "auto", *overrides, *tmp_paths(tmp), "tracking.registered_model="]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-4000:])
    return json.loads((tmp / "runs" / f"{run}-hubness" / "summary.json").read_text())


def run_seconds(db: Path, run_id: str, summary: Path) -> float:
    """A job's span: from its MLflow run's start to its summary.json (fit + test, + log_model where the
    job logs one; the search logs its chosen trial's model later, into the same run)."""
    from mlflow.tracking import MlflowClient

    info = MlflowClient(f"sqlite:///{db}").get_run(run_id).info
    return summary.stat().st_mtime - info.start_time / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rerun-top", type=int, default=0)
    parser.add_argument("--rerun-seeds", type=int, default=2)
    parser.add_argument("--ensemble", action="store_true", help="register the chosen configuration's seeds as one")
    parser.add_argument("--workdir", help="keep the runs, models and MLflow db here (default: a temp folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    extra = [*(["--rerun-top", str(args.rerun_top), "--rerun-seeds", str(args.rerun_seeds)] if args.rerun_top else []),
             *(["--ensemble"] if args.ensemble else []), *args.overrides]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(args.workdir or folder).resolve()
        cca, cca_wall = train_run("bench-cca", ["model.name=cca", "model.embed_dim=128", "model.cca_ridge=0.3",
                                                *args.overrides], tmp)  # the same data as the search
        cca_hub = corrected(tmp, "bench-cca", args.overrides)
        # CCA on the data a refit trains on (train+val): how much of a refit's gain is the data alone
        cca_tv, _ = train_run("bench-cca-trainval", ["model.name=cca", "model.embed_dim=128", "model.cca_ridge=0.3",
                                                     "data.train_split=train+val", "tracking.registered_model=",
                                                     *args.overrides], tmp)
        result, search_wall, stdout = run_search(tmp, extra)
        best = result["best"]
        choice = best["selection"]
        trial_dir = tmp / "runs" / "bench" / "trials" / best["trial_id"]
        workers = yaml.safe_load((trial_dir / "config.yaml").read_text())["scaling"]["num_workers"]
        alone_overrides = [f"{k}={v}" for k, v in best["params"].items()] + [f"scaling.num_workers={workers}",
                                                                             *args.overrides]
        alone, alone_wall = train_run("bench-alone", alone_overrides, tmp)
        trial_s = run_seconds(tmp / "mlruns.db", best["summary"]["run_id"], trial_dir / "summary.json")
        alone_s = run_seconds(tmp / "mlruns.db", alone["run_id"], tmp / "runs" / "bench-alone" / "summary.json")
    report(result, stdout, search_wall, cca, cca_wall, choice, alone, alone_wall, trial_s, alone_s, cca_hub, cca_tv)


def report(result: dict, stdout: str, search_wall: float, cca_summary: dict, cca_wall: float, choice: dict,
           alone: dict, alone_wall: float, trial_s: float, alone_s: float, cca_hub: dict, cca_tv: dict) -> None:
    cca, cca_val = cca_summary["test"]["rsum"], cca_summary["val_rsum"]
    table = stdout[stdout.index("| trial |"):].strip() if "| trial |" in stdout else "(no table)"
    trials = result["trials"]
    counts = {s: sum(t["status"] == s for t in trials) for s in ("finished", "stopped", "failed")}
    model = choice["model"]
    rerun_s = sum(r["wall_s"] or 0.0 for r in result["reruns"])
    print(f"\nsearch wall time: {search_wall:.0f} s ({search_wall / 60:.1f} min); trials {counts}; "
          f"seed re-runs: {len(result['reruns'])} ({rerun_s:.0f} s of the wall time)\n")
    print(table)
    print("\n| model (test split) | test rsum | / CCA | val rsum |\n|---|---|---|---|")
    print(f"| CCA (model.name=cca, this session, {cca_wall:.0f} s) | {cca:.1f} | 1.000 | {cca_val:.1f} |")
    hub = cca_hub["hubness"]
    print(f"| CCA with the hubness correction chosen on val (k={hub['k']}, w={hub['weight']}) | "
          f"{cca_hub['test']['rsum']:.1f} | {cca_hub['test']['rsum'] / cca:.3f} | {cca_hub['val_rsum']:.1f} |")
    tv = cca_tv["test"]["rsum"]
    print(f"| CCA fitted on train+val (what a refit trains on) | {tv:.1f} | {tv / cca:.3f} | "
          f"{cca_tv['val_rsum']:.1f} (in training) |")
    what = f"ensemble of seeds {model['seed']}" if isinstance(model["seed"], list) else f"seed {model['seed']}"
    hub = model.get("hubness") or {}
    what += f", hubness k={hub['k']} w={hub['weight']}" if hub.get("weight") else ", no hubness correction"
    refit = model.get("refit")
    what += f", refitted on {refit['train_split']}" if refit else ""
    print(f"| chosen: trial {choice['trial_id']}, registered {what} | {model['test']:.1f} | "
          f"{model['test'] / cca:.3f} | {model['val']:.1f} ({model['val'] / cca_val:.3f}x CCA's; before any refit) |")
    if refit:
        before = refit["before"]["test"]
        print(f"| the same ensemble before the refit (trained on the training split) | {before:.1f} | "
              f"{before / cca:.3f} | {model['val']:.1f} |")
    if hub.get("weight"):
        plain = hub["test_rsum_plain"]
        print(f"| the registered ensemble without the correction | {plain:.1f} | {plain / cca:.3f} | "
              f"{hub['val_rsum_plain']:.1f}{' (in training)' if refit else ''} |")
    if choice["n"] > 1:
        tests = [s["test"] for s in choice["seeds"]]
        spread = (max(tests) - min(tests)) / 2
        print(f"| chosen configuration, mean of {choice['n']} seeds (test ±{spread:.1f} half-range) | "
              f"{choice['test_mean']:.1f} | {choice['test_mean'] / cca:.3f} | "
              f"{choice['val_mean']:.1f} ± {choice['val_std']:.1f} |")
    own = choice["seeds"][0]  # the trial's own run, which the standalone run repeats
    print(f"| chosen trial's own run (seed {own['seed']}) | {own['test']:.1f} | {own['test'] / cca:.3f} | {own['val']:.1f} |")
    print(f"| the same alone (trainers.train, seed {own['seed']}) | {alone['test']['rsum']:.1f} | "
          f"{alone['test']['rsum'] / cca:.3f} | {alone['val_rsum']:.1f} |")
    print("\n| per-trial cost | seconds |\n|---|---|")
    print(f"| chosen trial's job in the search (MLflow start -> summary: fit + test) | {trial_s:.0f} |")
    print(f"| the same job alone (trainers.train, MLflow start -> summary: fit + test + log_model) | {alone_s:.0f} |")
    print(f"| the same job alone, whole command (Ray start/shutdown included) | {alone_wall:.0f} |")
    print(f"| overhead of the trial over its job alone | {100 * (trial_s / alone_s - 1):+.0f} % |")


if __name__ == "__main__":
    main()
