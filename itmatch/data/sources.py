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
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

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
        query = "&".join(f"{k}={v}" if v else k for k, v in sorted(self.options.items()))  # `?b` as written
        return f"{self.scheme}:{self.location}" + (f"?{query}" if query else "")


def parse_source(text: str) -> Source:
    """`karpathy:/d/dataset.json:/d/images?restval=train` -> Source(...). A path may hold the characters
    the syntax splits at: one that exists is read as written (`parquet:/data/a?b/`, a JSON in `run:1/`),
    and any path may write them escaped (`%3F` for `?`, `%3A` for `:`, `%25` for `%`)."""
    if ":" not in text:
        raise DataError(
            f"data.source {text!r} has no scheme; write one of "
            + ", ".join(f"{s}:PATH" for s in SCHEMES)
        )
    scheme, rest = text.split(":", 1)
    if scheme not in SCHEMES:
        raise DataError(f"data.source {text!r}: unknown scheme {scheme!r}; choices: {', '.join(SCHEMES)}")
    location, query = _split_query(scheme, rest)
    if not location:
        raise DataError(f"data.source {text!r}: empty location after {scheme!r}:")
    pieces = karpathy_paths(location) if scheme == "karpathy" else (location,)
    location = ":".join(_local_path(piece) for piece in pieces if piece)
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False)) if query else {}
    path_like = next((key for key in options if "/" in key or os.sep in key), None)
    if path_like is not None:  # "unknown option 'b/'" sent users looking for an option they never wrote
        raise DataError(f"data.source {text!r}: no file or folder {location + '?' + path_like!r}; read as "
                        f"{location!r} with options after its '?', {path_like!r} is no option: write a '?' inside "
                        "a path as %3F")
    return Source(scheme, location, options)


def _expand(path: str) -> str:
    """`~/data` as a shell would read it (else "not a directory" under a folder named `~`)."""
    return os.path.expanduser(path) if path.startswith("~") else path


_ESCAPE = re.compile(r"%(3[aAfF]|25)")
"""The escapes of the characters a source string splits at (`:` and `?`) and of `%` itself."""


def _local_path(piece: str) -> str:
    """A path as written in a source, `~` expanded; its escapes decoded unless it exists as written."""
    path = _expand(piece)
    return path if os.path.lexists(path) else _ESCAPE.sub(lambda m: unquote(m.group(0)), path)


def _exists(scheme: str, location: str) -> bool:
    """Whether `location` names something on disk (karpathy: its JSON file and any IMAGE_DIR, else
    `JSON:IMAGES?restval=keep` would read as a folder `IMAGES?restval=keep`)."""
    if scheme == "karpathy":
        json_path, image_dir = karpathy_paths(location)
        return os.path.isfile(_expand(json_path)) and (not image_dir or os.path.isdir(_expand(image_dir)))
    return os.path.lexists(_expand(location))


def _split_query(scheme: str, rest: str) -> tuple[str, str]:
    """(location, options) of the text after `scheme:`: split at the first '?', unless the text up to a
    later '?', or the whole, names an existing path (longest first)."""
    cuts = [i for i, ch in enumerate(rest) if ch == "?"]
    if not cuts:
        return rest, ""
    for cut in [len(rest), *reversed(cuts[1:])]:
        if _exists(scheme, rest[:cut]):
            return rest[:cut], rest[cut + 1:]
    return rest[:cuts[0]], rest[cuts[0] + 1:]


def karpathy_paths(location: str) -> tuple[str, str]:
    """(JSON, IMAGE_DIR or "") of a `karpathy:` location `JSON[:IMAGE_DIR]`: split at its first ':',
    unless the whole, or the text up to a later ':', is a file (a JSON in a folder `run:1`); of
    several, one followed by an existing folder."""
    cuts = [i for i, ch in enumerate(location) if ch == ":"]
    if not cuts or os.path.isfile(_expand(location)):
        return location, ""
    files = [cut for cut in cuts if os.path.isfile(_expand(location[:cut]))]
    folders = [cut for cut in files if os.path.isdir(_expand(location[cut + 1:]))]
    cut = (folders or files or cuts)[0]
    return location[:cut], location[cut + 1:]


def typed_options(source: Source, types: dict[str, type]) -> dict[str, Any]:
    """The source's options as `types` says; an unknown name (a typo such as `?bad_image=skip` would
    otherwise be ignored without a word) or a value of the wrong type is a DataError naming both."""
    unknown = sorted(set(source.options) - set(types))
    if unknown:
        choices = ", ".join(types) or "none"
        # `?b` without a value: more likely a '?' of a path that does not exist than an option
        hint = "; a '?' inside a path is written %3F" if source.options[unknown[0]] == "" else ""
        raise DataError(f"data.source {str(source)!r}: unknown option {unknown[0]!r} for {source.scheme}:; "
                        f"choices: {choices}{hint}")
    out = {}
    for key, value in source.options.items():
        try:
            out[key] = types[key](value)
        except ValueError:
            kind = {int: "an integer", float: "a number"}.get(types[key], types[key].__name__)
            raise DataError(f"data.source {str(source)!r}: option {key}={value!r} is not {kind}") from None
    return out
