"""Bad input, table-driven, through the real command line (`deim_ray.cli.main.main`, in process).

Every case must end with exit status 2 and ONE stderr line `deim-ray: error: ...` that names the problem and
the fix (no traceback), and must leave an existing run directory byte-for-byte untouched. All of them fail
before a Ray worker starts: config checks, the driver's preflight (data and weights files), storage URI and
run-name checks, the config-hash check of an existing run; only the cluster-capacity case needs Ray (the
session's local instance, 2 CPUs).

A second table covers input that is not an error but must be handled the documented way (corrupt images and
degenerate boxes are skipped and counted by the data layer), checkpoint files a resume refuses, and a
fine-tune across class counts. Last, the safety rules: every torch.load in the package is weights-only.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch
import yaml

from deim_ray.cli.main import main
from deim_ray.config.loader import load_config
from deim_ray.config.schema import SyntheticConfig
from deim_ray.data.coco import CocoDetection
from deim_ray.data.synthetic import generate_shapes
from deim_ray.driver.run import RunRequest, open_run
from deim_ray.engine.state import CheckpointError, load_train_state, make_train_state, save_train_state
from deim_ray.models.build import build_model
from deim_ray.models.pretrained import load_pretrained
from deim_ray.storage import RunStore, open_storage

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "demo" / "tiny.yml"


class Payload:
    """Any class outside torch's allow-list: pickling it makes a file `weights_only=True` must refuse."""

    def __reduce__(self):
        return (print, ("this must never run",))


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
    tree = yaml.safe_load(TINY.read_text())
    tree["data"].update(train={"img_folder": str(data / "train"), "ann_file": str(data / "annotations/train.json")},
                        val={"img_folder": str(data / "val"), "ann_file": str(data / "annotations/val.json")},
                        synthetic=None)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(tree))
    storage = tmp_path / "runs"
    open_run(RunRequest(cfg=load_config(config), storage_uri=str(storage), name="existing"),
             RunStore(open_storage(str(storage)), "existing"))
    return Env(tmp_path, data, config, storage)


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# ---- the cases: (id, build argv from the Env, words the error line must contain) ----------------------------------

def _yaml_text(text: str) -> Callable[[Env], list[str]]:
    def make(e: Env) -> list[str]:
        path = e.tmp / "case.yml"
        path.write_text(text)
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


def _pretrained(write: Callable[[Path], None]) -> Callable[[Env], list[str]]:
    def make(e: Env) -> list[str]:
        weights = e.tmp / "weights.pth"
        write(weights)
        return e.train("-u", f"model.pretrained={weights}")
    return make


def _truncated_weights(path: Path) -> None:
    torch.save({"model.w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])


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
]


@pytest.mark.parametrize("make_argv, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(make_argv, words, env, capsys, request):
    needs_ray = "beyond-the-cluster" in request.node.name
    if needs_ray:
        request.getfixturevalue("ray_local")  # the only case that needs a cluster to ask
    ray_before = ray.is_initialized()
    before = _snapshot(env.storage)
    argv = make_argv(env)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert needs_ray or ray.is_initialized() == ray_before, "the error came after Ray was started"
    errors = [line for line in err.splitlines() if line.startswith("deim-ray: error:")]
    assert rc == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert _snapshot(env.storage) == before


def test_the_matrix_is_large_enough():
    assert len(CLI_CASES) >= 25


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
