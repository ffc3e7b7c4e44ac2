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
        store = prepare_inputs(args.data or d.source, cache_dir=args.cache_dir or d.cache_dir,
                               raw_images=cfg.model.raw_images, image_encoder=d.image_encoder,
                               text_encoder=d.text_encoder, splits=stored_splits(args.split))
        if tuple(store.dims) != tuple(model.dims):
            raise DataError(f"the model takes features of width {model.dims}, {args.data or d.source} gives {store.dims}")
        split = store.split(args.split)
        if eq8 is not None:  # the same images and sentences, before anything is embedded
            align(split, eq8.phrases, f"--data {args.data or d.source} against {eq8.where}")
    except (DataError, ConfigError, CheckpointError, ModelRefError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    img, txt = embed_split(model, split)  # once, for the metrics and Eq. 8
    metrics = evaluate_embeddings(model, img, txt, split, chunk=cfg.train.eval_chunk, protocol=args.protocol)
    if eq8 is not None:
        metrics.update(eq8.evaluate(model, img, txt, split, chunk=cfg.train.eval_chunk))
    print(format_metrics(metrics))
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


def check_writable(path: str) -> None:
    """--json's file can be written (its folder made if missing), tried with a temporary file beside
    it before anything is evaluated; raise ConfigError naming the path otherwise."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json {path}: is a folder; give a file name (e.g. {target / 'test.json'})")
    _try_writing_in(target.parent, f"--json {path}", target.name)


def check_folder_writable(path: str) -> None:
    """--pictures' folder can hold files (made if missing), as check_writable checks --json's."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--pictures {path}: is a file; give a folder (the pictures are written into it)")
    _try_writing_in(folder, f"--pictures {folder}", "embedding_map.png")


def _try_writing_in(folder: Path, named: str, name: str) -> None:
    """A temporary file named after `name` in `folder` (made if missing); a ConfigError starting with
    `named` (the flag and its value) where the system refuses."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{name}."):
            pass
    except OSError as exc:
        raise ConfigError(f"{named}: cannot write there ({exc.strerror or exc})") from exc


if __name__ == "__main__":
    sys.exit(main())
