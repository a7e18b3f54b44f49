"""cli layer: one small function per `deim-ray` command (parse result in, one call down, text out)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

def _load(args: argparse.Namespace):
    from deim_ray.config.loader import load_config

    return load_config(args.config, args.update)


def _shortcuts(args: argparse.Namespace):
    from deim_ray.driver.shortcuts import Shortcuts

    return Shortcuts(config=args.config, model=args.model, data=args.data, epochs=args.epochs,
                     image_size=args.image_size, batch=args.batch, pretrained=args.pretrained,
                     backbone_weights=args.backbone_weights, updates=tuple(args.update))


def _check_run_args(args: argparse.Namespace, cfg) -> None:
    """The argument checks that need no cluster, storage or model library: seconds, before the heavy imports."""
    from deim_ray.driver.stage2_branches import check_branch_count
    from deim_ray.storage.run_store import check_run_name

    check_run_name(args.name)
    check_branch_count(cfg, args.stage2_branches)


def interrupted_at(args: argparse.Namespace) -> str:
    """Where the run of an interrupted `train`/`demo` stood (its manifest, read with the run's storage
    settings); "" for other commands."""
    if getattr(args, "stage2_branches", None) is None:
        return ""
    from deim_ray.driver.pickup import position
    from deim_ray.storage import RunStore, open_storage

    cfg = getattr(args, "loaded_config", None)
    if cfg is None:
        return "start-up"
    return position(RunStore(open_storage(args.storage, cfg.storage), args.name).read_manifest())


def _run(args: argparse.Namespace, cfg, explicit: frozenset[str] = frozenset()) -> int:
    _check_run_args(args, cfg)
    args.loaded_config = cfg  # for the line of an interrupt (`interrupted_at`)
    from deim_ray.driver.console import Console
    from deim_ray.driver.run import RunRequest, run_training
    from deim_ray.storage import format_resolution

    console = None if args.quiet else Console()
    manifest = run_training(RunRequest(cfg=cfg, storage_uri=args.storage, name=args.name, workers=args.workers,
                                       gpu=args.gpu, max_failures=args.max_failures, restart=args.restart,
                                       cpus_per_worker=args.cpus_per_worker, console=console,
                                       stage2_branches=args.stage2_branches, explicit=explicit,
                                       take_over=args.take_over))
    if console is None or not console.epochs_shown:  # the epochs were not streamed by this command
        print(epoch_table(args.storage, args.name, cfg.storage, cfg.schedule.epochs))
    print(format_resolution(manifest))
    table = final_class_table(args.storage, args.name, cfg.storage, manifest)
    if table:
        print(table)
    print(_next_steps(args.storage, args.name, cfg.train.active_trackers))
    return 0


def _next_steps(storage: str, name: str, trackers: tuple[str, ...]) -> str:
    run = f"{storage.rstrip('/')}/{name}"
    board = f", tensorboard --logdir {run}/tb" if "tensorboard" in trackers else ""
    logged = "".join(f", the {t} run {name}" for t in trackers if t != "tensorboard")
    return f"see {run}/plots/metrics.png{board}{logged}; use it: deim-ray predict|export {run}"


def train(args: argparse.Namespace) -> int:
    from deim_ray.driver.shortcuts import fresh_name, load_for_command, name_base

    shortcuts = _shortcuts(args)
    loaded = load_for_command(shortcuts)
    if args.name is None:
        args.name = fresh_name(args.storage, loaded.cfg, name_base(shortcuts))
        print(f"run name: {args.name} (in {args.storage}; --name chooses one)")
    return _run(args, loaded.cfg, loaded.explicit)


def demo(args: argparse.Namespace) -> int:
    from deim_ray.config.shipped import DEMO_CONFIG

    if args.config is None:
        if not DEMO_CONFIG.exists():
            raise FileNotFoundError(f"demo config {DEMO_CONFIG} is missing; run from a deim_ray checkout or pass -c")
        args.config = str(DEMO_CONFIG)
    return _run(args, _load(args))


def epoch_table(storage_uri: str, name: str, storage_cfg=None, epochs: int | None = None) -> str:
    """The run's epochs, one line each as the console prints them (from its metrics.jsonl, read with the
    run's own storage settings)."""
    from deim_ray.driver.console import epoch_line

    rows = _run_store(storage_uri, name, storage_cfg).read_metrics()
    return "\n".join(epoch_line(r, epochs) for r in rows) if rows else "(no metrics recorded)"


def final_class_table(storage_uri: str, name: str, storage_cfg, manifest) -> str:
    """The per-class table of the run's resolved artifact, from its epoch's metrics line ('' when unknown)."""
    from deim_ray.driver.evaluation import per_class_table, resolved_per_class

    rows = resolved_per_class(_run_store(storage_uri, name, storage_cfg), manifest) if manifest.final else []
    return f"per class, final artifact (epoch {manifest.final['epoch']}):\n{per_class_table(rows)}" if rows else ""


def _run_store(storage_uri: str, name: str, storage_cfg):
    from deim_ray.storage import RunStore, open_storage

    return RunStore(open_storage(storage_uri, storage_cfg), name)


def tune(args: argparse.Namespace) -> int:
    from deim_ray.driver.tune_space import check_trial_count, load_space
    from deim_ray.storage.run_store import check_run_name

    check_run_name(args.name)
    space = load_space(args.space)  # a bad space file is one line in seconds, before Ray and torch load
    check_trial_count(space, args.samples)
    from deim_ray.driver.tune import format_summary, run_tune

    summary = run_tune(args.config, args.update, space, args.samples, scheduler=args.scheduler,
                       max_concurrent=args.max_concurrent, storage_uri=args.storage, name=args.name,
                       workers_per_trial=args.workers_per_trial, gpu=args.gpu, metric=args.metric,
                       cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                       report_every=args.report_every)
    print(format_summary(summary))
    return 0 if summary.best else 1


def _storage_cfg(args: argparse.Namespace):
    """`--endpoint-url` as a StorageConfig (None keeps the AWS environment's endpoint)."""
    from deim_ray.config.schema import StorageConfig

    return StorageConfig(endpoint_url=args.endpoint_url) if getattr(args, "endpoint_url", None) else None


def resolve(args: argparse.Namespace) -> int:
    from deim_ray.storage import describe_run

    print(describe_run(args.run, _storage_cfg(args), verify=not args.no_verify))
    return 0


def fetch(args: argparse.Namespace) -> int:
    from deim_ray.storage.retrieve import fetch as fetch_artifact

    which = args.which or ("best_stg2" if args.branch else "final")
    path = fetch_artifact(args.run, which=which, out_dir=args.output, storage_cfg=_storage_cfg(args),
                          force=args.force, branch=args.branch)
    print(f"{which}{f' of branch {args.branch}' if args.branch else ''}: {path} (sha256 verified)")
    return 0


def plot(args: argparse.Namespace) -> int:
    from deim_ray.driver.plots import redraw
    from deim_ray.storage import open_run_dir

    print(f"wrote {redraw(open_run_dir(args.run, _storage_cfg(args)))}")
    return 0


def predict(args: argparse.Namespace) -> int:
    from deim_ray.driver.use import UseError, predict as run_predict

    if args.batch_size < 1 or not 0.0 <= args.score <= 1.0:
        raise UseError("--batch-size must be >= 1 and --score within [0, 1]")
    if not args.images and not args.data:
        raise UseError("name the images to predict (files or folders), or a dataset with --data DIR")
    path = run_predict(args.model, args.images, args.output, score=args.score, batch_size=args.batch_size,
                       device=args.device, storage_cfg=_storage_cfg(args), force=args.force, data_dir=args.data)
    count = len(json.loads(path.read_text()))
    print(f"wrote {path} ({count} detections with score >= {args.score}) and the drawn images in {path.parent}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from deim_ray.driver.evaluation import (evaluate_model, format_report, val_split_of, val_split_of_config,
                                            write_json, write_plots)

    if args.update and not args.config:
        from deim_ray.config.errors import ConfigError

        raise ConfigError("-u overrides a config's keys; pass -c CONFIG with it (or leave -u out with --data)")
    if args.output:
        _refuse_existing(args.output, force=None)
    split = val_split_of(args.data) if args.data else val_split_of_config(args.config, args.update)
    size = (args.image_size, args.image_size) if args.image_size else None
    report = evaluate_model(args.model, split, batch_size=args.batch_size, device=args.device, image_size=size,
                            storage_cfg=_storage_cfg(args))
    print(format_report(report))
    if args.output:
        print(f"wrote {write_json(report, args.output)}")
    if args.plots:
        print(f"wrote {', '.join(str(p) for p in write_plots(report, args.plots))}")
    return 0


def export(args: argparse.Namespace) -> int:
    from deim_ray.driver.use import export as run_export

    path = run_export(args.model, args.output, fmt=args.format, opset=args.opset, dynamic_batch=args.dynamic_batch,
                      storage_cfg=_storage_cfg(args), force=args.force)
    print(f"wrote {path} (inputs: images, orig_target_sizes; outputs: labels, boxes, scores; class names and "
          "preprocessing in its metadata)")
    return 0


def ls(args: argparse.Namespace) -> int:
    from deim_ray.storage.retrieve import list_runs

    runs = list_runs(args.root, _storage_cfg(args))
    if not runs:
        print(f"no runs under {args.root}")
        return 0
    print(f"{'name':<28} {'state':<15} {'final AP':>8}  {'updated':<20}  branches / trials")
    for r in runs:
        ap = f"{r.final_ap:.4f}" if r.final_ap is not None else "-"
        print(f"{r.name:<28} {r.state:<15} {ap:>8}  {r.updated_at or '-':<20}  {_parts(r)}"
              + (f"  ({r.problem})" if r.problem else ""))
    return 0


def _parts(r) -> str:
    """A run's stage-2 branches (and the winner), or a search's trials (and the best, whose AP is shown)."""
    if r.trials is not None:
        return f"{r.trials} trials" + (f", best {r.best}" if r.best else "") + f" (deim-ray ls {r.uri})"
    return "-" if r.branches is None else f"{r.branches}" + (f", winner {r.winner}" if r.winner else "")


def info(args: argparse.Namespace) -> int:
    from deim_ray.config.validate import validate
    from deim_ray.driver.shortcuts import load_for_command

    loaded = load_for_command(_shortcuts(args))
    validate(loaded.cfg, workers=args.workers)  # exactly `train`'s checks, before the model libraries load
    from deim_ray.driver.info import describe_checked

    print(describe_checked(loaded.cfg, loaded.derived, workers=args.workers, keep=loaded.explicit,
                           data=not args.no_data, loader=not args.no_loader, consumed_per_s=args.images_per_s))
    return 0


def show_augment(args: argparse.Namespace) -> int:
    from deim_ray.data.visualize import render_augment_grid

    _refuse_existing(args.output, args.force)
    cfg = _load(args)
    from deim_ray.config.schedule import stage_of

    if args.epoch >= cfg.schedule.epochs:
        from deim_ray.config.errors import ConfigError

        raise ConfigError(f"--epoch {args.epoch} is beyond the schedule (epochs 0..{cfg.schedule.epochs - 1})")
    path = render_augment_grid(cfg, args.epoch, args.output, n=args.n)
    print(f"wrote {path} (epoch {args.epoch}, stage {stage_of(args.epoch, cfg.schedule.stop_epoch)})")
    return 0


def _refuse_existing(output: str, force: bool | None) -> None:
    """A file the user names as output is replaced only with --force (None: the command has no --force)."""
    path = Path(output).absolute()
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise FileExistsError(f"cannot write {output}: {blocker} is a file, not a directory")
    if path.is_dir():
        raise FileExistsError(f"output {output} is a directory; name a file")
    if Path(output).exists() and not force:
        raise FileExistsError(f"{output} exists; choose another --output, remove it first"
                              + (", or pass --force" if force is not None else ""))


def import_config(args: argparse.Namespace) -> int:
    from deim_ray.config.upstream import write_converted

    _refuse_existing(args.output, force=None)
    unhonoured = write_converted(args.config, args.output)
    print(f"wrote {args.output}")
    for line in unhonoured:
        print(f"  not honoured: {line}")
    return 0


def convert_weights(args: argparse.Namespace) -> int:
    from deim_ray.models.convert.command import convert_checkpoint

    path, report = convert_checkpoint(args.checkpoint, args.config, args.output)
    print(report.summary())
    print(f"wrote {path}")
    return 0
