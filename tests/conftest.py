"""How `make test` shares the machine between its three pytest-xdist workers (`-n 3 --dist loadscope`).

The integration tests that start Ray run in two lanes, each on a worker of its own, one test after
another within a lane: each starts its own Ray cluster or Ray job (a private one: `ray.init(address=
"local")`, or heads on free ports, tests/integration/ray_head.py). One lane alone left the CPU idle
two thirds of the time (clusters start, poll, wait for actors: 23 CPU-minutes in a 35-minute suite),
so the two lanes are balanced by their measured times and run side by side, both handed out first.
The third worker takes the unit and multi-process tests and the integration tests that start no
Ray, a file at a time (its module fixtures run once); the lane workers take such files too once
their lane is done. With `-n 2` the lanes still go first, one on each worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The integration tests' node ids start with this (relative to the repo root, pytest's rootdir): the
# scheduler below sees only node ids, so the sort uses them too.
INTEGRATION_IDS = f"{(Path(__file__).parent / 'integration').relative_to(Path(__file__).parents[1]).as_posix()}/"
# Integration files that start no Ray, cluster or Ray job (CLIs and models in one process, an MLflow
# model server): they run beside the Ray tests, file by file, as the unit tests do
# (tests/unit/test_suite_split.py holds that they carry no `ray` mark and start no cluster).
WITHOUT_RAY = ("test_bad_input_cli.py", "test_ensemble_cli.py", "test_method_registry.py", "test_real_data_job.py",
               "test_serving.py")


# The Ray integration files of the first lane (the rest make the second), balanced by the times of a
# run in lanes (--durations, f109599: each test runs ~1.3-3x slower there than alone, the ablation
# and the multi-node tests most): ~1450 s each.
LANE_A = ("test_end_to_end_ray.py", "test_train_ray.py", "test_phrases_ray.py", "test_ablation_ray.py",
          "test_featurize_ray.py", "test_sigterm.py", "test_one_worker_job.py")


def runs_with_ray(nodeid: str) -> bool:
    """An integration test that may start Ray: these run one after another within their lane."""
    return nodeid.startswith(INTEGRATION_IDS) and _file(nodeid) not in WITHOUT_RAY


def ray_lane(nodeid: str) -> str | None:
    """The Ray lane of a test (a unit of work of its own), None for a test that starts no Ray."""
    if not runs_with_ray(nodeid):
        return None
    return "ray-lane-a" if _file(nodeid) in LANE_A else "ray-lane-b"


def _file(nodeid: str) -> str:
    return nodeid[len(INTEGRATION_IDS):].split("::")[0]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # stable: the longest unit of work is handed out first
    items.sort(key=lambda item: not runs_with_ray(item.nodeid))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadscope with each Ray lane one unit of work (else a file is one), handed out in the
    order above: xdist would otherwise reorder the units by their number of tests, and the Ray lanes,
    the longest by far, started after the larger unit files. xdist's own --dist loadgroup cannot be
    used: it renames items through `Item._nodeid`, which pytest 9 no longer reads."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class RayLanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return ray_lane(nodeid) or super()._split_scope(nodeid)

    return RayLanes(config, log)


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_store():
    """mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI in this process, and the commands a test starts
    take their default store from it (itmatch.config.ENV_TRACKING_URI): one test's store must not
    become the next one's default. Removed before and after every test."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
