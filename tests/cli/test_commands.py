"""The non-training commands through the real CLI entry point: info, show-augment, import-config, errors."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import deim_ray
from deim_ray.cli.main import main

TINY = "configs/demo/tiny.yml"
UPSTREAM_N = "tests/config/fixtures/upstream/deimv2/deimv2_hgnetv2_n_coco.yml"


def _data_args(root):
    return ["-u", f"data.train.img_folder={root}/train", f"data.train.ann_file={root}/annotations/train.json",
            f"data.val.img_folder={root}/val", f"data.val.ann_file={root}/annotations/val.json"]


def test_info_prints_model_size_and_phase_table(capsys):
    assert main(["info", "-c", "configs/demo/shapes.yml", "--no-loader"]) == 0
    out = capsys.readouterr().out
    assert "parameters: " in out and "epochs: 15" in out and "stop_epoch: 8" in out
    params = int(re.search(r"parameters: (\d+)", out).group(1))
    assert 300_000 < params < 600_000
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+-\d+\s+[12]\s", line)]
    assert rows[0].split()[0] == "0-0" and "Mosaic" not in rows[0]
    assert "Mosaic p=0.3" in rows[1] and "MixUp" in rows[1]
    assert rows[-1].split()[:2] == ["8-14", "2"] and "Mosaic" not in rows[-1] and "restart from best_stg1" in rows[-1]


def test_info_shows_what_stage2_branches_draw_from(tmp_path, capsys):
    assert main(["info", "-c", TINY, "--no-loader"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("stage-2 branches"))
    assert "default space" in line and "schedule.ema_restart_decay ~ choice(" in line
    custom = tmp_path / "search.yml"
    custom.write_text(f"__include__: [{Path(TINY).resolve()}]\n"
                      "stage2_search:\n  lr_scheduler.tail_lr_factor: {choice: [0.3, 0.6]}\n")
    assert main(["info", "-c", str(custom), "--no-loader"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("stage-2 branches"))
    assert line.endswith("the config's stage2_search: lr_scheduler.tail_lr_factor ~ choice(0.3, 0.6)")
    custom.write_text(f"__include__: [{Path(TINY).resolve()}]\nstage2_search:\n  optimizer.lr: {{choice: [0.1]}}\n")
    assert main(["info", "-c", str(custom), "--no-loader"]) == 2  # as train refuses it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimizer.lr" in err[0] and "not a stage-2 key" in err[0]


def test_info_of_the_n_config_matches_the_paper_size(capsys):
    assert main(["info", "-c", "configs/deimv2/deimv2_hgnetv2_n_coco.yml", "--no-data"]) == 0
    params = int(re.search(r"parameters: (\d+)", capsys.readouterr().out).group(1))
    assert abs(params - 3.6e6) / 3.6e6 < 0.05


def test_info_measures_the_loader_and_the_workers_it_needs(capsys):
    assert main(["info", "-c", TINY, "--images-per-s", "100000"]) == 0
    out = capsys.readouterr().out
    rates = [float(r) for r in re.findall(r"stage [12]\s+([\d.]+) img/s", out)]
    assert len(rates) == 3 and all(r > 0 for r in rates)  # tiny.yml: Mosaic phase, after it, stage 2
    needed = int(re.search(r"needs data.num_workers >= (\d+)", out).group(1))
    slowest = min(rates)  # printed to 0.1 img/s
    assert math.ceil(100000 / (slowest + 0.05)) <= needed <= math.ceil(100000 / (slowest - 0.05))


def test_show_augment_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "aug.png"
    assert main(["show-augment", "-c", TINY, *_data_args(tmp_path / "d"), "--epoch", "0", "-o", str(out), "-n", "4"]) == 0
    with Image.open(out) as im:
        assert im.width >= 2 * 160 and im.height >= 160
    assert "stage 1" in capsys.readouterr().out


def test_import_config_writes_a_loadable_config_and_refuses_to_overwrite(tmp_path, capsys):
    from deim_ray.config.loader import load_config

    out = tmp_path / "n.yml"
    assert main(["import-config", UPSTREAM_N, "-o", str(out)]) == 0
    cfg = load_config(out)
    assert (cfg.schedule.epochs, cfg.schedule.stop_epoch, cfg.model.variant) == (160, 148, "n")
    before = out.read_text()
    assert main(["import-config", UPSTREAM_N, "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == before


def test_config_error_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("schedule:\n  stop_epcoh: 3\n")
    proc = subprocess.run([sys.executable, "-m", "deim_ray", "info", "-c", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deim-ray: error:") and "stop_epoch" in err[0]


def test_help_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "deim_ray", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("train", "demo", "resolve", "fetch", "ls", "info", "show-augment", "import-config", "plot", "predict",
                "eval", "export"):
        assert cmd in proc.stdout
    assert "object detectors" in proc.stdout and "layer" not in proc.stdout  # what the tool does, not the code
    version = subprocess.run([sys.executable, "-m", "deim_ray", "--version"], capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0 and version.stdout.split() == ["deim-ray", deim_ray.__version__]
