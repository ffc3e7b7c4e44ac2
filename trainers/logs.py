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


def quiet_ray_reports(level: str) -> None:
    """Apply run.ray_log_level to the logger that prints every `ray.train.report` in a worker.

    Ray 2.60 names that logger by its file path, so RunConfig's LoggingConfig filter (which
    matches names starting with "ray.train") misses it; set its level directly.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray version: nothing to adjust
        return
    logging.getLogger(context.__file__).setLevel(getattr(logging, level))
