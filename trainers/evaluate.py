"""Evaluate a trained model: `python -m trainers.evaluate --model REF --data SOURCE --split test --json OUT`.

REF is a checkpoint folder or an MLflow URI (models:/NAME@ALIAS, models:/NAME/3, runs:/ID/model).
The data is featurised with the encoders the model was trained with (cached like training data);
a model trained end to end reads raw images and captions (e.g. --data karpathy:JSON:IMAGES) and
embeds them with its own fine-tuned towers.

001 Eq. 8: `--region-phrase-model REF` (eval.region_phrase_model) adds the eq8_* metrics, ranked by
D = (1 - α) d + α d_rp with a region-phrase model (α: --eq8-alpha, eval.eq8_alpha, default 0.2),
on the phrases and proposals of --region-phrase-data (eval.region_phrase_data; default: the data
that model was trained on). --data must be that data's sentences (karpathy:ROOT/dataset_sentences.json).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# MLflow draws a download bar on stderr for runs:/ references, and leaves it above a refusal too:
# an error is one line
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from itmatch.config import Config, ConfigError, EvalConfig  # noqa: E402
from itmatch.data.sources import DataError  # noqa: E402
from itmatch.data.raw import prepare_inputs  # noqa: E402
from itmatch.data.readers import split_name  # noqa: E402
from itmatch.data.store import stored_splits  # noqa: E402
from itmatch.eval.evaluate import embed_split, evaluate_embeddings  # noqa: E402
from itmatch.eval.retrieval import format_metrics  # noqa: E402
from itmatch.files import atomic_write_text  # noqa: E402
from itmatch.state import CheckpointError  # noqa: E402
from trainers.logs import setup_logging  # noqa: E402


def _given(what: str):
    """An argparse type that refuses a blank value: `--data "$DATA"` with the variable unset silently
    meant the default (the model's own data, cache or store), an evaluation of something else."""
    def check(value: str) -> str:
        if not value.strip():
            raise argparse.ArgumentTypeError(f"empty: give {what}, or leave the flag out for its default")
        return value
    return check


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainers.evaluate", description=__doc__)
    p.add_argument("--model", required=True, type=_given("a checkpoint folder or models:/NAME@ALIAS"),
                   help="checkpoint folder or models:/NAME@ALIAS")
    p.add_argument("--data", type=_given("a data source"), help="data source (default: the one the model was trained on)")
    p.add_argument("--split", default="test", type=_given("a split (train, val, test)"))
    p.add_argument("--protocol", choices=["full", "coco"], default="full",
                   help="coco adds 1K (5-fold mean) and 5K keys")
    p.add_argument("--json", type=_given("a file name"), help="write the metrics here")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db"),
                   type=_given("an MLflow store URI"))
    p.add_argument("--cache-dir", type=_given("a folder"),
                   help="feature cache (default: the model config's data.cache_dir)")
    p.add_argument("--pictures", metavar="DIR", type=_given("a folder"),
                   help="also write embedding_map.png and queries.html here")
    p.add_argument("--region-phrase-model", metavar="REF", type=_given("a checkpoint folder or models:/NAME@ALIAS"),
                   help="001 Eq. 8: also rank by the combination with this region-phrase model (eq8_* metrics)")
    p.add_argument("--region-phrase-data", metavar="SOURCE", type=_given("a data source"),
                   help="its phrases and proposals (entities: or shapes-phrases:; default: its training data)")
    p.add_argument("--eq8-alpha", type=float, default=EvalConfig.model_fields["eq8_alpha"].default,
                   help="Eq. 8's weight of the region-phrase distance (default %(default)s, 001 §5.6)")
    return p.parse_args(argv)


FLAGS = {"region_phrase_model": "--region-phrase-model", "region_phrase_data": "--region-phrase-data",
         "eq8_alpha": "--eq8-alpha"}


def eval_options(args: argparse.Namespace) -> EvalConfig:
    """The Eq. 8 flags as the eval.* keys they set, checked like a config (one line naming both)."""
    try:
        return EvalConfig(**{key: getattr(args, key) for key in FLAGS})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0])
        raise ConfigError(f"{FLAGS[key]} (eval.{key}) = {err.get('input')!r}: {err['msg']}") from None


def eq8_for(args: argparse.Namespace, cfg):
    """The Eq. 8 setup when --region-phrase-model is given (None otherwise): the flags, the
    evaluated model and data checked, the region-phrase model loaded and its split prepared."""
    ev = eval_options(args)
    if not ev.region_phrase_model:
        return None
    from itmatch.data.sources import PHRASE_SCHEMES, parse_source
    from trainers.results import eq8_setup

    data = args.data or cfg.data.source
    if cfg.data.task != "retrieval" or parse_source(data).scheme in PHRASE_SCHEMES:
        raise ConfigError(f"--region-phrase-model {ev.region_phrase_model}: 001 Eq. 8 combines it with an "
                          f"image-sentence model on sentences, but --model {args.model} / --data {data} is a phrase "
                          "localization model / data (give the sentences: karpathy:ROOT/dataset_sentences.json)")
    return eq8_setup(ev, args.split, tracking_uri=args.tracking_uri, cache_dir=args.cache_dir or cfg.data.cache_dir)


def check_task(ref: str, cfg: Config, data: Optional[str]) -> None:
    """A phrase localization model scored on image-caption data (or the other way round) gave the
    other task's metrics without a word: the data's task must be the model's."""
    if not data:
        return
    given = cfg.data.model_copy(update={"source": data}).task
    if given != cfg.data.task:
        raise DataError(f"--data {data}: {given} data, but {ref} is a {cfg.data.task} model (trained on "
                        f"{cfg.data.source}): evaluate it on data of its own task")


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from itmatch.eval.eq8 import align
    from trainers.results import ModelRefError, resolve_model

    try:
        if args.json:  # found before the evaluation, not after it
            check_writable(args.json)
        if args.pictures:  # likewise: a file there was a traceback once every metric had been computed
            check_folder_writable(args.pictures)
        model, cfg = resolve_model(args.model, args.tracking_uri)
        args.split = split_name(args.split)  # `dev` is stored as val; a union reads its parts
        d = cfg.data
        eq8 = eq8_for(args, cfg)  # bad Eq. 8 flags fail before the evaluated data is read
        check_task(args.model, cfg, args.data)
        store = read_data(args, cfg)
        check_widths(args, model, store, d.source)
        split = store.split(args.split)
        if eq8 is not None:  # the same images and sentences, before anything is embedded
            align(split, eq8.phrases, f"--data {args.data or d.source} against {eq8.where}")
        img, txt = embed_split(model, split)  # once, for the metrics and Eq. 8
        check_finite(args, model, img, txt)
    except (DataError, ConfigError, CheckpointError, ModelRefError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = evaluate_embeddings(model, img, txt, split, chunk=cfg.train.eval_chunk, protocol=args.protocol)
    if eq8 is not None:
        metrics.update(eq8.evaluate(model, img, txt, split, chunk=cfg.train.eval_chunk))
    print(format_metrics(metrics))
    metrics = finite_metrics(metrics)
    if args.pictures:
        from trainers.job import pictures_of

        written = pictures_of(model, cfg, store, args.split, Path(args.pictures),
                              f"{args.model}: example queries on {args.split}", embeddings=(img, txt))
        print(f"pictures: {', '.join(str(p) for p in written.values()) or 'none (see warnings)'}", file=sys.stderr)
    if args.json:
        try:
            atomic_write_text(args.json, json.dumps(metrics, indent=2))
        except OSError as exc:  # e.g. the disk filled meanwhile: the metrics still reach the user
            print(json.dumps(metrics, indent=2))
            print(f"error: --json {args.json}: could not write it ({exc.strerror or exc}); the metrics are above",
                  file=sys.stderr)
            return 1
    else:
        print(json.dumps(metrics, indent=2))
    return 0


def read_data(args: argparse.Namespace, cfg: Config):
    """The evaluated split's store: --data, else the data.source the model was trained on, whose
    relative path is read from the current folder -- a failure then says where the source came from."""
    d = cfg.data
    try:
        return prepare_inputs(args.data or d.source, cache_dir=args.cache_dir or d.cache_dir,
                              raw_images=cfg.model.raw_images, image_encoder=d.image_encoder,
                              text_encoder=d.text_encoder, splits=stored_splits(args.split))
    except DataError as exc:
        if args.data:
            raise
        raise DataError(f"--model {args.model} was trained on data.source = {d.source!r} (--data not given; a "
                        f"relative path is read from {Path.cwd()}): {exc}; give --data") from None


def check_widths(args: argparse.Namespace, model, store, trained_on: str) -> None:
    """The data's feature widths are the ones the model takes, named by side and by both references
    (`trained_on`: the model's data.source, read where --data is not given)."""
    data = f"--data {args.data}" if args.data else f"data.source {trained_on}"
    for side, want, got in zip(("image", "caption"), tuple(model.dims), tuple(store.dims)):
        if want != got:
            raise DataError(f"{data}: {side} features of width {got}, but --model {args.model} takes {want} "
                            f"(image, caption widths: model {tuple(model.dims)}, data {tuple(store.dims)})")


def check_finite(args: argparse.Namespace, model, img, txt) -> None:
    """Embeddings that are not all finite (weights of a diverged run) ranked every item last and
    scored 0 without a word; name the first weight that is not finite, if one is."""
    import torch

    if bool(torch.isfinite(img).all()) and bool(torch.isfinite(txt).all()):
        return
    bad = next((name for name, t in model.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    cause = f"its weight {bad!r} holds NaN or inf (a diverged run?)" if bad else "its weights overflow on this data"
    raise CheckpointError(f"--model {args.model}: its embeddings of split {args.split!r} are not finite: {cause}")


def finite_metrics(metrics: dict) -> dict:
    """`metrics` with any NaN or inf as None: json.dumps writes them as NaN, which is not JSON (a
    reader such as jq refuses the whole file); named on stderr, as they are not numbers."""
    import math

    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        print(f"warning: metrics {', '.join(bad)} are not finite numbers: written as null", file=sys.stderr)
    return {k: (None if k in bad else v) for k, v in metrics.items()}


def check_writable(path: str) -> None:
    """--json's file can be written (its folder made if missing), tried with a temporary file beside
    it before anything is evaluated; raise ConfigError naming the path otherwise."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json {path}: is a folder; give a file name (e.g. {target / 'test.json'})")
    if path.endswith(("/", os.sep)):  # Path() drops the slash: `out/` was written as a file named out
        raise ConfigError(f"--json {path}: names a folder (it ends in {path[-1]}); give a file name "
                          f"(e.g. {target / 'test.json'})")
    if target.is_file() and _checkpoint_file(target):
        raise ConfigError(f"--json {path}: is a file of a saved model (it would be overwritten); give another name")
    _try_writing_in(target.parent, f"--json {path}", target.name)


def _checkpoint_file(path: Path) -> bool:
    """`path` is one of the files a checkpoint or ensemble folder is read from."""
    from itmatch.models.ensemble import ENSEMBLE_FILE
    from itmatch.state import CHECKSUM_FILE, CONFIG_FILE, STATE_FILE

    folder = path.parent
    is_model = (folder / STATE_FILE).is_file() or (folder / ENSEMBLE_FILE).is_file()
    return is_model and path.name in (STATE_FILE, CONFIG_FILE, CHECKSUM_FILE, ENSEMBLE_FILE)


def check_folder_writable(path: str) -> None:
    """--pictures' folder can hold files (made if missing), as check_writable checks --json's."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--pictures {path}: is a file; give a folder (the pictures are written into it)")
    _try_writing_in(folder, f"--pictures {folder}", "embedding_map.png")


def _try_writing_in(folder: Path, named: str, name: str) -> None:
    """A temporary file named after `name` in `folder` (made if missing); a ConfigError starting with
    `named` (the flag and its value) where the system refuses."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # mkdir said only "File exists"
        raise ConfigError(f"{named}: cannot write there ({blocker} is a file, not a folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}."):
            pass
    except OSError as exc:
        raise ConfigError(f"{named}: cannot write there ({exc.strerror or exc})") from exc


if __name__ == "__main__":
    sys.exit(main())
