"""driver layer: Ctrl-C (SIGINT) and SIGTERM at any moment of a command — one line, the run left consistent.

Inside `stop_on_signals(where)` a SIGINT or SIGTERM does not raise in the main thread (an exception raised in
the middle of Ray's C code surfaces as SystemError tracebacks, or not at all): the interpreter writes the signal
to a wakeup pipe, and a watcher thread ends the command from there, whatever the main thread is doing:

1. it silences the console (Ray's and Python's complaints while everything stops), runs the callbacks
   registered with `on_stop` (the driver's hold on its run is released, so the re-run starts at once);
2. it prints one line — `deim-ray: interrupted at epoch E of stage S; re-run the same command to resume` —
   and exits with 128 + the signal (130, 143) at once, skipping the interpreter's shutdown hooks. The Ray
   Train runs and their workers end with the driver: actors belong to the job of the driver that created them,
   and a local instance's processes share the driver's fate. (`ray.shutdown` from here would race the main
   thread's `ray.get` and end the process with status 1.)

Nothing needs undoing: every file the run stores is written whole and the manifest records only complete
epochs, so it is consistent at any moment and the re-run resumes from its `last`. A second signal skips the
waiting of step 1. The main thread never ends the process itself once a signal came (a library's handler
may raise KeyboardInterrupt or SystemExit in it): it waits for the watcher. `ray.init` installs its own SIGTERM handler, so `ensure_ray` calls `keep_handlers` after it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_TIMEOUT = 10.0
"""Seconds each stop step (reading the position, each callback) may take before the process exits anyway."""


class Terminated(KeyboardInterrupt):
    """SIGTERM in a command that is not a training one: it unwinds like Ctrl-C, so half-written outputs are
    removed on the way out (`deim_ray.outputs`)."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """For commands that write outputs (predict, export, fetch, ...): SIGTERM raises `Terminated` in the main
    thread, as SIGINT raises KeyboardInterrupt, instead of ending the process where it stands."""
    def terminate(signum, frame):
        raise Terminated()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Stop:
    """The watcher's state for one `stop_on_signals` block."""

    def __init__(self, where: Callable[[], str]):
        self.where = where
        self.signals: list[int] = []
        self.callbacks: list[Callable[[], None]] = []
        self.ending = threading.Lock()


_active: _Stop | None = None


def _ignore(signum, frame) -> None:
    """The Python-level handler: nothing (the watcher acts); it only replaces the default (exit / KeyboardInterrupt)."""


def keep_handlers() -> None:
    """Re-install the handlers after a library (ray.init) replaced them; nothing outside `stop_on_signals`."""
    if _active is not None and threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _ignore)


@contextmanager
def on_stop(callback: Callable[[], None]) -> Iterator[None]:
    """Run `callback` if the command is interrupted inside this block (before Ray is stopped)."""
    stop = _active
    if stop is not None:
        stop.callbacks.append(callback)
    try:
        yield
    finally:
        if stop is not None and callback in stop.callbacks:
            stop.callbacks.remove(callback)


@contextmanager
def stop_on_signals(where: Callable[[], str]) -> Iterator[None]:
    """End the command on SIGINT/SIGTERM as the module docstring says; `where()` names the position."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stop = _Stop(where)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {signum: signal.signal(signum, _ignore) for signum in SIGNALS}
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    _active = stop
    threading.Thread(target=_watch, args=(stop, read_fd), name="deim_ray-signals", daemon=True).start()
    try:
        yield
    except KeyboardInterrupt:  # a library's own SIGINT handler (Ray Train's `fit`) turned the signal into this
        stop.signals = stop.signals or [signal.SIGINT]
        _end(stop)
    finally:
        if stop.signals:  # the watcher is ending the process: whatever reached the main thread must not
            threading.Event().wait()
        _active = None
        signal.set_wakeup_fd(old_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write_fd)  # ends the watcher


def _watch(stop: _Stop, read_fd: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while data := pipe.read(16):
            stop.signals += [b for b in data if b in SIGNALS]
            if stop.signals:
                threading.Thread(target=_end, args=(stop,), daemon=True).start()


def _bounded(step: Callable[[], None], stop: _Stop) -> None:
    """Run `step` for at most STOP_TIMEOUT seconds, and not at all once a second signal came."""
    if len(stop.signals) > 1:
        return
    worker = threading.Thread(target=step, daemon=True)
    worker.start()
    worker.join(STOP_TIMEOUT)


def _end(stop: _Stop) -> None:
    """Steps 1 and 2 of the module docstring; the first signal's thread does them, a later one only hurries it."""
    if not stop.ending.acquire(blocking=False):
        return
    signum = stop.signals[0]
    sys.stdout.flush()
    console = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    where = []
    _bounded(lambda: where.append(stop.where()), stop)
    for callback in list(stop.callbacks):
        _bounded(callback, stop)
    at = f" at {where[0]}" if where and where[0] else ""
    os.write(console, f"deim-ray: interrupted{at}; re-run the same command to resume\n".encode())
    os._exit(128 + signum)
