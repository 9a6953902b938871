"""scanpy-style Python API over the same core as the command line.

Functions take ``adata`` first; ``copy=False`` writes results into it and returns None,
``copy=True`` returns an annotated copy and leaves ``adata`` untouched. The expression matrix
itself is never modified, no global state is read or written, and neither the caller's config
nor the presets are ever mutated.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import pandas as pd

from .config import CONFIG_KEYS, Config, ConfigLayer, build_config
from .data import UNLABELED, align_genes, read_labels
from .data.labels import require_column
from .errors import ScnymError
from .store import load_model
from .train.device import thread_count_restored
from .workflows.inputs import load_cells, load_training_inputs
from .workflows.annotation import annotate, uns_safe
from .workflows.inputs import open_query
from .workflows.predictor import Predictor, predict_in_memory
from .workflows.runtime import setup_runtime
from .workflows.train import run_training

log = logging.getLogger(__name__)

__all__ = ["scnym_api", "scnym_interpret", "atlas2target", "resolve_trained_model", "PRETRAINED_MODELS",
           "UNLABELED"]

#: Named pretrained models and the folder name each is looked up under in the local cache.
PRETRAINED_MODELS: Mapping[str, str] = {
    "pretrained_human": "pretrained_human",
    "pretrained_mouse": "pretrained_mouse",
    "pretrained_rat": "pretrained_rat",
}
CACHE_ENVIRONMENT_VARIABLE = "SCNYM_MODEL_CACHE"

# scNym 0.3 API configs nest some keys; their flat names here
_NESTED_KEYS = {
    "ssl_kwargs": {"T": "sharpen_temperature", "ramp_epochs": "unsup_ramp_epochs",
                   "burn_in_epochs": "unsup_burn_in_epochs", "augment": "augmentation",
                   "n_augmentations": "n_augmentations", "augment_pseudolabels": "augment_pseudolabels",
                   "pseudolabel_min_confidence": "pseudolabel_min_confidence", "dan_max_weight": "dan_max_weight",
                   "dan_ramp_epochs": "dan_ramp_epochs", "dan_use_conf_pseudolabels": "dan_use_conf_pseudolabels",
                   "min_epochs": "min_epochs"},
    "model_kwargs": {"n_hidden": "n_hidden", "n_layers": "n_layers", "init_dropout": "init_dropout",
                     "residual": "residual"},
}
_RENAMED_KEYS = {"optimizer_name": "optimizer"}
_IGNORED_KEYS = {"description", "tensorboard", "ssl_method", "unsup_criterion", "dan_criterion"}


def model_cache_dir() -> Path:
    """Where named pretrained models live: $SCNYM_MODEL_CACHE, else ~/.cache/scnym/models."""
    return Path(os.environ.get(CACHE_ENVIRONMENT_VARIABLE, Path.home() / ".cache" / "scnym" / "models")).expanduser()


def resolve_trained_model(trained_model: Union[str, Path]) -> Path:
    """A model directory (run, fold or weights file) or a named pretrained model from the local cache."""
    if str(trained_model) in PRETRAINED_MODELS:
        folder = model_cache_dir() / PRETRAINED_MODELS[str(trained_model)]
        if not (folder / "model.json").is_file() and not (folder / "all_data" / "model.json").is_file():
            raise ScnymError(
                f"pretrained model {trained_model!r} is not in the local cache {folder}: scnym does not download "
                f"at run time; put its model directory (model.json and weights) there, set "
                f"{CACHE_ENVIRONMENT_VARIABLE} to the folder that holds it, or pass trained_model=<path>")
        return folder
    path = Path(trained_model).expanduser()
    if not path.exists():
        names = ", ".join(PRETRAINED_MODELS)
        raise ScnymError(f"trained_model {str(trained_model)!r} is neither a model path nor a pretrained model "
                         f"name ({names})")
    return path


def _flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat config keys from a (possibly scNym-0.3-style nested) dict; the input is not modified."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in _NESTED_KEYS and isinstance(value, Mapping):
            for inner, inner_value in value.items():
                if inner in _NESTED_KEYS[key]:
                    flat[_NESTED_KEYS[key][inner]] = inner_value
                elif inner not in _IGNORED_KEYS:
                    raise ScnymError(f"config[{key!r}][{inner!r}] is not a setting scnym knows")
        elif key in _IGNORED_KEYS:
            continue
        else:
            flat[_RENAMED_KEYS.get(key, key)] = value
    return flat


def make_config(config: Union[str, Mapping[str, Any], Config, None], **settings: Any) -> Config:
    """A validated Config from a preset name, a dict of settings (flat or scNym-0.3 nested) or a Config.

    ``settings`` (e.g. ``lower_group=...``) take precedence; nothing passed in is modified.
    """
    if isinstance(config, Config):
        return config.replace(**{k: v for k, v in settings.items() if v is not None})
    layers = []
    if isinstance(config, str):
        layers.append(ConfigLayer("config", {"preset": config}))
    elif isinstance(config, Mapping):
        layers.append(ConfigLayer("config", _flatten(config)))
    elif config is not None:
        raise ScnymError(f"config must be a preset name, a dict or a Config, not {type(config).__name__}")
    layers.append(ConfigLayer("scnym_api arguments", {k: v for k, v in settings.items() if v is not None}))
    return build_config(layers)


# command-line options that are arguments of the API functions, under their API names
_API_ARGUMENTS = {"lower_group": "groupby", "input_domain_group": "domain_groupby", "model_path": "trained_model",
                  "prediction_key": "key_added", "out_path": "out_path", "input_counts": "adata"}
_FLAG = re.compile(r"--([a-z][a-z0-9_]*)(?:[ =](true|false))?", re.IGNORECASE)


def _in_api_words(message: str) -> str:
    """An error worded for the command line, reworded for a Python caller: ``--overwrite true`` becomes
    ``config={'overwrite': True}``, ``--lower_group`` becomes ``groupby``."""
    def reword(match: re.Match) -> str:
        key, value = match.group(1), match.group(2)
        python_value = None if value is None else value.lower() == "true"
        if key in _API_ARGUMENTS:
            return _API_ARGUMENTS[key] + ("" if value is None else f"={python_value}")
        if key in CONFIG_KEYS:
            return f"config['{key}']" if value is None else f"config={{'{key}': {python_value}}}"
        return match.group(0)

    return _FLAG.sub(reword, message)


def _api_call(function):
    """What every public API function shares: errors in the caller's terms, and torch's thread count given
    back as found (the workflows set it for their run, from config['num_threads'])."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            with thread_count_restored():
                return function(*args, **kwargs)
        except ScnymError as error:
            raise ScnymError(_in_api_words(str(error))) from None

    return wrapper


def _write_results(target, result, key_added: str, extra_uns: dict) -> None:
    annotate(target, key=key_added, predictions=result)
    target.uns[key_added] = uns_safe({**target.uns[key_added], **extra_uns})


@_api_call
def scnym_api(
    adata,
    task: str = "train",
    *,
    groupby: Optional[str] = None,
    domain_groupby: Optional[str] = None,
    out_path: Union[str, Path] = "./scnym_outputs",
    trained_model: Union[str, Path, None] = None,
    config: Union[str, Mapping[str, Any], Config] = "new_identity_discovery",
    key_added: str = "scNym",
    copy: bool = False,
):
    """Train a scNym model on an AnnData, or predict cell types with one.

    Parameters
    ----------
    adata
        Cells x genes. ``X`` may hold raw counts or log-normalized values (see the README,
        Inputs); it is never modified. Use ``config={"input_layer": ...}`` for a layer.
    task
        ``"train"``: fit on the cells labelled in ``obs[groupby]``; cells labelled
        ``"Unlabeled"`` are the target data (MixMatch + domain adversary). After training, every
        cell of ``adata`` is predicted. ``"predict"``: predict with ``trained_model``.
    groupby
        obs column with cell-type labels (train). With ``task="predict"``, optional: the known labels of
        the cells, scored in ``uns[key_added]["evaluation"]``.
    domain_groupby
        obs column with each cell's domain (donor, technology, ...) for the domain adversary
        (train; default: labeled vs unlabeled cells).
    out_path
        Where the trained model is written (train): a model directory usable by
        ``predict_cell_types`` and ``trained_model``.
    trained_model
        A model directory, fold directory or weights file, or a pretrained model name
        (``pretrained_human``, ``pretrained_mouse``, ``pretrained_rat``) found in the local cache
        (``$SCNYM_MODEL_CACHE`` or ``~/.cache/scnym/models``) (predict).
    config
        A preset name (``default``, ``no_new_identity``, ``new_identity_discovery``, ``no_dan``,
        ``no_ssl``), a dict of config keys (flat, or scNym 0.3's nested ``ssl_kwargs`` /
        ``model_kwargs``; ``n_folds`` defaults to 0: no cross-validation), or a
        :class:`~scnym_cli.config.Config`. Never modified.
    key_added
        Prefix of the fields written.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    None, or an annotated copy of ``adata`` if ``copy=True``. Fields written:

    - ``obs[key_added]``: predicted cell type (categorical)
    - ``obs[key_added + "_confidence"]``: calibrated probability of that type
    - ``obs[key_added + "_novelty"]``: how unlike the reference's known cells the cell's query cluster is, in
      [0, 1]: the mean of two quantiles among the model-selection cells' own, its distance to the nearest
      reference cells in the embedding and its share of query cells among its neighbours there (higher = less
      like any reference type; ``config={"unknown_rate": 0.05}`` calls cells above the threshold Unknown)
    - ``obs[key_added + "_disagreement"]``: share of a run's models (cross-validation folds and all_data,
      ``config={"ensemble": ...}``) whose own call differs from the averaged one; only for runs with folds
    - ``obs[key_added + "_prediction_set"]``, ``obs[key_added + "_set_size"]`` with
      ``config={"coverage": 0.9}``: the conformal prediction set (classes joined by ``|``) and its size
      (``"coverage_per_class": True`` for the coverage within every class)
    - ``obsm[key_added + "_probabilities"]``: probability of every class (cells x classes)
    - ``obsm["X_scnym"]``: the model's cell embedding
    - ``uns[key_added + "_classes"]``: class order of the probability columns
    - ``uns[key_added]``: provenance -- ``scnym_version``, ``params`` (the effective config), ``model_path``,
      ``models`` (each model's path, manifest and weight checksums, training-data checksum), ``classes``,
      ``gene_overlap`` -- and after training ``train_results`` (the run summary); when predicting with
      ``groupby``, ``evaluation``: ``metrics`` (accuracy, balanced accuracy, macro-F1, ECE), ``per_class``
      (precision, recall, F1, support of every class; with prediction sets their coverage and mean size),
      ``confusion`` (counts; true x predicted) and ``reliability`` (accuracy and mean confidence per
      confidence bin)
    """
    if task not in ("train", "predict"):
        raise ScnymError(f"task must be 'train' or 'predict', not {task!r}")
    target = adata.copy() if copy else adata
    if task == "train":
        if groupby is None:
            raise ScnymError("task='train' needs groupby: the obs column with cell-type labels")
        settings: dict[str, Any] = {"lower_group": groupby, "input_domain_group": domain_groupby,
                                    "out_path": str(out_path)}
        if not isinstance(config, Config) and not (isinstance(config, Mapping) and "n_folds" in config):
            settings["n_folds"] = 0  # a notebook wants one model fast; a Config says what it wants itself
        effective = make_config(config, **settings)
        summary = run_training(effective, lambda: load_training_inputs(effective, adata), command="scnym_api")
        model_path = effective.path("out_path")
        extra = {"params": effective.to_dict(), "model_path": str(model_path), "train_results": summary}
    else:
        if trained_model is None:
            raise ScnymError("task='predict' needs trained_model: a model path or a pretrained model name")
        model_path = resolve_trained_model(trained_model)
        effective = make_config(config if not isinstance(config, str) else None)
        extra = {"params": effective.to_dict(), "model_path": str(model_path)}
    device = setup_runtime(effective)
    if task == "train":  # adata is the training data: already in the model's gene naming, labels in obs
        effective = effective.replace(gene_map=None, gene_species=None, training_metadata=None)
    predictor = Predictor(model_path, effective, device)
    result = predict_in_memory(predictor, open_query(effective, Path("adata"), adata=adata), effective)
    if task == "predict" and groupby is not None:
        truth = require_column(adata.obs, groupby, "groupby", "adata").astype(str).to_numpy()
        extra["evaluation"] = result.evaluate(truth).to_dict()
    _write_results(target, result, key_added, extra)
    log.info("scnym_api: wrote obs[%r], obs[%r], obsm[%r], obsm['X_scnym'], uns[%r]", key_added,
             f"{key_added}_confidence", f"{key_added}_probabilities", key_added)
    return target if copy else None


@_api_call
def scnym_interpret(
    adata,
    groupby: str,
    target: str,
    *,
    source: str = "all",
    trained_model: Union[str, Path, None] = None,
    config: Union[Mapping[str, Any], Config, None] = None,
) -> dict:
    """Expected-gradient attributions of every gene to one class, for that class's cells.

    Parameters
    ----------
    adata
        Cells x genes (raw counts or log-normalized); may contain ``Unlabeled`` cells. Not modified.
    groupby
        obs column saying which cells belong to which class.
    target
        The class to explain (a class of the model, with cells in ``obs[groupby]``).
    source
        Reference cells: ``"all"`` (every cell not labelled ``target``, Unlabeled included) or a
        class name.
    trained_model
        A model directory or a pretrained model name (see :func:`scnym_api`).
    config
        Settings (dict or Config), e.g. ``{"eg_samples": 64, "eg_max_cells": 500, "seed": 0}``.

    Returns
    -------
    ``{"saliency": pd.Series, "gradients": pd.DataFrame}``: mean attribution per gene (sorted,
    highest first) and the per-cell attributions (target cells x genes).
    """
    from .workflows.markers import explain_class
    from .store import covariates_for

    if trained_model is None:
        raise ScnymError("scnym_interpret needs trained_model: a model path or a pretrained model name")
    effective = make_config(config, lower_group=groupby)
    device = setup_runtime(effective)
    loaded = load_model(resolve_trained_model(trained_model), device)
    if target not in loaded.classes:
        raise ScnymError(f"the model does not know class {target!r}; its classes are: {', '.join(loaded.classes)}")
    cells, _ = load_cells(effective, Path("adata"), adata=adata, translate_to=loaded.genes)
    covariates = covariates_for(loaded.manifest, cells.obs, cells.source)
    cells, _ = align_genes(cells, loaded.genes, min_overlap=effective.min_gene_overlap, what="adata")
    labels = read_labels(cells, groupby, option="groupby")
    result = explain_class(loaded, cells, labels, target, source, effective, device, covariates)
    return {"saliency": result.saliency, "gradients": result.attributions}


@_api_call
def atlas2target(adata, atlas, *, key_added: str = "annotations", atlas_groupby: Optional[str] = None,
                 min_gene_overlap: float = 0.5):
    """Concatenate a labeled reference atlas with your (unlabeled) cells, ready for ``scnym_api``.

    Parameters
    ----------
    adata
        Your cells. They get ``obs[key_added] = "Unlabeled"``.
    atlas
        A local h5ad path or an AnnData with cell-type labels in ``obs[atlas_groupby]``.
    key_added
        The label column of the result: the atlas's labels, ``"Unlabeled"`` for your cells (pass it as
        ``groupby`` to :func:`scnym_api`).
    atlas_groupby
        The atlas's label column (default: ``key_added``).
    min_gene_overlap
        Stop when the shared genes are fewer than this fraction of the atlas's genes.

    Returns
    -------
    A new AnnData: atlas cells, then your cells, on the genes both share (atlas order). ``X`` is
    ln(CPM + 1), each dataset normalized over its own genes before they are joined;
    ``obs["scNym_dataset"]`` is ``atlas_reference`` or ``target_query`` (a domain column for
    ``domain_groupby``); cell ids are made unique. Neither input is modified.
    """
    import anndata

    if isinstance(atlas, (str, Path)):
        path = Path(atlas).expanduser()
        if not path.is_file():
            raise ScnymError(f"atlas {path} does not exist; give a local h5ad path or an AnnData (no downloads)")
        atlas = anndata.read_h5ad(path)
    atlas_groupby = atlas_groupby or key_added
    if atlas_groupby not in atlas.obs.columns:
        raise ScnymError(f"the atlas has no labels in obs[{atlas_groupby!r}]; name its label column with "
                         f"atlas_groupby=...; its columns: {list(atlas.obs.columns)[:20]}")
    parts = []
    for name, data in (("atlas_reference", atlas), ("target_query", adata)):
        cells, _ = load_cells(Config(), Path(name), adata=data)
        part = anndata.AnnData(X=cells.X, obs=pd.DataFrame(index=cells.cell_ids), var=pd.DataFrame(index=cells.genes))
        part.obs[key_added] = (atlas.obs[atlas_groupby].astype(str).to_numpy() if name == "atlas_reference"
                               else np.full(part.n_obs, UNLABELED))
        part.obs["scNym_dataset"] = name
        parts.append(part)
    shared = parts[0].var_names.intersection(parts[1].var_names, sort=False)
    fraction = len(shared) / max(parts[0].n_vars, 1)
    if fraction < min_gene_overlap or len(shared) == 0:
        raise ScnymError(f"your data share only {len(shared)} of the atlas's {parts[0].n_vars} genes ({fraction:.1%}); "
                         "check the gene naming (symbols vs Ensembl ids, species)")
    log.info("atlas2target: %d atlas + %d query cells on %d shared genes (%.1f%% of the atlas's)",
             parts[0].n_obs, parts[1].n_obs, len(shared), 100 * fraction)
    joined = anndata.concat([p[:, shared] for p in parts], axis=0, join="inner", index_unique="-",
                            keys=["atlas", "query"])
    joined.obs[key_added] = joined.obs[key_added].astype(str)
    joined.uns["scnym_atlas2target"] = {"n_shared_genes": int(len(shared)), "x": "log1p_cpm"}
    return joined
