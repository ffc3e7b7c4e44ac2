"""`itm train|eval|submit ...`: a thin wrapper over the modules users can also run directly."""

from __future__ import annotations

import sys
from typing import Optional

COMMANDS = {
    "train": "trainers.train",
    "eval": "trainers.evaluate",
    "submit": "cluster.submit",
    "jobs": "cluster.jobs",
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: itm {{{'|'.join(COMMANDS)}}} [args...]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
