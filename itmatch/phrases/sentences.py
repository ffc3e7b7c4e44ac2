"""The sentences of a Flickr30K Entities folder as image-caption data, for 001 Eq. 8.

Eq. 8 combines an image-sentence model with a region-phrase model on the same images and the same
sentences: the sentences whose phrases (and the images whose region proposals) the region-phrase
data holds. `write_sentences_json(root)` writes them as a Karpathy split JSON beside the layout,

    ROOT/dataset_sentences.json   {"dataset": "entities-sentences", "images": [{"imgid": <image id>,
                                  "filename", "split", "sentids", "sentences": [{"raw", "tokens",
                                  "imgid", "sentid": <caption id>}]}]}

so `karpathy:ROOT/dataset_sentences.json` (images from ROOT/images, or `:IMAGE_DIR`) is an ordinary
image-caption source whose image ids and caption ids are the Entities reader's (`read_entities`:
numeric image ids, dense caption ids in image, then line order). An image-sentence model trained or
evaluated on it lines up with the region-phrase store of the same folder by those ids
(`itmatch.eval.eq8`). The shapes writer (`write_shapes_entities`) writes this file too.

    python -m itmatch.phrases.sentences ROOT [--images DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

from itmatch.data.sources import DataError
from itmatch.files import atomic_write_text
from itmatch.phrases.entities import PhraseCorpus, read_entities

SENTENCES_JSON = "dataset_sentences.json"


def sentences_document(corpus: PhraseCorpus) -> dict[str, Any]:
    """The corpus's images and captions (markup removed) in the Karpathy split format."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    caps = corpus.captions
    for cid, iid, text in zip(caps.column("caption_id").to_pylist(), caps.column("image_id").to_pylist(),
                              caps.column("text").to_pylist()):
        by_image.setdefault(iid, []).append({"raw": text, "tokens": text.split(), "imgid": iid, "sentid": cid})
    images = []
    for iid, name, split, path in zip(*(corpus.images.column(c).to_pylist()
                                        for c in ("image_id", "name", "split", "path"))):
        sentences = by_image.get(iid, [])
        images.append({"imgid": iid, "filename": Path(path).name if path else f"{name}.jpg", "split": split,
                       "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    return {"dataset": "entities-sentences", "source": corpus.name, "images": images}


def write_sentences_json(root: str | Path, *, image_dir: Optional[str | Path] = None,
                         corpus: Optional[PhraseCorpus] = None) -> Path:
    """Write ROOT/dataset_sentences.json (module docstring) from the Entities folder at `root`
    (or from `corpus`, already read from it) and return its path."""
    root = Path(root)
    corpus = corpus if corpus is not None else read_entities(root, image_dir=image_dir)
    path = root / SENTENCES_JSON
    atomic_write_text(path, json.dumps(sentences_document(corpus)))
    return path


__all__ = ["SENTENCES_JSON", "sentences_document", "write_sentences_json"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="itmatch.phrases.sentences", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="a Flickr30K Entities folder (Sentences/, Annotations/, split lists)")
    p.add_argument("--images", help="image folder (default ROOT/images)")
    args = p.parse_args(argv)
    try:
        path = write_sentences_json(args.root, image_dir=args.images)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}: use data.source=karpathy:{path}" + (f":{args.images}" if args.images else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
