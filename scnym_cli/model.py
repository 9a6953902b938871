"""Objects for Python users who want them: a trained :class:`Model` that predicts AnnData and returns
:class:`~scnym_cli.workflows.predictor.Predictions` (a table, AnnData fields, scores against known labels,
the report's plots). The same core as ``scnym predict_cell_types`` and ``scnym_api(..., "predict")``.

    from scnym_cli import Model
    model = Model.load("model/", coverage=0.9)            # any prediction config key
    predictions = model.predict(adata)
    predictions.table()                                   # the predictions.csv table
    predictions.to_anndata(adata)                         # obs["scNym"], obsm["X_scnym"], ...
    predictions.evaluate(adata.obs["cell_type"]).metrics  # when the labels are known
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from .api import _api_call, make_config, resolve_trained_model
from .config import Config
from .workflows.inputs import open_query
from .workflows.predictor import Predictions, Predictor, predict_in_memory
from .workflows.runtime import setup_runtime

__all__ = ["Model", "Predictions"]


class Model:
    """A trained model (a run directory, a fold or all_data directory, or a named pretrained model) ready to
    predict; its run's ensemble, calibration and novelty reference are loaded once."""

    def __init__(self, predictor: Predictor, config: Config, path: Path):
        self._predictor, self.config, self.path = predictor, config, path

    @classmethod
    @_api_call
    def load(cls, trained_model: Union[str, Path], **settings: Any) -> "Model":
        """Load ``trained_model`` with prediction settings given as config keys (``ensemble="all_data"``,
        ``coverage=0.9``, ``unknown_rate=0.05``, ``device="cpu"``, ...); they hold for every prediction."""
        path = resolve_trained_model(trained_model)
        config = make_config(None, **settings)
        return cls(Predictor(path, config, setup_runtime(config)), config, path)

    @property
    def classes(self) -> list[str]:
        return list(self._predictor.classes)

    @property
    def genes(self) -> list[str]:
        return list(self._predictor.model_genes)

    def describe(self) -> dict:
        """What predicts: the models, their temperatures, the calibration of prediction sets."""
        return self._predictor.describe()

    @_api_call  # errors in API terms, torch's thread count given back (as for load)
    def predict(self, adata) -> Predictions:
        """Predict every cell of ``adata`` (counts or log-normalized in ``X``, or the config's ``input_layer``;
        never modified)."""
        source = open_query(self.config, Path("adata"), adata=adata)
        return predict_in_memory(self._predictor, source, self.config)

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, {len(self.classes)} classes, {len(self.genes)} genes)"
