"""Bad input, table-driven, through the real command line (`deim_ray.cli.main.main`, in process).

Every case must end with exit status 2 and ONE stderr line `deim-ray: error: ...` that names the problem and
the fix (no traceback, no password it was fed), and must leave the case's files (data, config, an existing run
directory, files it was told to write over) byte-for-byte untouched. All of them fail before a Ray worker
starts: argument and config checks (YAML bombs, deep nesting, encodings), the driver's preflight (data, images
and weights files), storage URI and run-name checks, the config-hash check of an existing run; only the
cluster-capacity case needs Ray (the session's local instance, 2 CPUs). Cases whose environment matters (S3
endpoints, Ray addresses) run as separate processes in test_hostile_input.py.

A second table covers input that is not an error but must be handled the documented way (corrupt images,
degenerate and NaN boxes are skipped and counted by the data layer; 16-bit and EXIF-rotated images are read as
shown), checkpoint files a resume refuses, and a fine-tune across class counts. Last, the safety rules: every torch.load in the package is weights-only.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import yaml
from PIL import Image

from deim_ray.cli.main import main
from deim_ray.config.loader import config_sha256, load_config
from deim_ray.config.schema import SyntheticConfig
from deim_ray.data.coco import CocoDetection
from deim_ray.data.errors import DataError
from deim_ray.data.synthetic import generate_shapes
from deim_ray.driver.preflight import absolute_paths, preflight
from deim_ray.driver.run import RunRequest, open_run
from deim_ray.engine.state import CheckpointError, load_train_state, make_train_state, save_train_state
from deim_ray.models.build import build_model
from deim_ray.models.pretrained import load_pretrained
from deim_ray.storage import RunState, RunStore, open_storage

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "demo" / "tiny.yml"
URL_PASSWORD = "UrlPassw0rd-Xy9q"
FILE_SECRET = "hunter2-Pw-5Rt8"


class Payload:
    """Any class outside torch's allow-list: pickling it makes a file `weights_only=True` must refuse."""

    def __reduce__(self):
        # eval, not print: once Ray has started in this process, `print` is Ray's wrapper and pickles by its name
        return (eval, ("'this must never run'",))


@dataclass
class Env:
    """One case's world: a valid dataset and config, and a run `existing` already in the storage root."""

    tmp: Path
    data: Path
    config: Path
    storage: Path

    def tree(self) -> dict:
        return yaml.safe_load(self.config.read_text())

    def write_config(self, tree: dict, name: str = "case.yml") -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(tree))
        return path

    def ann(self, split: str) -> Path:
        return self.data / "annotations" / f"{split}.json"

    def edit_ann(self, split: str, edit: Callable[[dict], None]) -> None:
        doc = json.loads(self.ann(split).read_text())
        edit(doc)
        self.ann(split).write_text(json.dumps(doc))

    def train(self, *extra: str, config: Path | None = None, name: str = "existing") -> list[str]:
        return ["train", "-c", str(config or self.config), "--storage", str(self.storage), "--name", name,
                "--workers", "2", *extra]


@pytest.fixture(autouse=True)
def _fresh_log_handler():
    """`main` binds deim_ray's log handler to the stderr of its first call; capsys replaces that per test."""
    yield
    logger = logging.getLogger("deim_ray")
    for handler in [h for h in logger.handlers if getattr(h, "_deim_ray", False)]:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input_data") / "shapes"
    generate_shapes(root, SyntheticConfig(num_train=6, num_val=4, image_size=64, num_classes=3, max_objects=3))
    return root


@pytest.fixture
def env(pristine, tmp_path) -> Env:
    data = tmp_path / "shapes"
    for path in pristine.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            (data / path.relative_to(pristine)).parent.mkdir(parents=True, exist_ok=True)
            (data / path.relative_to(pristine)).write_bytes(path.read_bytes())
    return Env(tmp_path, data, *config_and_existing_run(tmp_path, data))


def config_and_existing_run(tmp: Path, data: Path) -> tuple[Path, Path]:
    """`tmp/config.yml` (the tiny config on the shapes in `data`) and `tmp/runs` holding run `existing` in stage 1
    with one committed epoch (its `last`): a run with work to lose."""
    tree = yaml.safe_load(TINY.read_text())
    tree["data"].update(train={"img_folder": str(data / "train"), "ann_file": str(data / "annotations/train.json")},
                        val={"img_folder": str(data / "val"), "ann_file": str(data / "annotations/val.json")},
                        synthetic=None)
    config = tmp / "config.yml"
    config.write_text(yaml.safe_dump(tree))
    storage = tmp / "runs"
    store = RunStore(open_storage(str(storage)), "existing")
    open_run(RunRequest(cfg=load_config(config), storage_uri=str(storage), name="existing"), store)
    (tmp / "state.pt").write_bytes(b"a committed epoch")
    store.put_artifact("last", tmp / "state.pt", epoch=0, stage=1, ap=0.1)
    (tmp / "state.pt").unlink()
    store.update_manifest(lambda m: setattr(m, "holder", None))  # its driver has ended: no live holder
    return config, storage


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ---- the cases: (id, build argv from the Env, words the error line must contain) ----------------------------------

def _yaml_text(text: str | bytes) -> Callable[[Env], list[str]]:
    def make(e: Env) -> list[str]:
        path = e.tmp / "case.yml"
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return e.train(config=path)
    return make


def _tree_edit(edit: Callable[[dict], None]) -> Callable[[Env], list[str]]:
    def make(e: Env) -> list[str]:
        tree = e.tree()
        edit(tree)
        return e.train(config=e.write_config(tree))
    return make


def _ann_edit(split: str, edit: Callable[[dict], None]) -> Callable[[Env], list[str]]:
    def make(e: Env) -> list[str]:
        e.edit_ann(split, edit)
        return e.train()
    return make


def _include_cycle(e: Env) -> list[str]:
    (e.tmp / "a.yml").write_text("__include__: [b.yml]\n")
    (e.tmp / "b.yml").write_text("__include__: [a.yml]\n")
    return e.train(config=e.tmp / "a.yml")


def _ann_text(split: str, text: str) -> Callable[[Env], list[str]]:
    def make(e: Env) -> list[str]:
        e.ann(split).write_text(text)
        return e.train()
    return make


def _pretrained(write: Callable[[Path], None], name: str = "weights.pth") -> Callable[[Env], list[str]]:
    def make(e: Env) -> list[str]:
        weights = e.tmp / name
        write(weights)
        return e.train("-u", f"model.pretrained={weights}")
    return make


def _truncated_weights(path: Path) -> None:
    torch.save({"model.w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])


def _alias_bomb(open_: str, close: str) -> str:
    """A "billion laughs" document: 10 values, each level 10 aliases of the one below, 8 levels (10**9)."""
    lines = [f"l0: &l0 {open_}" + ", ".join(f"k{i}: 1" if open_ == "{" else "1" for i in range(10)) + close]
    for n in range(1, 9):
        refs = [f"k{i}: *l{n - 1}" if open_ == "{" else f"*l{n - 1}" for i in range(10)]
        lines.append(f"l{n}: &l{n} {open_}" + ", ".join(refs) + close)
    return "\n".join(lines) + "\n"


def _include_secret(e: Env) -> list[str]:
    (e.tmp / "passwd").write_text(f"root:x:0:0:{FILE_SECRET}:/root:/bin/bash\nadmin: {FILE_SECRET}\n")
    return _yaml_text("__include__: [passwd]\n")(e)


def _include_shadow(e: Env) -> list[str]:
    """A shadow-style file parses as YAML (`root:$6$...:7::` is a key); its lines must not reach the error."""
    (e.tmp / "shadow").write_text(f"root:$6${FILE_SECRET}:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n")
    return _yaml_text("__include__: [../../../../../../..{}]\n".format(e.tmp / "shadow"))(e)


def _convert_pickle(e: Env) -> list[str]:
    torch.save({"ema": {"module": Payload()}}, e.tmp / "upstream.pth")
    return ["convert-weights", str(e.tmp / "upstream.pth"), "-c", str(e.config), "-o", str(e.tmp / "final.pth")]


def _unusable_boxes(doc: dict) -> None:
    for a in doc["annotations"]:
        a["bbox"] = [5, 5, 0, 3] if a["id"] % 2 else [float("nan"), 1, 2, 3]


def _pickle_folder(path: Path) -> None:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "deimv2"}))
    torch.save({"model.w": Payload()}, path / "pytorch_model.bin")


def _storage_under_a_file(e: Env) -> list[str]:
    (e.tmp / "file").write_bytes(b"x")
    return ["train", "-c", str(e.config), "--storage", str(e.tmp / "file" / "runs"), "--name", "r"]


def _damaged_manifest(e: Env) -> list[str]:
    manifest = e.storage / "existing" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"artifacts": {', '"artifacts": [], "was": {'))
    return e.train()


def _show_augment(*extra: str) -> Callable[[Env], list[str]]:
    return lambda e: ["show-augment", "-c", str(e.config), *extra]


def _show_augment_over(e: Env) -> list[str]:
    (e.tmp / "notes.png").write_bytes(b"not yours")
    return _show_augment("--epoch", "0", "-o", str(e.tmp / "notes.png"))(e)


def _show_augment_under_a_file(e: Env) -> list[str]:
    (e.tmp / "file").write_bytes(b"x")
    return _show_augment("--epoch", "0", "-o", str(e.tmp / "file" / "grid.png"))(e)


def _backbone_file(variant: str, other: str) -> Callable[[Env], list[str]]:
    """A backbone file in upstream's layout written from another model's backbone (`other`)."""
    def make(e: Env) -> list[str]:
        from deim_ray.config.schema import ModelConfig

        model = build_model(ModelConfig(variant=other), 3)
        prefix = "model.conv_encoder.model."
        state = {k[len(prefix):].replace("embedder.", "stem.").replace("encoder.stages.", "stages.")
                 .replace(".convolution.", ".conv.").replace(".normalization.", ".bn."): v
                 for k, v in model.state_dict().items() if k.startswith(prefix)}
        torch.save(state, e.tmp / "backbone.pth")
        return e.train("-u", f"model.variant={variant}", "model.num_queries=100",
                       f"model.backbone_pretrained={e.tmp}/backbone.pth")
    return make


def _set(section: str, key: str, value):
    return lambda tree: tree[section].__setitem__(key, value)


def _mismatched_categories(doc: dict) -> None:
    doc["categories"] = doc["categories"][:2]
    doc["annotations"] = [a for a in doc["annotations"] if a["category_id"] in (1, 3)]


CLI_CASES = [
    ("malformed-yaml", _yaml_text("model: [unclosed\n"), ["malformed YAML", "line"]),
    ("unknown-key-with-suggestion", _yaml_text("model:\n  variantt: tiny\n"), ["model.variantt", "did you mean"]),
    ("wrong-type", _tree_edit(_set("schedule", "epochs", "many")), ["schedule.epochs", "integer"]),
    ("missing-include", _yaml_text("__include__: [nope.yml]\n"), ["nope.yml", "not found"]),
    ("include-cycle", _include_cycle, ["include cycle", "remove one"]),
    ("missing-config-file", lambda e: e.train(config=e.tmp / "nope.yml"), ["nope.yml"]),
    ("unknown-override-key", lambda e: e.train("-u", "optimizer.lrr=0.1"), ["optimizer.lrr", "did you mean"]),
    ("inconsistent-schedule", lambda e: e.train("-u", "augment.mixup_epochs=[0,3]"),
     ["augment.mixup_epochs", "stop_epoch"]),
    ("stop-epoch-beyond-epochs", lambda e: e.train("-u", "schedule.stop_epoch=9"), ["schedule.stop_epoch"]),
    ("batch-not-divisible-by-workers", lambda e: e.train("--workers", "3"), ["total_batch_size", "--workers (3)"]),
    ("zero-workers", lambda e: e.train("--workers", "0"), ["--workers", "at least 1"]),
    ("negative-max-failures", lambda e: e.train("--max-failures", "-1"), ["--max-failures"]),
    ("missing-image-folder", lambda e: e.train("-u", f"data.train.img_folder={e.tmp}/nowhere"),
     ["image folder", "does not exist", "data.train.img_folder"]),
    ("missing-annotation-file", lambda e: e.train("-u", f"data.val.ann_file={e.tmp}/none.json"),
     ["annotation file", "does not exist", "ann_file"]),
    ("annotation-json-malformed", _ann_text("train", '{"images": [1, '), ["not valid JSON", "repair"]),
    ("annotation-not-coco", _ann_text("val", '{"images": []}'), ["not COCO detection format"]),
    ("category-id-unknown", _ann_edit("train", lambda d: d["annotations"][0].__setitem__("category_id", 999)),
     ["category_id 999", "not in `categories`"]),
    ("duplicate-category-id", _ann_edit("val", lambda d: d["categories"].append(dict(d["categories"][0]))),
     ["repeats a category id"]),
    ("annotation-of-unknown-image", _ann_edit("train", lambda d: d["annotations"][0].__setitem__("image_id", 777)),
     ["image_id 777", "not in `images`"]),
    ("empty-dataset", _ann_edit("train", lambda d: d.update(images=[], annotations=[])), ["lists no images"]),
    ("val-without-annotations", _ann_edit("val", lambda d: d.update(annotations=[])),
     ["no annotations", "ground-truth"]),
    ("train-val-categories-differ", _ann_edit("val", _mismatched_categories), ["different categories"]),
    ("image-folder-without-the-files", lambda e: e.train("-u", f"data.val.img_folder={e.data}/annotations"),
     ["sampled image files", "data.val.img_folder"]),
    ("pretrained-missing", lambda e: e.train("-u", f"model.pretrained={e.tmp}/none.pth"),
     ["model.pretrained", "does not exist"]),
    ("pretrained-truncated", _pretrained(_truncated_weights), ["weights_only=True"]),
    ("pretrained-pickle-payload", _pretrained(lambda p: torch.save({"model": Payload()}, p)),
     ["weights_only=True"]),
    ("storage-uri-malformed", lambda e: ["train", "-c", str(e.config), "--storage", "s3://", "--name", "x"],
     ["s3://"]),
    ("run-name-with-separator", lambda e: e.train(name="team/run"), ["run name", "no '/'"]),
    ("run-name-dot-dot", lambda e: e.train(name=".."), ["run name"]),
    ("existing-run-other-config", lambda e: e.train("-u", "optimizer.lr=0.001"),
     ["another config", "optimizer.lr", "--restart"]),
    ("workers-beyond-the-cluster", lambda e: e.train("--workers", "4"), ["needs 4 CPU", "has 2", "lower --workers"]),
    # broken and hostile input (issue 15)
    ("cpus-per-worker-nan", lambda e: e.train("--cpus-per-worker", "nan"), ["--cpus-per-worker", "finite"]),
    ("cpus-per-worker-inf", lambda e: e.train("--cpus-per-worker", "inf"), ["--cpus-per-worker", "finite"]),
    ("workers-not-a-number", lambda e: e.train("--workers", "two"), ["--workers", "not an integer"]),
    ("config-endpoint-with-password-and-bad-port",
     lambda e: ["train", "-c", str(e.config), "--storage", "s3://bucket-x/runs", "--name", "r", "-u",
                f"storage.endpoint_url=http://KEYID:{URL_PASSWORD}@127.0.0.1:99999"],
     ["storage.endpoint_url", "valid port"]),
    ("yaml-mapping-alias-bomb", _yaml_text(_alias_bomb("{", "}")), ["aliases", "refusing"]),
    ("yaml-list-alias-bomb", _yaml_text(_alias_bomb("[", "]")), ["aliases", "refusing"]),
    ("yaml-alias-containing-itself", _yaml_text("a: &a {b: *a}\n"), ["contains itself"]),
    ("yaml-nested-20000-deep", _yaml_text("a: " + "[" * 20_000 + "]" * 20_000), ["nests", "deep"]),
    ("config-not-utf8", _yaml_text(b'model: {variant: "\xff\xfe"}\n'), ["not UTF-8"]),
    ("include-of-a-password-file", _include_secret, ["passwd", "not a YAML config"]),
    ("include-of-a-shadow-file", _include_shadow, ["shadow", "not a YAML config"]),
    ("annotation-json-100000-deep", _ann_text("train", "[" * 100_000 + "]" * 100_000), ["nests JSON too deeply"]),
    ("train-boxes-all-unusable", _ann_edit("train", _unusable_boxes), ["no usable box", "NaN"]),
    ("image-8000x8000", _ann_edit("val", lambda d: d["images"][0].update(width=8000, height=8000)),
     ["8000x8000", "MP"]),
    ("annotation-id-2**70", _ann_edit("train", lambda d: d["annotations"][0].__setitem__("id", 2 ** 70)),
     ["64-bit integer"]),
    ("safetensors-garbage", _pretrained(lambda p: p.write_bytes(b"\x08" + b"\x00" * 7 + b"garbage!"),
                                        "w.safetensors"), ["safetensors"]),
    ("safetensors-huge-header", _pretrained(lambda p: p.write_bytes(struct.pack("<Q", 2 ** 40) + b"{}"),
                                            "w.safetensors"), ["safetensors"]),
    ("pth-pickle-payload-says-why", _pretrained(lambda p: torch.save({"model": Payload()}, p)),
     ["would run code", "weights_only=True"]),
    ("convert-weights-pickle-payload", _convert_pickle, ["would run code", "object eval"]),
    ("pretrained-folder-pickle-payload", _pretrained(_pickle_folder, "weights"), ["would run code"]),
    ("storage-under-a-file", _storage_under_a_file, ["which is a file"]),
    ("damaged-manifest-of-the-run", _damaged_manifest, ["`artifacts`", "damaged"]),
    ("show-augment-over-an-existing-file", _show_augment_over, ["exists", "--force"]),
    ("show-augment-under-a-file", _show_augment_under_a_file, ["is a file"]),
    ("show-augment-negative-epoch", _show_augment("--epoch", "-5"), ["--epoch", "at least 0"]),
    ("show-augment-epoch-beyond-schedule", _show_augment("--epoch", "99"), ["--epoch 99", "beyond"]),
    # what a worker refused after Ray had started, now refused by preflight (issue 21)
    ("backbone-file-missing", lambda e: e.train("-u", "model.variant=atto",
                                                f"model.backbone_pretrained={e.tmp}/weight/PPHGNetV2_B0_stage1.pth"),
     ["model.backbone_pretrained", "does not exist", "PPHGNetV2_B0_stage1.pth", "null"]),
    ("backbone-file-of-another-model", _backbone_file("n", "hgnetv2_m"), ["does not fit", "PPHGNetV2_B0"]),
    ("image-size-too-small-for-the-queries", lambda e: e.train("-u", "model.num_queries=300",
                                                               "data.image_size=[64,64]"),
     ["64x64", "encoder tokens", "num_queries=300", "at least"]),
    ("model-extra-unknown-key", lambda e: e.train("-u", "model.extra={decoder_layerz: 2}"),
     ["decoder_layerz", "did you mean"]),
    ("batch-larger-than-the-training-set", lambda e: e.train("-u", "data.total_batch_size=8"),
     ["6 images", "fewer than one batch", "total_batch_size"]),
    ("model-name-unknown", lambda e: ["train", "--data", str(e.data), "--model", "deimv2-nano"], ["--model",
                                                                                                  "deimv2-n"]),
    ("model-without-data", lambda e: ["train", "--model", "deimv2-atto"], ["needs --data"]),
    ("config-and-model", lambda e: ["train", "-c", str(e.config), "--model", "deimv2-atto", "--data", str(e.data)],
     ["not both"]),
]

INFO_CASES = ["backbone-file-missing", "backbone-file-of-another-model", "image-size-too-small-for-the-queries",
              "model-extra-unknown-key", "batch-larger-than-the-training-set", "missing-image-folder",
              "train-val-categories-differ", "pretrained-missing", "model-name-unknown"]
"""Cases `info` must refuse exactly as `train` does (the same preflight)."""


@pytest.mark.parametrize("make_argv, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(make_argv, words, env, capsys, request):
    needs_ray = "beyond-the-cluster" in request.node.name
    if needs_ray:
        request.getfixturevalue("ray_local")  # the only case that needs a cluster to ask
    ray_before = ray.is_initialized()
    argv = make_argv(env)
    before = _snapshot(env.tmp)
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert needs_ray or ray.is_initialized() == ray_before, "the error came after Ray was started"
    errors = [line for line in err.splitlines() if line.startswith("deim-ray: error:")]
    assert rc == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    assert URL_PASSWORD not in out + err and FILE_SECRET not in out + err
    assert not re.search(r"weights_only.{0,20}False", out + err)  # never advice to load a file unsafely
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert _snapshot(env.tmp) == before


def test_the_matrix_is_large_enough():
    assert len(CLI_CASES) >= 63


def _as_info(argv: list[str]) -> list[str]:
    """`train ... ARGS` as `info ARGS` (no storage or run arguments, no loader measurement)."""
    out, skip = ["info", "--no-loader"], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in ("--storage", "--name"):
            skip = True
        else:
            out.append(arg)
    return out


@pytest.mark.parametrize("case", INFO_CASES)
def test_info_refuses_what_train_refuses(case, env, capsys):
    make_argv, words = next(c[1:] for c in CLI_CASES if c[0] == case)
    argv = make_argv(env)
    capsys.readouterr()
    assert main(argv) == 2
    train_error = capsys.readouterr().err.strip().splitlines()[-1]
    assert main(_as_info(argv)) == 2
    info_err = capsys.readouterr().err
    assert info_err.strip().splitlines() == [train_error], info_err


def test_a_changed_config_starts_over_when_no_epoch_was_committed(env):
    """A stage that failed before its first committed epoch: the same command with the config fixed starts the
    run over (it had nothing to lose) instead of refusing the new config."""
    storage = env.tmp / "fresh-runs"
    store = RunStore(open_storage(str(storage)), "r")
    first = open_run(RunRequest(cfg=load_config(env.config), storage_uri=str(storage), name="r"), store)
    store.transition(RunState.STAGE1_RUNNING, note="stage 1 started")
    store.transition(RunState.FAILED, note="stage 1: a worker refused the input")
    fixed = load_config(env.config, ["optimizer.lr=0.001"])
    again = open_run(RunRequest(cfg=fixed, storage_uri=str(storage), name="r"), store)
    assert again.state is RunState.NEW and again.attempt == first.attempt + 1
    assert again.config_sha256 == config_sha256(fixed) != first.config_sha256


# ---- handled, not refused ------------------------------------------------------------------------------------------

def _dataset(env: Env, split: str = "train") -> CocoDetection:
    return CocoDetection(env.data / split, env.ann(split))


def test_corrupt_and_truncated_images_are_skipped_with_a_count(env, caplog):
    images = sorted((env.data / "train").glob("*.jpg"))
    images[0].write_bytes(b"not an image at all")
    images[1].write_bytes(images[1].read_bytes()[: images[1].stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="deim_ray.data"):
        ds = _dataset(env)
    assert ds.report.skipped_images == {"unreadable": [images[0].name], "truncated": [images[1].name]}
    assert len(ds) == len(images) - 2 and ds.report.num_skipped == 2
    assert any("skipped 2 image file(s)" in r.getMessage() for r in caplog.records)


def test_degenerate_and_out_of_image_boxes_are_clamped_or_dropped(env):
    def edit(doc):
        anns = doc["annotations"]
        anns[0]["bbox"] = [10, 10, 0, 5]          # no width: dropped
        anns[1]["bbox"] = [70, 70, 20, 20]        # entirely outside the 64 px image: dropped
        anns[2]["bbox"] = [-10, -10, 30, 30]      # partly outside: clamped to the image
        doc["annotations"] = anns[:3]
    env.edit_ann("train", edit)
    ds = _dataset(env)
    assert ds.report.degenerate == 2
    boxes = torch.cat([torch.as_tensor(r.boxes) for r in ds.records])
    assert boxes.shape == (1, 4) and boxes[0].tolist() == [0.0, 0.0, 20.0, 20.0]


def test_nan_and_infinite_boxes_are_dropped_and_counted(env):
    def edit(doc):
        doc["annotations"][0]["bbox"] = [float("nan"), 1, 5, 5]
        doc["annotations"][1]["bbox"] = [1, 1, float("inf"), 5]
        doc["annotations"][2]["area"] = float("nan")
    env.edit_ann("train", edit)
    ds = _dataset(env)
    kept = {int(a) for r in ds.records for a in r.ann_ids}
    dropped = {a["id"] for a in json.loads(env.ann("train").read_text())["annotations"][:3]}
    assert ds.report.non_finite == 3 and not kept & dropped
    assert all(np.isfinite(r.boxes).all() for r in ds.records)
    assert not {a["id"] for a in ds._gt_dict()["annotations"]} & dropped  # nor in evaluation


def _single_image_set(env: Env, image: Image.Image, box: list[float], **save) -> CocoDetection:
    """A one-image dataset whose only box is `box` (xywh, in the upright image)."""
    folder = env.tmp / "one"
    folder.mkdir()
    image.save(folder / "a.png" if "exif" not in save else folder / "a.jpg", **save)
    name = next(folder.iterdir()).name
    ann = env.tmp / "one.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": name}],
                               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box}],
                               "categories": [{"id": 1, "name": "thing"}]}))
    return CocoDetection(folder, ann)


def test_16_bit_png_is_scaled_not_clipped(env):
    ramp = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)  # 0..65504
    image, _ = _single_image_set(env, Image.fromarray(ramp), [0, 0, 10, 10]).load_item(0)
    pixels = np.asarray(image)
    assert image.mode == "RGB" and np.abs(pixels[..., 0].astype(float) - ramp / 257).max() <= 0.5
    assert 100 < pixels.mean() < 155  # PIL's own conversion gives ~255 everywhere


def test_exif_orientation_is_applied_and_boxes_refer_to_the_upright_image(env):
    upright = Image.new("RGB", (40, 80), "black")
    upright.paste((255, 255, 255), (5, 50, 25, 70))  # the object, drawn on the image as a viewer shows it
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    ds = _single_image_set(env, upright.transpose(Image.Transpose.ROTATE_90), [5, 50, 20, 20], exif=exif,
                           quality=100)
    image, target = ds.load_item(0)
    assert image.size == (40, 80) and (ds.records[0].width, ds.records[0].height) == (40, 80)
    x0, y0, x1, y1 = (int(v) for v in target["boxes"][0].tolist())
    inside = np.asarray(image)[y0:y1, x0:x1]
    assert inside.mean() > 200 and np.asarray(image).mean() < 60


def test_huge_images_are_skipped_by_the_dataset(env, monkeypatch):
    import deim_ray.data.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 63 * 63)  # the 64x64 shapes stand for 8000x8000 photos
    with pytest.raises(DataError, match="no usable image"):
        _dataset(env)


def test_preflight_generates_a_synthetic_dataset_once_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TINY, ["data.train.img_folder=d/shapes/train", "data.train.ann_file=d/shapes/annotations/"
                             "train.json", "data.val.img_folder=d/shapes/val",
                             "data.val.ann_file=d/shapes/annotations/val.json"])
    summaries = preflight(cfg).summaries
    assert (tmp_path / "d" / "shapes" / ".complete").is_file() and [s.split for s in summaries] == ["train", "val"]
    worker_cfg = absolute_paths(cfg)
    assert worker_cfg.data.train.img_folder == str(tmp_path / "d" / "shapes" / "train")
    assert worker_cfg.data.val.ann_file == str(tmp_path / "d" / "shapes" / "annotations" / "val.json")


def _tiny_state(cfg, classes: int, sha: str) -> dict:
    model = build_model(cfg.model, classes)
    return make_train_state(model=model.state_dict(), ema=None, optimizer={}, scaler=None, epoch=0, stage=1,
                            best={"top1": 0.0, "local_epoch": 0, "local_ap": 0.0, "stage_best": {}},
                            config_sha256=sha)


def test_resume_refuses_truncated_foreign_and_pickled_checkpoints(env):
    cfg = load_config(env.config)
    good = save_train_state(_tiny_state(cfg, 3, "sha-a"), env.tmp / "good.pt")
    truncated = env.tmp / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = env.tmp / "pickled.pt"
    torch.save({"format": "deim_ray.train_state/1", "model": Payload()}, pickled)
    cases = [(truncated, None, "truncated, corrupt"), (pickled, None, "weights-only"),
             (good, "sha-b", "another config")]
    for path, sha, words in cases:
        with pytest.raises(CheckpointError, match=words) as info:
            load_train_state(path, expected_config_sha256=sha)
        assert "\n" not in str(info.value)


@pytest.mark.slow
def test_resume_from_another_class_count_is_one_line_error(env):
    from deim_ray.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(env.config)
    trainer = Trainer(cfg, "sha")
    with pytest.raises(CheckpointError, match="another model") as info:
        trainer.load_weights(_tiny_state(cfg, 5, "sha"))
    assert "\n" not in str(info.value) and "model.pretrained" in str(info.value)


@pytest.mark.slow
def test_resume_with_other_trainable_parameters_is_one_line_error_and_loads_nothing(env):
    """A TrainState whose optimizer grouped other parameters (e.g. saved while a tensor now frozen was trained)."""
    from deim_ray.engine.trainer import Trainer

    torch.set_num_threads(1)
    cfg = load_config(env.config)
    trainer = Trainer(cfg, "sha")
    state = trainer.state_dict()
    state["optimizer"]["param_groups"][-1]["params"].append(max(
        i for g in state["optimizer"]["param_groups"] for i in g["params"]) + 1)
    state["model"] = {k: torch.full_like(v, 7) if v.is_floating_point() else v for k, v in state["model"].items()}
    with pytest.raises(CheckpointError, match="parameter groups") as info:
        trainer.load_weights(state)
    assert "\n" not in str(info.value) and "model.pretrained" in str(info.value)
    assert not any(torch.all(p == 7) for p in trainer.model.parameters())  # nothing was loaded


def test_fine_tune_across_class_counts_loads_what_matches_and_reports_the_rest(env):
    cfg = load_config(env.config)
    weights = env.tmp / "coco-like.pth"
    torch.save(_tiny_state(cfg, 5, "sha"), weights)
    model = build_model(cfg.model, 3)
    report = load_pretrained(model, str(weights))
    assert report.loaded and report.shape_mismatch and set(report.shape_mismatch) <= set(report.reinitialised)
    assert "re-initialised" in report.summary() and report.shape_mismatch[0] in report.summary()
    source = torch.load(weights, weights_only=True)["model"]
    name = report.loaded[0]
    assert torch.equal(model.state_dict()[name], source[name])


# ---- safety --------------------------------------------------------------------------------------------------------

def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in (ROOT / "deim_ray").rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.name, text[match.start():end + 1]))
    assert calls, "no torch.load found: the scan is broken"
    unsafe = [(name, call) for name, call in calls if "weights_only=True" not in call]
    assert not unsafe, unsafe


def test_pickle_payload_is_refused_and_never_executed(env, capfd):
    path = env.tmp / "payload.pth"
    torch.save({"ema": {"module": Payload()}}, path)
    capfd.readouterr()
    assert main(env.train("-u", f"model.pretrained={path}")) == 2
    out = capfd.readouterr()
    assert "this must never run" not in out.out + out.err
    assert out.err.count("deim-ray: error:") == 1


@pytest.mark.parametrize("error", [
    "deim_ray.config.errors.ConfigError", "deim_ray.data.errors.DataError", "deim_ray.models.errors.ModelError",
    "deim_ray.engine.optim.ParamGroupError", "deim_ray.engine.state.CheckpointError",
    "deim_ray.driver.preflight.PreflightError", "deim_ray.driver.ray_stage.ClusterTooSmall",
    "deim_ray.driver.run.RunError", "deim_ray.storage.errors.StorageError"])
def test_every_error_type_of_ours_is_a_one_line_exit_2(error, monkeypatch, capsys):
    import importlib

    from deim_ray.cli import commands

    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)

    def fail(args):
        raise cls(f"{name}: what is wrong; how to fix it")
    monkeypatch.setattr(commands, "info", fail)  # the command is a stand-in; the error path is the real one
    assert main(["info", "-c", str(TINY)]) == 2
    assert capsys.readouterr().err.strip() == f"deim-ray: error: {name}: what is wrong; how to fix it"
