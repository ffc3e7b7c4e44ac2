"""CPUs per worker that Ray can place node by node (trainers.placement), against a simulation of
placing the bundles one at a time, and the checks that use them: a one-worker job on two nodes
asked for both nodes' CPUs in one bundle, a GPU worker on ray_cluster.yaml's shape for more CPUs
than its GPU node has, and preflight compared totals, so Ray waited forever."""

from __future__ import annotations

import random
import sys

import pytest

from itmatch.config import ConfigError, load_config
from trainers import placement


def _placed(nodes: list[dict], cpus: float, gpu: bool) -> int:
    """Reference: put bundles on the first node with room left until none has any."""
    free = [dict(n) for n in nodes]
    count = 0
    while True:
        node = next((n for n in free if n.get("CPU", 0) >= cpus - 1e-9 and (not gpu or n.get("GPU", 0) >= 1)), None)
        if node is None:
            return count
        node["CPU"] = node.get("CPU", 0) - cpus
        node["GPU"] = node.get("GPU", 0) - (1 if gpu else 0)
        count += 1


def _random_nodes(rng: random.Random) -> list[dict]:
    return [{"CPU": float(rng.choice([0, 1, 2, 3, 4, 8, 12, 16])), **({"GPU": float(rng.randint(0, 4))}
                                                                       if rng.random() < 0.6 else {})}
            for _ in range(rng.randint(1, 5))]


def test_capacity_matches_placing_bundles_one_by_one():
    rng = random.Random(0)
    for _ in range(300):
        nodes = _random_nodes(rng)
        cpus, gpu = rng.choice([0.25, 0.33, 0.5, 1, 1.5, 2, 3, 5, 8]), rng.random() < 0.5
        assert placement.capacity(nodes, cpus, gpu) == _placed(nodes, cpus, gpu), (nodes, cpus, gpu)


def test_the_largest_share_is_placeable_and_one_more_cpu_is_not():
    rng = random.Random(1)
    for _ in range(300):
        nodes, slots, gpu = _random_nodes(rng), rng.randint(1, 8), rng.random() < 0.5
        share = placement.largest_share(nodes, slots, gpu)
        whole = [c for c in range(1, 17) if _placed(nodes, c, gpu) >= slots]
        assert share == (float(max(whole)) if whole else None), (nodes, slots, gpu)
        small = placement.largest_share(nodes, slots, gpu, fractional=True)
        if share is None and small is not None:  # below one CPU: the largest hundredth that fits
            assert small < 1 and _placed(nodes, small, gpu) >= slots
            assert small == 0.99 or _placed(nodes, round(small + 0.01, 2), gpu) < slots


def _fake_ray(monkeypatch, nodes: list[dict]) -> None:
    ray = type(sys)("ray")
    ray.is_initialized = lambda: True
    ray.nodes = lambda: [{"Alive": True, "Resources": n} for n in nodes] + [{"Alive": False, "Resources": {"CPU": 64.0}}]
    monkeypatch.setitem(sys.modules, "ray", ray)


RAY_CLUSTER_YAML = [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]


@pytest.mark.parametrize("nodes, overrides, expected", [
    ([{"CPU": 8.0}, {"CPU": 8.0}], [], 8.0),                                 # was 16: no node has 16
    ([{"CPU": 8.0}, {"CPU": 8.0}], ["scaling.num_workers=3"], 4.0),          # was 5: only two fit
    (RAY_CLUSTER_YAML, ["scaling.num_workers=2", "scaling.use_gpu=true"], 8.0),  # was 12
    ([{"CPU": 2.0}], ["scaling.num_workers=2"], 1.0),
    ([{"CPU": 2.0}], ["scaling.num_workers=3"], 1.0),                        # does not fit: preflight says so
    ([{"CPU": 8.0}], ["scaling.num_workers=2", "scaling.cpus_per_worker=3"], 3.0),  # the user's setting wins
])
def test_cpus_per_worker_fit_node_by_node(monkeypatch, nodes, overrides, expected):
    from trainers.job import cpus_per_worker

    _fake_ray(monkeypatch, nodes)
    assert cpus_per_worker(load_config(None, overrides)) == expected


@pytest.mark.parametrize("nodes, overrides, needles", [
    ([{"CPU": 1.0}, {"CPU": 1.0}], ["scaling.num_workers=2", "scaling.cpus_per_worker=2"],
     ["x 2 CPUs per worker", "has 2 on nodes of 1 CPUs, 1 CPUs", "hold 0 such workers"]),
    (RAY_CLUSTER_YAML, ["scaling.num_workers=2", "scaling.use_gpu=true", "scaling.cpus_per_worker=10"],
     ["x 10 CPUs and a GPU per worker", "8 CPUs + 1 GPU", "hold 0"]),
    (RAY_CLUSTER_YAML, ["scaling.num_workers=3", "scaling.use_gpu=true"], ["needs 3 GPUs", "has 2"]),
])
def test_preflight_refuses_workers_no_node_holds(monkeypatch, nodes, overrides, needles):
    from trainers import preflight, train

    _fake_ray(monkeypatch, nodes)
    monkeypatch.setattr(train, "init_ray", lambda cfg: None)
    with pytest.raises(ConfigError) as err:
        preflight.check_cluster(load_config(None, [*overrides]))
    assert all(n in str(err.value) for n in needles), str(err.value)


@pytest.mark.parametrize("nodes, overrides", [
    (RAY_CLUSTER_YAML, ["scaling.num_workers=2", "scaling.use_gpu=true"]),
    ([{"CPU": 8.0}, {"CPU": 8.0}], ["scaling.num_workers=3"]),
])
def test_preflight_passes_what_fits(monkeypatch, nodes, overrides):
    from trainers import preflight, train

    _fake_ray(monkeypatch, nodes)
    monkeypatch.setattr(train, "init_ray", lambda cfg: None)
    preflight.check_cluster(load_config(None, [*overrides]))
