"""driver layer: a driver's hold on its run while it trains (the manifest's `holder`, see storage/holder.py).

`holding(store)` renews the holder's `seen` every HEARTBEAT_SECONDS from a daemon thread, so a second driver on
the same run can tell this one is alive, and removes the holder record when the block ends (done, failed or
interrupted), so the next `train` of the run starts at once. A driver that was taken over (`--take-over`
elsewhere) stops renewing at its next beat: the fenced write is refused.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from deim_ray.driver.interrupts import on_stop
from deim_ray.storage import RunStore, StorageError
from deim_ray.storage.holder import HEARTBEAT_SECONDS
from deim_ray.storage.manifest import utc_now

log = logging.getLogger("deim_ray.driver")


def _beat(store: RunStore, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_SECONDS):
        try:
            store.update_manifest(lambda m: m.holder and m.holder.__setitem__("seen", utc_now()))
        except StorageError as e:  # taken over (StaleWriter) or storage gone: the stage itself reports it
            log.debug("run %s: holder heartbeat stopped: %s", store.name, e)
            return


@contextmanager
def holding(store: RunStore) -> Iterator[None]:
    """Keep this driver's claim on `store`'s run fresh for the duration of the block; release it at the end."""
    stop = threading.Event()
    beat = threading.Thread(target=_beat, args=(store, stop), name="deim_ray-holder", daemon=True)
    beat.start()
    try:
        with on_stop(lambda: _release(store)):  # an interrupted driver lets go too
            yield
    finally:
        stop.set()
        _release(store)


def _release(store: RunStore) -> None:
    try:
        store.update_manifest(lambda m: setattr(m, "holder", None))
    except StorageError:
        pass  # taken over: the holder recorded is the newer driver's
