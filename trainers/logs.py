"""Progress lines of the project's own loggers ("itmatch.*"), without turning on every library's
INFO logs: a root-level basicConfig(INFO) inside a Ray worker makes Ray Train print each report."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> None:
    logger = logging.getLogger("itmatch")
    if not any(getattr(h, "_itmatch", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._itmatch = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
