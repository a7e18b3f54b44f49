"""driver layer: `plots/metrics.png`, the picture of a run, redrawn during training and by `deim-ray plot`.

Three panels over epochs: AP and AP50 with the stage switch marked and each stage's best highlighted, the
training loss, and the LR. The image is drawn from `metrics.jsonl` lines alone, so a run anywhere (local or S3)
can be redrawn from its directory. Matplotlib's object API (no pyplot state) lets rank 0 draw on its uploader
thread while training goes on. A drawing holds the GIL for 0.1-0.5 s (the first one of a process also imports
matplotlib), time the next training steps wait for, so rank 0 redraws at most once per `PLOT_INTERVAL_S` of a
stage and after the stage's last epoch.

`render_pr_curves` draws a model's per-class precision-recall curves at IoU 0.5 and `render_confusion_matrix` its
confusion matrix (`deim-ray eval --plots`).
"""

from __future__ import annotations

import io
import logging
import time

from deim_ray.config.schedule import stage_epochs
from deim_ray.engine.hooks import Hook
from deim_ray.storage import RunStore

log = logging.getLogger("deim_ray.worker")

PLOT_KEY = "plots/metrics.png"
PLOT_INTERVAL_S = 60.0
_STAGE_COLOURS = {1: "tab:blue", 2: "tab:orange"}


def render_metrics(records: list[dict], stop_epoch: int | None, title: str = "") -> bytes:
    """PNG bytes of the three panels for the given metrics.jsonl lines (sorted by epoch)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = sorted(records, key=lambda r: r["epoch"])
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(11, 3.6), dpi=100)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.82 if title else 0.9, wspace=0.22)
    ap_ax, loss_ax, lr_ax = fig.subplots(1, 3)
    ap_ax.plot(epochs, [r["ap"] for r in records], "o-", color="tab:green", label="AP")
    ap_ax.plot(epochs, [r["coco_stats"][1] for r in records], "s--", color="tab:olive", ms=4, label="AP50")
    _mark_bests(ap_ax, records)
    loss_ax.plot(epochs, [r["loss"] for r in records], "o-", color="tab:red", ms=4)
    lr_ax.plot(epochs, [r["lr"] for r in records], "o-", color="tab:purple", ms=4)
    for ax, name in ((ap_ax, "AP (COCO)"), (loss_ax, "training loss"), (lr_ax, "learning rate (end of epoch)")):
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if stop_epoch is not None and epochs and epochs[0] < stop_epoch <= epochs[-1] + 1:
            ax.axvline(stop_epoch - 0.5, color="grey", ls=":", lw=1.5)
    if stop_epoch is not None:
        ap_ax.text(stop_epoch - 0.5, 0.98, " stage 2", transform=ap_ax.get_xaxis_transform(), va="top",
                   fontsize=8, color="grey")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ap_ax.set_ylim(bottom=0)
    ap_ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_pr_curves(per_class: list[dict], pr50: list[list[float]], title: str = "") -> bytes:
    """PNG bytes: precision over recall at IoU 0.5 (area all, 100 detections), one curve per class with ground
    truth, labelled with its AP50 (`evaluator.CocoResult`'s `per_class` and `pr50`)."""
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.2), dpi=100)
    ax = fig.subplots()
    recall = np.linspace(0.0, 1.0, 101)  # COCOeval's recall thresholds
    for row, precision in zip(per_class, pr50):
        if row["ap50"] >= 0:
            ax.plot(recall, np.where(np.asarray(precision) < 0, np.nan, precision), lw=1.5,
                    label=f"{row['name']} (AP50 {row['ap50']:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"{title}\nprecision-recall at IoU 0.5" if title else "precision-recall at IoU 0.5")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower left", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_confusion_matrix(counts: list[list[int]], labels: list[str], title: str = "") -> bytes:
    """PNG bytes: the counts (row = true class, column = predicted class, the last of each "background"), each
    row shaded by its share of the row's total, the counts written in the cells."""
    import numpy as np
    from matplotlib.figure import Figure

    matrix = np.asarray(counts, dtype=float)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = 3.2 + 0.45 * len(labels)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.subplots()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true")
    if len(labels) <= 30:  # beyond that the numbers no longer fit their cells
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 0.6 else "black")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _mark_bests(ax, records: list[dict]) -> None:
    """A star on each stage's best epoch, labelled with its AP."""
    for stage in sorted({r["stage"] for r in records}):
        best = max((r for r in records if r["stage"] == stage), key=lambda r: r["ap"])
        ax.plot([best["epoch"]], [best["ap"]], "*", ms=16, color=_STAGE_COLOURS.get(stage, "black"),
                label=f"stage {stage} best: {best['ap']:.3f} (epoch {best['epoch']})", zorder=5)


def write_plot(store: RunStore, records: list[dict], stop_epoch: int | None) -> str:
    """Draw `records` into the run's plots/metrics.png; returns its URI."""
    png = render_metrics(records, stop_epoch, title=f"run {store.name}")
    return store.write_bytes(PLOT_KEY, png).uri


def redraw(store: RunStore) -> str:
    """`deim-ray plot`: redraw a run's PNG from its metrics.jsonl; returns the PNG's URI."""
    from deim_ray.storage import ManifestError

    manifest = store.read_manifest()
    if manifest is None:
        raise ManifestError(f"no run at {store.uri} (no manifest.json); check the URI")
    records = store.read_metrics()
    if not records:
        raise ManifestError(f"run {store.uri} has no metrics.jsonl yet (no epoch finished); nothing to plot")
    return write_plot(store, records, manifest.stop_epoch)


class PlotHook(Hook):
    """Rank 0: redraw plots/metrics.png on the run's uploader thread (after metrics.jsonl), at most once per
    `interval_s` of a stage and after its last epoch."""

    def __init__(self, sync, store: RunStore, interval_s: float = PLOT_INTERVAL_S):
        self.sync, self.store, self.interval_s = sync, store, interval_s
        self.drawn_at = 0.0

    def before_stage(self, trainer):
        self.drawn_at = time.monotonic()
        if trainer.is_main:  # here, before the epochs: imported on the uploader thread it would slow training
            import matplotlib.backends.backend_agg  # noqa: F401
            import matplotlib.figure  # noqa: F401

    def after_epoch(self, trainer, record, decision):
        if not trainer.is_main or trainer.stop_reason or self.sync.uploader is None:
            return  # fenced off (a newer attempt owns the run) or not rank 0
        sched = trainer.cfg.schedule
        last = record.epoch == stage_epochs(trainer.stage, sched.epochs, sched.stop_epoch).stop - 1
        if last or time.monotonic() - self.drawn_at >= self.interval_s:
            self.drawn_at = time.monotonic()
            self.sync.uploader.submit(self._draw, list(self.sync.metrics), sched.stop_epoch)

    def _draw(self, lines: list[dict], stop_epoch: int) -> None:
        try:  # a picture never ends a run; the next epoch draws it again
            write_plot(self.store, lines, stop_epoch)
        except Exception as e:
            log.warning("could not draw %s: %s", PLOT_KEY, str(e).splitlines()[0] if str(e) else type(e).__name__)
