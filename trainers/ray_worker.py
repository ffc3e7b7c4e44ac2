"""What every Ray worker process of this project's jobs runs first (the runtime_env's
`worker_process_setup_hook`, installed by trainers.train.init_ray).

Ray's own code inside a worker sometimes looks its cluster up on the machine rather than using the
connection the worker has: Ray Train's PlacementGroupCleaner asks the state API whether its
controller still lives, and the state API reads RAY_ADDRESS, else the cluster that `ray start` last
recorded in /tmp/ray, else the GCS processes it finds on the machine. With two clusters on one
machine (two private runs side by side; measured with the suite's two Ray lanes) the lookup raised
"Found multiple active Ray instances", the cleaner's monitor thread died, and the placement group of a
trial Tune had stopped was never removed: its CPUs stayed held and the search's seed re-runs waited
for them forever. Beside a `ray start` cluster the lookup would ask that other cluster. RAY_ADDRESS
pinned to the worker's own cluster makes every such lookup find it.
Kept free of heavy imports: every worker process of a job imports it.
"""

from __future__ import annotations

import os

HOOK = f"{__name__}.pin_cluster_address"


def pin_cluster_address() -> None:
    """RAY_ADDRESS := the GCS address of the cluster this worker belongs to."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
