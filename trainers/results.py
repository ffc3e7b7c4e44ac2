"""Find, copy and evaluate trained weights: Ray checkpoint folders, plain folders, MLflow URIs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from itmatch.config import Config
from itmatch.data.phrase_store import PhraseSplit
from itmatch.data.store import FeatureSplit
from itmatch.eval.evaluate import embed_split, evaluate_embeddings
from itmatch.state import load_checkpoint, load_model


def best_checkpoint_folder(result, dest: Path) -> Path:
    """Copy the best weights of the run's latest checkpoint to a stable folder and return it."""
    from trainers.loop import BEST_DIR

    if result.checkpoint is None:
        raise RuntimeError(f"the run at {result.path} reported no checkpoint (did every epoch fail?)")
    with result.checkpoint.as_directory() as folder:
        source = Path(folder) / BEST_DIR
        if not source.is_dir():
            raise RuntimeError(f"checkpoint {result.checkpoint.path} holds no {BEST_DIR}/ weights")
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest


def evaluate_folder(folder: Path, split: FeatureSplit, cfg: Config, plots_dir: Optional[Path] = None) -> dict[str, Any]:
    """Test metrics of a checkpoint; with `plots_dir`, also its plots and the overlap indicator."""
    model, _ = load_model(folder)
    img, txt = embed_split(model, split)  # once, for the metrics and the plots
    metrics: dict[str, Any] = evaluate_embeddings(model, img, txt, split, chunk=cfg.train.eval_chunk)
    state = load_checkpoint(folder)[0]["train_state"]
    if plots_dir is not None and isinstance(split, PhraseSplit):  # retrieval's plots rank whole galleries
        from itmatch.eval.plots import training_curves

        if state.history:
            training_curves(state.history, Path(plots_dir) / "training.png", cfg.train.metric)
    elif plots_dir is not None:
        from itmatch.eval.plots import write_plots

        metrics.update(write_plots(img, txt, torch.from_numpy(split.caption_image), state.history, plots_dir,
                                   cfg.train.metric))
    metrics["_val_score"] = state.best_metric
    metrics["_best_epoch"] = state.best_epoch
    return metrics


class ModelRefError(LookupError):
    """A model reference that names nothing loadable: unknown registered model, alias, version or run."""


def resolve_model(ref: str, tracking_uri: Optional[str] = None):
    """A checkpoint folder (a Ray checkpoint's best/ is preferred), or an MLflow models:/ or runs:/ URI."""
    if "://" in ref or ref.startswith(("models:", "runs:")):
        import mlflow

        from trainers.tracking import resolve_uri

        from mlflow.exceptions import MlflowException

        from trainers.preflight import check_tracking_uri

        if tracking_uri:
            check_tracking_uri(tracking_uri, key="--tracking-uri")  # else MLflow retries for minutes
            mlflow.set_tracking_uri(resolve_uri(tracking_uri))
        try:
            wrapper = mlflow.pyfunc.load_model(ref).unwrap_python_model()
        except (MlflowException, OSError) as exc:  # unknown name, version, alias or run; missing artifacts
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ModelRefError(f"--model {ref}: cannot load from {mlflow.get_tracking_uri()} ({first})") from exc
        return wrapper.model, wrapper.cfg
    folder = Path(ref)
    if (folder / "best").is_dir():
        folder = folder / "best"
    from itmatch.models.ensemble import is_ensemble

    if not (folder / "state.pt").is_file() and not is_ensemble(folder):
        raise FileNotFoundError(f"--model {ref}: not a checkpoint folder (state.pt + config.yaml), an ensemble "
                                "folder (ensemble.json) nor an MLflow URI such as models:/NAME@ALIAS")
    return load_model(folder)
