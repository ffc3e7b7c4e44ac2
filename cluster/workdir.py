"""What a Ray job would upload from its working directory, checked before Ray sees it.

Ray zips the working directory on the submitting machine and PUTs it to the job server. Over the
limit it answers with an opaque error (`413: Maximum request body size 104857600 exceeded` from the
dashboard, or a GCS "Package size ... exceeds" one) and names nothing. This module walks the tree
with Ray's own traversal — `.gitignore` (unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1), `.rayignore`
at every level, Ray's default excludes (`.git`, `.venv`, ...; RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES)
and the runtime_env `excludes` — so what it counts is exactly what Ray packs, and says in one line
what is largest and what to exclude.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

MIB = 1024 ** 2
# Ray writes the package with ZipFile's default ZIP_STORED (no compression): each entry costs its
# bytes plus a local header (30 + name) and a central-directory record (46 + name); 22 for the end.
_ZIP_ENTRY, _ZIP_END = 30 + 46, 22
_QUIET = logging.getLogger("cluster.workdir.ray")  # Ray's traversal logs every ignore file at INFO
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


def upload_limit() -> int:
    """Bytes a job's working-dir package may have, as this Ray version enforces it.

    Job submission sends the zip as one HTTP body to the dashboard, whose aiohttp app refuses
    bodies over DASHBOARD_CLIENT_MAX_SIZE (100 MiB in Ray 2.60, measured: 413); the dashboard then
    stores it in the GCS, capped at GCS_STORAGE_MAX_SIZE (the gRPC message size, 512 MiB unless
    RAY_max_grpc_message_size is set). The smaller one is the real limit."""
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return min(DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE)


def uploaded_entries(working_dir: Path, excludes: Sequence[str] = ()) -> dict[str, int]:
    """Relative path -> bytes of every entry Ray would zip (files, and empty folders as `name/`)."""
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    root = Path(working_dir).absolute()
    if not root.is_dir():
        raise NotADirectoryError(f"working dir {root} is not a directory")
    # The same inputs as ray.dashboard's job client: its env switch, its defaults + the user's excludes.
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    patterns = ray_constants.get_runtime_env_default_excludes() + list(excludes)
    entries: dict[str, int] = {}

    def record(path: Path) -> None:  # mirrors packaging._zip_files' handler: files and empty folders
        if path.is_file():
            entries[path.relative_to(root).as_posix()] = path.stat().st_size
        elif path.is_dir() and path != root and next(path.iterdir(), None) is None:
            entries[path.relative_to(root).as_posix() + "/"] = 0

    # Ray's private traversal, reused so .gitignore/.rayignore nesting and pattern semantics match
    # whatever this Ray version does (pinned in pyproject; tests/unit/test_cluster_jobs.py checks the
    # estimate against a real package built by Ray).
    packaging._dir_travel(root, [packaging._get_excludes(root, patterns)], record,
                          include_gitignore=include_gitignore, logger=_QUIET)
    return entries


def _tree(entries: dict[str, int]) -> dict[str, int]:
    """Bytes under every file and folder (folders end in '/')."""
    sizes: dict[str, int] = defaultdict(int)
    for rel, n in entries.items():
        parts = rel.rstrip("/").split("/")
        for i in range(1, len(parts)):
            sizes["/".join(parts[:i]) + "/"] += n
        sizes[rel] += n
    return sizes


@dataclass
class Upload:
    root: Path
    entries: dict[str, int]
    limit: int

    @property
    def size(self) -> int:
        """The package's bytes as Ray builds it (stored zip: contents + per-entry headers)."""
        names = sum(len(rel.encode()) for rel in self.entries)
        return sum(self.entries.values()) + _ZIP_ENTRY * len(self.entries) + 2 * names + _ZIP_END

    @property
    def ok(self) -> bool:
        return self.size < self.limit  # Ray refuses at >= for the GCS, > for HTTP: be strict

    def largest(self) -> tuple[str, int]:
        """The biggest top-level entry (what a user sees first in the folder)."""
        top = {rel: n for rel, n in _tree(self.entries).items() if "/" not in rel.rstrip("/")}
        return max(top.items(), key=lambda kv: kv[1], default=("(nothing)", 0))

    def to_exclude(self) -> tuple[str, int, bool]:
        """The most specific path whose exclusion alone brings the package under the limit (a single
        big file is named, not the folder it sits in), else the biggest path; and whether it suffices."""
        excess = self.size - self.limit + 1
        sizes = _tree(self.entries)
        enough = [kv for kv in sizes.items() if kv[1] >= excess]
        if not enough:
            return (*max(sizes.items(), key=lambda kv: kv[1]), False)
        return (*max(enough, key=lambda kv: (kv[0].rstrip("/").count("/"), kv[1])), True)

    def message(self) -> str:
        """One line: the total, the limit, what is largest and (when over) what to exclude."""
        name, n = self.largest()
        head = (f"working dir {self.root}: {_mib(self.size)} to upload in {len(self.entries)} files, "
                f"{'under' if self.ok else 'over'} Ray's {_mib(self.limit)} job upload limit; largest: {name} ({_mib(n)})")
        if self.ok:
            return head
        path, m, enough = self.to_exclude()
        if enough:
            return f"{head}; excluding {path} ({_mib(m)}) is enough: --exclude {path}, or list it in .rayignore"
        return (f"{head}; no single path is enough: exclude {path} ({_mib(m)}) and more "
                "(--exclude PATTERN, or .rayignore)")


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"


def check(working_dir: Path, excludes: Sequence[str] = (), limit: Optional[int] = None) -> Upload:
    """What Ray would upload from `working_dir` with these runtime_env excludes, against `limit`
    (default: this Ray version's, see upload_limit)."""
    return Upload(Path(working_dir).absolute(), uploaded_entries(working_dir, excludes),
                  upload_limit() if limit is None else limit)
