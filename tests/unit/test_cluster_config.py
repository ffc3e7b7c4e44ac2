"""ray_cluster.yaml is a valid Ray cluster config (Ray's own autoscaler schema, after the defaults
`ray up` fills in), and it exposes nothing: dashboard on localhost, token auth on every node, the
project's venv first on PATH, no credentials in the file."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_config())
    validate_config(config)  # raises on any schema error
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def test_nothing_is_open_and_the_venv_runs_everything():
    config = _config()
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for commands in (head, workers):
        assert "RAY_AUTH_MODE=token" in commands and "RAY_AUTH_MODE=disabled" not in commands
        assert "RAY_AUTH_TOKEN_PATH=/home/ubuntu/.ray/auth_token" in commands
    every_start = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all(c.startswith("export PATH=/home/ubuntu/itmatch/.venv/bin:") for c in every_start)
    assert "torch==2.13.0" in " ".join(config["setup_commands"])
    text = (ROOT / "ray_cluster.yaml").read_text().lower()
    assert not re.search(r"(aws_secret|access_key|password|token\s*[:=]\s*\w{16,})", text)


def test_cluster_preset_loads():
    from itmatch.config import load_config

    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    assert cfg.run.storage_path.startswith("/shared") and cfg.data.cache_dir.startswith("/shared")


def test_the_cluster_presets_workers_fit_its_gpu_nodes():
    """Each worker (its CPUs and a GPU) fits one gpu_worker node; up to max_workers of them run at
    once. Preflight does not refuse a job before the autoscaler has started any GPU node."""
    from itmatch.config import load_config
    from trainers import placement

    cfg = load_config(ROOT / "configs" / "cluster.yaml")
    types = _config()["available_node_types"]
    gpu_node = types["gpu_worker"]
    nodes = [types["head"]["resources"]] + [gpu_node["resources"]] * gpu_node["max_workers"]
    assert placement.capacity(nodes, cfg.scaling.cpus_per_worker, gpu=True) == gpu_node["max_workers"]
    assert cfg.scaling.use_gpu and not cfg.scaling.check_resources
