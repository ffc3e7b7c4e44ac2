"""A run's Ray workers find their own cluster while another Ray cluster runs on the same machine.

Ray Train's PlacementGroupCleaner asks the State API, from inside a worker, whether its controller
still lives; the State API looks the cluster up on the machine. Beside a second cluster that lookup
failed ("Found multiple active Ray instances"), the cleaner's thread died, and a placement group Tune's
stopped trial left behind held its CPUs until the search's seed re-runs hung (seen with the suite's
two Ray lanes). trainers.train.init_ray pins every worker to its own cluster (trainers.ray_worker).
The same question asked from a cluster started without that hook fails: the reference that shows
the situation is real."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from ray_cli import ROOT
from ray_head import ray_head

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

# What the cleaner does: ask the State API, inside a worker, for the state of a live actor.
ASK = """
@ray.remote(num_cpus=0)
class Probe:
    def state_of(self, actor_id):
        from ray.util.state import get_actor
        try:
            return get_actor(actor_id, timeout=30).state
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

probe = Probe.remote()
print("STATE:", ray.get(probe.state_of.remote(probe._actor_id.hex())), flush=True)
ray.shutdown()
"""
OURS = """
import ray
from itmatch.config import load_config
from trainers.train import init_ray
init_ray(load_config(None, ["scaling.num_workers=2"]), worker_groups=True)
""" + ASK
PLAIN = """
import ray
ray.init(address="local", include_dashboard=True)
""" + ASK


def _ask(script: str, cwd) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=240)
    said = [line for line in done.stdout.splitlines() if line.startswith("STATE:")]
    assert done.returncode == 0 and said, done.stdout[-2000:] + done.stderr[-3000:]
    return said[0]


def test_a_private_clusters_workers_ask_their_own_cluster_beside_another(tmp_path):
    with ray_head(num_cpus=1):  # another cluster on this machine, as a second run's would be
        assert _ask(OURS, tmp_path) == "STATE: ALIVE"
        assert "multiple active Ray instances" in _ask(PLAIN, tmp_path)
