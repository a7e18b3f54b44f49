"""engine layer: the best-checkpoint rule of a DEIM run, as explicit state.

`Stage` and the artifact names come from `config.schedule`; `BestTracker` is the best-checkpoint rule: in stage 1 every new best writes
best_stg1; in stage 2 best_stg2 is written only when an epoch beats the best so far (stage 1 included), and an
epoch that is not a new local best restarts the next epoch from best_stg1 (upstream's restart search) unless
the config turns that off. The tracker is part of every checkpoint, so a resumed run keeps its historical
best (upstream re-seeded it from the resumed weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from deim_ray.config.schedule import BEST_STG1, BEST_STG2, Stage


@dataclass(frozen=True)
class Decision:
    save: str | None
    """Artifact name to (re)write with this epoch's state: best_stg1, best_stg2 or None."""
    restart_from_stg1: bool
    """Start the next epoch from best_stg1 (stage 2 only)."""


@dataclass
class BestTracker:
    top1: float = -1.0
    """Best AP of the whole run so far."""
    local_epoch: int = -1
    """Epoch of the best AP since the last stage-2 restart (-1 after a restart)."""
    local_ap: float = -1.0
    stage_best: dict[str, dict] = field(default_factory=dict)
    """Per stage ("1"/"2"): {"epoch", "ap"} of the best written artifact."""

    def update(self, epoch: int, ap: float, stage: Stage, stage2_restart: bool = True) -> Decision:
        if self.local_epoch < 0 or ap > self.local_ap:
            self.local_epoch, self.local_ap = epoch, ap
        new_local = self.local_epoch == epoch
        if stage is Stage.ONE:
            if not new_local:
                return Decision(None, False)
            self.top1 = max(self.top1, ap)
            self.stage_best["1"] = {"epoch": epoch, "ap": ap}
            return Decision(BEST_STG1, False)
        if new_local and ap > self.top1:
            self.top1 = ap
            self.stage_best["2"] = {"epoch": epoch, "ap": ap}
            return Decision(BEST_STG2, False)
        if new_local or not stage2_restart:
            return Decision(None, False)
        self.local_epoch, self.local_ap = -1, -1.0
        return Decision(None, True)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "BestTracker":
        return cls(top1=float(state["top1"]), local_epoch=int(state["local_epoch"]),
                   local_ap=float(state["local_ap"]), stage_best=dict(state.get("stage_best", {})))
