"""A data source is one string: `scheme:location?key=value&...`, parsed once.

    precomp:DIR                   VSE++-style {split}_ims.npy + {split}_caps.txt [+ {split}_caps_<name>.npy]
    karpathy:JSON[:IMAGE_DIR]     Karpathy split JSON + image folder (default: <json dir>/images)
    parquet:PATH                  Parquet file or folder with image and caption columns
    hf:PATH                       a Hugging Face `datasets` folder (save_to_disk) or a Parquet path
    synthetic:DIR                 the generated shapes dataset (written to DIR on first use)
    entities:ROOT                 Flickr30K Entities (Sentences/, Annotations/, split lists, proposals.parquet,
                                  images/): region-phrase data, read by itmatch.phrases.read_entities
    shapes-phrases:DIR            the shapes scenes written in that layout (itmatch.phrases.write_shapes_entities)

The last two carry phrases with boxes and region proposals: a source of either scheme makes the run
a phrase localization task (`PHRASE_SCHEMES`, `DataConfig.task`).
"""

from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

SCHEMES = ("precomp", "karpathy", "parquet", "hf", "synthetic", "entities", "shapes-phrases")
PHRASE_SCHEMES = ("entities", "shapes-phrases")
"""Schemes whose data is region-phrase pairs (001 §4) rather than image-caption pairs."""


class DataError(ValueError):
    """Bad data: the message names the file, the field and the offending value."""


@dataclass(frozen=True)
class Source:
    scheme: str
    location: str
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.scheme}:{self.location}" + (f"?{query}" if query else "")


def parse_source(text: str) -> Source:
    """`karpathy:/d/dataset.json:/d/images?restval=train` -> Source(...)."""
    if ":" not in text:
        raise DataError(
            f"data.source {text!r} has no scheme; write one of "
            + ", ".join(f"{s}:PATH" for s in SCHEMES)
        )
    scheme, rest = text.split(":", 1)
    if scheme not in SCHEMES:
        raise DataError(f"data.source {text!r}: unknown scheme {scheme!r}; choices: {', '.join(SCHEMES)}")
    location, _, query = rest.partition("?")
    if not location:
        raise DataError(f"data.source {text!r}: empty location after {scheme!r}:")
    # `~/data` as a shell would read it (karpathy: holds two paths, JSON:IMAGES): "not a directory" before
    location = ":".join(os.path.expanduser(part) if part.startswith("~") else part for part in location.split(":"))
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    return Source(scheme, location, options)


def typed_options(source: Source, types: dict[str, type]) -> dict[str, Any]:
    """The source's options as `types` says; an unknown name (a typo such as `?bad_image=skip` would
    otherwise be ignored without a word) or a value of the wrong type is a DataError naming both."""
    unknown = sorted(set(source.options) - set(types))
    if unknown:
        choices = ", ".join(types) or "none"
        raise DataError(f"data.source {str(source)!r}: unknown option {unknown[0]!r} for {source.scheme}:; "
                        f"choices: {choices}")
    out = {}
    for key, value in source.options.items():
        try:
            out[key] = types[key](value)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(types[key], types[key].__name__)
            raise DataError(f"data.source {str(source)!r}: option {key}={value!r} is not {kind}") from None
    return out
