"""scnym: cell identity classification for single-cell RNA-seq (scNym, rebuilt).

The command line (``scnym ...``) and the Python API share one core:
inputs -> genes / normalization -> batches -> module -> trainer -> outputs.
"""

__version__ = "0.1.0"

from .errors import ScnymError  # noqa: E402

__all__ = ["ScnymError", "__version__"]
