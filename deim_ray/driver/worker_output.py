"""driver layer: what the Ray workers print reaches the console without tracebacks, and a log file in full.

Ray forwards every worker's and actor's stdout/stderr to the driver's console. When a stage fails, that is two
worker tracebacks and a TrainController traceback around the one line deim_ray prints for the cause (`run.py`).
`capture_worker_output` replaces Ray's console printer in this process with one that writes every forwarded line
to a log file (`log_file()`, named by the failure line) and passes the rest on with traceback blocks and Ray's
failure summaries left out. With `-v` the console gets everything, as Ray prints it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
import threading
from pathlib import Path

_HANDLER = "ray_print_logs"
_lock = threading.Lock()
_path: Path | None = None

_SUMMARY = re.compile(r"Training failed|worker group|TrainController|Worker \d+ failed|ray\.exceptions\.|"
                      r"RayTaskError|Failed to query Ray Train Controller|Failed to send resource request")
"""Ray's own lines around a failure (its traceback blocks are dropped as a whole)."""


_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")


def log_file() -> Path | None:
    """The file the workers' full output of this process went to, once anything was written."""
    return _path if _path is not None and _path.exists() else None


def _log_dir() -> Path:
    return Path(os.environ.get("DEIM_RAY_LOG_DIR") or Path(tempfile.gettempdir()) / "deim_ray" / "logs")


def _write(data: dict) -> None:
    global _path
    with _lock:
        if _path is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            _path = _log_dir() / f"workers-{stamp}-{os.getpid()}.log"
            _path.parent.mkdir(parents=True, exist_ok=True)
        who = data.get("actor_name") or data.get("task_name") or "worker"
        with open(_path, "a", encoding="utf-8", errors="replace") as f:
            for line in data.get("lines", []):
                f.write(f"({who} pid={data.get('pid')}) {line}\n")


def without_tracebacks(lines: list[str]) -> list[str]:
    """`lines` less every Python traceback block (from "Traceback (most recent call last):" through its
    exception line) and Ray's failure summary lines."""
    kept, inside = [], False
    for line in lines:
        if "Traceback (most recent call last)" in line:
            inside = True
            continue
        if inside:
            # a traceback's frames are indented; its last line (the exception) is not
            inside = line[:1].isspace() or not line.strip()
            continue
        if line.startswith(_CHAINED):
            continue
        if line.strip() and not _SUMMARY.search(line):
            kept.append(line)
    return kept


def capture_worker_output(verbose: bool) -> None:
    """Route Ray's forwarded worker output in this process through the log file (see the module docstring)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    original = next((handler for name, handler in dispatcher.handlers if name == _HANDLER), None)
    if original is None or getattr(original, "_deim_ray", False):
        return

    def handle(data: dict) -> None:
        _write(data)
        lines = data.get("lines", []) if verbose else without_tracebacks(data.get("lines", []))
        if lines:
            original({**data, "lines": lines})

    handle._deim_ray = True
    dispatcher.remove_handler(_HANDLER)
    dispatcher.add_handler(_HANDLER, handle)
