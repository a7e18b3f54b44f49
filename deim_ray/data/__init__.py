"""data layer: detection datasets (COCO, YOLO, VOC), the stage-aware augmentation pipeline, loaders and the
synthetic shapes set.

Entry points (what the engine and the CLI call):
- `synthetic.ensure_dataset(cfg.data)` / `synthetic.generate_shapes(root, cfg)`: write the seeded shapes set.
- `layouts.detect_layout(root)`: the format and train/val splits of a YOLO, Pascal VOC or COCO folder;
  `layout_writer.write_layout(train, val, layout, root)` writes one (tests, the shapes in every layout).
- `annotations.read_split(split)`: any split's annotations (COCO JSON, YOLO labels, VOC XMLs) as one COCO dict.
- `coco.CocoDetection.from_split(split, transforms)`: the dataset; `.categories` maps COCO category ids
  to contiguous class indices, `.coco_gt` is the faster-coco-eval ground truth for evaluation.
- `transforms.build_train_transforms(cfg, scale)` / `build_val_transforms(cfg, scale)`: per-sample pipelines
  (`scale=False`, what the loaders use, leaves uint8 tensors that the collator scales once per batch); their
  faster kernels live in `color` (photometric), `iou_crop` and `resize`.
- `loader.build_train_loader(cfg, dataset, rank, world_size, seed)`: call `.set_epoch(epoch)` before each
  epoch; the epoch travels with each sample index, so workers persist across epochs and stages.
- `loader.build_val_loader(cfg, dataset, rank, world_size)`: each image on exactly one rank.
- `gates.*`: every epoch gate as a pure function; `gates.phase_table(cfg)` for `deim-ray info`.
- `visualize.render_augment_grid(cfg, epoch, out_png)`: `deim-ray show-augment`.
- `throughput.phase_rates(cfg)`: one loader process's images/s per phase, for `deim-ray info`.
Batches are `(images float32 [B,3,H,W], targets)`; the target keys are documented in `collate`.
Bad input raises `errors.DataError` with a one-line message saying how to fix it.
"""
