"""cli layer: `deim-ray` argument parsing; each command calls one function of the layers below.

Errors a user can fix (bad config, bad storage URI, refused resume, too few resources, ...) end as one line on
stderr, `deim-ray: error: <what is wrong and how to fix it>`, with exit status 2; nothing is overwritten.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import traceback

from deim_ray import __version__
from deim_ray.cli import commands
from deim_ray.driver.interrupts import Terminated, sigterm_unwinds, stop_on_signals
from deim_ray.logs import setup_logging
from deim_ray.redact import redact


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every other deim-ray error (usage stays behind --help)."""

    def error(self, message: str):
        self.exit(2, f"deim-ray: error: {redact(message)} (see `{self.prog} --help`)\n")


def _number(kind: type, low: float, inclusive: bool):
    """An argparse type: a finite `kind` at least `low` (or above it when not `inclusive`)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            bound = f"at least {low:g}" if inclusive else f"above {low:g}"
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number, {bound}")
        return value
    return parse


POSITIVE_INT, COUNT, POSITIVE = _number(int, 1, True), _number(int, 0, True), _number(float, 0, False)


def _is_user_error(e: BaseException) -> bool:
    """Every exception type deim_ray defines carries a one-line, actionable message (ConfigError, DataError,
    StorageError, RunError, CheckpointError, ...); so do missing or existing files named on the command line
    and any file-system error that names its path (no permission, not a directory, disk full, ...)."""
    return (type(e).__module__.startswith("deim_ray.") or isinstance(e, (FileNotFoundError, FileExistsError))
            or (isinstance(e, OSError) and e.filename is not None and e.strerror is not None))


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror is not None:
        return f"{e.filename}: {e.strerror}; check the path and its permissions"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def report_error(e: BaseException) -> int:
    """The CLI's one exit for errors: a user error is one redacted line and status 2; anything else is a
    redacted traceback and status 1."""
    if _is_user_error(e):
        print(f"deim-ray: error: {redact(_one_line(e))}", file=sys.stderr)
        return 2
    print(redact("".join(traceback.format_exception(e))).rstrip(), file=sys.stderr)
    return 1


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-c", "--config", required=required, help="YAML config (ours or an upstream DEIMv2 file)")
    p.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. -u schedule.epochs=20 optimizer.lr=1e-3")


def _add_shortcut_args(p: argparse.ArgumentParser) -> None:
    """The one-line training arguments (`driver/shortcuts.py`): a shipped model on a dataset folder."""
    g = p.add_argument_group("training on a dataset folder (instead of, or on top of, -c CONFIG)")
    g.add_argument("--data", metavar="DIR", help="dataset folder: COCO (as annotation tools export it too), YOLO or "
                   "Pascal VOC, detected from the layout; fits batch, warm-ups and EMA to its size")
    g.add_argument("--model", metavar="NAME", help="shipped model config, e.g. deimv2-atto, deimv2-n, dfine-n, "
                   "rtdetrv2-r18 (needs --data)")
    g.add_argument("--epochs", type=POSITIVE_INT, help="total epochs; the two-stage schedule is derived from it")
    g.add_argument("--image-size", type=POSITIVE_INT, metavar="S", help="train and evaluate at S x S (multiple of 32)")
    g.add_argument("--batch", type=POSITIVE_INT, metavar="B", help="total batch over all workers (default: the "
                   "config's, lowered to keep 16 steps per epoch on small data)")
    g.add_argument("--pretrained", metavar="CKPT", help="fine-tune from a checkpoint (what model.pretrained takes)")
    g.add_argument("--backbone-weights", metavar="PATH|none", help="ImageNet backbone file (default: the one the "
                   "config names); none starts from a random backbone")


def _add_run_args(p: argparse.ArgumentParser, default_name: str | None) -> None:
    p.add_argument("--storage", default="./runs", help="run storage: a directory or s3://bucket/prefix (default ./runs)")
    p.add_argument("--name", default=default_name, help="run name (same name resumes; default: "
                   + (default_name if default_name else "the model or config name, -2, -3, ... after a finished run")
                   + ")")
    p.add_argument("--workers", type=POSITIVE_INT, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, AMP per config")
    p.add_argument("--cpus-per-worker", type=POSITIVE, default=1.0, help="CPUs reserved per worker (default 1)")
    p.add_argument("--max-failures", type=COUNT, default=3, help="worker failures to survive per stage (default 3)")
    p.add_argument("--restart", action="store_true", help="start this run name over instead of resuming it")
    p.add_argument("--take-over", action="store_true",
                   help="continue the run even while another live driver holds it (that driver is fenced out)")
    p.add_argument("--stage2-branches", type=POSITIVE_INT, default=1, metavar="K",
                   help="run K stage-2 branches in parallel from best_stg1, varying the config's stage2_search "
                        "(default 1: one stage 2 with the config's settings)")


def _add_endpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")


def _add_use_commands(sub) -> None:
    """Commands that look at a finished run or use its model: plot, predict, eval, export."""
    p = sub.add_parser("plot", help="redraw a run's plots/metrics.png (AP, loss, LR per epoch) from its metrics")
    p.add_argument("run", help="run directory or s3://bucket/prefix/NAME")
    _add_endpoint_arg(p)
    p.set_defaults(func=commands.plot)

    p = sub.add_parser("predict", help="detect objects in images with a run's final model")
    p.add_argument("model", metavar="RUN|final.pth", help="run directory, s3://bucket/prefix/NAME or a final.pth")
    p.add_argument("images", nargs="*", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    p.add_argument("--data", metavar="DIR", help="instead of images: a dataset folder's val split (COCO, YOLO "
                   "or VOC, as train --data reads it), written with the dataset's image ids")
    p.add_argument("-o", "--output", default="predictions", help="output folder (default predictions)")
    p.add_argument("--score", type=float, default=0.3, help="keep detections scoring at least this (default 0.3)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    _add_endpoint_arg(p)
    p.set_defaults(func=commands.predict)

    p = sub.add_parser("eval", help="COCO AP and per-class AP of a model on a dataset's val split (this machine)")
    p.add_argument("model", metavar="RUN|final.pth|MODEL.onnx",
                   help="run directory, s3://bucket/prefix/NAME, a final.pth or an exported .onnx (ONNX Runtime, CPU)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="DIR", help="dataset folder: its val split (COCO, YOLO or VOC, as "
                                                   "train --data reads it)")
    data.add_argument("-c", "--config", help="a config: its data.val")
    p.add_argument("-u", "--update", nargs="+", default=[], metavar="KEY=VALUE", help="override config keys (with -c)")
    p.add_argument("--image-size", type=POSITIVE_INT, metavar="S", help="evaluate at S x S instead of the "
                   "training size (PyTorch models)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=8, help="images per forward pass (default 8)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (PyTorch models; default: cuda when available)")
    p.add_argument("-o", "--output", metavar="results.json", help="also write the stats and per-class AP as JSON")
    p.add_argument("--plots", metavar="DIR", help="draw the per-class precision-recall curves into DIR/pr_curves.png")
    _add_endpoint_arg(p)
    p.set_defaults(func=commands.evaluate)

    p = sub.add_parser("export", help="export a run's final model (postprocessing included) for deployment")
    p.add_argument("model", metavar="RUN|final.pth", help="run directory, s3://bucket/prefix/NAME or a final.pth")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="output format (default onnx)")
    p.add_argument("-o", "--output", default="model.onnx", help="file to write (default model.onnx)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size instead of a fixed batch of 1")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _add_endpoint_arg(p)
    p.set_defaults(func=commands.export)


def _add_training_commands(sub) -> None:
    """Commands that train: train, demo, tune."""
    p = sub.add_parser("train", help="two-stage training on Ray Train")
    _add_config_args(p, required=False)
    _add_shortcut_args(p)
    _add_run_args(p, default_name=None)
    p.set_defaults(func=commands.train)

    p = sub.add_parser("demo", help="the full two-stage job on synthetic shapes, local Ray, 2 CPU workers")
    _add_config_args(p, required=False)
    _add_run_args(p, default_name="demo")
    p.set_defaults(func=commands.demo)

    p = sub.add_parser("tune", help="hyperparameter search with Ray Tune; every trial is a full two-stage run")
    _add_config_args(p)
    p.add_argument("--space", required=True, help="YAML: dotted config key -> {loguniform|uniform|quniform|"
                   "randint|choice|grid: [...]}")
    p.add_argument("--samples", type=POSITIVE_INT, default=4, help="trials to sample (each grid point repeats; default 4)")
    p.add_argument("--scheduler", default="asha", choices=["asha", "fifo"],
                   help="asha stops weak trials early, by epoch AP (default asha)")
    p.add_argument("--metric", default="ap", choices=["ap", "ap50", "loss"],
                   help="epoch metric the scheduler compares (default ap; trials are ranked by final AP)")
    p.add_argument("--max-concurrent", type=POSITIVE_INT, default=2, help="trials running at once (default 2)")
    p.add_argument("--storage", default="./runs", help="a directory or s3://bucket/prefix (default ./runs)")
    p.add_argument("--name", default="tune", help="search name; trials are <storage>/<name>/trial-<n> (default tune)")
    p.add_argument("--workers-per-trial", type=POSITIVE_INT, default=1, help="Ray Train workers per trial (default 1)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL, AMP per config")
    p.add_argument("--cpus-per-worker", type=POSITIVE, default=1.0, help="CPUs reserved per worker (default 1)")
    p.add_argument("--max-failures", type=COUNT, default=3, help="worker failures each stage survives (default 3)")
    p.add_argument("--report-every", type=COUNT, default=0, metavar="N",
                   help="print each trial's epoch line every N epochs (default 0: about 4 per trial)")
    p.set_defaults(func=commands.tune)


def _add_run_commands(sub) -> None:
    """Commands that read a run from its storage: resolve, fetch, ls."""
    p = sub.add_parser("resolve", help="print a run's final artifact and why it was chosen")
    p.add_argument("run", help="run directory or s3://bucket/prefix/NAME")
    p.add_argument("--no-verify", action="store_true",
                   help="skip re-reading the artifact to check its size and sha256 against the manifest")
    _add_endpoint_arg(p)
    p.set_defaults(func=commands.resolve)

    p = sub.add_parser("fetch", help="download a run's artifact and verify its sha256")
    p.add_argument("run", help="run directory or s3://bucket/prefix/NAME")
    p.add_argument("-o", "--output", default=".", help="output directory (default .)")
    p.add_argument("--which", choices=["final", "best_stg1", "best_stg2", "last"],
                   help="artifact to fetch (default final; best_stg2 with --branch)")
    p.add_argument("--branch", help="a stage-2 branch of the run (e.g. b1): fetch its best_stg2 or last")
    p.add_argument("--force", action="store_true", help="replace a different file of the same name in the output")
    _add_endpoint_arg(p)
    p.set_defaults(func=commands.fetch)

    p = sub.add_parser("ls", help="list runs under a storage root with state and final AP")
    p.add_argument("root", help="storage root: a directory or s3://bucket/prefix")
    _add_endpoint_arg(p)
    p.set_defaults(func=commands.ls)


def _add_config_commands(sub) -> None:
    """Commands about configs, data and weights before a run: info, show-augment, convert-weights, import-config."""
    p = sub.add_parser("info", help="model size, the whole schedule phase by phase (checked as train checks), "
                                    "and the loader workers needed")
    _add_config_args(p, required=False)
    _add_shortcut_args(p)
    p.add_argument("--workers", type=int, default=2,
                   help="workers the batch sizes must divide by (default 2, as train)")
    p.add_argument("--no-data", action="store_true", help="skip the data and weight-file checks (describe a config "
                   "whose data or weights are elsewhere)")
    p.add_argument("--images-per-s", type=POSITIVE, default=None,
                   help="images/s one training worker (GPU) consumes; prints the data.num_workers that keeps up")
    p.add_argument("--no-loader", action="store_true", help="skip the short loader measurement")
    p.set_defaults(func=commands.info)

    p = sub.add_parser("show-augment", help="draw augmented training images with boxes for one epoch")
    _add_config_args(p)
    p.add_argument("--epoch", type=COUNT, required=True, help="epoch whose augmentation to show (0-based)")
    p.add_argument("-o", "--output", default="augment.png", help="PNG to write (default augment.png)")
    p.add_argument("-n", type=POSITIVE_INT, default=8, help="number of images (default 8)")
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.set_defaults(func=commands.show_augment)

    p = sub.add_parser("convert-weights", help="upstream DEIMv2 / DEIM (D-FINE, RT-DETRv2) checkpoint -> "
                       "deim_ray final.pth (EMA weights preferred)")
    p.add_argument("checkpoint", help="upstream checkpoint (.pth: {'model', 'ema': {'module'}} or a state dict)")
    p.add_argument("-c", "--config", required=True, help="the upstream config the checkpoint was trained with")
    p.add_argument("-o", "--output", required=True, help="final.pth to write (never overwritten)")
    p.set_defaults(func=commands.convert_weights)

    p = sub.add_parser("import-config", help="convert an upstream DEIMv2 YAML config to deim_ray's format")
    p.add_argument("config", help="upstream config file (its __include__ chain is followed)")
    p.add_argument("-o", "--output", required=True, help="YAML file to write")
    p.set_defaults(func=commands.import_config)


DESCRIPTION = ("Train DEIM-family real-time object detectors (DEIMv2, D-FINE, RT-DETRv2) with the two-stage DEIM "
               "recipe on a Ray cluster or a laptop, and use the one final model it hands back: resolve, fetch, "
               "evaluate, predict, export. Start with `deim-ray demo`.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deim-ray", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"deim-ray {__version__}")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    noise.add_argument("-v", "--verbose", action="store_true",
                       help="also Ray's own lines, the workers' logs and library chatter")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training_commands(sub)
    _add_run_commands(sub)
    _add_use_commands(sub)
    _add_config_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 0
    setup_logging(quiet=args.quiet, verbose=args.verbose)
    training = args.command in ("train", "demo", "tune")
    try:
        with stop_on_signals(lambda: commands.interrupted_at(args)) if training else sigterm_unwinds():
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # before the handlers were in place, or a command that is not a training one
        print("deim-ray: interrupted; re-run the same command to resume", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except Exception as e:
        return report_error(e)


if __name__ == "__main__":
    sys.exit(main())
