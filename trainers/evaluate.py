"""Evaluate a trained model: `python -m trainers.evaluate --model REF --data SOURCE --split test --json OUT`.

REF is a checkpoint folder or an MLflow URI (models:/NAME@ALIAS, models:/NAME/3, runs:/ID/model).
The data is featurised with the encoders the model was trained with (cached like training data);
a model trained end to end reads raw images and captions (e.g. --data karpathy:JSON:IMAGES) and
embeds them with its own fine-tuned towers.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

from itmatch.config import ConfigError  # noqa: E402
from itmatch.data.sources import DataError  # noqa: E402
from itmatch.data.raw import prepare_inputs  # noqa: E402
from itmatch.eval.evaluate import evaluate_split  # noqa: E402
from itmatch.eval.retrieval import format_metrics  # noqa: E402
from itmatch.state import CheckpointError  # noqa: E402
from trainers.logs import setup_logging  # noqa: E402


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainers.evaluate", description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint folder or models:/NAME@ALIAS")
    p.add_argument("--data", help="data source (default: the one the model was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--protocol", choices=["full", "coco"], default="full",
                   help="coco adds 1K (5-fold mean) and 5K keys")
    p.add_argument("--json", help="write the metrics here")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns.db"))
    p.add_argument("--cache-dir", help="feature cache (default: the model config's data.cache_dir)")
    p.add_argument("--pictures", metavar="DIR", help="also write embedding_map.png and queries.html here")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    from trainers.results import ModelRefError, resolve_model

    try:
        model, cfg = resolve_model(args.model, args.tracking_uri)
        d = cfg.data
        store = prepare_inputs(args.data or d.source, cache_dir=args.cache_dir or d.cache_dir,
                               raw_images=cfg.model.raw_images, image_encoder=d.image_encoder,
                               text_encoder=d.text_encoder, splits=[args.split])
    except (DataError, ConfigError, CheckpointError, ModelRefError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if tuple(store.dims) != tuple(model.dims):
        print(f"error: the model takes features of width {model.dims}, {args.data} gives {store.dims}",
              file=sys.stderr)
        return 2
    metrics = evaluate_split(model, store.split(args.split), chunk=cfg.train.eval_chunk, protocol=args.protocol)
    print(format_metrics(metrics))
    if args.pictures and cfg.data.task != "retrieval":
        print("pictures: not drawn (they show image-caption retrieval; this is a phrase model)", file=sys.stderr)
    elif args.pictures:
        from itmatch.eval.pictures import model_pictures

        written = model_pictures(model, store, args.split, Path(args.pictures), n_queries=cfg.eval.picture_queries,
                                 k=cfg.eval.picture_top_k, max_images=cfg.eval.picture_map_images,
                                 seed=cfg.train.seed, title=f"{args.model}: example queries on {args.split}")
        print(f"pictures: {', '.join(str(p) for p in written.values()) or 'none (see warnings)'}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    else:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
