"""config layer: the vocabulary of the two-stage schedule, in one place for every layer.

Stage 1 is epochs `[0, stop_epoch)` (strong augmentation), stage 2 is `[stop_epoch, epochs)` (clean data,
restarts from best_stg1). The data gates, the engine's epoch loop, the driver's state machine, storage's
manifest and the CLI all ask this module which stage an epoch belongs to and what the artifacts are called.
"""

from __future__ import annotations

import enum


class Stage(enum.IntEnum):
    ONE = 1
    TWO = 2


def stage_of(epoch: int, stop_epoch: int) -> Stage:
    """Stage 1 for epoch < stop_epoch, else stage 2 (epochs are 0-based)."""
    return Stage.TWO if epoch >= stop_epoch else Stage.ONE


def stage_epochs(stage: Stage, epochs: int, stop_epoch: int) -> range:
    """The epochs a stage covers: stage 1 is [0, stop_epoch), stage 2 is [stop_epoch, epochs)."""
    return range(0, stop_epoch) if stage is Stage.ONE else range(stop_epoch, epochs)


LAST = "last"
"""TrainState after the latest epoch (overwritten every epoch)."""
BEST_STG1 = "best_stg1"
"""TrainState of the best validated epoch of stage 1; stage 2 starts from it."""
BEST_STG2 = "best_stg2"
"""TrainState of the best validated epoch of stage 2."""
FINAL = "final"
"""Deployable EMA weights of the resolved winner, with the metadata to rebuild the model."""
ARTIFACT_NAMES = (BEST_STG1, BEST_STG2, LAST, FINAL)


def best_artifact(stage: Stage) -> str:
    """The best-checkpoint artifact of a stage: best_stg1 or best_stg2."""
    return BEST_STG1 if stage is Stage.ONE else BEST_STG2


# --- The derived schedule -------------------------------------------------------------------------------
#
# Upstream's "Customizing Epoch" rule (DEIMv2 README §3.4), for T = stop_epoch training epochs and a stage 2
# of no_aug_epoch clean epochs:  epochs = T + no_aug_epoch, flat_epoch = 4 + T // 2,
# policy_epoch = [4, flat_epoch, T], mixup_epochs = [4, flat_epoch], copyblend_epochs = [4, T],
# matcher_change_epoch ~ 90% of T. Short runs start strong augmentation earlier (min(4, T // 4)) and keep
# stage 2 at most half the run, so every epoch count from 2 up gives a valid schedule.

KeyPath = tuple[str, ...]

AUTO = "auto"
"""Written for a derivable key, the rule computes it (as leaving the key out does; for
`schedule.matcher_change_epoch`, left out means no matcher switch, `auto` means the rule's epoch)."""
AUG_START_EPOCH = 4
"""First epoch of strong augmentation in upstream's rule (its `start_epoch`)."""
DEFAULT_NO_AUG_EPOCHS = 12
"""Stage-2 length when a config names none (upstream's DEIMv2 S/M/N value)."""
DEFAULT_EPOCHS = 160

EPOCHS = ("schedule", "epochs")
STOP_EPOCH = ("schedule", "stop_epoch")
NO_AUG_EPOCHS = ("schedule", "no_aug_epochs")
LR_NO_AUG_EPOCH = ("lr_scheduler", "no_aug_epoch")
FLAT_EPOCH = ("lr_scheduler", "flat_epoch")
POLICY_EPOCH = ("augment", "policy_epoch")
MIXUP_EPOCHS = ("augment", "mixup_epochs")
COPYBLEND_EPOCHS = ("augment", "copyblend_epochs")
MATCHER_EPOCH = ("schedule", "matcher_change_epoch")

DRIVERS = (EPOCHS, STOP_EPOCH, NO_AUG_EPOCHS, LR_NO_AUG_EPOCH)
"""Keys that move the schedule: a layer (file or overrides) setting one re-derives what earlier layers set."""
DERIVED = (STOP_EPOCH, LR_NO_AUG_EPOCH, FLAT_EPOCH, POLICY_EPOCH, MIXUP_EPOCHS, COPYBLEND_EPOCHS, MATCHER_EPOCH)
"""Keys the rule computes when they are absent or `auto`."""


def dotted(path: KeyPath) -> str:
    return ".".join(path)


def _get(tree: dict, path: KeyPath, default=None):
    node = tree
    for segment in path:
        if not isinstance(node, dict) or segment not in node:
            return default
        node = node[segment]
    return node


def _has(tree: dict, path: KeyPath) -> bool:
    missing = object()
    return _get(tree, path, missing) is not missing


def _set(tree: dict, path: KeyPath, value) -> None:
    node = tree
    for segment in path[:-1]:
        node = node.setdefault(segment, {})
    node[path[-1]] = value


def _switched_off(path: KeyPath, value) -> bool:
    """A matcher switch of null, or an empty [start, end) window: off, whatever the schedule."""
    if path == MATCHER_EPOCH:
        return value is None
    return path in (MIXUP_EPOCHS, COPYBLEND_EPOCHS) and isinstance(value, list) and len(value) == 2 \
        and all(_is_int(v) for v in value) and value[0] >= value[1]


def mark_stale(tree: dict, layer: dict) -> list[str]:
    """Before `layer` is merged over `tree`: if the layer moves the schedule (sets a key of DRIVERS), every
    derived value of `tree` that the layer does not set was chosen for the old schedule and becomes `auto`
    (a switched-off window or matcher stays off). Returns the dotted keys marked."""
    if not any(_has(layer, p) for p in DRIVERS):
        return []
    marked = []
    for path in DERIVED:
        if _has(layer, path) or not _has(tree, path):
            continue
        value = _get(tree, path)
        if value != AUTO and not _switched_off(path, value):
            _set(tree, path, AUTO)
            marked.append(dotted(path))
    return marked


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _given(tree: dict, path: KeyPath):
    """The int a config gives for `path`, or None when absent or `auto` (anything else is left to the
    typed build to report)."""
    value = _get(tree, path)
    return value if _is_int(value) else None


def derive_schedule(tree: dict) -> list[str]:
    """Fill every absent or `auto` key of DERIVED in a plain config tree by the rule above (in place).
    Returns one note per derived key, e.g. `schedule.stop_epoch = 20 (epochs 32 - no_aug 12)`."""
    if any(not isinstance(tree.get(section, {}), dict) for section in ("schedule", "lr_scheduler", "augment")):
        return []  # the typed build names the section that is not a mapping
    epochs = _get(tree, EPOCHS, DEFAULT_EPOCHS)
    if not _is_int(epochs):
        _drop_auto(tree)  # the typed build names the bad `schedule.epochs`
        return []
    stop, stop_note = _stop_epoch(tree, epochs)
    start = min(AUG_START_EPOCH, stop // 4)
    flat = start + stop // 2
    values = {
        STOP_EPOCH: (stop, stop_note),
        LR_NO_AUG_EPOCH: (epochs - stop, f"epochs {epochs} - stop_epoch {stop}"),
        FLAT_EPOCH: (flat, f"start {start} + stop_epoch {stop} // 2"),
        POLICY_EPOCH: ([start, flat, stop], "[start, flat, stop_epoch]"),
        MIXUP_EPOCHS: ([start, flat], "[start, flat]"),
        COPYBLEND_EPOCHS: ([start, stop], "[start, stop_epoch]"),
        MATCHER_EPOCH: (stop * 9 // 10, f"90% of stop_epoch {stop}"),
    }
    notes = []
    for path, (value, why) in values.items():
        current = _get(tree, path)
        if current == AUTO or (not _has(tree, path) and path != MATCHER_EPOCH):
            _set(tree, path, value)
            notes.append(f"{dotted(path)} = {value} ({why})")
    return notes


def _stop_epoch(tree: dict, epochs: int) -> tuple[int, str]:
    """stop_epoch as given, else epochs - lr_scheduler.no_aug_epoch as given, else epochs minus the stage-2
    length schedule.no_aug_epochs (default 12) capped at half the run."""
    given = _given(tree, STOP_EPOCH)
    if given is not None:
        return given, "given"
    lr_no_aug = _given(tree, LR_NO_AUG_EPOCH)
    if lr_no_aug is not None:
        return epochs - lr_no_aug, f"epochs {epochs} - lr_scheduler.no_aug_epoch {lr_no_aug}"
    wanted = _given(tree, NO_AUG_EPOCHS)
    wanted = DEFAULT_NO_AUG_EPOCHS if wanted is None else wanted
    no_aug = min(wanted, epochs // 2)
    capped = f": no_aug_epochs {wanted} capped at half the run" if no_aug < wanted else ""
    return epochs - no_aug, f"epochs {epochs} - no_aug {no_aug}{capped}"


def _drop_auto(tree: dict) -> None:
    for path in DERIVED:
        if _get(tree, path) == AUTO:
            del _get(tree, path[:-1])[path[-1]]
