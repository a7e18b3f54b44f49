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
