"""Where a job's workers fit: CPUs per worker that Ray can place node by node.

Ray places each worker's bundle ({CPU: c} plus a GPU with scaling.use_gpu) on one node. Totals
over the cluster can fit while no node holds a single bundle: the cluster's CPUs divided by the
workers asked a one-worker job on two 8-CPU nodes for 16 CPUs, and a GPU worker on ray_cluster.yaml
(an 8-CPU head, 8-CPU + 1-GPU workers) for more CPUs than its GPU node has, and Ray waited forever.
Bundles are identical, so counting how many each node holds is exact.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

Node = dict[str, float]


def local_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, e.g. a batch scheduler's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def nodes() -> list[Node]:
    """Each alive node's resources on the Ray cluster this process is attached to; without Ray
    (a job training in its driver), this machine as one node."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive", True)]
    import torch

    return [{"CPU": float(local_cpus()), "GPU": float(torch.cuda.device_count())}]


def capacity(nodes: list[Node], cpus: float, gpu: bool) -> int:
    """How many bundles of `cpus` CPUs (and one GPU each with `gpu`) the nodes hold at once."""
    held = 0
    for node in nodes:
        fit = math.floor(node.get("CPU", 0.0) / cpus + 1e-9)  # 1e-9: 2 / (2/3) is 2.9999...
        held += min(fit, int(node.get("GPU", 0.0))) if gpu else fit
    return held


def largest_share(nodes: list[Node], slots: int, gpu: bool, fractional: bool = False) -> Optional[float]:
    """The most whole CPUs each of `slots` bundles can have with all of them placed at once (with
    `fractional`, hundredths of a CPU below one); None when not even one CPU (a hundredth) each fits."""
    top = int(max((n.get("CPU", 0.0) for n in nodes), default=0.0))
    steps = [float(c) for c in range(top, 0, -1)] + ([k / 100 for k in range(99, 0, -1)] if fractional else [])
    return next((c for c in steps if capacity(nodes, c, gpu) >= slots), None)


def describe(nodes: list[Node]) -> str:
    """`8 CPUs + 1 GPU, 8 CPUs`: the nodes, as an error message names them."""
    def one(n: Node) -> str:
        gpus = n.get("GPU", 0.0)
        return f"{n.get('CPU', 0.0):g} CPUs" + (f" + {gpus:g} GPU{'s' if gpus != 1 else ''}" if gpus else "")

    return ", ".join(one(n) for n in nodes) or "no nodes"
