"""Ensemble trained runs: `python -m trainers.ensemble MEMBER MEMBER ... --name NAME [key=value ...]`.

MEMBER is a run folder (its summary.json names the best checkpoint) or a checkpoint folder: e.g.
the seed re-runs of a search's chosen configuration (`runs/<search>/trials/*`), or runs of one
preset with several `train.seed`s. The members must take the same inputs (same encoders and
towers). The ensemble (itmatch.models.ensemble: the mean of the members' cosines) is saved as
`run.storage_path/NAME/best_model`, evaluated on the validation and test splits of the first
member's data (key=value overrides apply to that config, e.g. data.cache_dir=...), logged to MLflow
as its own run and registered like any job's model: it takes the alias only if it beats the
holder on the same validation split. No Ray: it trains nothing. `--cca-weight W` adds closed-form
CCA, fitted on the training split, as one more member at weight W (the runs share 1 - W).
`--hubness auto` fits a hubness correction (itmatch.models.hubness: CSLS against the training
split's embeddings) and keeps the neighbourhood size and weight that score best on the validation
split, or none where none beats the plain ensemble (`--hubness K,W` fixes them); with a
correction or CCA one member is enough.

NAME's folder is this command's alone: one that holds another run (a training run's checkpoints),
or a member inside it, is refused before anything is written. Re-running replaces the ensemble
there, written beside it and swapped in once complete and scored, so a failure leaves the previous
one as it was. Members must share one task (image-text retrieval or phrase localization).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional  # noqa: E402

from itmatch.config import Config, ConfigError, load_config  # noqa: E402
from itmatch.data.sources import DataError  # noqa: E402
from itmatch.files import atomic_write_text  # noqa: E402
from itmatch.state import CheckpointError  # noqa: E402
from trainers import preflight  # noqa: E402
from trainers.job import read_summary  # noqa: E402
from trainers.logs import setup_logging  # noqa: E402

log = logging.getLogger("itmatch.ensemble")
# Keys that decide how inputs are prepared: members must agree on them to share one preparation
# (and on model.name, except that CCA reads the same inputs as the networks on towers).
SAME_INPUTS = ("data.image_encoder", "data.text_encoder", "model.image_tower", "model.text_tower", "model.image_size",
               "model.text_max_length", "model.name")
TOWER_MODELS = ("embedding", "cca", "similarity", "twoway")
# What this command writes in its run folder, beside trainers.job.SUMMARY_FILE: the ensemble, the CCA member.
BEST_DIR, CCA_DIR = "best_model", "cca_member"
# Rows of each modality in a hubness bank: a seeded subset of a larger training split (the bank is
# saved with the model, rows x the joined width in float16).
BANK_ROWS = 5000
# What a config key (or section) looks like: `loss.margin`, `loss`; a path has `/` or other signs.
DOTTED_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def member_checkpoint(ref: str) -> Path:
    """A run folder's best checkpoint (from its summary.json), or the checkpoint folder itself."""
    folder = Path(ref)
    if not folder.exists():
        raise CheckpointError(f"member {ref}: no such folder")
    summary_path = folder / "summary.json"
    summary = read_summary(summary_path)
    if summary is not None:
        best = summary.get("best_checkpoint")
        if not best or not isinstance(best, str):
            raise CheckpointError(f"{summary_path}: no best_checkpoint (the run did not finish)")
        folder = Path(best)
        if not folder.is_dir():  # else reported as "not a run folder", though the summary is there
            raise CheckpointError(f"member {ref}: {summary_path} names best_checkpoint {best}, which is missing "
                                  "(moved or deleted); give a checkpoint folder of the run instead")
    if (folder / "ensemble.json").is_file() and not (folder / "state.pt").is_file():
        raise CheckpointError(f"member {ref}: an ensemble ({folder}), not one model; give its members instead")
    if not (folder / "state.pt").is_file():
        raise CheckpointError(f"member {ref}: neither a finished run folder (summary.json) nor a checkpoint "
                              "folder (state.pt + config.yaml)")
    return folder


def check_members(configs: list[Config], refs: list[str], dims: list[tuple[int, int]]) -> None:
    """One line naming the first member whose task or inputs differ from the first member's."""
    first = configs[0].flat()
    for cfg, ref, width in zip(configs[1:], refs[1:], dims[1:]):
        flat = cfg.flat()
        if cfg.data.task != configs[0].data.task:  # not a key of flat(): inferred from the source's scheme
            raise ConfigError(f"member {ref}: a {cfg.data.task} model (data.source={cfg.data.source!r}), but "
                              f"{refs[0]} is a {configs[0].data.task} model (data.source="
                              f"{configs[0].data.source!r}); an ensemble's members must share one task")
        for key in SAME_INPUTS:
            if key == "model.name" and {flat[key], first[key]} <= set(TOWER_MODELS):
                continue
            if flat[key] != first[key]:
                raise ConfigError(f"member {ref}: {key}={flat[key]!r}, but {refs[0]} has {first[key]!r}; an "
                                  "ensemble's members must take the same inputs")
        # the same encoder names can still give other widths (other precomp files): the members
        # would then fail on the first member's data with a shape error mid-evaluation
        if tuple(width) != tuple(dims[0]):
            raise ConfigError(f"member {ref}: takes (image, caption) features {tuple(width)} wide, but {refs[0]} "
                              f"takes {tuple(dims[0])}; an ensemble's members must take the same inputs")


def check_output(folder: Path, refs: list[str], checkpoints: list[Path]) -> None:
    """Refuse, before anything is written, a run folder that another kind of run holds (it would be
    overwritten) and a member inside it (or holding it): the new ensemble replaces that folder's."""
    for ref, checkpoint in zip(refs, checkpoints):
        for path in (Path(ref).resolve(), checkpoint.resolve()):
            if path == folder or folder in path.parents or path in folder.parents:
                raise ConfigError(f"member {ref}: lies in the ensemble's own folder {folder} (or holds it), which "
                                  "this command replaces; copy it elsewhere or pick another --name")
    foreign = _not_ours(folder)
    if foreign:
        raise ConfigError(f"{folder}: exists and is not an ensemble of trainers.ensemble (it holds {foreign}); "
                          "pick another --name (run.name) to keep it")


def _not_ours(folder: Path) -> str:
    """What in `folder` marks another kind of run ("" where nothing): a training run's checkpoints,
    config.yaml or metrics.jsonl, or a best_model that is a checkpoint (state.pt). Other files (a
    user's evaluation JSON beside the ensemble) are left alone."""
    from itmatch.models.ensemble import is_ensemble

    if not folder.exists():
        return ""
    if not folder.is_dir():
        return "no folder: it is a file"
    others = [p.name for p in sorted(folder.iterdir())
              if p.name in ("config.yaml", "metrics.jsonl") or (p.is_dir() and p.name.startswith("checkpoint_"))]
    best = folder / BEST_DIR
    if best.exists() and (best / "state.pt").exists():
        others.append(f"{BEST_DIR}/state.pt")
    elif best.exists() and not is_ensemble(best):
        others.append(f"{BEST_DIR} without ensemble.json")
    return ", ".join(others)


def build(refs: list[str], name: str, overrides: list[str], min_members: int = 2) -> tuple[Config, list[Path]]:
    from itmatch.state import CONFIG_FILE, load_checkpoint
    from trainers.job import run_dir

    if len(refs) < min_members:
        raise ConfigError(f"an ensemble needs at least {min_members} member(s), got {len(refs)}")
    folders = [member_checkpoint(r) for r in refs]
    loaded = [load_checkpoint(f) for f in folders]
    check_members([c for _, c in loaded], refs, [tuple(p["dims"]) for p, _ in loaded])
    # the first member's config as the preset: its overrides are read as trainers.train reads them
    cfg = load_config(folders[0] / CONFIG_FILE, overrides)
    cfg = load_config(None, {**cfg.flat(), "run.name": name, "run.start_from": None})
    check_output(run_dir(cfg), refs, folders)
    return cfg, folders


def in_search(cfg: Config, search_dir: Path) -> list[str]:
    """`build` overrides for a search's ensemble: saved in the search's folder, logged where the
    search logs (its members' own tracking settings may differ), registered by the search, not here."""
    # as JSON, which the overrides' YAML reads back as it was (None as null, text quoted whole)
    where = [f"tracking.{k}={json.dumps(v)}" for k, v in cfg.tracking.model_dump().items()
             if k != "registered_model"]
    return [f"run.storage_path={search_dir}", *where, "tracking.registered_model="]


def cca_member(cfg: Config, store: Any, folder: Path, dim: int) -> Path:
    """Closed-form CCA (`dim` canonical dimensions, model.cca_ridge) fitted on `store`'s training
    split, saved as a checkpoint folder: a member beside trained runs on the same features."""
    from itmatch.models.cca import CCAModel, training_pairs
    from itmatch.state import TrainState, save_checkpoint

    flat = {**cfg.flat(), "model.name": "cca", "model.embed_dim": dim, "model.residual": "none"}
    model = CCAModel(*store.dims, dim).fit(*training_pairs(store.split(cfg.data.train_split)),
                                           ridge=cfg.model.cca_ridge)
    save_checkpoint(folder, model={k: v.float() for k, v in model.state_dict().items()},
                    cfg=load_config(None, flat), train_state=TrainState(), dims=tuple(store.dims))
    return folder


def hubness_setting(text: str) -> Optional[tuple[int, float]]:
    """itmatch.models.hubness.parse_setting, refused as a ConfigError."""
    from itmatch.models.hubness import parse_setting

    try:
        return parse_setting(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def fit_hubness(model: Any, store: Any, cfg: Config, setting: str = "auto") -> tuple[Any, dict[str, Any]]:
    """The hubness correction of `model`, its bank the training split's embeddings (at most
    BANK_ROWS a modality): with "auto" the (k, w) that scores best on the validation split by
    train.metric, None where no setting beats the plain embeddings; with "K,W" that one. Returns
    it and a record of what was tried."""
    import torch

    from itmatch.eval.evaluate import embed_split
    from itmatch.eval.retrieval import retrieval_metrics
    from itmatch.models.hubness import DEFAULT_GRID, HubnessCorrection, choose, sample_rows

    fixed = hubness_setting(setting)
    train = store.split(cfg.data.train_split)
    ref_img, ref_txt = embed_split(model, train, image_rows=sample_rows(len(train.image_ids), BANK_ROWS, cfg.train.seed),
                                   caption_rows=sample_rows(len(train), BANK_ROWS, cfg.train.seed))
    val = store.split(cfg.data.val_split)
    img, txt = embed_split(model, val)
    txt_img = torch.from_numpy(val.caption_image)
    metric, chunk = cfg.train.metric, cfg.train.eval_chunk
    grid = DEFAULT_GRID if fixed == (0, 0.0) else [fixed]
    picked = choose(img, txt, ref_img, ref_txt, lambda i, t: retrieval_metrics(i, t, txt_img, chunk=chunk)[metric],
                    grid=grid)
    if fixed != (0, 0.0):  # asked for: kept whatever validation says
        picked.k, picked.weight, picked.score = fixed[0], fixed[1], picked.tried[0][2]
    record = {"setting": setting, "k": picked.k, "weight": picked.weight, f"val_{metric}": picked.score,
              f"val_{metric}_plain": picked.plain,
              "tried": [{"k": k, "weight": w, f"val_{metric}": v} for k, w, v in picked.tried],
              "bank": f"{cfg.data.train_split}: {len(ref_img)} images, {len(ref_txt)} captions"}
    log.info("hubness correction: k=%d weight=%.2f (val %s %.2f, plain %.2f)", picked.k, picked.weight, metric,
             picked.score, picked.plain)
    if picked.weight <= 0:
        return None, record
    return HubnessCorrection(ref_img, ref_txt, picked.k, picked.weight), record


def _hubness_tag(record: dict[str, Any], metric: str) -> str:
    """One line for the MLflow UI: the correction kept (or none) and what it did on validation."""
    what = f"k={record['k']} w={record['weight']}" if record["weight"] else "none kept"
    return f"{what} (val {metric} {record[f'val_{metric}_plain']:.2f} plain, {record[f'val_{metric}']:.2f} kept)"


def _ensemble_tags(hub_record: Optional[dict], metric: str, selection: Optional[dict], cfg: Config) -> dict[str, str]:
    if selection is None:
        return {} if hub_record is None else {"itmatch.hubness": _hubness_tag(hub_record, metric)}
    # a refit: the correction was chosen before it, and validation says nothing now
    tags = {"itmatch.refit": f"trained on {cfg.data.train_split}; selected as run {selection.get('run_id')} "
                             f"(val {metric} {selection['score']:.2f})"}
    if hub_record is not None:
        tags["itmatch.hubness"] = f"k={hub_record['k']} w={hub_record['weight']} (chosen before the refit)"
    return tags


def _ensemble_metrics(val: dict, test: dict, hub_record: Optional[dict], metric: str,
                      selection: Optional[dict]) -> dict[str, float]:
    """What the ensemble's run logs: val and test metrics, the plain (uncorrected) scores; a refit
    logs no validation metric of its own (its training data holds the split), only the score it was
    selected by, as selection_val_<metric>."""
    plain = {f"hubness_{k}": v for k, v in (hub_record or {}).items()
             if k.endswith("_plain") and (selection is None or not k.startswith("val_"))}
    vals = {f"val_{k}": v for k, v in val.items()} if selection is None else \
        {f"selection_val_{metric}": selection["score"]}
    return {**vals, **{f"test_{k}": v for k, v in test.items()}, **plain}


def stage(cfg: Config, store: Any, folders: list[Path], refs: list[str], cca_weight: float, cca_dim: int,
          hubness: str, staged: list[tuple[Path, Path]]
          ) -> tuple[Any, list[Path], Optional[list[float]], Optional[dict]]:
    """The ensemble, its CCA member and hubness correction written into staging folders beside the
    run folder's own (each appended to `staged` with its place there, the ensemble first), so that
    a failure before `evaluate_and_log` swaps them in leaves the previous ensemble as it was.
    Returns the loaded model, its members as named once in place, the weights, the hubness record."""
    from itmatch.eval.evaluate import evaluate_split
    from itmatch.files import staging_folder
    from itmatch.models.ensemble import Ensemble, save_hubness, saved_hubness, stage_ensemble
    from itmatch.state import load_model
    from trainers.job import run_dir

    run, weights, named = run_dir(cfg), None, list(folders)
    if cca_weight > 0:
        staged.append((staging_folder(run / CCA_DIR), run / CCA_DIR))
        folders = [*folders, cca_member(cfg, store, staged[-1][0], cca_dim)]
        named.append(run / CCA_DIR)
        refs = [*refs, f"cca (dim {cca_dim}, ridge {cfg.model.cca_ridge}, fitted on {cfg.data.train_split})"]
        weights = [(1 - cca_weight) / (len(folders) - 1)] * (len(folders) - 1) + [cca_weight]
    best = stage_ensemble(run / BEST_DIR, folders, sources=refs, weights=weights)
    staged.insert(0, (best, run / BEST_DIR))
    model, _ = load_model(best)
    if tuple(store.dims) != tuple(model.dims):
        raise DataError(f"the members take features of width {model.dims}, {cfg.data.source} gives {store.dims}")
    hub_record = None
    if hubness_setting(hubness) is not None:
        correction, hub_record = fit_hubness(model, store, cfg, hubness)
        if correction is not None:  # what the correction changed on test, for the record (not chosen on it)
            hub_record[f"test_{cfg.train.metric}_plain"] = evaluate_split(
                model, store.split(cfg.data.test_split), chunk=cfg.train.eval_chunk)[cfg.train.metric]
            save_hubness(best, correction, hub_record["bank"])
            # the bank as saved (float16): what the registered model scores with; the members are loaded
            model = Ensemble(model.members, model.weights, saved_hubness(best)).eval()
    return model, named, weights, hub_record


def evaluate_and_log(cfg: Config, folders: list[Path], refs: list[str], tags: Optional[dict[str, str]] = None,
                     cca_weight: float = 0.0, cca_dim: int = 128, hubness: str = "off",
                     selection: Optional[dict[str, Any]] = None, cca_key: str = "--cca-dim") -> dict[str, Any]:
    """Save, evaluate (val, test), log and maybe register the ensemble; `tags` for its MLflow run.
    `cca_weight` > 0 adds CCA fitted on the training split (`cca_member`) at that weight, the
    trained members sharing the rest equally; `hubness` ("auto" or "K,W") attaches the correction
    that `fit_hubness` picks on the validation split, or the one asked for. `selection` ({"score",
    "run_id"}): a refit whose training data holds the validation split (tuning/refit.py) is scored,
    logged and promoted by that score, its ensemble's before the refit, not by its own."""
    from itmatch.eval.evaluate import evaluate_split
    from itmatch.files import replace_folder
    from trainers.job import SUMMARY_FILE, promote, run_dir
    from trainers.train import prepare_store

    store = prepare_store(cfg)
    if cca_weight > 0:  # before anything is staged; `cca_key` names the setting that gave cca_dim
        preflight.check_cca_dim(store, cca_dim, cca_key)
    staged: list[tuple[Path, Path]] = []
    try:
        model, folders, weights, hub_record = stage(cfg, store, folders, refs, cca_weight, cca_dim, hubness, staged)
        metric, chunk = cfg.train.metric, cfg.train.eval_chunk
        val = evaluate_split(model, store.split(cfg.data.val_split), chunk=chunk)
        test = evaluate_split(model, store.split(cfg.data.test_split), chunk=chunk)
        for folder, place in staged:  # complete and scored: only now does it replace the folder's ensemble
            replace_folder(folder, place)
    finally:
        for folder, _ in staged:  # gone once swapped in; what a failure left
            shutil.rmtree(folder, ignore_errors=True)
    best = run_dir(cfg) / BEST_DIR
    score = val[metric] if selection is None else selection["score"]
    summary: dict[str, Any] = {"best_checkpoint": str(best), "members": [str(f) for f in folders], "weights": weights,
                               f"val_{metric}": score, "test": test, "hubness": hub_record}
    if selection is not None:
        summary["refit"] = {"train_split": cfg.data.train_split, f"val_{metric}_in_training": val[metric],
                            "selected_by_run": selection.get("run_id")}
    if cfg.tracking.enabled:
        from trainers import tracking as tr

        info = tr.start_run(cfg, str(run_dir(cfg)), store, tags={"itmatch.ensemble": str(len(folders)),
                                                                 **_ensemble_tags(hub_record, metric, selection, cfg),
                                                                 **(tags or {})})
        try:
            tr.epoch_logger(info)(_ensemble_metrics(val, test, hub_record, metric, selection), 1)
            model_info = tr.log_model(info, best, store)
            summary.update(model_uri=model_info.model_uri, run_id=info["run_id"])
            if cfg.tracking.registered_model:
                summary["registry"] = promote(info, cfg, store, model_info.model_uri, score)
        except BaseException:
            tr.end_run(info, "FAILED")
            raise
        tr.end_run(info)
    atomic_write_text(run_dir(cfg) / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
    return summary


def split_members(args: list[str]) -> tuple[list[str], list[str]]:
    """The members (folders) and the key=value overrides among the positional arguments. A folder
    may hold `=` (runs/lr=0.1/best_model): an existing path is a member, and so is text whose part
    before `=` is no dotted name (a config key's shape), so that a missing one is named as a member;
    a misspelt key stays an override, which load_config refuses listing the valid keys."""
    refs, overrides = [], []
    for arg in args:
        key = arg.split("=", 1)[0].strip()
        is_override = "=" in arg and not Path(arg).exists() and DOTTED_KEY.fullmatch(key) is not None
        (overrides if is_override else refs).append(arg)
    return refs, overrides


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="trainers.ensemble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("members", nargs="+", help="run folders or checkpoint folders, then key=value overrides")
    p.add_argument("--name", required=True, help="the ensemble's run name (its folder under run.storage_path)")
    p.add_argument("--cca-weight", type=float, default=0.0,
                   help="add CCA fitted on the first member's training split at this weight (0 <= w < 1)")
    p.add_argument("--cca-dim", type=int, default=128, help="CCA's canonical dimensions (with --cca-weight)")
    p.add_argument("--hubness", default="off",
                   help="off | auto: a hubness correction (CSLS against the training split) if it helps on "
                        "validation | K,W: that one (K reference neighbours, weight W)")
    args = p.parse_intermixed_args(argv)
    try:
        refs, overrides = split_members(args.members)
        if not 0 <= args.cca_weight < 1 or args.cca_dim < 1:
            raise ConfigError(f"--cca-weight must be in [0, 1) and --cca-dim >= 1, got {args.cca_weight} and {args.cca_dim}")
        alone_ok = args.cca_weight > 0 or hubness_setting(args.hubness) is not None  # one run + CCA or a correction
        cfg, folders = build(refs, args.name, overrides, min_members=1 if alone_ok else 2)
        preflight.check_tracking(cfg)  # a bad store or name fails here, not after the evaluation
        summary = evaluate_and_log(cfg, folders, refs, cca_weight=args.cca_weight, cca_dim=args.cca_dim,
                                   hubness=args.hubness)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from itmatch.eval.retrieval import format_metrics

    log.info("ensemble of %d: val %s %.2f | test %s", len(folders), cfg.train.metric,
             summary[f"val_{cfg.train.metric}"], format_metrics(summary["test"]))
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
