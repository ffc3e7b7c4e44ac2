"""tests/conftest.py runs the integration files that start no Ray beside the Ray tests: hold that
each of them really starts none (no `ray` mark, no private head node or cluster, no Ray job), and
that every other integration file is kept with the Ray tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("suite_conftest", TESTS / "conftest.py")  # not tests/unit's
conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conftest)


def test_files_beside_the_ray_tests_start_no_ray():
    for name in conftest.WITHOUT_RAY:
        text = (TESTS / "integration" / name).read_text()
        for needle in ("mark.ray", "ray_head", "local_cluster", 'run_module("tuning.', "import ray", "ray.init"):
            assert needle not in text, (name, needle)


def test_only_the_listed_integration_files_leave_the_ray_worker():
    for path in (TESTS / "integration").glob("test_*.py"):
        nodeid = f"{conftest.INTEGRATION_IDS}{path.name}::test_x"
        assert conftest.runs_with_ray(nodeid) == (path.name not in conftest.WITHOUT_RAY), path.name
    assert not conftest.runs_with_ray("tests/unit/test_config.py::test_x")


def test_both_ray_lanes_hold_real_ray_files():
    names = {path.name for path in (TESTS / "integration").glob("test_*.py")}
    assert set(conftest.LANE_A) <= names  # a renamed file would leave lane A silently
    lanes = {conftest.ray_lane(f"{conftest.INTEGRATION_IDS}{name}::test_x") for name in names}
    assert lanes == {"ray-lane-a", "ray-lane-b", None}
    assert all(conftest.runs_with_ray(f"{conftest.INTEGRATION_IDS}{name}::test_x") for name in conftest.LANE_A)
    assert conftest.ray_lane("tests/unit/test_config.py::test_x") is None
