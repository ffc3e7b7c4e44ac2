"""Ray Jobs for this project: submit, follow, stop, list and read the logs of training runs and
Tune searches, and check what a submission would upload — from Python (`Jobs`, `submit`) or:

    python -m cluster.jobs submit train  [--address A] [--no-wait] [--no-check] [--job-id ID] [--exclude PAT]... -- <trainers.train args>
    python -m cluster.jobs submit search [--address A] [--no-wait] [--no-check] [--job-id ID] [--exclude PAT]... -- <tuning.search args>
    python -m cluster.jobs follow ID     # stream the logs until the job ends; exit 0 iff it SUCCEEDED
    python -m cluster.jobs stop ID       # stop it and wait until it is STOPPED
    python -m cluster.jobs logs ID       # the logs so far
    python -m cluster.jobs list          # every submitted job: id, status, start, entrypoint
    python -m cluster.jobs check [--working-dir D] [--exclude PAT]...   # what submit would upload

The address is --address, else RAY_ADDRESS, else http://127.0.0.1:8265 (the dashboard / job
server, e.g. through `ray dashboard ray_cluster.yaml`). A cluster with token auth wants the token in
RAY_AUTH_TOKEN: it is sent as a bearer token whenever it is set (Ray's own client sends it only when
RAY_AUTH_MODE=token as well); nothing here reads a token from a file or a config.

The working dir (default: this repo) is uploaded minus .gitignore'd / .rayignore'd paths, Ray's
default excludes and --exclude patterns; `submit` checks its size first and refuses, in one line
naming what is largest, what Ray would otherwise refuse with an opaque error. Before that, the
job's own command line checks its arguments here (`--print-config` in the working dir: preset,
keys, values, search space, scheduler), so a typo is refused in one line instead of failing on
the cluster minutes later; `--no-check` skips it. Relative paths in the job's arguments
(`--config configs/debug.yaml`) resolve in the job's copy of the working dir.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, TextIO
from urllib.parse import urlparse

from cluster import workdir

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ENTRYPOINTS = {"train": "trainers.train", "search": "tuning.search"}
PROBE_TIMEOUT_S = 5.0  # requests has no timeout: a dropped port would hang the CLI forever


class JobsError(Exception):
    """A one-line, user-facing failure; `exit_code` is the CLI's."""
    exit_code = 1


class BadArgs(JobsError):
    """The job's own command line refuses its arguments: said here, before anything is uploaded."""
    exit_code = 2


class BadWorkdir(JobsError):
    """Too large to upload, or unreadable: refused before anything reaches the cluster."""
    exit_code = 2  # bad input, as the project's other CLIs answer it


def entrypoint(kind: str, args: Sequence[str]) -> str:
    """The job's shell command: the project CLI, run by the `python` that `ray start` ran with."""
    import shlex

    return f"python -m {ENTRYPOINTS[kind]} " + " ".join(shlex.quote(a) for a in args)


def resolve_address(address: Optional[str] = None) -> str:
    return (address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS).rstrip("/")


def auth_headers() -> dict[str, str]:
    """RAY_AUTH_TOKEN from the environment as a bearer header; empty when unset (then Ray's own
    rules apply: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _positive_mib(text: str) -> float:
    """--limit-mib: a finite size above 0 (argparse turns the ValueError into a one-line usage error)."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(text)
    return value


def _seconds(text: str) -> float:
    """stop --timeout: finite seconds above 0, the rule of --limit-mib. NaN made the wait's deadline
    never pass (a hang once the job outlived the stop request); a negative one gave up before looking."""
    try:
        return _positive_mib(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: seconds, a finite number above 0") from None


def _address(text: str) -> str:
    """--address: not empty. `--address "$CLUSTER"` with the variable unset fell back to RAY_ADDRESS
    or the local default without a word: another cluster than the one meant."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty (leave --address out for $RAY_ADDRESS, else "
                                         f"{DEFAULT_ADDRESS})")
    return text


def _job_id(text: str) -> str:
    """A job id as it goes into the job server's URLs (/api/jobs/<id>): Ray takes an empty
    --job-id as none given and picks its own (the id the user meant to follow never exists), and
    an empty, spaced or '/'-holding id for follow/logs/stop asks for another endpoint."""
    if not text or any(c.isspace() or c in "/?#%" for c in text):
        raise argparse.ArgumentTypeError(f"invalid job id {text!r}: not empty, without spaces or '/?#%' "
                                         "(`python -m cluster.jobs list` shows the ids)")
    return text


def _probe(address: str) -> None:
    """Fail fast, in one line, when nothing listens at an http(s) address."""
    url = urlparse(address if "://" in address else f"http://{address}")
    if url.scheme not in ("http", "https"):
        _check_module_address(address, url.scheme)
        return  # a module address (e.g. anyscale://): Ray resolves it
    if not url.hostname:  # Ray's "Invalid address format" traceback
        raise BadArgs(f"address {address!r}: no host name in it (e.g. http://head-node:8265)")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
    except ValueError as exc:  # "Port out of range 0-65535", a port that is not a number
        raise BadArgs(f"address {address!r}: {exc}") from None
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise JobsError(f"cannot reach the Ray job server at {address} ({exc.strerror or exc}): is the "
                        "cluster up and its dashboard port reachable (`ray dashboard ray_cluster.yaml`)?") from None


def _check_module_address(address: str, scheme: str) -> None:
    """Ray reads `<module>://...` as a cluster provider's address (anyscale://): a scheme no module
    answers to (ftp://, a typo of http) was "Module: ftp does not exist", exit 1, as if the cluster failed."""
    import importlib

    try:  # Ray imports it next anyway
        module = importlib.import_module(scheme) if scheme.isidentifier() else None
    except Exception:  # noqa: BLE001 - any failure to import is "no such provider"
        module = None
    if not hasattr(module, "get_job_submission_client_cluster_info"):
        raise BadArgs(f"address {address!r}: not an http(s) address, and no installed Python module {scheme!r} "
                      "provides a Ray cluster there (e.g. http://head-node:8265)")


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


class Jobs:
    """The job server at one address. Connects on first use; every Ray error becomes a JobsError."""

    def __init__(self, address: Optional[str] = None) -> None:
        self.address = resolve_address(address)
        self._client: Optional[JobSubmissionClient] = None

    @property
    def client(self) -> JobSubmissionClient:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            _probe(self.address)
            with self._errors():
                self._client = JobSubmissionClient(self.address, headers=auth_headers())
        return self._client

    @contextmanager
    def _errors(self, job_id: Optional[str] = None) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            raise JobsError(f"the Ray job server at {self.address} refused the request ({_first_line(exc)}); "
                            "export RAY_AUTH_TOKEN with the cluster's token") from None
        except (ConnectionError, requests.RequestException, aiohttp.ClientError) as exc:
            raise JobsError(f"cannot reach the Ray job server at {self.address}: {_first_line(exc)}") from None
        except RuntimeError as exc:
            if job_id is not None and "status code 404" in str(exc):
                raise JobsError(f"no job {job_id!r} at {self.address} "
                                "(`python -m cluster.jobs list` shows the jobs there)") from None
            raise JobsError(f"Ray job server at {self.address}: {_first_line(exc)}") from None

    def submit(self, kind: str, args: Sequence[str], working_dir: Path = ROOT, excludes: Sequence[str] = (),
               job_id: Optional[str] = None, limit: Optional[int] = None, check: bool = True) -> str:
        """Check the upload and the arguments (`check`), then submit `python -m <trainers.train|tuning.search>
        args`; the job's id."""
        upload = check_upload(working_dir, excludes, limit)
        if check:
            check_args(kind, args, working_dir)
        runtime_env: dict = {"working_dir": str(upload.root)}
        if excludes:
            runtime_env["excludes"] = list(excludes)
        with self._errors():
            return self.client.submit_job(entrypoint=entrypoint(kind, args), runtime_env=runtime_env,
                                          submission_id=job_id)

    def status(self, job_id: str) -> JobStatus:
        with self._errors(job_id):
            return self.client.get_job_status(job_id)

    def wait(self, job_id: str, timeout: float = 60, poll: float = 0.5) -> JobStatus:
        """The job's status once terminal; JobsError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not (status := self.status(job_id)).is_terminal():
            if time.monotonic() > deadline:
                raise JobsError(f"job {job_id} is still {status.value} after {timeout:.0f} s")
            time.sleep(poll)
        return status

    def follow(self, job_id: str, out: TextIO = sys.stdout) -> JobStatus:
        """Stream the job's logs to `out` until it ends; its final status."""
        self.status(job_id)  # an unknown id fails here, in one line, not inside the websocket

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with self._errors(job_id):
            asyncio.run(tail())
        return self.wait(job_id, timeout=30)  # the log stream closes as the job ends; its status follows

    def stop(self, job_id: str, timeout: float = 60) -> JobStatus:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL) and wait until it has ended."""
        with self._errors(job_id):
            self.client.stop_job(job_id)
        return self.wait(job_id, timeout)

    def logs(self, job_id: str) -> str:
        with self._errors(job_id):
            return self.client.get_job_logs(job_id)

    def list_jobs(self) -> list[JobDetails]:
        """Submitted jobs, oldest first (not the bare drivers a job's own `ray.init` registers)."""
        from ray.job_submission import JobType

        with self._errors():
            jobs = [j for j in self.client.list_jobs() if j.type == JobType.SUBMISSION]
        return sorted(jobs, key=lambda j: j.start_time or 0)


def check_args(kind: str, args: Sequence[str], working_dir: Path = ROOT, timeout: float = 120) -> None:
    """The job's command line run here with `--print-config` in the working dir (where the job's
    relative paths resolve too): a preset, key, value, search space or scheduler it refuses is a
    BadArgs naming it, before the upload and the cluster's minutes to start a driver. Data paths are
    not read (they are the cluster's). When the check itself cannot run here (no torch in this
    environment, a timeout), a warning says so and the job is submitted unchecked."""
    import subprocess

    elsewhere = [p for p in _file_args(args) if Path(p).is_absolute() and not Path(p).exists()]
    if elsewhere:  # a preset or space on the cluster's disks: only the job can read it
        print(f"note: {elsewhere[0]} is not on this machine (the cluster's?): the {kind} arguments are checked "
              "by the job itself", file=sys.stderr)
        return
    command = [sys.executable, "-m", ENTRYPOINTS[kind], "--print-config", *args]
    try:
        done = subprocess.run(command, cwd=working_dir, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"warning: the {kind} arguments were not checked here ({_first_line(exc)})", file=sys.stderr)
        return
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == 2:  # the CLIs' exit code for bad input (and argparse's)
        at = max((i for i, line in enumerate(lines) if "error:" in line), default=max(len(lines) - 1, 0))
        said = "; ".join(line.split("error:", 1)[-1].strip() for line in lines[at:]) or "bad arguments"
        raise BadArgs(f"{ENTRYPOINTS[kind]} refuses these arguments (nothing submitted): {said}")
    if done.returncode != 0:
        print(f"warning: the {kind} arguments were not checked here (exit {done.returncode}: "
              f"{lines[-1] if lines else 'no output'})", file=sys.stderr)


def _file_args(args: Sequence[str]) -> list[str]:
    """The files a job's arguments name: --config and --space values (also as --flag=value), search.space=."""
    found = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if flag in ("--config", "--space"):
            found.append(value if eq else (args[i + 1] if i + 1 < len(args) else ""))
        elif flag == "search.space" and eq:
            found.append(value)
    return [f for f in found if f]


def check_upload(working_dir: Path = ROOT, excludes: Sequence[str] = (),
                 limit: Optional[int] = None) -> workdir.Upload:
    """What Ray would upload; BadWorkdir (one line, naming the largest path) when over the limit."""
    upload = _measure(working_dir, excludes, limit)
    if not upload.ok:
        raise BadWorkdir(upload.message())
    return upload


def _measure(working_dir: Path, excludes: Sequence[str], limit: Optional[int]) -> workdir.Upload:
    try:
        return workdir.check(working_dir, excludes, limit)
    except OSError as exc:
        raise BadWorkdir(f"cannot read the working dir {working_dir}: {exc}") from None


def submit(kind: str, args: Sequence[str], address: Optional[str] = None, **kwargs) -> str:
    """`Jobs(address).submit(...)`: the Python entry point for one submission."""
    return Jobs(address).submit(kind, args, **kwargs)


def format_jobs(jobs: Sequence[JobDetails]) -> str:
    rows = [("JOB ID", "STATUS", "STARTED", "ENTRYPOINT")]
    for j in jobs:
        started = datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if j.start_time else "-"
        command = j.entrypoint if len(j.entrypoint) <= 100 else j.entrypoint[:97] + "..."
        rows.append((j.submission_id or j.job_id or "-", j.status.value, started, command))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[3]]) for r in rows)


# --- CLI: each command is a few lines over Jobs -----------------------------------------------

def _cmd_submit(args: argparse.Namespace, job_args: list[str]) -> int:
    jobs = Jobs(args.address)
    job_id = jobs.submit(args.kind, job_args, args.working_dir, args.exclude, args.job_id, check=not args.no_check)
    print(f"submitted {job_id}: {entrypoint(args.kind, job_args)}", flush=True)
    if args.no_wait:
        print(f"follow it: python -m cluster.jobs follow {job_id} --address {jobs.address}")
        return 0
    return _report(job_id, jobs.follow(job_id))


def _cmd_follow(args: argparse.Namespace, _: list[str]) -> int:
    return _report(args.job_id, Jobs(args.address).follow(args.job_id))


def _cmd_stop(args: argparse.Namespace, _: list[str]) -> int:
    status = Jobs(args.address).stop(args.job_id, timeout=args.timeout)
    print(f"job {args.job_id}: {status.value}")
    return 0  # it no longer runs: stopped now, or had already ended (the status says which)


def _cmd_logs(args: argparse.Namespace, _: list[str]) -> int:
    print(Jobs(args.address).logs(args.job_id), end="")
    return 0


def _cmd_list(args: argparse.Namespace, _: list[str]) -> int:
    print(format_jobs(Jobs(args.address).list_jobs()))
    return 0


def _cmd_check(args: argparse.Namespace, _: list[str]) -> int:
    limit = None if args.limit_mib is None else int(args.limit_mib * workdir.MIB)
    upload = _measure(args.working_dir, args.exclude, limit)
    print(upload.message(), file=sys.stdout if upload.ok else sys.stderr)
    return 0 if upload.ok else BadWorkdir.exit_code


def _report(job_id: str, status: JobStatus) -> int:
    print(f"job {job_id}: {status.value}")
    return 0 if status.value == "SUCCEEDED" else 1


COMMANDS = {"submit": _cmd_submit, "follow": _cmd_follow, "stop": _cmd_stop, "logs": _cmd_logs,
            "list": _cmd_list, "check": _cmd_check}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cluster.jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--address", type=_address, help=f"job server (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    upload = argparse.ArgumentParser(add_help=False)
    upload.add_argument("--working-dir", type=Path, default=ROOT, help="uploaded to the job (default: this repo)")
    upload.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="runtime_env excludes (gitignore syntax, relative to the working dir); repeatable")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", parents=[server, upload], help="submit a training run or a Tune search")
    s.add_argument("kind", choices=sorted(ENTRYPOINTS), help="train: trainers.train; search: tuning.search")
    s.add_argument("--job-id", type=_job_id, help="submission id (default: Ray picks one)")
    s.add_argument("--no-wait", action="store_true", help="return after submitting instead of following")
    s.add_argument("--no-check", action="store_true",
                   help="submit without first checking the job's arguments here (--print-config)")
    for name, text in (("follow", "stream logs until the job ends"), ("logs", "print the logs so far"),
                       ("stop", "stop a job and wait until it has ended")):
        sub.add_parser(name, parents=[server], help=text).add_argument("job_id", type=_job_id)
    sub.choices["stop"].add_argument("--timeout", type=_seconds, default=60, help="seconds to wait (default 60)")
    sub.add_parser("list", parents=[server], help="submitted jobs")
    c = sub.add_parser("check", parents=[upload], help="what submit would upload, against Ray's limit")
    c.add_argument("--limit-mib", type=_positive_mib, help="another limit (default: this Ray version's)")
    return parser


def split_job_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Our options before the first `--`, the job's arguments after it (passed through verbatim)."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut], argv[cut + 1:]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ours, job_args = split_job_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(ours)
    if job_args and args.command != "submit":
        print(f"error: {args.command} takes no job arguments after --", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command](args, job_args)
    except JobsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # only following stops; the job itself keeps running
        print("\ninterrupted: the job keeps running (`python -m cluster.jobs stop ID` stops it)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
