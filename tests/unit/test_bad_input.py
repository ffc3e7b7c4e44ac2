"""Bad input is refused with one line naming the culprit, before anything of a run is touched.

One table: each row builds a small bad input in tmp_path and the call that must refuse it (the
data is read by `prepare` as the driver does; config and cluster checks go through
`trainers.preflight.check`). Every row asserts the exception type, that the message names the
file/field/value, that it is a single line, and that an existing run folder (config, checkpoint)
and MLflow store were not modified. Ray is replaced by a fake cluster (no Ray starts here)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import socket
import sqlite3
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_readers import write_precomp

from itmatch.config import Config, ConfigError, load_config, save_config
from itmatch.data.sources import DataError
from itmatch.data.store import prepare
from itmatch.state import CheckpointError, TrainState, load_checkpoint, save_checkpoint


def jpeg_bytes(seed: int = 0, size: int = 32) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


class Env:
    """A tmp_path with an existing run (config + checkpoint) and MLflow store, and helpers to build
    bad inputs around it."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp, self.monkeypatch = tmp, monkeypatch
        self.run = tmp / "runs" / "r1"
        self.db = tmp / "mlruns.db"
        self.cluster = {"CPU": 2.0}
        cfg = self.config()
        save_config_dir = self.run
        save_config_dir.mkdir(parents=True)
        save_config(cfg, self.run / "config.yaml")
        save_checkpoint(self.run / "checkpoint_000000", model={"w": torch.zeros(2)}, cfg=cfg,
                        train_state=TrainState(epoch=1), dims=(4, 3))
        with contextlib.closing(sqlite3.connect(self.db)) as db:  # an existing store (the preflight reads it)
            db.execute("CREATE TABLE experiments (name TEXT)")
            db.commit()
        self.before = self.snapshot()

    def config(self, *overrides: str) -> Config:
        return load_config(overrides=[
            f"run.storage_path={self.tmp / 'runs'}", "run.name=r1", "data.batch_size=10",
            f"tracking.tracking_uri=sqlite:///{self.db}", f"data.cache_dir={self.tmp / 'cache'}",
            "data.text_encoder=foo", *overrides])

    def snapshot(self) -> dict[str, tuple[int, str]]:
        files = [p for p in self.run.rglob("*") if p.is_file()] + [self.db]
        return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}

    # ---- data
    def precomp(self, sizes=None, **kw) -> Path:
        root = self.tmp / "p"
        write_precomp(root, sizes or {"train": 6, "dev": 2, "test": 2}, **kw)
        return root

    def prepare(self, source: str, *, image_encoder: str = "pixels", text_encoder: str = "") -> Any:
        # precomp fixtures carry caption features named "foo"; other sources encode captions
        text_encoder = text_encoder or ("foo" if source.startswith("precomp:") else "hashing")
        return prepare(source, cache_dir=self.tmp / "cache", image_encoder=image_encoder,
                       text_encoder=text_encoder, progress=False)

    def karpathy(self, images: dict[str, bytes | None], caption: str = "a caption") -> Path:
        folder = self.tmp / "k"
        (folder / "images").mkdir(parents=True)
        entries = []
        for i, (name, data) in enumerate(images.items()):
            if data is not None:
                (folder / "images" / name).write_bytes(data)
            entries.append({"filename": name, "imgid": i, "split": "train",
                            "sentences": [{"raw": caption, "sentid": 2 * i}, {"raw": "two", "sentid": 2 * i + 1}]})
        (folder / "d.json").write_text(json.dumps({"images": entries}))
        return folder / "d.json"

    # ---- preflight with a fake Ray cluster
    def preflight(self, cfg: Config, sizes=None, **precomp) -> None:
        import ray

        import trainers.train
        from trainers import placement, preflight

        store = self.prepare(f"precomp:{self.precomp(sizes, **precomp)}")
        self.monkeypatch.setattr(trainers.train, "init_ray", lambda cfg: None)
        self.monkeypatch.setattr(ray, "cluster_resources", lambda: dict(self.cluster))
        self.monkeypatch.setattr(placement, "nodes", lambda: [dict(self.cluster)])
        preflight.check(cfg, store)


def _rewrite(path: Path, edit: Callable[[bytes], bytes]) -> Path:
    path.write_bytes(edit(path.read_bytes()))
    return path


def _nan_row(root: Path) -> None:
    ims = np.load(root / "train_ims.npy")
    ims[3, 1] = np.nan
    np.save(root / "train_ims.npy", ims)


def _unanswered_port() -> int:
    with socket.socket() as s:  # bound then closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parquet_mixed(env: Env) -> str:
    folder = env.tmp / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"image": [jpeg_bytes()], "caption": ["a dog"]}), folder / "train-0.parquet")
    pq.write_table(pa.table({"image": [jpeg_bytes(1)], "caption": [7]}), folder / "test-0.parquet")
    return f"parquet:{folder}"


def _truncated_checkpoint(env: Env) -> None:
    folder = env.tmp / "copy"
    save_checkpoint(folder, model={"w": torch.zeros(2)}, cfg=env.config(), train_state=TrainState(), dims=(4, 3))
    _rewrite(folder / "state.pt", lambda b: b[: len(b) // 3])
    load_checkpoint(folder)


def _same_file_twice(env: Env) -> None:
    path = env.karpathy({"a.jpg": jpeg_bytes(), "b.jpg": jpeg_bytes(1)})
    doc = json.loads(path.read_text())
    doc["images"][1].update(filename="a.jpg", split="test")  # a test image that training would see
    path.write_text(json.dumps(doc))
    env.prepare(f"karpathy:{path}")


def _hf_not_a_dataset(env: Env) -> None:
    (env.tmp / "notds").mkdir()
    (env.tmp / "notds" / "readme.txt").write_text("hello")
    env.prepare(f"hf:{env.tmp / 'notds'}")


# (id, action, exception, substrings the message must hold, single line)
CASES: list[tuple[str, Callable[[Env], Any], type, list[str], bool]] = [
    ("precomp-non-utf8-captions",
     lambda e: (_rewrite(e.precomp() / "train_caps.txt", lambda b: b.replace(b"image 0 caption 2", b"caf\xe9")),
                e.prepare(f"precomp:{e.tmp / 'p'}")),
     DataError, ["train_caps.txt", "line 3", "xe9", "not UTF-8"], True),
    ("precomp-empty-caption",
     lambda e: (_rewrite(e.precomp() / "train_caps.txt", lambda b: b.replace(b"train image 1 caption 0", b"  ")),
                e.prepare(f"precomp:{e.tmp / 'p'}")),
     DataError, ["train_caps.txt", "line 6", "empty caption"], True),
    ("precomp-feature-widths-differ",
     lambda e: (e.precomp({"train": 3}, dim=4), e.precomp({"test": 2}, dim=5, seed=1),
                e.prepare(f"precomp:{e.tmp / 'p'}")),
     DataError, ["train_ims.npy", "4 wide", "test_ims.npy", "width 5"], True),
    ("precomp-caption-count-mismatch",
     lambda e: (_rewrite(e.precomp() / "dev_caps.txt", lambda b: b + b"one more\n"),
                e.prepare(f"precomp:{e.tmp / 'p'}")),
     DataError, ["dev_caps.txt", "11 captions", "dev_ims.npy"], True),
    ("precomp-caption-feature-rows",
     lambda e: (np.save(e.precomp() / "test_caps_foo.npy", np.zeros((3, 3), np.float32)),
                e.prepare(f"precomp:{e.tmp / 'p'}")),
     DataError, ["test_caps_foo.npy", "3 rows", "10 captions"], True),
    ("precomp-nan-feature-row",
     lambda e: (_nan_row(e.precomp()), e.prepare(f"precomp:{e.tmp / 'p'}")),
     DataError, ["split 'train'", "image features", "row 3", "non-finite"], True),
    ("precomp-not-npy",
     lambda e: ((e.precomp() / "dev_ims.npy").write_bytes(b"garbage"), e.prepare(f"precomp:{e.tmp / 'p'}")),
     DataError, ["dev_ims.npy", "cannot read as .npy"], True),
    ("parquet-zero-bytes",
     lambda e: ((e.tmp / "z.parquet").write_bytes(b""), e.prepare(f"parquet:{e.tmp / 'z.parquet'}")),
     DataError, ["z.parquet", "0 bytes"], True),
    ("parquet-not-parquet",
     lambda e: ((e.tmp / "y.parquet").write_text("id,caption\n1,a dog\n"), e.prepare(f"parquet:{e.tmp / 'y.parquet'}")),
     DataError, ["y.parquet", "not a readable Parquet file"], True),
    ("parquet-splits-disagree-in-columns",
     lambda e: e.prepare(_parquet_mixed(e)),
     DataError, ["pq", "splits disagree"], True),
    ("parquet-empty-caption",
     lambda e: (pq.write_table(pa.table({"image": [jpeg_bytes()], "caption": [" "]}), e.tmp / "c.parquet"),
                e.prepare(f"parquet:{e.tmp / 'c.parquet'}")),
     DataError, ["c.parquet", "row 0", "'caption'", "empty caption"], True),
    ("parquet-caption-not-text",
     lambda e: (pq.write_table(pa.table({"image": [jpeg_bytes()], "caption": [[7]]}), e.tmp / "n.parquet"),
                e.prepare(f"parquet:{e.tmp / 'n.parquet'}")),
     DataError, ["n.parquet", "row 0", "'caption' holds 7, not caption text"], True),
    ("parquet-null-image-id",
     lambda e: (pq.write_table(pa.table({"image": [jpeg_bytes(0), jpeg_bytes(1)], "caption": ["a", "b"],
                                         "key": [7, None]}), e.tmp / "i.parquet"),
                e.prepare(f"parquet:{e.tmp / 'i.parquet'}?id=key")),
     DataError, ["i.parquet", "row 1", "'key' is null"], True),
    ("parquet-null-split",
     lambda e: (pq.write_table(pa.table({"image": [jpeg_bytes(0), jpeg_bytes(1)], "caption": ["a", "b"],
                                         "split": ["train", None]}), e.tmp / "s.parquet"),
                e.prepare(f"parquet:{e.tmp / 's.parquet'}")),
     DataError, ["s.parquet", "row 1", "'split' = None"], True),
    ("hf-folder-not-a-dataset", _hf_not_a_dataset, DataError, ["notds", "not a datasets.save_to_disk folder"], True),
    ("karpathy-broken-json",
     lambda e: ((e.tmp / "b.json").write_text('{"images": [{"filename": "x.jpg",'),
                e.prepare(f"karpathy:{e.tmp / 'b.json'}")),
     DataError, ["b.json", "not valid JSON", "line 1"], True),
    ("karpathy-non-utf8-json",
     lambda e: ((e.tmp / "n.json").write_bytes(b'{"images": ["caf\xe9"]}'), e.prepare(f"karpathy:{e.tmp / 'n.json'}")),
     DataError, ["n.json", "not UTF-8", "offset 16"], True),
    ("karpathy-missing-image",
     lambda e: e.prepare(f"karpathy:{e.karpathy({'a.jpg': jpeg_bytes(), 'gone.jpg': None})}"),
     DataError, ["d.json", "1 image file(s)", "gone.jpg", "missing"], True),
    ("karpathy-truncated-jpeg",
     lambda e: e.prepare(f"karpathy:{e.karpathy({'a.jpg': jpeg_bytes(), 'cut.jpg': jpeg_bytes(1)[:300]})}"),
     DataError, ["1 of 2 images cannot be decoded", "cut.jpg", "runcated", "bad_images=skip"], True),
    ("karpathy-not-an-image",
     lambda e: e.prepare(f"karpathy:{e.karpathy({'a.jpg': jpeg_bytes(), 'txt.jpg': b'plain text'})}"),
     DataError, ["cannot be decoded", "txt.jpg", "cannot identify image file"], True),
    ("karpathy-same-file-in-two-splits", _same_file_twice,
     DataError, ["d.json", "images[1] field 'filename' = 'a.jpg'", "images[0]", "'train' and 'test'"], True),
    ("karpathy-empty-caption",
     lambda e: e.prepare(f"karpathy:{e.karpathy({'a.jpg': jpeg_bytes()}, caption='   ')}"),
     DataError, ["d.json", "images[0].sentences[0]", "no caption text"], True),
    ("bad-images-policy-value",
     lambda e: e.prepare(f"karpathy:{e.karpathy({'a.jpg': jpeg_bytes()})}?bad_images=ignore"),
     DataError, ["bad_images='ignore'", "fail, skip"], True),
    ("source-option-misspelt",  # would otherwise be ignored: the bad images fail the run anyway
     lambda e: e.prepare(f"karpathy:{e.karpathy({'a.jpg': jpeg_bytes()})}?bad_image=skip"),
     DataError, ["unknown option 'bad_image' for karpathy:", "restval, bad_images"], True),
    ("source-option-not-an-int",
     lambda e: e.prepare(f"precomp:{e.precomp(feature_name='foo')}?caps_per_image=five"),
     DataError, ["caps_per_image='five'", "is not an integer"], True),
    ("source-option-zero-captions",
     lambda e: e.prepare(f"precomp:{e.precomp(feature_name='foo')}?caps_per_image=0"),
     DataError, ["caps_per_image=0", "at least 1"], True),
    ("unknown-image-encoder",
     lambda e: e.prepare(f"karpathy:{e.karpathy({'a.jpg': jpeg_bytes()})}", image_encoder="resnet9000"),
     DataError, ["data.image_encoder = 'resnet9000'", "efficientnet_lite0"], True),
    ("unknown-text-encoder",
     lambda e: e.prepare(f"precomp:{e.precomp(feature_name=None)}", text_encoder="bert-xxl"),
     DataError, ["data.text_encoder = 'bert-xxl'", "minilm"], True),
    ("missing-split",
     lambda e: prepare(f"precomp:{e.precomp({'train': 2})}", cache_dir=e.tmp / "cache", image_encoder="pixels",
                       text_encoder="foo", splits=["train", "val"], progress=False),
     DataError, ["split(s) ['val'] not found", "available: ['train']"], True),
    ("unknown-config-key",
     lambda e: e.config("data.batchsize=12"), ConfigError, ["unknown config key 'data.batchsize'"], True),
    # config.py reports every bad key on its own line under a header: two lines for one key
    ("metric-not-a-metric",  # else it trained an epoch, then failed on a KeyError
     lambda e: e.config("train.metric=RSUM"), ConfigError, ["train.metric='RSUM'", "rsum, i2t_r1"], False),
    ("metric-lower-is-better",  # else the worst epoch was kept and promoted
     lambda e: e.config("train.metric=i2t_medr"), ConfigError, ["train.metric='i2t_medr'", "higher is better"], False),
    ("out-of-range-config-value",
     lambda e: e.config("loss.margin=-1"), ConfigError, ["loss.margin = -1", "greater than or equal to 0"], False),
    ("batch-larger-than-data",
     lambda e: e.preflight(e.config("data.batch_size=600", "run.name=fresh")),
     DataError, ["data.batch_size=600", "30 training captions", "split 'train'"], True),
    ("fewer-images-than-workers",
     lambda e: e.preflight(e.config("data.batch_size=4", "run.name=fresh"), sizes={"train": 1, "dev": 1, "test": 1}),
     DataError, ["1 images cannot be split over 2 workers", "scaling.num_workers=2"], True),
    ("changed-keys-on-resume",
     lambda e: e.preflight(e.config("optim.lr=0.001", "loss.margin=0.2", "run.max_failures=3")),
     ConfigError, ["r1 was started with a different config", "loss.margin: 0.05 -> 0.2",
                   "optim.lr: 0.0002 -> 0.001"], True),
    ("tracking-sqlite-folder-missing",
     lambda e: e.preflight(e.config(f"tracking.tracking_uri=sqlite:///{e.tmp / 'nowhere' / 'm.db'}", "run.name=fresh")),
     ConfigError, ["tracking.tracking_uri", "nowhere", "does not exist"], True),
    ("tracking-sqlite-two-slashes",  # a relative sqlite URI needs three
     lambda e: e.preflight(e.config("tracking.tracking_uri=sqlite://mlruns.db", "run.name=fresh")),
     ConfigError, ["tracking.tracking_uri = 'sqlite://mlruns.db'", "sqlite:///relative/path.db"], True),
    ("tracking-database-driver-missing",
     lambda e: e.preflight(e.config("tracking.tracking_uri=postgresql+nosuchdriver://u@db/mlflow", "run.name=fresh")),
     ConfigError, ["tracking.tracking_uri = 'postgresql+nosuchdriver://u@db/mlflow'", "nosuchdriver"], True),
    ("tracking-unknown-scheme",
     lambda e: e.preflight(e.config("tracking.tracking_uri=htp://mlflow:5000", "run.name=fresh")),
     ConfigError, ["tracking.tracking_uri = 'htp://mlflow:5000'", "MLflow cannot use it"], True),
    ("tracking-alias-reserved",  # MLflow refuses it only at registration, once training is over
     lambda e: e.preflight(e.config("tracking.alias=v1", "run.name=fresh")),
     ConfigError, ["tracking.alias = 'v1'", "reserved"], True),
    ("tracking-model-name-slash",
     lambda e: e.preflight(e.config("tracking.registered_model=team/model", "run.name=fresh")),
     ConfigError, ["tracking.registered_model = 'team/model'", "cannot contain '/'"], True),
    ("tracking-http-no-answer",
     lambda e: e.preflight(e.config(f"tracking.tracking_uri=http://127.0.0.1:{_unanswered_port()}", "run.name=fresh")),
     ConfigError, ["tracking.tracking_uri = 'http://127.0.0.1:", "no answer within"], True),
    ("cca-more-dims-than-features",
     lambda e: e.preflight(e.config("model.name=cca", "model.embed_dim=4096", "run.name=fresh")),
     ConfigError, ["model.embed_dim=4096", "model.name='cca'", "canonical dimensions", "lower model.embed_dim"], True),
    ("more-workers-than-cpus",
     lambda e: e.preflight(e.config("scaling.num_workers=3", "run.name=fresh")),
     ConfigError, ["scaling.num_workers=3", "needs 3 CPUs", "has 2"], True),
    ("cpus-per-worker-too-many",
     lambda e: e.preflight(e.config("scaling.cpus_per_worker=1.5", "run.name=fresh")),
     ConfigError, ["scaling.num_workers=2 x 1.5 CPUs", "needs 3 CPUs"], True),
    ("gpu-without-gpus",
     lambda e: e.preflight(e.config("scaling.use_gpu=true", "run.name=fresh")),
     ConfigError, ["scaling.use_gpu=true", "needs 2 GPUs", "has 0"], True),
    ("truncated-checkpoint", _truncated_checkpoint, CheckpointError, ["copy/state.pt", "sha256 differs"], True),
    ("resume-with-features-of-another-width",  # a size-mismatch traceback in the workers, retried
     lambda e: e.preflight(e.config(), dim=6),
     DataError, ["r1/checkpoint_000000: takes features 4 (image) x 3 (caption) wide", "gives 6 x 3",
                 "the run resumes it"], True),
    ("start-from-features-of-another-width",
     lambda e: e.preflight(e.config("run.name=fresh", f"run.start_from={e.run / 'checkpoint_000000'}"), cap_dim=5),
     DataError, ["takes features 4 (image) x 3 (caption) wide", "gives 4 x 5", "(run.start_from)"], True),
]


@pytest.mark.parametrize("action, exc, needles, one_line", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_culprit(tmp_path, monkeypatch, action, exc, needles, one_line):
    env = Env(tmp_path, monkeypatch)
    with pytest.raises(exc) as info:
        action(env)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert ("\n" not in message) or not one_line, message
    assert "Traceback" not in message
    assert env.snapshot() == env.before  # the run folder, its checkpoint and the MLflow store are untouched


def test_a_run_that_lost_its_config_is_checked_against_its_newest_checkpoints(tmp_path, monkeypatch):
    """Without <run>/config.yaml the check was skipped: the run resumed with another margin, silently.
    An empty saved config read as every default: "a different config" listing the defaults."""
    env = Env(tmp_path, monkeypatch)
    (env.run / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"r1 was started with a different config .*loss.margin: 0.05 -> 0.2"):
        env.preflight(env.config("loss.margin=0.2"))
    env.preflight(env.config())  # the same config resumes
    (env.run / "config.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"r1/config.yaml: not a saved config"):
        env.preflight(env.config())


def test_a_batch_that_leaves_no_full_batch_names_the_largest_that_does(tmp_path, monkeypatch):
    """It said only "lower data.batch_size": a batch takes a few captions of each image, so with
    every caption asked for, the limit is well below the caption count."""
    from trainers.preflight import check_batch

    env = Env(tmp_path, monkeypatch)
    store = env.prepare(f"precomp:{env.precomp({'train': 12, 'dev': 2, 'test': 2})}")
    with pytest.raises(DataError, match=r"data.batch_size=60 leaves no full batch .* the largest that does is (\d+)"
                       ) as err:
        check_batch(env.config("data.batch_size=60"), store)
    largest = int(re.search(r"the largest that does is (\d+)", str(err.value)).group(1))
    assert 0 < largest < 60
    check_batch(env.config(f"data.batch_size={largest}"), store)
    with pytest.raises(DataError, match="leaves no full batch"):
        check_batch(env.config(f"data.batch_size={largest + 1}"), store)


def test_at_least_twenty_kinds():
    assert len(CASES) >= 20


def test_good_input_passes_the_same_checks(tmp_path, monkeypatch):
    # the fixtures above are bad only where each row makes them so
    env = Env(tmp_path, monkeypatch)
    env.preflight(env.config("run.max_failures=3", "train.log_every=5", "tracking.experiment=other"))


def test_truncated_images_can_be_skipped_with_a_count(tmp_path, monkeypatch):
    env = Env(tmp_path, monkeypatch)
    json_path = env.karpathy({"a.jpg": jpeg_bytes(), "cut.jpg": jpeg_bytes(1)[:300], "c.jpg": jpeg_bytes(2)})
    store = env.prepare(f"karpathy:{json_path}?bad_images=skip")
    split = store.split("train")
    assert store.manifest["skipped_images"] == {"train": 1}
    assert len(split.image_ids) == 2 and len(split) == 4  # the cut image and its two captions are gone
    assert set(split.image_ids.tolist()) == {0, 2}


@pytest.mark.parametrize("scheduler, epochs, refused", [("step", 30, False), ("constant", 30, False),
                                                        ("cosine", 30, True), ("step", 10, True)])
def test_epochs_may_grow_on_resume_only_when_the_schedule_allows(tmp_path, scheduler, epochs, refused):
    from trainers.preflight import changed_keys

    saved = load_config(overrides=[f"optim.scheduler={scheduler}", "train.epochs=20"])
    new = load_config(overrides=[f"optim.scheduler={scheduler}", f"train.epochs={epochs}",
                                 "tracking.enabled=false", "run.ray_log_level=INFO", "scaling.cpus_per_worker=1",
                                 "scaling.thread_wait=spin"])
    assert changed_keys(saved, new) == ([("train.epochs", 20, epochs)] if refused else [])
