"""Logging set-up shared by the command line and the Ray workers: deim_ray's own lines at INFO, others quiet.

By default the driver prints deim_ray's lines and every warning; library chatter (boto's credential notices,
Ray Train's per-report and per-checkpoint lines) stays in Ray's log files. Workers log warnings only: the
driver prints their epochs (driver/console.py). `-v` (`verbose`) brings all of it back on the console;
`DEIM_RAY_LOG_LEVEL=DEBUG` turns deim_ray's own logging up. Every line passes through
`redact.RedactingFilter`, so no credential reaches a console or a log file.
"""

from __future__ import annotations

import logging
import os
import sys

from deim_ray.redact import RedactingFilter

_CHATTY = ("botocore", "boto3", "urllib3", "s3transfer", "filelock", "matplotlib", "PIL")
"""Libraries whose INFO lines (e.g. "Found credentials in environment variables") are not for the console."""

_verbose = False


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    global _verbose
    _verbose = verbose
    logger = logging.getLogger("deim_ray")
    level = os.environ.get("DEIM_RAY_LOG_LEVEL", "WARNING" if quiet else "INFO").upper()
    logger.setLevel(level)
    if not any(getattr(h, "_deim_ray", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(RedactingFilter())
        handler._deim_ray = True
        logger.addHandler(handler)
    logger.propagate = False
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if not verbose:  # in a Ray worker, Ray Train sends the root logger's INFO (its own per-report lines) to the console
        logging.getLogger().setLevel(logging.WARNING)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at each line (a test's capture, a redirected stream), not to the one
    it found when the logging was set up."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def is_verbose() -> bool:
    """Whether `-v` asked for Ray's and the workers' own lines too."""
    return _verbose
