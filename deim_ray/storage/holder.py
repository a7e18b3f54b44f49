"""storage layer: which driver holds a run, and whether it is still alive (the manifest's `holder`).

A driver that claims a run records itself (host, pid, since) and renews `seen` every HEARTBEAT_SECONDS while it
runs (`driver/holding.py`); when it stops it removes the record. A second driver on the same run is refused
while the holder is alive: on the holder's own host, while its process exists and it was seen within
HOLD_SECONDS; from another host, while it was seen within HOLD_SECONDS (a killed driver elsewhere holds the run
that long at most). `--take-over` claims the run regardless, and fencing stops the old driver's writes.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from typing import Any

from deim_ray.storage.manifest import utc_now

HEARTBEAT_SECONDS = 20
"""How often a running driver renews `seen`."""
HOLD_SECONDS = 90
"""A holder not seen for this long is gone (several missed heartbeats: frozen, killed, cut off)."""


def this_driver() -> dict[str, Any]:
    """The holder record of this process, as a claim writes it."""
    now = utc_now()
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": now, "seen": now}


def _seconds_since(stamp: str) -> float:
    try:
        then = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return float("inf")
    if then.tzinfo is None:
        then = then.replace(tzinfo=dt.timezone.utc)
    return (dt.datetime.now(dt.timezone.utc) - then).total_seconds()


def _process_exists(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError, TypeError):
        return isinstance(pid, int)  # another user's process exists; a malformed pid does not
    return True


def other_live_holder(holder: dict[str, Any] | None) -> dict[str, Any] | None:
    """`holder` when it is another driver that is still alive (see the module docstring), else None."""
    if not isinstance(holder, dict):
        return None
    local = holder.get("host") == socket.gethostname()
    if local and holder.get("pid") == os.getpid():
        return None  # this process re-opening the run it holds
    if _seconds_since(holder.get("seen", "")) > HOLD_SECONDS:
        return None
    return holder if not local or _process_exists(holder.get("pid")) else None


def describe_holder(holder: dict[str, Any]) -> str:
    seen = _seconds_since(holder.get("seen", ""))
    return (f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}, "
            f"seen {seen:.0f} s ago")
