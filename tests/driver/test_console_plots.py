"""The run's console lines, its metrics picture and its TensorBoard scalars, from real metrics lines; the
console board on a real local Ray instance."""

import io
import json
import struct
import time
from types import SimpleNamespace

import pytest

from deim_ray.cli.main import main
from deim_ray.driver.console import BoardHook, Console, _bar, epoch_line
from deim_ray.driver.plots import PLOT_KEY, redraw, render_metrics
from deim_ray.driver.tensorboard import epoch_scalars
from deim_ray.engine.evaluator import COCO_STAT_NAMES
from deim_ray.storage import Manifest, RunStore, open_storage


def _record(epoch: int, stage: int, ap: float, **extra) -> dict:
    stats = [ap, min(1.0, 2 * ap)] + [ap / 2] * 10
    return {"epoch": epoch, "stage": stage, "ap": ap, "coco_stats": stats, "loss": 20.0 - epoch,
            "losses": {"loss_mal": 1.5, "loss_bbox": 0.4, "loss_giou": 0.8}, "lr": 1e-3 * (0.5 if stage == 2 else 1),
            "epoch_time_s": 4.0, "eval_time_s": 0.5, "restarted_from_stg1": False, **extra}


RECORDS = [_record(0, 1, 0.01), _record(1, 1, 0.08), _record(2, 1, 0.05), _record(3, 2, 0.2), _record(4, 2, 0.31)]


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_epoch_line_shows_stage_metrics_time_and_what_was_saved():
    line = epoch_line(RECORDS[4] | {"best": 0.31, "saved": "best_stg2"}, epochs=6)
    assert line.startswith("epoch  4/5  stage 2")
    for part in ("loss  16.000", "AP 0.310", "AP50 0.620", "best 0.310", "4.5s", "-> saved best_stg2"):
        assert part in line
    assert "img/s" not in line and "data wait" not in line


def test_epoch_line_shows_throughput_and_data_wait_when_recorded():
    line = epoch_line(RECORDS[0] | {"images_per_s": 41.6, "data_wait": 0.034, "restarted_from_stg1": True})
    assert "42 img/s" in line and "data wait 3%" in line and "next epoch restarts from best_stg1" in line


def test_progress_bar_counts_iterations_and_estimates_the_rest():
    bar = _bar({"epoch": 3, "stage": 1, "iteration": 5, "iterations": 20, "elapsed_s": 2.0})
    assert "[######..................] 5/20 it" in bar and "~6s left" in bar


def test_metrics_png_is_drawn_for_both_stages():
    width, height = _png_size(render_metrics(RECORDS, stop_epoch=3, title="run t"))
    assert (width, height) == (1100, 360)


def test_plot_command_redraws_a_local_run(tmp_path, capsys):
    store = RunStore(open_storage(str(tmp_path)), "r1")
    store.write_manifest(Manifest.new(name="r1", config_sha256="0" * 64, epochs=5, stop_epoch=3))
    with pytest.raises(Exception, match="no metrics.jsonl"):
        redraw(store)
    store.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in RECORDS))
    assert main(["plot", str(tmp_path / "r1")]) == 0
    assert "plots/metrics.png" in capsys.readouterr().out
    assert _png_size((tmp_path / "r1" / PLOT_KEY).read_bytes())[0] == 1100
    assert main(["plot", str(tmp_path / "nothing")]) == 2


def test_tensorboard_scalars_cover_losses_every_coco_stat_lr_times_and_throughput():
    scalars = epoch_scalars(RECORDS[1] | {"images_per_s": 40.0, "data_wait": 0.1})
    assert {f"coco/{n}" for n in COCO_STAT_NAMES} <= set(scalars)
    assert scalars["coco/AP"] == 0.08 and scalars["coco/AP50"] == 0.16
    assert {"loss/total", "loss/loss_mal", "loss/loss_giou", "lr", "time/epoch_s", "time/eval_s",
            "data/images_per_s", "data/wait_fraction"} <= set(scalars)
    assert "data/images_per_s" not in epoch_scalars(RECORDS[1])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [False, True], ids=["plain", "terminal"])
def test_console_prints_each_epoch_the_board_receives_once(ray_local, terminal):
    stream = _Terminal() if terminal else io.StringIO()
    console = Console(stream=stream)
    trainer = SimpleNamespace(is_main=True, stage=2, tracker=SimpleNamespace(top1=0.31),
                              data=SimpleNamespace(train_loader=[0] * 4))
    with console.watch(epochs=6) as board:
        hook = BoardHook(board)
        for i in range(4):
            hook.on_step(trainer, 4, i)
        time.sleep(1.0)  # a poll draws the bar (on a terminal)
        record = SimpleNamespace(to_json=lambda: RECORDS[4])
        hook.after_epoch(trainer, record, SimpleNamespace(save="best_stg2"))
        time.sleep(1.0)  # the poll thread prints it ...
        hook.after_epoch(trainer, SimpleNamespace(to_json=lambda: RECORDS[3]), SimpleNamespace(save=""))
    text = stream.getvalue()
    if terminal:  # the bar of the running epoch, erased before the epoch's line
        assert "\r" + _bar({"epoch": 4, "stage": 2, "iteration": 4, "iterations": 4, "elapsed_s": 0})[:40] in text
        text = text.split("\r\033[K", 1)[1]
    assert "\r" not in text  # no bar on a plain stream, nor after the lines on a terminal
    lines = text.splitlines()  # ... and the closing drain printed the one that arrived last
    assert console.epochs_shown == 2 and len(lines) == 2
    assert lines[0].startswith("epoch  4/5  stage 2") and lines[0].endswith("-> saved best_stg2")
    assert lines[1].startswith("epoch  3/5")
