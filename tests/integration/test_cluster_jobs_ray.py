"""`python -m cluster.jobs` against a private `ray start --head` with token auth, the way a user runs
it from the repo root: submit a tiny training run (relative preset), follow it to SUCCEEDED, list
it, read its logs; submit a Tune search and stop it (STOPPED); an unknown job id or a missing token
is one line, not a traceback. Every command is a subprocess under a hard timeout."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from ray_cli import ROOT, run_module
from ray_head import ray_head

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
STEPS: list[str] = []  # seconds per command, printed with -s
# Token auth as on a real cluster: the CLI gets the token from RAY_AUTH_TOKEN only (no RAY_AUTH_MODE).
TOKEN = uuid.uuid4().hex


def _keys(tmp: Path, name: str | None) -> list[str]:
    """Tiny and fast: 1 worker, 1 epoch, no MLflow; everything written goes to tmp (absolute: the
    job runs in a temporary copy of the repo). No run.name for a search (--name names it)."""
    return [f"data.source=synthetic:{tmp / 'shapes'}?n_images=120", f"data.cache_dir={tmp / 'cache'}",
            f"run.storage_path={tmp / 'runs'}", *([f"run.name={name}"] if name else []), "run.max_failures=0",
            "tracking.enabled=false", "train.epochs=1", "scaling.num_workers=1"]


def _jobs(*args: str, timeout: int = 60, token: str = TOKEN):
    start = time.monotonic()
    done = run_module("cluster.jobs", list(args), ROOT, {"RAY_AUTH_TOKEN": token}, timeout=timeout)
    STEPS.append(f"{args[0]} {time.monotonic() - start:.0f}s")
    return done


def _wait_for(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    return path.exists()


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs")
    (tmp / "space.yaml").write_text("optim.lr: {loguniform: [1.0e-3, 5.0e-3]}\n")
    train_id, search_id = (f"itm-{kind}-{uuid.uuid4().hex[:8]}" for kind in ("train", "search"))
    out = {"train_id": train_id, "search_id": search_id, "tmp": tmp, "t0": time.monotonic()}
    with ray_head(num_cpus=2, auth_token=TOKEN) as head:
        a = ("--address", head.address)
        out["no_token"] = _jobs("list", *a, token="")
        out["submit"] = _jobs("submit", "train", *a, "--no-wait", "--job-id", train_id, "--",
                              "--config", "configs/debug.yaml", *_keys(tmp, "j1"))
        out["follow"] = _jobs("follow", train_id, *a, timeout=240)
        out["logs"] = _jobs("logs", train_id, *a)
        out["unknown"] = _jobs("logs", "raysubmit_nope", *a)
        # A search that would run for many minutes: stop it once tuning.search has made its folder.
        # --no-check: the train submission above ran the argument check (a few seconds per command)
        out["submit_search"] = _jobs("submit", "search", *a, "--no-wait", "--no-check", "--job-id", search_id, "--",
                                     "--config", "configs/debug.yaml", "--space", str(tmp / "space.yaml"),
                                     "--num-samples", "50", "--name", "s2", *_keys(tmp, None))
        out["search_started"] = _wait_for(tmp / "runs" / "s2", timeout=120)
        out["stop"] = _jobs("stop", search_id, *a, timeout=120)
        # The older entry point (README): `cluster.submit` still submits a training run; stop it at once.
        out["legacy"] = run_module("cluster.submit", [*a, "--no-wait", "--", "--config", "configs/debug.yaml",
                                                      *_keys(tmp, "j3")], ROOT, {"RAY_AUTH_TOKEN": TOKEN}, timeout=60)
        legacy_id = out["legacy"].stdout.partition("submitted ")[2].partition(":")[0]
        out["legacy_stop"] = _jobs("stop", legacy_id or "missing", *a, timeout=120)
        out["list"] = _jobs("list", *a)
        out["wall_s"] = time.monotonic() - out["t0"]
    return out


def _ok(done) -> str:
    return done.stdout[-3000:] + done.stderr[-3000:]


def test_training_job_submits_follows_lists_and_logs(session):
    train_id = session["train_id"]
    assert session["submit"].returncode == 0, _ok(session["submit"])
    assert f"submitted {train_id}: python -m trainers.train --config configs/debug.yaml" in session["submit"].stdout
    follow = session["follow"]
    assert follow.returncode == 0 and f"job {train_id}: SUCCEEDED" in follow.stdout, _ok(follow)
    assert '"best_epoch"' in follow.stdout  # the driver's summary, streamed while it ran
    assert session["logs"].returncode == 0 and '"best_epoch"' in session["logs"].stdout, _ok(session["logs"])
    assert (session["tmp"] / "runs" / "j1").is_dir()  # the relative preset resolved in the job's copy
    row = next(line for line in session["list"].stdout.splitlines() if line.startswith(train_id))
    assert "SUCCEEDED" in row and "python -m trainers.train" in row


def test_search_job_is_stopped(session):
    search_id = session["search_id"]
    assert session["submit_search"].returncode == 0, _ok(session["submit_search"])
    assert session["search_started"], "tuning.search never made its folder"
    stop = session["stop"]
    assert stop.returncode == 0 and f"job {search_id}: STOPPED" in stop.stdout, _ok(stop)
    row = next(line for line in session["list"].stdout.splitlines() if line.startswith(search_id))
    assert "STOPPED" in row and "python -m tuning.search" in row


def test_the_older_submit_entry_point_still_submits_training(session):
    legacy, stop = session["legacy"], session["legacy_stop"]
    assert legacy.returncode == 0 and "python -m trainers.train --config configs/debug.yaml" in legacy.stdout, \
        _ok(legacy)
    assert stop.returncode == 0 and stop.stdout.strip().endswith(": STOPPED"), _ok(stop)


def test_unknown_job_is_one_line(session):
    unknown = session["unknown"]
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip().splitlines() == [
        f"error: no job 'raysubmit_nope' at {unknown.args[-1]} (`python -m cluster.jobs list` shows the jobs there)"]
    print(f"cluster jobs session: {session['wall_s']:.0f} s ({', '.join(STEPS)})")  # -s shows it; budget ~90 s


def test_missing_token_is_one_line(session):
    refused = session["no_token"]
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "export RAY_AUTH_TOKEN" in lines[0], refused.stderr
    print(f"without a token: {lines[0]}")
