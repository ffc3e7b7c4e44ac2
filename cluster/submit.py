"""Submit the training CLI to a Ray cluster as a job: the same dotted keys as `trainers.train`.

    python -m cluster.submit --address http://HEAD:8265 -- --config configs/flickr8k_precomp.yaml scaling.num_workers=4

equals `ray job submit --address ... --working-dir . -- python -m trainers.train ...`. The working
directory is uploaded (minus .gitignore'd paths); the job's driver attaches to the cluster through
RAY_ADDRESS, which Ray Jobs sets. For a cluster started with RAY_AUTH_MODE=token, export the token
(RAY_AUTH_TOKEN) on the submitting side.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def entrypoint(train_args: list[str]) -> str:
    return "python -m trainers.train " + " ".join(shlex.quote(a) for a in train_args)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cluster.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard / job server address")
    parser.add_argument("--no-wait", action="store_true", help="return after submission instead of tailing logs")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for trainers.train (after --)")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(entrypoint=entrypoint(train_args), runtime_env={"working_dir": str(ROOT)})
    print(f"submitted {job_id}: {entrypoint(train_args)}")
    if args.no_wait:
        return 0
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="")

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
