"""cluster.jobs without a Ray cluster: the working-dir upload check counts exactly what Ray would
pack (.gitignore, .rayignore, Ray's default excludes, runtime_env excludes), refuses in one line
naming the biggest path and the limit, and the CLI answers an unreachable address in one line."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from cluster import jobs, workdir

ROOT = Path(__file__).resolve().parents[2]

KIB = 1024


def _tree(root: Path, files: dict[str, int | str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * content if isinstance(content, int) else content.encode())
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small project with one big data file, a .gitignore'd bigger one, and Ray's default excludes."""
    return _tree(tmp_path / "repo", {
        "train.py": 2 * KIB, "configs/a.yaml": 300, "data/big.bin": 300 * KIB, "data/small.txt": 5 * KIB,
        ".gitignore": "cache/\n*.ckpt\n", "cache/features.npy": 900 * KIB, "model.ckpt": 900 * KIB,
        "tests/.rayignore": "*.log\n", "tests/run.log": 700 * KIB, "tests/test_a.py": 1 * KIB,
        ".venv/lib/torch.so": 900 * KIB, ".git/objects/pack": 900 * KIB,
    })


def test_big_file_over_the_limit_is_named_with_the_limit(repo: Path):
    upload = workdir.check(repo, limit=100 * KIB)
    assert not upload.ok
    message = upload.message()
    assert "\n" not in message and "largest: data/ (305.0 KiB)" in message and "100.0 KiB" in message
    assert "excluding data/big.bin (300.0 KiB) is enough: --exclude data/big.bin" in message
    assert workdir.check(repo, excludes=["data/big.bin"], limit=100 * KIB).ok  # the advice works


def test_ignored_and_default_excluded_files_do_not_count(repo: Path):
    entries = workdir.check(repo, limit=100 * KIB).entries
    assert sorted(entries) == [".gitignore", "configs/a.yaml", "data/big.bin", "data/small.txt",
                               "tests/.rayignore", "tests/test_a.py", "train.py"]
    assert workdir.check(repo, limit=400 * KIB).ok  # 900 KiB .gitignore'd, 700 KiB .rayignore'd: not counted


def test_explicit_excludes_count_like_rays_runtime_env_excludes(repo: Path):
    upload = workdir.check(repo, excludes=["data/", "*.yaml"], limit=100 * KIB)
    assert upload.ok and not any(rel.startswith("data/") or rel.endswith(".yaml") for rel in upload.entries)


def test_rays_switch_to_ignore_gitignore_is_honoured(repo: Path, monkeypatch):
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    upload = workdir.check(repo, limit=1300 * KIB)  # ~2.1 MiB with the .gitignore'd files
    assert {"cache/features.npy", "model.ckpt"} <= set(upload.entries)
    assert "excluding cache/features.npy (900.0 KiB) is enough" in upload.message()  # the deepest that suffices


def test_size_equals_the_package_ray_builds(repo: Path, tmp_path: Path):
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    (repo / "empty").mkdir()  # packed as an entry of its own
    package = tmp_path / "pkg.zip"
    create_package(str(repo), package, include_gitignore=True,
                   excludes=ray_constants.get_runtime_env_default_excludes() + ["configs/"])
    upload = workdir.check(repo, excludes=["configs/"], limit=100 * KIB)
    assert "empty/" in upload.entries and upload.size == package.stat().st_size


def test_no_single_path_is_enough_says_so(tmp_path: Path):
    root = _tree(tmp_path / "r", {"a/1.bin": 50 * KIB, "a/2.bin": 50 * KIB, "b/1.bin": 120 * KIB})
    message = workdir.check(root, limit=100 * KIB).message()
    assert "largest: b/ (120.0 KiB)" in message
    assert "no single path is enough: exclude b/ (120.0 KiB) and more" in message


def test_the_limit_is_the_smaller_of_rays_http_and_gcs_limits():
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    assert workdir.upload_limit() == min(DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE) == 100 * 1024 ** 2


def test_submit_refuses_before_contacting_the_cluster(repo: Path):
    with pytest.raises(jobs.BadWorkdir, match="data/big.bin"):  # port 1: would fail if it connected first
        jobs.Jobs("http://127.0.0.1:1").submit("train", ["--config", "x.yaml"], working_dir=repo, limit=100 * KIB)


def test_check_cli_one_line_and_exit_code(repo: Path, capsys):
    assert jobs.main(["check", "--working-dir", str(repo), "--limit-mib", "0.1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data/big.bin" in err and "102.4 KiB" in err
    assert jobs.main(["check", "--working-dir", str(repo)]) == 0
    assert "under Ray's 100.0 MiB job upload limit" in capsys.readouterr().out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv", [["list"], ["logs", "raysubmit_x"], ["stop", "raysubmit_x"]])
def test_unreachable_address_is_one_line(argv, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{_closed_port()}")  # the default address
    assert jobs.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot reach the Ray job server at http://127.0.0.1:")


@pytest.mark.parametrize("argv, needle", [
    (["list", "--address", "http://127.0.0.1:99999"], "error: address 'http://127.0.0.1:99999': Port out of range"),
    # Ray's "Invalid address format" traceback; "Module: ftp does not exist" and an AssertionError
    # traceback for a module that is no cluster provider, exit 1 as if the cluster had failed
    (["list", "--address", ":::"], "error: address ':::': no host name in it"),
    (["logs", "x", "--address", "http://:8265"], "error: address 'http://:8265': no host name in it"),
    (["list", "--address", "ftp://x:1"], "error: address 'ftp://x:1': not an http(s) address, and no installed"),
    (["list", "--address", "json://x"], "error: address 'json://x': not an http(s) address"),
    (["list", "--address", "a-b://x"], "error: address 'a-b://x': not an http(s) address"),
    (["check", "--limit-mib", "nan"], "argument --limit-mib: invalid"),
    (["check", "--limit-mib", "-1"], "argument --limit-mib: invalid"),  # was "over Ray's -1024.0 KiB limit"
])
def test_a_bad_port_or_limit_is_one_line_not_a_traceback(argv, needle, capsys):
    with pytest.raises(SystemExit) if argv[0] == "check" else contextlib.nullcontext() as done:
        code = jobs.main(argv)
    code = done.value.code if argv[0] == "check" else code
    assert code == 2 and needle in capsys.readouterr().err


def test_entrypoints_and_job_args():
    assert jobs.split_job_args(["submit", "search", "--", "--search", "optuna", "--", "x"]) == \
        (["submit", "search"], ["--search", "optuna", "--", "x"])
    assert jobs.entrypoint("search", ["--space", "a b.yaml"]) == "python -m tuning.search --space 'a b.yaml'"
    assert jobs.entrypoint("train", ["loss.margin=0.1"]) == "python -m trainers.train loss.margin=0.1"


def test_token_comes_from_the_environment_only(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert jobs.auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")
    assert jobs.auth_headers() == {"Authorization": "Bearer s3cret"}


def test_address_default(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert jobs.resolve_address() == "http://head:8265" and jobs.resolve_address("http://x:1") == "http://x:1"


@pytest.mark.parametrize("kind, args, needle", [
    ("train", ["--config", "configs/debug.yaml", "train.epochs=abc"], "train.epochs = 'abc'"),
    ("train", ["--config", "configs/nope.yaml"], "config preset 'configs/nope.yaml' does not exist"),
    ("train", ["--epochs", "3"], "unrecognized arguments: --epochs"),
    ("search", ["--config", "configs/debug.yaml", "--space", "configs/search/nope.yaml"], "configs/search/nope.yaml"),
    ("search", ["--config", "configs/debug.yaml", "--space", "configs/search/eq6.yaml", "--search", "optuna",
                "--scheduler", "pbt"], "search.scheduler=pbt"),
])
def test_bad_job_arguments_are_refused_before_contacting_the_cluster(kind, args, needle):
    """The job's own CLI judges its arguments here, relative paths from the working dir (the repo)."""
    with pytest.raises(jobs.BadArgs) as info:  # port 1: would fail differently if it connected first
        jobs.Jobs("http://127.0.0.1:1").submit(kind, args, working_dir=ROOT)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_good_job_arguments_pass_the_check():
    jobs.check_args("train", ["--config", "configs/debug.yaml", "train.epochs=2"], ROOT)
    jobs.check_args("search", ["--config", "configs/debug.yaml", "--space", "configs/search/eq6.yaml",
                               "--num-samples", "2"], ROOT)


def test_a_preset_on_the_clusters_disks_is_left_to_the_job(capsys):
    """/shared/presets/x.yaml exists on the cluster, not here: the check steps aside instead of refusing."""
    jobs.check_args("train", ["--config", "/nonexistent-cluster-disk/x.yaml", "train.epochs=abc"], ROOT)
    jobs.check_args("search", ["--config=configs/debug.yaml", "search.space=/nonexistent-cluster-disk/s.yaml"], ROOT)
    assert capsys.readouterr().err.count("is not on this machine") == 2
