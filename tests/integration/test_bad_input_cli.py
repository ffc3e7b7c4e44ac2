"""The real CLIs refuse bad input with one line and exit 2, before Ray starts, leaving an existing
run folder untouched. Few and fast: the full table of kinds is tests/unit/test_bad_input.py."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from ray_cli import run_module


def _precomp(root: Path, n_train: int = 6) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("dev", 2), ("test", 2)):
        np.save(root / f"{prefix}_ims.npy", rng.normal(size=(n, 4)).astype(np.float32))
        np.save(root / f"{prefix}_caps_foo.npy", rng.normal(size=(n * 5, 3)).astype(np.float32))
        (root / f"{prefix}_caps.txt").write_text("".join(f"{prefix} {i} cap {j}\n" for i in range(n) for j in range(5)))
    return root


def _snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path: Path) -> dict:
    """A precomp source and an existing run (saved config + one checkpoint) to leave untouched."""
    data = _precomp(tmp_path / "p")
    args = [f"data.source=precomp:{data}", "data.text_encoder=foo", "data.batch_size=10",
            f"data.cache_dir={tmp_path / 'cache'}", f"run.storage_path={tmp_path / 'runs'}", "run.name=r1",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}"]
    run = tmp_path / "runs" / "r1"
    (run / "checkpoint_000000").mkdir(parents=True)
    (run / "checkpoint_000000" / "state.pt").write_bytes(b"weights")
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"source": f"precomp:{data}", "text_encoder": "foo",
                                                              "batch_size": 10}}))
    return {"tmp": tmp_path, "args": args, "run": run, "before": _snapshot(run)}


CASES = [
    ("batch-larger-than-data", ["run.name=fresh", "data.batch_size=600"],
     ["data.batch_size=600", "30 training captions"]),
    ("changed-key-on-resume", ["optim.lr=0.001"], ["r1 was started with a different config", "optim.lr: 0.0002 -> 0.001"]),
    ("tracking-uri-folder-missing", ["run.name=fresh", "tracking.tracking_uri=sqlite:////nonexistent/dir/m.db"],
     ["tracking.tracking_uri = 'sqlite:////nonexistent/dir/m.db'", "does not exist"]),
    ("unknown-encoder", ["run.name=fresh", "data.text_encoder=nope"], ["data.text_encoder = 'nope'"]),
]


@pytest.mark.parametrize("extra, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_train_cli_refuses_in_one_line_before_ray(workspace, extra, needles):
    start = time.monotonic()
    proc = run_module("trainers.train", [*workspace["args"], *extra], cwd=workspace["tmp"], timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0]
    assert "Ray" not in proc.stdout + proc.stderr and time.monotonic() - start < 60  # no Ray started
    assert _snapshot(workspace["run"]) == workspace["before"]
    assert not (workspace["tmp"] / "runs" / "fresh").exists()


def test_evaluate_cli_unknown_registered_model_is_one_line(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    MlflowClient(uri).search_experiments()  # an existing (empty) store
    proc = run_module("trainers.evaluate", ["--model", "models:/no-such-model@champion", "--tracking-uri", uri],
                      cwd=tmp_path, timeout=120)
    # MLflow logs its creation of the fresh sqlite store at INFO; the refusal itself is one line
    lines = [line for line in proc.stderr.splitlines() if "mlflow.store.db" not in line and line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and "models:/no-such-model@champion" in lines[0] and "not found" in lines[0]
    assert "Traceback" not in proc.stderr


def test_evaluate_cli_a_misspelt_store_is_named_not_created(tmp_path):
    """MLflow created an empty store at the misspelt path and said the model was "not found"."""
    proc = run_module("trainers.evaluate", ["--model", "models:/m@champion", "--tracking-uri", "sqlite:///mlrun.db"],
                      cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and f"no such file {tmp_path / 'mlrun.db'}" in lines[0], lines
    assert not (tmp_path / "mlrun.db").exists()


def test_evaluate_cli_damaged_checkpoint_is_named(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "state.pt").write_bytes(b"\x80\x02 not a checkpoint")
    (tmp_path / "ckpt" / "config.yaml").write_text("{}\n")
    proc = run_module("trainers.evaluate", ["--model", str(tmp_path / "ckpt")], cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and f"{tmp_path / 'ckpt' / 'state.pt'}: cannot load" in lines[0]

