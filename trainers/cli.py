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
    usage = f"usage: itm {{{'|'.join(COMMANDS)}}} [args...]"
    if argv[:1] in (["-h"], ["--help"]):  # asked for: not an error
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:  # a bare usage line did not say what was wrong
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1) if argv else []
        said = f"unknown command {argv[0]!r}" + (f" (did you mean {close[0]!r}?)" if close else "") if argv else \
            "no command given"
        print(f"error: {said}; {usage}", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
