"""storage layer: `BackgroundUploader`, so rank 0 hands uploads off and keeps training.

One worker thread runs the submitted calls in submission order (a best checkpoint is recorded after the
`last` that preceded it, and `metrics.jsonl` after both). An error does not stop later calls; `flush()`
waits for everything submitted so far and raises the first error not yet raised.

    uploader = BackgroundUploader()
    uploader.submit(store.put_artifact, LAST, path, epoch=3, stage=1, ap=0.41)
    ...
    uploader.flush()   # the stage ends only when every upload is durable
    uploader.close()
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from deim_ray.storage.errors import StorageError

_STOP = object()


class UploadTimeout(StorageError, TimeoutError):
    """`flush(timeout)` expired with uploads still pending."""


class BackgroundUploader:
    """A FIFO of calls run on one daemon thread; see the module docstring."""

    def __init__(self, name: str = "deim-ray-upload"):
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._errors: list[BaseException] = []
        self._idle = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Queue `fn(*args, **kwargs)`; the returned Future holds its result or exception."""
        if self._closed:
            raise StorageError("BackgroundUploader is closed; create a new one to submit more uploads")
        future: Future = Future()
        with self._idle:
            self._pending += 1
        self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - handed to flush() and the Future
                    future.set_exception(e)
                    with self._idle:
                        self._errors.append(e)
            with self._idle:
                self._pending -= 1
                self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every submitted call has finished; raise the first error since the last flush.

        UploadTimeout if calls are still running after `timeout` seconds (they keep running).
        """
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout):
                raise UploadTimeout(f"{self._pending} upload(s) still running after {timeout:g} s; the storage "
                                    "endpoint is slow or unreachable — check it, then retry")
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def close(self, timeout: float | None = None) -> None:
        """Finish queued calls, stop the thread, and raise the first error not yet raised by `flush`."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
        self.flush(timeout)
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundUploader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(Exception):  # the exception already in flight is the one to report
            self.close()
