"""Learning-rate schedules of the seed recipes, stepped once per epoch, with exact state for resuming.

Each schedule sets the optimizer's learning rate at the start of every epoch
(:meth:`EpochSchedule.lr_for_epoch`) and sees the epoch's mean training loss at its end
(:meth:`EpochSchedule.end_epoch`), which returns True when training should stop (the learning
rate fell below ``min_lr``). Epochs are counted within the phase (0-based).

* ``constant``
* ``step`` {step_epochs, gamma}: lr x gamma every ``step_epochs`` (Wei: halved every 200)
* ``cosine`` {min_lr}: cosine decay from the initial lr to ``min_lr`` over the phase's epochs
* ``ema_plateau`` {factor, patience, ema_alpha, min_delta, min_lr}: lr x factor when the exponential
  moving average of the training loss (ema = alpha ema + (1 - alpha) loss) has not improved on its
  best by more than ``min_delta`` for ``patience`` epochs (Liu / nnU-Net 2019); stop below ``min_lr``
* ``plateau`` {factor, patience, min_delta, min_lr}: the same on the raw epoch loss (Daza)
"""

from __future__ import annotations

import math
from typing import Optional

NAMES = ("constant", "step", "cosine", "ema_plateau", "plateau")


class EpochSchedule:
    """A schedule of ``spec`` for an optimizer starting at ``base_lr`` over ``epochs`` epochs."""

    def __init__(self, spec: dict, base_lr: float, epochs: int):
        self.spec = dict(spec or {"name": "constant"})
        self.name = self.spec.get("name", "constant")
        if self.name not in NAMES:
            raise ValueError(f"unknown scheduler {self.name!r}; valid: {', '.join(NAMES)}")
        self.base_lr = float(base_lr)
        self.epochs = max(1, int(epochs))
        self.lr = self.base_lr
        self.ema: Optional[float] = None
        self.best: Optional[float] = None
        self.bad_epochs = 0

    def lr_for_epoch(self, epoch: int) -> float:
        """Learning rate for (phase) ``epoch``."""
        s = self.spec
        if self.name == "step":
            return self.base_lr * float(s.get("gamma", 0.5)) ** (epoch // int(s.get("step_epochs", 200)))
        if self.name == "cosine":
            lo = float(s.get("min_lr", 0.0))
            return lo + 0.5 * (self.base_lr - lo) * (1 + math.cos(math.pi * epoch / self.epochs))
        return self.lr  # constant and plateau schedules keep their current rate

    def end_epoch(self, epoch: int, loss: float) -> bool:
        """Record the epoch's mean training loss; True when training should stop."""
        if self.name not in ("ema_plateau", "plateau"):
            return False
        s = self.spec
        if self.name == "ema_plateau":
            alpha = float(s.get("ema_alpha", 0.93))
            self.ema = loss if self.ema is None else alpha * self.ema + (1 - alpha) * loss
            value = self.ema
        else:
            value = loss
        if self.best is None or value < self.best - float(s.get("min_delta", 0.0)):
            self.best = value
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs >= int(s.get("patience", 30)):
                self.lr *= float(s.get("factor", 0.2))
                self.bad_epochs = 0
        return self.lr < float(s.get("min_lr", 0.0))

    def state_dict(self) -> dict:
        return {"lr": self.lr, "ema": self.ema, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.ema, self.best, self.bad_epochs = state["lr"], state["ema"], state["best"], state["bad_epochs"]
