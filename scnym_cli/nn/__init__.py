"""Tensor-only torch modules: they know nothing of AnnData, files or devices."""

from .classifier import CellTypeClassifier, InputDropout

__all__ = ["CellTypeClassifier", "InputDropout"]
