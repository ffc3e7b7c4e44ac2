"""Find, copy and evaluate trained weights: Ray checkpoint folders, plain folders, MLflow URIs."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from itmatch.config import Config, ConfigError, EvalConfig
from itmatch.data.phrase_store import PhraseSplit, prepare_phrases
from itmatch.data.sources import DataError
from itmatch.data.store import FeatureSplit, SplitRows
from itmatch.eval.evaluate import embed_split, evaluate_embeddings
from itmatch.files import replace_folder, staging_folder
from itmatch.state import CheckpointError, load_checkpoint, load_model

log = logging.getLogger("itmatch.results")


def best_checkpoint_folder(result, dest: Path) -> Path:
    """Copy the best weights of the run's latest checkpoint to a stable folder and return it."""
    from trainers.loop import BEST_DIR

    if result.checkpoint is None:
        raise RuntimeError(f"the run at {result.path} reported no checkpoint (did every epoch fail?)")
    with result.checkpoint.as_directory() as folder:
        source = Path(folder) / BEST_DIR
        if not source.is_dir():
            raise RuntimeError(f"checkpoint {result.checkpoint.path} holds no {BEST_DIR}/ weights")
        return copy_folder(source, dest)


def copy_folder(source: Path, dest: Path) -> Path:
    """A copy of `source` at `dest`, swapped in whole (the old `dest` is never half gone)."""
    staged = staging_folder(dest)
    try:
        shutil.copytree(source, staged)
        return replace_folder(staged, dest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone once swapped in


def evaluate_folder(folder: Path, split: FeatureSplit, cfg: Config, plots_dir: Optional[Path] = None,
                    split_name: Optional[str] = None,
                    loaded: Optional[tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]] = None) -> dict[str, Any]:
    """Test metrics of a checkpoint with the overlap indicator; with `plots_dir`, also its plots;
    with eval.region_phrase_model, also 001 Eq. 8's eq8_* metrics on `split_name` (default
    data.test_split: what `split` is). `loaded`: the checkpoint's model and its embeddings of
    `split` where the caller has them (`load_and_embed`), so they are not computed twice."""
    model, (img, txt) = loaded if loaded is not None else load_and_embed(folder, split)
    metrics: dict[str, Any] = evaluate_embeddings(model, img, txt, split, chunk=cfg.train.eval_chunk)
    if cfg.eval.region_phrase_model and not isinstance(split, PhraseSplit):
        metrics.update(_eq8_or_warn(model, img, txt, split, cfg, split_name or cfg.data.test_split))
    state = load_checkpoint(folder)[0]["train_state"]
    if plots_dir is not None and isinstance(split, PhraseSplit):  # retrieval's plots rank whole galleries
        from itmatch.eval.plots import training_curves

        if state.history:
            training_curves(state.history, Path(plots_dir) / "training.png", cfg.train.metric)
    elif plots_dir is not None:
        from itmatch.eval.plots import write_plots

        metrics.update(write_plots(img, txt, torch.from_numpy(split.caption_image), state.history, plots_dir,
                                   cfg.train.metric))
    elif not isinstance(split, PhraseSplit):
        from itmatch.eval.retrieval import overlap_indicator

        metrics["overlap"] = overlap_indicator(img, txt, torch.from_numpy(split.caption_image))  # what the plot shows
    metrics["_val_score"] = state.best_metric
    metrics["_best_epoch"] = state.best_epoch
    return metrics


def load_and_embed(folder: Path, split: FeatureSplit) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """A checkpoint's model and its (image, caption) embeddings of `split` -- computed once for the
    metrics, Eq. 8, the plots and the pictures (with towers, embedding a test split is most of
    what a run's end costs)."""
    model, _ = load_model(folder)
    return model, embed_split(model, split)


def _eq8_or_warn(model: nn.Module, img: torch.Tensor, txt: torch.Tensor, split: SplitRows, cfg: Config,
                 split_name: str) -> dict[str, float]:
    """Eq. 8's metrics at the end of a run; the preflight checked its inputs before training, so a
    failure here (files gone since) warns rather than losing the trained run's logging."""
    try:
        setup = eq8_setup(cfg.eval, split_name, tracking_uri=cfg.tracking.tracking_uri, cache_dir=cfg.data.cache_dir)
        return setup.evaluate(model, img, txt, split, chunk=cfg.train.eval_chunk)
    except (ConfigError, DataError) as exc:
        log.warning("001 Eq. 8 metrics not computed: %s", exc)
        return {}


@dataclass
class Eq8Setup:
    """001 Eq. 8's region-phrase side for one split: the model, that split of the region-phrase data."""

    model: nn.Module
    phrases: PhraseSplit
    alpha: float
    where: str  # the key and value that named the region-phrase data and split, for errors

    def evaluate(self, model: nn.Module, img: torch.Tensor, txt: torch.Tensor, split: SplitRows, *,
                 chunk: int = 1024) -> dict[str, float]:
        """The eq8_* metrics of `model`, whose embeddings of `split` are `img`, `txt`."""
        from itmatch.eval.eq8 import evaluate_eq8

        return evaluate_eq8(model, img, txt, split, self.model, self.phrases, alpha=self.alpha, chunk=chunk,
                            where=self.where)


def eq8_setup(ev: EvalConfig, split_name: str, *, tracking_uri: Optional[str], cache_dir: str | Path) -> Eq8Setup:
    """Load eval.region_phrase_model and prepare (or find cached) split `split_name` of its data
    (eval.region_phrase_data, else the source it was trained on) with its own encoders. A
    ConfigError / DataError naming the key and value when the model is not a region-phrase model,
    cannot be loaded, or its data lacks the split or does not fit it."""
    ref = ev.region_phrase_model
    key = f"eval.region_phrase_model = {ref!r}"
    try:
        model, pcfg = resolve_model(ref, tracking_uri, key="eval.region_phrase_model")
    except (ModelRefError, FileNotFoundError, CheckpointError) as exc:
        raise ConfigError(str(exc)) from None
    if pcfg.data.task != "phrases":
        raise ConfigError(f"{key} is not a region-phrase model: it was trained on data.source={pcfg.data.source!r} "
                          "(image-caption data); give one trained on entities: or shapes-phrases: data "
                          "(e.g. configs/shapes_phrases.yaml)")
    source = ev.region_phrase_data or pcfg.data.source
    data = f"eval.region_phrase_data = {source!r}" if ev.region_phrase_data else \
        f"the data.source eval.region_phrase_model was trained on ({source!r}; eval.region_phrase_data unset)"
    try:
        store = prepare_phrases(source, cache_dir=cache_dir, image_encoder=pcfg.data.image_encoder,
                                text_encoder=pcfg.data.text_encoder, splits=[split_name], progress=False,
                                raw_images=pcfg.model.raw_images)
    except DataError as exc:
        raise DataError(f"{data}: {exc}") from None
    if tuple(store.dims) != tuple(getattr(model, "dims", store.dims)):
        raise ConfigError(f"{key} takes features of width {tuple(model.dims)} but {data} gives {tuple(store.dims)}")
    return Eq8Setup(model, store.split(split_name), ev.eq8_alpha, f"{data}, split {split_name!r}")


class ModelRefError(LookupError):
    """A model reference that names nothing loadable: unknown registered model, alias, version or run."""


def resolve_model(ref: str, tracking_uri: Optional[str] = None, key: str = "--model"):
    """A checkpoint folder (a Ray checkpoint's best/ is preferred), or an MLflow models:/ or runs:/ URI;
    errors name `key` (the flag or config key that gave `ref`)."""
    if "://" in ref or ref.startswith(("models:", "runs:")):
        import mlflow

        from trainers.tracking import resolve_uri

        from mlflow.exceptions import MlflowException

        from trainers.preflight import check_tracking_uri

        if tracking_uri:
            check_tracking_uri(tracking_uri, key="--tracking-uri")  # else MLflow retries for minutes
            database = Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None
            if database is not None and not database.is_file():  # MLflow creates an empty store there
                raise ModelRefError(f"--tracking-uri {tracking_uri}: no such file {database.resolve()}: reading "
                                    f"{ref} needs the MLflow store it was logged to")
            mlflow.set_tracking_uri(resolve_uri(tracking_uri))
        try:
            wrapper = mlflow.pyfunc.load_model(ref).unwrap_python_model()
        except (MlflowException, OSError) as exc:  # unknown name, version, alias or run; missing artifacts
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ModelRefError(f"{key} {ref}: cannot load from {mlflow.get_tracking_uri()} ({first})") from exc
        return _itmatch_model(wrapper, ref, key)
    given = Path(ref)
    # a checkpoint's best weights, or a finished run's folder (its best_model/, as trainers.ensemble takes it)
    folder = next((given / sub for sub in ("best", "best_model") if (given / sub).is_dir()), given)
    from itmatch.models.ensemble import is_ensemble

    if not (folder / "state.pt").is_file() and not is_ensemble(folder):
        raise FileNotFoundError(_not_a_model(given, key))
    loaded = load_model(folder)
    if folder != given and (given / "state.pt").is_file():  # said: the folder named holds weights of its own
        log.info("%s %s: read its best weights, %s (not the checkpoint's own, of its last epoch)", key, ref, folder)
    return loaded


def _itmatch_model(wrapper: Any, ref: str, key: str) -> tuple[nn.Module, Config]:
    """The network and config of a loaded pyfunc model; another program's pyfunc model (any
    PythonModel registered in the same store) was an AttributeError traceback."""
    model, cfg = getattr(wrapper, "model", None), getattr(wrapper, "cfg", None)
    if not isinstance(model, nn.Module) or not isinstance(cfg, Config):
        raise ModelRefError(f"{key} {ref}: not an itmatch model (its python_model is a {type(wrapper).__name__}, "
                            "not trainers.pyfunc_model's EmbeddingModel)")
    return model, cfg


def _not_a_model(path: Path, key: str) -> str:
    """Why `path` is no model folder, naming what is there: a path missing from the current folder
    (a relative one written for another), a checkpoint's file, a run folder cut short (no best_model/)."""
    from itmatch.state import CONFIG_FILE, STATE_FILE, checkpoint_candidates

    said = f"{key} {path}"
    if not path.exists():
        return f"{said}: no such file or folder ({path.resolve()}): not a checkpoint folder nor an MLflow URI"
    if path.is_file() and path.name in (STATE_FILE, CONFIG_FILE):
        return f"{said}: a checkpoint's file; give its folder: {key} {path.parent}"
    checkpoints = checkpoint_candidates(None, path) if path.is_dir() else []  # newest first
    if checkpoints:
        return (f"{said}: a run folder without best_model/ (the run did not finish); give one of its checkpoints, "
                f"e.g. the newest: {key} {checkpoints[0]}")
    return (f"{said}: not a checkpoint folder (state.pt + config.yaml), an ensemble folder (ensemble.json) "
            "nor an MLflow URI such as models:/NAME@ALIAS")
