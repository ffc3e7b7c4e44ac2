"""How `make test` shares the machine between its two pytest-xdist workers (`-n 2 --dist loadscope`).

The integration tests that start Ray run one after another on one worker, first, as without xdist:
each starts its own Ray cluster or Ray job and sizes it to the whole machine. Two of them at once on
2 cores (tried once) failed a DeepSpeed crash-and-resume run and a PBT search; the DeepSpeed test
passed when re-run beside another Ray test, so the failures depend on load, cause not established.
They still leave about half of the CPU idle while clusters start and poll (53 % busy, measured),
which the other worker fills with the unit and multi-process tests and the integration tests that
start no Ray, a file at a time (its module fixtures run once)."""

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


def runs_with_ray(nodeid: str) -> bool:
    """An integration test that may start Ray: these run one after another on one worker."""
    return nodeid.startswith(INTEGRATION_IDS) and nodeid[len(INTEGRATION_IDS):].split("::")[0] not in WITHOUT_RAY


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # stable: the longest unit of work is handed out first
    items.sort(key=lambda item: not runs_with_ray(item.nodeid))


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadscope with every integration test in one unit of work (else a file is one).
    xdist's own --dist loadgroup cannot be used: it renames items through `Item._nodeid`, which
    pytest 9 no longer reads, so its groups are ignored."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "integration" if runs_with_ray(nodeid) else super()._split_scope(nodeid)

    return IntegrationTogether(config, log)


@pytest.fixture(autouse=True)
def _no_inherited_mlflow_store():
    """mlflow.set_tracking_uri sets MLFLOW_TRACKING_URI in this process, and the commands a test starts
    take their default store from it (itmatch.config.ENV_TRACKING_URI): one test's store must not
    become the next one's default. Removed before and after every test."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
