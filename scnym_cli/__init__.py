"""scnym: cell identity classification for single-cell RNA-seq (scNym, rebuilt).

The command line (``scnym ...``) and the Python API share one core:
inputs -> genes / normalization -> batches -> module -> trainer -> outputs.

Log messages (gene overlap, training progress, outputs written) go to the ``scnym_cli`` logger. Used as a
library, they are shown at INFO on stderr (a notebook shows them under the cell) unless the program has set
up logging itself (the root logger has handlers), in which case they reach those handlers instead. Silence
them with ``logging.getLogger("scnym_cli").setLevel(logging.WARNING)``.
"""

import logging
import sys

from ._version import __version__  # noqa: E402

from .errors import ScnymError  # noqa: E402


class _StderrUnlessConfigured(logging.StreamHandler):
    """Writes to the current sys.stderr (a notebook replaces it per cell) when nobody configured logging."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("scnym: %(message)s"))
        self.addFilter(lambda record: not logging.getLogger().handlers)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it on creation: the current stderr is used instead
        pass


_package_log = logging.getLogger(__name__)
if not _package_log.handlers:
    _package_log.addHandler(_StderrUnlessConfigured())
if _package_log.level == logging.NOTSET:  # a level the program chose before importing scnym stays
    _package_log.setLevel(logging.INFO)



def __getattr__(name: str):
    """``scnym_cli.Model`` and ``scnym_cli.Predictions`` (scnym_cli/model.py), imported when first used: the
    command line's start-up does not pay for torch and the workflows."""
    if name in ("Model", "Predictions"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'scnym_cli' has no attribute {name!r}")


__all__ = ["Model", "Predictions", "ScnymError", "__version__"]
