"""driver layer: what a user sees while a run trains — one line per epoch, and a progress bar on a terminal.

Rank 0 pushes its step progress and each finished epoch to a small `Board` actor (it reserves no CPU); the
driver process polls the board from a thread and prints, so the lines come from the driver itself (one per
epoch, no per-rank copies, no Ray prefixes) whether the workers run on this machine or across a cluster.
Where the driver's stderr is not a terminal (`ray job submit`, CI, a log file) only the plain lines appear.

    console = Console()                          # the CLI makes one per command
    with console.watch(stage, epochs) as board:  # the board's name travels to the workers (WorkerArgs)
        trainer.fit()
    console.epochs_shown                         # how many epoch lines this command printed
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import ray

from deim_ray.engine.hooks import Hook

log = logging.getLogger("deim_ray.driver")

POLL_S = 0.5
"""How often the driver polls the board and rank 0 pushes its step progress."""


@ray.remote(num_cpus=0)
class Board:
    """The latest step progress of rank 0 and the epoch lines the driver has not printed yet."""

    def __init__(self):
        self.progress: dict | None = None
        self.lines: list[dict] = []

    def step(self, progress: dict) -> None:
        self.progress = progress

    def epoch(self, line: dict) -> None:
        self.lines.append(line)
        self.progress = None

    def drain(self) -> tuple[dict | None, list[dict]]:
        lines, self.lines = self.lines, []
        return self.progress, lines


def epoch_line(record: dict, epochs: int | None = None) -> str:
    """One epoch as the console and the closing table print it (`record` is a metrics.jsonl line, plus
    `best` and `saved` when known)."""
    total = f"/{epochs - 1}" if epochs else ""
    parts = [f"epoch {record['epoch']:>2}{total}", f"stage {record['stage']}", f"loss {record['loss']:7.3f}",
             f"AP {record['ap']:.3f}", f"AP50 {record['coco_stats'][1]:.3f}"]
    if record.get("best") is not None:
        parts.append(f"best {record['best']:.3f}")
    seconds = record.get("epoch_time_s", 0.0) + record.get("eval_time_s", 0.0)
    parts.append(f"{seconds:5.1f}s")
    if record.get("images_per_s") is not None:
        parts.append(f"{record['images_per_s']:.0f} img/s")
    if record.get("data_wait") is not None:
        parts.append(f"data wait {100 * record['data_wait']:.0f}%")
    notes = [f"saved {record['saved']}"] if record.get("saved") else []
    if record.get("restarted_from_stg1"):
        notes.append("next epoch restarts from best_stg1")
    return "  ".join(parts) + (f"  -> {', '.join(notes)}" if notes else "")


def _bar(progress: dict, width: int = 24) -> str:
    done, total = progress["iteration"], max(progress["iterations"], 1)
    filled = int(width * done / total)
    left = progress["elapsed_s"] * (total - done) / max(done, 1)
    return (f"epoch {progress['epoch']:>2}  stage {progress['stage']}  [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{total} it  {progress['elapsed_s']:.0f}s, ~{left:.0f}s left")


class Console:
    """Writes the epoch lines of the stages it watches to `stream` (stderr, beside the log lines); draws the
    running epoch's bar there when it is a terminal."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.epochs_shown = 0
        self._bar_shown = False

    @contextmanager
    def watch(self, epochs: int, label: str = "") -> Iterator[str]:
        """Create a board for one stage run and print what arrives on it until the block ends; yields the board's
        name for the workers. A `label` (a stage-2 branch, several watched at once) starts each of its lines and
        turns the progress bar off."""
        name = f"deim_ray_board_{uuid.uuid4().hex[:12]}"
        board = Board.options(name=name).remote()
        stop = threading.Event()
        thread = threading.Thread(target=self._poll, args=(board, epochs, stop, label), daemon=True,
                                  name="deim-console")
        thread.start()
        try:
            yield name
        finally:
            stop.set()
            thread.join()
            self._safely(self._show, board, epochs, label)  # lines that arrived after the last poll
            self._clear_bar()
            self._safely(ray.kill, board)

    def _poll(self, board, epochs: int, stop: threading.Event, label: str) -> None:
        while not stop.wait(POLL_S):
            self._safely(self._show, board, epochs, label)

    @staticmethod
    def _safely(fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # the console must never end (or mask the end of) a run
            log.debug("console: %s failed: %s", getattr(fn, "__name__", fn), e)

    def _show(self, board, epochs: int, label: str = "") -> None:
        progress, lines = ray.get(board.drain.remote(), timeout=30)
        for line in lines:
            self._clear_bar()
            self.stream.write((f"{label}  " if label else "") + epoch_line(line, epochs) + "\n")
            self.stream.flush()
            self.epochs_shown += 1
        if self.tty and progress is not None and not label:
            self.stream.write("\r" + _bar(progress) + "\033[K")
            self.stream.flush()
            self._bar_shown = True

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._bar_shown = False


class BoardHook(Hook):
    """Rank 0 (worker side): step progress every `POLL_S` seconds, and each finished epoch, to the driver's board."""

    def __init__(self, board_name: str):
        self.board = ray.get_actor(board_name)
        self.started = self.last_push = 0.0

    def on_step(self, trainer, epoch, iteration):
        if not trainer.is_main:
            return
        now = time.monotonic()
        if iteration == 0:
            self.started = now - 1e-9
        iterations = len(trainer.data.train_loader)
        if now - self.last_push < POLL_S and iteration + 1 < iterations:
            return
        self.last_push = now
        self.board.step.remote({"epoch": epoch, "stage": int(trainer.stage), "iteration": iteration + 1,
                                "iterations": iterations, "elapsed_s": now - self.started})

    def after_epoch(self, trainer, record, decision):
        if trainer.is_main:  # waited for, so the line is on the board before Ray hears of the epoch
            line = record.to_json() | {"best": trainer.tracker.top1, "saved": decision.save or ""}
            ray.get(self.board.epoch.remote(line))
