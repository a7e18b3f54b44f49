"""Logging set-up shared by the command line and the Ray workers: deim_ray's own lines at INFO, others quiet.

Ray's and transformers' loggers stay at their defaults (warnings), so progress lines are not drowned in
framework chatter; `DEIM_RAY_LOG_LEVEL=DEBUG` turns deim_ray's own logging up. Every line passes through
`redact.RedactingFilter`, so no credential reaches a console or a log file.
"""

from __future__ import annotations

import logging
import os

from deim_ray.redact import RedactingFilter


def setup_logging(quiet: bool = False) -> None:
    logger = logging.getLogger("deim_ray")
    level = os.environ.get("DEIM_RAY_LOG_LEVEL", "WARNING" if quiet else "INFO").upper()
    logger.setLevel(level)
    if not any(getattr(h, "_deim_ray", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RedactingFilter())
        handler._deim_ray = True
        logger.addHandler(handler)
    logger.propagate = False
