"""config layer: import upstream DEIMv2 / DEIM (D-FINE, RT-DETRv2) YAML configs into deim_ray's format.

DEIM users arrive with upstream files: top-level `epoches`, `train_dataloader.collate_fn.stop_epoch`,
class-named model sections, `lrsheduler: flatcosine`... `convert_upstream` resolves the upstream include
chain (same semantics as our own files) and maps every key it understands onto deim_ray's sections. A
key that cannot be honoured is returned in a list of one-line notes, never dropped silently: anything the
mapping did not read is reported as "not recognised". `load_config` calls this automatically for
upstream-style files; `write_converted` backs `deim-ray import-config`.

Equivalences applied (documented, not reported): a disabled or empty MixUp/CopyBlend range becomes [0, 0];
a `flat_epoch` beyond the run (upstream N: 7800) with a constant tail becomes flat_epoch = epochs -
no_aug_epoch with lr_gamma 1.0 (the same LR curve), and any constant LR (lr_gamma 1.0) puts its flat/tail split at
stop_epoch; `scaler: GradScaler` selects float16 AMP as upstream.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deim_ray.config.errors import ConfigError
from deim_ray.config.families import FAMILY_DECODERS, convert_family, translate_family_regex
from deim_ray.config.typed import UPSTREAM_HINTS, build_config
from deim_ray.config.upstream_model import convert_model, translate_param_regex
from deim_ray.config.yaml_tree import KeyPath, display_path, origin_of, resolve_file
from deim_ray.outputs import output_file

UPSTREAM_KEYS = frozenset({
    "train_dataloader", "val_dataloader", "epoches", "lrsheduler", "lr_warmup_scheduler", "HGNetv2", "DINOv3STAs",
    "HybridEncoder", "LiteEncoder", "DEIMTransformer", "DFINETransformer", "RTDETRTransformerv2", "PResNet",
    "DEIMCriterion", "DEIM", "PostProcessor", "eval_spatial_size",
    "use_ema", "use_amp", "clip_max_norm", "task", "num_classes", "remap_mscoco_category", "evaluator", "output_dir",
    "checkpoint_freq", "sync_bn", "find_unused_parameters", "warmup_iter", "flat_epoch", "no_aug_epoch", "lr_gamma",
    "print_freq", "use_focal_loss", "criterion", "postprocessor", "scaler",
})
"""Top-level keys that only upstream configs use."""
OWN_SECTIONS = frozenset({"data", "augment", "schedule", "train", "eval", "storage"})
"""deim_ray sections upstream never uses at the top level (`model`, `optimizer`, `ema`, `lr_scheduler` are in both)."""
_UPSTREAM_INCLUDE = re.compile(
    r"(^|/)(dataset/\w+_detection\.yml|base/(dfine_hgnetv2|deim|rt_deim|rt_optimizer|rtdetrv2_r50vd)\.yml"
    r"|\.\./runtime\.yml)$"
)

TL, VL = "train_dataloader", "val_dataloader"
COLLATE, TRANSFORMS = f"{TL}.collate_fn", f"{TL}.dataset.transforms"
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
_MISSING = object()


@dataclasses.dataclass
class UpstreamConversion:
    tree: dict[str, Any]
    """The config in deim_ray's format (only the keys upstream determines)."""
    unhonoured: list[str]
    """One line per upstream key deim_ray cannot honour: `key=value: reason`."""
    sources: dict[KeyPath, KeyPath]
    """Our key path -> the upstream key path it came from (for error messages)."""


def is_upstream_config(raw: Mapping[str, Any]) -> bool:
    """True if `raw` (a config tree, best with includes resolved) is written in upstream DEIM's format."""
    if any(key in UPSTREAM_KEYS for key in raw):
        return True
    if isinstance(raw.get("model"), str) or (isinstance(raw.get("ema"), Mapping) and "type" in raw["ema"]):
        return True
    includes = raw.get("__include__") or []
    includes = [includes] if isinstance(includes, str) else includes
    return any(isinstance(p, str) and _UPSTREAM_INCLUDE.search(p.replace("\\", "/")) for p in includes)


def check_not_mixed(tree: Mapping[str, Any], where: str) -> None:
    """Reject a tree that mixes upstream keys with deim_ray sections (an include chain across formats)."""
    own = sorted(k for k in tree if k in OWN_SECTIONS or (k == "model" and isinstance(tree[k], Mapping)))
    if own:
        upstream = sorted(k for k in tree if k in UPSTREAM_KEYS)[:3] or ["model: DEIM"]
        named = ", ".join(f"{k} (deim_ray: {UPSTREAM_HINTS[k]})" if k in UPSTREAM_HINTS else k for k in upstream)
        raise ConfigError(
            f"{where} mixes deim_ray sections ({', '.join(own)}) with upstream DEIM keys ({named}); "
            f"use one format (convert upstream files with `deim-ray import-config`)"
        )


def convert_upstream(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """Resolve an upstream config's include chain and convert it: (tree in our format, unhonoured keys)."""
    tree, _ = resolve_file(path)
    if not is_upstream_config(tree):
        raise ConfigError(f"{display_path(path)} is already in deim_ray's format; load it with load_config")
    check_not_mixed(tree, display_path(path))
    conversion = convert_upstream_tree(tree)
    return conversion.tree, conversion.unhonoured


def convert_upstream_tree(tree: Mapping[str, Any]) -> UpstreamConversion:
    """Convert a resolved upstream tree (see module docstring)."""
    r = _Reader(tree)
    family = FAMILY_DECODERS.get(r.peek("DEIM.decoder"))
    if family is None:
        convert_model(r)
    else:  # D-FINE / RT-DETRv2 (config/families)
        r.ignore("DEIM.decoder")
        convert_family(r, family)
    _convert_schedule(r)
    _convert_lr(r)
    _convert_optimizer(r)
    _convert_train_loader(r)
    _convert_val_loader(r)
    _convert_runtime(r)
    r.report_leftovers()
    return UpstreamConversion(r.out, r.notes, r.sources)


def write_converted(path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> list[str]:
    """Convert an upstream config and write it as a resolved deim_ray YAML; returns the unhonoured keys."""
    from deim_ray.config.loader import dump_yaml  # loader imports this module

    tree, origins = resolve_file(path)
    if not is_upstream_config(tree):
        raise ConfigError(f"{display_path(path)} is already in deim_ray's format; nothing to import")
    where = display_path(path)
    check_not_mixed(tree, where)
    conversion = convert_upstream_tree(tree)
    config = build_config(conversion.tree, lambda p: upstream_origin(conversion, origins, p, where), str(path))
    header = [f"# converted from upstream DEIM-family config {where}"]
    if conversion.unhonoured:
        header += ["# not honoured (review these):", *(f"#   {line}" for line in conversion.unhonoured)]
    with output_file(out_path) as partial:
        partial.write_text("\n".join(header) + "\n" + dump_yaml(config), encoding="utf-8")
    return conversion.unhonoured


def upstream_origin(conversion: UpstreamConversion, origins: Mapping[KeyPath, str], path: KeyPath, default: str) -> str:
    """Where a converted key came from: the upstream file and key."""
    for cut in range(len(path), 0, -1):
        upstream = conversion.sources.get(path[:cut])
        if upstream is not None:
            return f"{origin_of(origins, upstream, default)}, upstream key `{'.'.join(upstream)}`"
    return default


class _Reader:
    """Reads an upstream tree, records what was read, and builds the converted tree."""

    def __init__(self, tree: Mapping[str, Any]) -> None:
        self.tree = tree
        self.used: set[KeyPath] = set()
        self.notes: list[str] = []
        self.out: dict[str, Any] = {}
        self.sources: dict[KeyPath, KeyPath] = {}

    def _lookup(self, key: str) -> Any:
        node: Any = self.tree
        for segment in key.split("."):
            if not isinstance(node, Mapping) or segment not in node:
                return _MISSING
            node = node[segment]
        return node

    def has(self, key: str) -> bool:
        return self._lookup(key) is not _MISSING

    def peek(self, key: str, default: Any = None) -> Any:
        value = self._lookup(key)
        return default if value is _MISSING else copy.deepcopy(value)

    def get(self, key: str, default: Any = None) -> Any:
        self.ignore(key)
        return self.peek(key, default)

    def ignore(self, key: str) -> None:
        self.used.add(tuple(key.split(".")))

    def put(self, ours: str, value: Any, upstream: str | None) -> None:
        *parents, leaf = ours.split(".")
        node = self.out
        for segment in parents:
            node = node.setdefault(segment, {})
        node[leaf] = value
        if upstream is not None:
            self.sources[tuple(ours.split("."))] = tuple(upstream.split("."))

    def take(self, upstream: str, ours: str) -> None:
        if self.has(upstream):
            self.put(ours, self.get(upstream), upstream)

    def expect(self, key: str, expected: Any) -> None:
        if self.has(key) and (value := self.get(key)) != expected:
            self.note(key, value, f"deim_ray always uses {expected!r}")

    def note(self, key: str, value: Any, reason: str) -> None:
        text = repr(value)
        self.notes.append(f"{key}={text if len(text) <= 80 else text[:77] + '...'}: {reason}")
        self.ignore(key)

    def report_leftovers(self) -> None:
        for path, value in _leaves(self.tree, ()):
            if not any(path[:cut] in self.used for cut in range(1, len(path) + 1)):
                self.note(".".join(path), value, "not recognised by deim_ray")


def _leaves(tree: Mapping[str, Any], prefix: KeyPath) -> list[tuple[KeyPath, Any]]:
    leaves = []
    for key, value in tree.items():
        path = (*prefix, str(key))
        leaves += _leaves(value, path) if isinstance(value, Mapping) and value else [(path, value)]
    return leaves


def _convert_schedule(r: _Reader) -> None:
    r.take("epoches", "schedule.epochs")
    stop = r.get(f"{COLLATE}.stop_epoch")
    if stop is None:
        r.note(f"{COLLATE}.stop_epoch", None, "upstream never enters stage 2 without it; set schedule.stop_epoch")
    else:
        r.put("schedule.stop_epoch", stop, f"{COLLATE}.stop_epoch")
    epochs = r.out.get("schedule", {}).get("epochs")
    if isinstance(stop, int) and isinstance(epochs, int) and 1 < epochs <= stop:
        # upstream's 72-epoch RT-DETRv2 R50/R101 baselines never reach their stop_epoch: a single stage
        r.note(f"{COLLATE}.stop_epoch", stop, f"upstream never enters stage 2 (epochs {epochs}); deim_ray's job has "
               f"two stages, so its last epoch runs as stage 2 (stop_epoch {epochs - 1})")
        r.put("schedule.stop_epoch", epochs - 1, f"{COLLATE}.stop_epoch")
    r.take(f"{COLLATE}.ema_restart_decay", "schedule.ema_restart_decay")


def _convert_lr(r: _Reader) -> None:
    kind = r.get("lrsheduler")
    if kind == "flatcosine":
        r.put("lr_scheduler.type", "flatcosine", "lrsheduler")
        r.ignore("lr_scheduler")  # built by upstream but unused while flatcosine drives the LR
        r.ignore("lr_warmup_scheduler")
        for key in ("warmup_iter", "flat_epoch", "no_aug_epoch", "lr_gamma"):
            r.take(key, f"lr_scheduler.{key}")
        _fit_flat_epoch(r)
    elif kind is None:
        for key in ("lr_scheduler", "lr_warmup_scheduler"):
            if r.has(key):
                r.note(key, r.get(key), "per-epoch schedulers are not supported; using a constant LR after warm-up")
        r.put("lr_scheduler.type", "constant", None)
        if r.has("lr_warmup_scheduler.warmup_duration"):
            r.put("lr_scheduler.warmup_iter", r.peek("lr_warmup_scheduler.warmup_duration"), "lr_warmup_scheduler")
        for key in ("warmup_iter", "flat_epoch", "no_aug_epoch", "lr_gamma"):
            r.ignore(key)  # only read by upstream's flatcosine
    else:
        raise ConfigError(f"upstream `lrsheduler: {kind}` is not supported; use flatcosine")


def _fit_flat_epoch(r: _Reader) -> None:
    _fit_flat_tail(r)
    _constant_lr_at_stop_epoch(r)


def _constant_lr_at_stop_epoch(r: _Reader) -> None:
    """With lr_gamma 1 the LR is constant after warm-up wherever the flat/tail split lies; place it at stop_epoch,
    as deim_ray's schedule check asks (upstream's plain D-FINE/RT-DETRv2 baselines write no_aug_epoch 0)."""
    lr, s = r.out.get("lr_scheduler", {}), r.out.get("schedule", {})
    epochs, stop = s.get("epochs"), s.get("stop_epoch")
    if lr.get("lr_gamma", 1.0) != 1.0 or not all(isinstance(v, int) for v in (epochs, stop)):
        return
    if lr.get("no_aug_epoch") != epochs - stop:
        r.put("lr_scheduler.no_aug_epoch", epochs - stop, "no_aug_epoch")
        r.put("lr_scheduler.flat_epoch", stop, "flat_epoch")


def _fit_flat_tail(r: _Reader) -> None:
    lr, epochs = r.out.get("lr_scheduler", {}), r.out.get("schedule", {}).get("epochs")
    flat, no_aug, gamma = lr.get("flat_epoch"), lr.get("no_aug_epoch"), lr.get("lr_gamma", 1.0)
    if not all(isinstance(v, int) for v in (flat, no_aug, epochs)) or flat <= epochs - no_aug:
        return
    limit = epochs - no_aug
    if flat < epochs and gamma != 1.0:
        reason = f"upstream holds the base LR into the no-aug phase; deim_ray reaches lr_gamma at epoch {limit}"
        r.note("flat_epoch", flat, reason)
    else:
        r.put("lr_scheduler.lr_gamma", 1.0, "lr_gamma")  # the LR never leaves the base value upstream
    r.put("lr_scheduler.flat_epoch", limit, "flat_epoch")


def _convert_optimizer(r: _Reader) -> None:
    for key in ("type", "lr", "betas", "weight_decay"):
        r.take(f"optimizer.{key}", f"optimizer.{key}")
    if not r.has("optimizer.params"):
        return
    groups = []
    for i, group in enumerate(r.get("optimizer.params") or []):
        where = f"optimizer.params[{i}]"
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), str):
            r.note(where, group, "a param group needs a `params` regex")
            continue
        pattern = _translate_regex(r, group["params"])
        if pattern is None:
            r.note(f"{where}.params", group["params"], "regex over upstream module names kept as is; "
                   "check it against deim_ray's (transformers) parameter names")
        entry = {"params": pattern or group["params"]}
        for key, value in group.items():
            if key in ("lr", "weight_decay"):
                entry[key] = value
            elif key != "params":
                r.note(f"{where}.{key}", value, "per-group setting not supported (only lr and weight_decay)")
        groups.append(entry)
    r.put("optimizer.params", groups, "optimizer.params")


def _translate_regex(r: _Reader, pattern: str) -> str | None:
    family = FAMILY_DECODERS.get(r.peek("DEIM.decoder"))
    return translate_param_regex(pattern) if family is None else translate_family_regex(family, pattern)


def _convert_train_loader(r: _Reader) -> None:
    for key, expected in (("type", "DataLoader"), ("shuffle", True), ("drop_last", True)):
        r.expect(f"{TL}.{key}", expected)
    r.take(f"{TL}.total_batch_size", "data.total_batch_size")
    if r.has(f"{TL}.batch_size"):
        r.note(f"{TL}.batch_size", r.get(f"{TL}.batch_size"), "per-rank batch size: set data.total_batch_size instead")
    r.take(f"{TL}.num_workers", "data.num_workers")
    _convert_dataset(r, TL, "train")
    _convert_policy(r)
    _convert_collate(r)
    train_size = _convert_train_ops(r)
    eval_size = r.get("eval_spatial_size")
    size = eval_size if eval_size is not None else train_size
    if size is not None:
        r.put("data.image_size", size, "eval_spatial_size" if eval_size is not None else f"{TRANSFORMS}.ops")
    if train_size is not None and size is not None and list(train_size) != list(size):
        r.note(f"{TRANSFORMS}.ops.Resize.size", train_size, f"deim_ray trains and evaluates at data.image_size {size}")


def _convert_dataset(r: _Reader, loader: str, split: str) -> None:
    dataset = f"{loader}.dataset"
    for key, expected in (("type", "CocoDetection"), ("return_masks", False), ("transforms.type", "Compose")):
        r.expect(f"{dataset}.{key}", expected)
    r.take(f"{dataset}.img_folder", f"data.{split}.img_folder")
    r.take(f"{dataset}.ann_file", f"data.{split}.ann_file")


def _convert_policy(r: _Reader) -> None:
    policy = f"{TRANSFORMS}.policy"
    r.expect(f"{policy}.name", "stop_epoch")
    if not r.has(f"{policy}.epoch"):
        reason = "without it upstream runs every op in every epoch; deim_ray gates them by augment.policy_epoch"
        r.note(policy, None, reason)
    r.take(f"{policy}.epoch", "augment.policy_epoch")
    _end_policy_by_stop_epoch(r, policy)
    r.take(f"{policy}.ops", "augment.policy_ops")
    # Upstream's default mosaic_prob (-0.1) means "never"; any negative value does.
    prob = r.get(f"{TRANSFORMS}.mosaic_prob", 0.0)
    prob = max(prob, 0.0) if isinstance(prob, (int, float)) else prob
    r.put("augment.mosaic_prob", prob, f"{TRANSFORMS}.mosaic_prob")


def _end_policy_by_stop_epoch(r: _Reader, policy: str) -> None:
    value, stop = r.out.get("augment", {}).get("policy_epoch"), r.out.get("schedule", {}).get("stop_epoch")
    epochs = value if isinstance(value, list) else [value]  # upstream writes one epoch as a scalar
    if not (isinstance(stop, int) and epochs and all(isinstance(e, int) for e in epochs)) or epochs[-1] <= stop:
        return
    # upstream's rtdetrv2_r18vd_120e_coco: stop_epoch 72 from its base, policy 117
    r.note(f"{policy}.epoch", value, f"strong augmentation ends at stop_epoch {stop} in deim_ray (policy_epoch "
           "clamped to it); upstream keeps it past its stage switch")
    r.put("augment.policy_epoch", [min(e, stop) for e in epochs], f"{policy}.epoch")


def _convert_collate(r: _Reader) -> None:
    c = COLLATE
    r.expect(f"{c}.type", "BatchImageCollateFunction")
    repeat = r.get(f"{c}.base_size_repeat")
    r.put("augment.base_size_repeat", repeat, f"{c}.base_size_repeat")
    if r.has(f"{c}.base_size") or repeat is not None:
        r.put("augment.base_size", r.get(f"{c}.base_size", 640), f"{c}.base_size")  # upstream default 640
    stop = r.peek(f"{c}.stop_epoch")
    for name in ("mixup", "copyblend"):
        prob = r.get(f"{c}.{name}_prob", 0.0)
        r.put(f"augment.{name}_prob", prob, f"{c}.{name}_prob")
        epochs = _epoch_range(r.get(f"{c}.{name}_epochs", [0, 0]), prob, stop)
        r.put(f"augment.{name}_epochs", epochs, f"{c}.{name}_epochs")
    for key in ("area_threshold", "num_objects", "with_expand", "expand_ratios"):
        r.take(f"{c}.{key}", f"augment.copyblend.{key}")
    r.expect(f"{c}.copyblend_type", "blend")
    r.expect(f"{c}.random_num_objects", False)


def _epoch_range(value: Any, prob: Any, stop: Any) -> Any:
    """[0, 0] for a range that can never fire (empty, or disabled and reaching past stage 1)."""
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
        return value
    start, end = value
    beyond_stage1 = isinstance(stop, int) and end > stop
    return [0, 0] if start >= end or (prob == 0 and beyond_stage1) else value


# Train op -> {parameter: our key, or ("=", value) when only that value is supported}.
_TRAIN_OPS: dict[str, dict[str, Any]] = {
    "Mosaic": {
        **{k: f"augment.mosaic.{k}" for k in ("output_size", "rotation_range", "translation_range", "scaling_range",
                                              "use_cache", "max_cached_images", "random_pop")},
        "probability": ("=", 1.0), "fill_value": ("=", 0),
    },
    "RandomPhotometricDistort": {"p": "augment.photometric_p"},
    "RandomZoomOut": {"p": "augment.zoom_out_p", "side_range": "augment.zoom_out_side_range", "fill": ("=", 0)},
    "RandomIoUCrop": {"p": "augment.iou_crop_p"},
    "RandomHorizontalFlip": {"p": "augment.flip_p"},
    "SanitizeBoundingBoxes": {"min_size": "augment.sanitize_min_size"},
    "Resize": {"size": None},
    "ConvertPILImage": {"dtype": ("=", "float32"), "scale": ("=", True)},
    "Normalize": {"mean": ("=", IMAGENET["mean"]), "std": ("=", IMAGENET["std"])},
    "ConvertBoxes": {"fmt": ("=", "cxcywh"), "normalize": ("=", True)},
}
# Probability of each optional op: its value when the op is listed without `p`, and the key set to 0 when absent.
_OP_PROBABILITY = {
    "Mosaic": ("augment.mosaic_prob", None),
    "RandomPhotometricDistort": ("augment.photometric_p", 0.5),
    "RandomZoomOut": ("augment.zoom_out_p", 0.5),
    "RandomIoUCrop": ("augment.iou_crop_p", 1.0),
    "RandomHorizontalFlip": ("augment.flip_p", 0.5),
}


def _convert_train_ops(r: _Reader) -> list[int] | None:
    """Map the train op list; returns the Resize size (if any)."""
    seen, size = set(), None
    for key, kind, params in _ops(r, f"{TRANSFORMS}.ops", _TRAIN_OPS):
        seen.add(kind)
        size = params.get("size", size)
        for param, value in params.items():
            _apply_op_param(r, f"{key}.{param}", _TRAIN_OPS[kind].get(param, _MISSING), value)
        default_p = _OP_PROBABILITY.get(kind, (None, None))
        if default_p[1] is not None and "p" not in params:
            r.put(default_p[0], default_p[1], None)
    for kind, (ours, _) in _OP_PROBABILITY.items():
        if kind not in seen:
            r.put(ours, 0.0, f"{TRANSFORMS}.ops")
    r.put("data.normalize", "Normalize" in seen, f"{TRANSFORMS}.ops")
    return size


def _ops(r: _Reader, key: str, known: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(note key, op type, parameters) for each supported op in an upstream op list; reports the others."""
    ops = r.get(key)
    found = []
    for i, op in enumerate(ops if isinstance(ops, list) else []):
        op_key = f"{key}[{i}]"
        if not isinstance(op, Mapping) or "type" not in op:
            r.note(op_key, op, "not an op mapping with a `type`")
        elif op["type"] not in known:
            r.note(op_key, op["type"], "transform not supported by deim_ray's pipeline")
        else:
            found.append((f"{op_key}.{op['type']}", op["type"], {k: v for k, v in op.items() if k != "type"}))
    return found


def _apply_op_param(r: _Reader, key: str, target: Any, value: Any) -> None:
    if target is _MISSING:
        r.note(key, value, "parameter not supported")
    elif isinstance(target, tuple) and value != target[1]:
        r.note(key, value, f"deim_ray always uses {target[1]!r}")
    elif isinstance(target, str):
        r.put(target, value, None)


def _convert_val_loader(r: _Reader) -> None:
    for key, expected in (("type", "DataLoader"), ("shuffle", False), ("drop_last", False),
                          ("collate_fn.type", "BatchImageCollateFunction")):
        r.expect(f"{VL}.{key}", expected)
    r.take(f"{VL}.total_batch_size", "data.val_batch_size")
    if r.has(f"{VL}.batch_size"):
        r.note(f"{VL}.batch_size", r.get(f"{VL}.batch_size"), "per-rank batch size: set data.val_batch_size instead")
    workers = r.get(f"{VL}.num_workers")
    if workers is not None and workers != r.peek(f"{TL}.num_workers"):
        r.note(f"{VL}.num_workers", workers, "deim_ray uses data.num_workers for both loaders")
    _convert_dataset(r, VL, "val")
    size, normalize = r.out.get("data", {}).get("image_size"), r.out.get("data", {}).get("normalize", False)
    val_ops = {kind: _TRAIN_OPS[kind] for kind in ("Resize", "ConvertPILImage", "Normalize")}
    seen = set()
    for key, kind, params in _ops(r, f"{VL}.dataset.transforms.ops", val_ops):
        seen.add(kind)
        if kind == "Resize" and size is not None and list(params.get("size", [])) != list(size):
            r.note(f"{key}.size", params.get("size"), f"deim_ray evaluates at data.image_size {size}")
        for param, value in params.items():
            _apply_op_param(r, f"{key}.{param}", val_ops[kind].get(param, _MISSING), value)
    if ("Normalize" in seen) != normalize:
        reason = "train and val must normalise alike (data.normalize)"
        r.note(f"{VL}.dataset.transforms.ops", "Normalize" in seen, reason)


# Upstream keys with no deim_ray setting, and why.
_NO_SETTING = {
    "num_classes": "no deim_ray key: the classes are the annotation file's categories",
    "remap_mscoco_category": "no deim_ray key: category ids always map to contiguous classes and back",
    "output_dir": "runs are written to --storage/--name",
    "summary_dir": "metrics go to metrics.jsonl in the run directory",
    "checkpoint_freq": "deim_ray checkpoints every epoch (see train.keep_checkpoints)",
    "find_unused_parameters": "not configurable in deim_ray",
    "print_method": "not configurable in deim_ray",
    "print_rank": "not configurable in deim_ray",
    "device": "devices come from Ray (--gpu)",
    "resume": "re-run the same deim-ray train command to resume",
    "tuning": "set model.pretrained to fine-tune from a checkpoint",
    "last_epoch": "resume state comes from the run's checkpoints",
}


def _convert_runtime(r: _Reader) -> None:
    r.take("use_amp", "train.use_amp")
    r.take("sync_bn", "train.sync_bn")
    if r.has("scaler"):
        scaler = r.get("scaler")
        if isinstance(scaler, Mapping) and scaler.get("type") == "GradScaler" and scaler.get("enabled", True):
            r.put("train.amp_dtype", "float16", "scaler")  # upstream AMP is float16 with a GradScaler
        else:
            r.note("scaler", scaler, "only GradScaler (float16 AMP) is supported")
    r.take("use_ema", "ema.enabled")
    r.expect("ema.type", "ModelEMA")
    for key in ("decay", "warmups", "start"):
        r.take(f"ema.{key}", f"ema.{key}")
    for key in ("clip_max_norm", "print_freq", "seed"):
        r.take(key, f"train.{key}")
    expected = {"task": "detection", "use_focal_loss": True, "evaluator.type": "CocoEvaluator",
                "evaluator.iou_types": ["bbox"], "criterion": "DEIMCriterion", "postprocessor": "PostProcessor"}
    for key, value in expected.items():
        r.expect(key, value)
    for key, reason in _NO_SETTING.items():
        if r.has(key):
            r.note(key, r.get(key), reason)
