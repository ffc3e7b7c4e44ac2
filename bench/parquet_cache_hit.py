"""Memory and time of opening an already-featurised Parquet source (a cache hit), side by side in one
run: the table read whole into Python objects first (what every `parquet:`/`hf:` run did before
the source was read lazily) against the lazy read (split and image-path columns only).

The table: the Flickr8k-1k images as bytes, repeated `--copies` times (ids of their own, so each copy
is distinct data), five captions each, one row per image; featurised once with the `pixels`
encoder (cheap), then opened again. Each measurement runs in a fresh process (its own peak RSS
from getrusage, imports included).

    .venv/bin/python bench/parquet_cache_hit.py [--copies 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "flickr8k-1k"
OPEN = """
import json, resource, sys, time
t = time.perf_counter()
from itmatch.data.store import prepare
from itmatch.data.readers import read_source
if sys.argv[3] == "eager":  # the rows read first, as before
    corpus = read_source(sys.argv[1]); corpus.images; corpus.captions
if sys.argv[3] != "imports":
    prepare(sys.argv[1], cache_dir=sys.argv[2], image_encoder="pixels", text_encoder="hashing", progress=False)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print(json.dumps({"seconds": seconds, "peak_mib": peak}))
"""


def write_table(path: Path, copies: int) -> int:
    doc = json.loads((DATA / "dataset_flickr8k_1k.json").read_text())["images"]
    rows = {"id": [], "image": [], "captions": [], "split": []}
    for copy in range(copies):
        for im in doc:
            rows["id"].append(f"{copy}-{im['imgid']}")
            rows["image"].append((DATA / "images" / im["filename"]).read_bytes())
            rows["captions"].append([s["raw"] for s in im["sentences"]])
            rows["split"].append(im["split"])
    pq.write_table(pa.table(rows), path)
    return len(rows["id"])


def measure(source: str, cache: Path, mode: str) -> dict:
    """One fresh process opening the source; its own peak RSS and time (imports included)."""
    done = subprocess.run([sys.executable, "-c", OPEN, source, str(cache), mode], cwd=ROOT, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "f8k.parquet"
        n = write_table(table, args.copies)
        source = f"parquet:{table}?id=id"
        t = time.perf_counter()
        measure(source, Path(tmp) / "cache", "lazy")  # the miss: featurise once
        miss = time.perf_counter() - t
        lazy = measure(source, Path(tmp) / "cache", "lazy")
        eager = measure(source, Path(tmp) / "cache", "eager")
        imports = measure(source, Path(tmp) / "cache", "imports")
        size = table.stat().st_size / 2**20
    print(f"Parquet table: {n} images, {size:.0f} MiB; first run (featurise, pixels encoder) {miss:.1f} s")
    print(f"{'cache hit':<34} {'peak RSS MiB':>12} {'seconds':>8}")
    print(f"{'rows read first (before)':<34} {eager['peak_mib']:>12.0f} {eager['seconds']:>8.2f}")
    print(f"{'lazy: split/path columns only':<34} {lazy['peak_mib']:>12.0f} {lazy['seconds']:>8.2f}")
    print(f"{'(the imports alone)':<34} {imports['peak_mib']:>12.0f} {imports['seconds']:>8.2f}")
    base = imports["peak_mib"]
    print(f"ratio before/lazy: memory {eager['peak_mib'] / lazy['peak_mib']:.2f}x "
          f"({(eager['peak_mib'] - base) / max(lazy['peak_mib'] - base, 1):.1f}x above the imports), "
          f"time {eager['seconds'] / lazy['seconds']:.2f}x")


if __name__ == "__main__":
    main()
