"""What the trainer needs to know, as one small typed object: the trainer and the objectives can be built,
used and tested without the command line's schema. The workflows translate a Config into it once
(workflows/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .mixmatch import MixMatchSettings


@dataclass(frozen=True)
class TrainingSettings:
    """How to fit one model. The defaults are Config's (a run always passes every value)."""

    seed: int = 0
    n_epochs: int = 15
    min_epochs: int = 5
    patience: int = 5
    batch_size: int = 256
    lr: float = 1.0
    weight_decay: float = 1e-4
    optimizer: str = "adadelta"
    lr_schedule: str = "auto"              # auto: cosine for sgd, constant otherwise
    min_steps_per_epoch: int = 30
    selection_metric: str = "loss"         # loss | accuracy | balanced_accuracy | last
    calibrate: bool = True                 # fit a temperature after training
    weight_classes: bool = False           # inverse-frequency class weights in the labeled loss
    balance_classes: Optional[bool] = None  # class-balanced labeled batches; None: when adapting (see below)
    mixup_alpha: Optional[float] = 0.3     # MixUp of labeled batches in supervised runs
    read_buffer_cells: int = 65536          # cells of disk-backed data shuffled together
    weight_averaging: float = 0.0          # decay of a moving average of the weights, evaluated and kept; 0: off
    semi_supervised: MixMatchSettings = field(default_factory=MixMatchSettings)

    def balances_labeled_classes(self, adapting: bool) -> bool:
        """balance_classes resolved for a run: as given, else (auto) when adapting to target cells and the loss
        is not class-weighted already."""
        if self.balance_classes is not None:
            return self.balance_classes
        return adapting and not self.weight_classes
