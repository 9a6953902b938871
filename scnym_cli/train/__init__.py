"""Training: devices, losses, objectives, metrics and the one shared trainer."""

from .device import resolve_device
from .trainer import FitResult, Trainer, TrainingData

__all__ = ["FitResult", "Trainer", "TrainingData", "resolve_device"]
