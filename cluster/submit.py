"""Submit the training CLI to a Ray cluster as a job: the same dotted keys as `trainers.train`.

    python -m cluster.submit --address http://HEAD:8265 -- --config configs/flickr8k_precomp.yaml scaling.num_workers=4

equals `ray job submit --address ... --working-dir . -- python -m trainers.train ...`, and
`python -m cluster.jobs submit train ...` (which also submits Tune searches, and follows, stops,
lists and reads the logs of jobs). The working directory is uploaded (minus .gitignore'd paths),
after a size check that names what is largest when Ray would refuse it; the job's driver attaches
to the cluster through RAY_ADDRESS, which Ray Jobs sets. The address defaults to RAY_ADDRESS, else
http://127.0.0.1:8265. For a cluster with token auth, export the token as RAY_AUTH_TOKEN.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from cluster import jobs

ROOT = jobs.ROOT


def entrypoint(train_args: list[str]) -> str:
    return jobs.entrypoint("train", train_args)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None,
                        help=f"Ray dashboard / job server address (default: $RAY_ADDRESS, else {jobs.DEFAULT_ADDRESS})")
    parser.add_argument("--no-wait", action="store_true", help="return after submission instead of tailing logs")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for trainers.train (after --)")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        client = jobs.Jobs(args.address)
        job_id = client.submit("train", train_args)
        print(f"submitted {job_id}: {entrypoint(train_args)}", flush=True)
        if args.no_wait:
            return 0
        status = client.follow(job_id)
    except jobs.JobsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"job {job_id}: {status}")
    return 0 if status.value == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
