"""Model cards: a ``README.md`` in every model directory and training run, written from the manifest (and the
run's tables), in the layout model hubs read (a YAML header, then Markdown): what the model is, what it was
trained on, how good it is per class, how calibrated, what it is for and what it cannot do.

A model folder can therefore be shared as it is; scnym itself never downloads anything when it runs.
``scnym print_model PATH`` shows the card in a terminal.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from .errors import ScnymError
from .store import ALL_DATA_DIR, MANIFEST_FILE

CARD_FILE = "README.md"
RUN_SUMMARY_FILE = "run_summary.json"
PER_CLASS_FILE = "per_class_metrics.csv"


def _genes_sha256(genes: list[str]) -> str:
    return hashlib.sha256("\n".join(genes).encode()).hexdigest()


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _per_class_table(per_class: pd.DataFrame) -> list[str]:
    columns = [c for c in ("class", "precision", "recall", "f1", "support", "coverage") if c in per_class.columns]
    headings = {"coverage": "prediction-set coverage"}
    lines = ["| " + " | ".join(headings.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for _, row in per_class.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    return lines


def render_card(manifest: dict[str, Any], run_summary: Optional[dict[str, Any]] = None,
                per_class: Optional[pd.DataFrame] = None, title: Optional[str] = None) -> str:
    """The card of one model (its manifest), with the cross-validation of its run when given."""
    training = manifest.get("training", {})
    config = manifest.get("config", {})
    fingerprint = manifest.get("data_fingerprint", {})
    architecture = manifest.get("model", {}).get("kwargs", {})
    name = training.get("name", "model")
    own_metrics = training.get("held_out_metrics") or training.get("model_selection_metrics") or {}
    own_cells = "held-out cells" if training.get("held_out_metrics") else "model-selection cells"
    header: dict[str, Any] = {
        "library_name": "scnym",
        "tags": ["single-cell", "scRNA-seq", "cell-type-annotation", "label-transfer", "scnym"],
        "pipeline_tag": "tabular-classification",
        "scnym_version": manifest.get("package_version"),
        "model_name": name,
        "architecture": {"class": manifest.get("model", {}).get("class"), **architecture},
        "normalization": manifest.get("normalization"),
        "species": config.get("gene_species") or "not given",
        "classes": list(manifest.get("classes", [])),
        "genes": {"count": len(manifest.get("genes", [])), "sha256": _genes_sha256(manifest.get("genes", [])),
                  "first": list(manifest.get("genes", [])[:10])},
        "training_data": {"sha256": fingerprint.get("sha256"), "n_cells": fingerprint.get("n_cells"),
                          "n_labeled": training.get("n_fit", 0) + training.get("n_select", 0)
                          + training.get("n_held_out", 0),
                          "n_target": training.get("n_target"), "input_normalization":
                          training.get("input_normalization")},
        "semi_supervised": training.get("semi_supervised"),
        "calibration": {"temperature": manifest.get("temperature")},
        "metrics": {"cells": own_cells, **{k: round(float(v), 4) for k, v in own_metrics.items()}},
        "meaning_sha256": manifest.get("meaning_sha256"),
    }
    if run_summary and run_summary.get("cross_validation"):
        header["cross_validation"] = {
            "n_folds": run_summary.get("n_folds"),
            **{k: {"mean": round(v["mean"], 4), "std": round(v["std"], 4)}
               for k, v in run_summary["cross_validation"].items()}}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {title or f'scnym cell-type classifier: {name}'}", "",
             f"A {architecture.get('n_layers', '?')}-layer, {architecture.get('n_hidden', '?')}-wide scnym "
             f"classifier of {len(manifest.get('classes', []))} cell types from {len(manifest.get('genes', []))} "
             f"genes (ln(CPM + 1) of counts), trained with scnym {manifest.get('package_version')} "
             + ("semi-supervised (MixMatch and a domain adversary on unlabeled target cells)."
                if training.get("semi_supervised") else "on labeled cells only (supervised)."), "",
             "## Training data", "",
             f"- {fingerprint.get('n_cells', '?')} cells x {fingerprint.get('n_genes', '?')} genes "
             f"(data checksum `{str(fingerprint.get('sha256', ''))[:16]}…`), input read as "
             f"{training.get('input_normalization', '?')}",
             f"- labeled cells: {training.get('n_fit', '?')} fit, {training.get('n_select', '?')} for model "
             f"selection, {training.get('n_held_out', 0)} held out; target (unlabeled) cells: "
             f"{training.get('n_target', 0)}",
             f"- classes: {', '.join(manifest.get('classes', []))}",
             f"- settings: {config.get('n_epochs', '?')} epochs (kept epoch {training.get('best_epoch', '?')} of "
             f"{training.get('epochs_run', '?')}), seed {config.get('seed', '?')}; every setting is in "
             f"`{MANIFEST_FILE}`", ""]
    lines += ["## Evaluation", ""]
    if run_summary and run_summary.get("cross_validation"):
        cv = run_summary["cross_validation"]
        lines += [f"Cross-validation ({run_summary.get('n_folds')} folds; each fold's model scored on the cells "
                  "it never saw):", "",
                  "| metric | mean | std |", "|---|---|---|",
                  *[f"| {k} | {v['mean']:.4f} | {v['std']:.4f} |" for k, v in cv.items()], ""]
        if per_class is not None and len(per_class):
            lines += ["Per class (held-out predictions of all folds pooled; low recall = a type this model "
                      "misses):", "", *_per_class_table(per_class), ""]
    if own_metrics:
        lines += [f"This model on its {own_cells}: "
                  + ", ".join(f"{k} {float(v):.4f}" for k, v in own_metrics.items()), ""]
    run_conformal = (run_summary or {}).get("conformal", {})
    conformal = run_conformal.get("over_all_cells")
    lines += ["## Calibration and uncertainty", "",
              f"Probabilities are temperature-scaled (T = {_fmt(manifest.get('temperature'))}) on labeled cells "
              "the weights were not fit on. Prediction can add conformal prediction sets (`--coverage 0.9`), a "
              "novelty score and Unknown calls (`--unknown_rate`)"
              + (f"; in cross-validation, sets at coverage {run_conformal.get('coverage')} held the true "
                 f"type for {100 * conformal['coverage']:.1f}% of cells with {conformal['mean_set_size']:.2f} types "
                 "on average." if conformal else "."), "",
              "## Intended use", "",
              "Annotating cell types of new single-cell RNA-seq data of the same tissue(s) and species, from "
              "counts or log-normalized values, by label transfer from this reference; as a first pass to be "
              "checked against markers, not as a diagnosis.", "",
              "## Limitations", "",
              "- It knows only the classes above: cells of other types get the closest known type unless "
              "Unknown calls are asked for (`--unknown_rate`), and their confidence can still be high.",
              "- Accuracy drops under strong shifts (other studies, technologies, species); rare types are the "
              "first to be lost — check per-class recall above and the query's own labels when there are some.",
              f"- Genes missing from a query are read as zero; prediction refuses queries with under "
              f"{config.get('min_gene_overlap', 0.5):.0%} of the model's genes.", "",
              "## How to use", "",
              "```bash",
              "scnym predict_cell_types --model_path THIS_FOLDER --input_counts query.h5ad --out_path predictions",
              "```", "",
              "```python",
              "import scnym_cli",
              "model = scnym_cli.Model.load(\"THIS_FOLDER\")",
              "predictions = model.predict(adata)",
              "```", "",
              f"Files: `{MANIFEST_FILE}` (genes, classes, architecture, settings, checksums), "
              f"`{manifest.get('weights_file', 'weights')}` (safetensors), calibration and novelty references. "
              "Loading checks every checksum.", ""]
    return "\n".join(lines)


def _run_facts(run_directory: Path) -> tuple[Optional[dict], Optional[pd.DataFrame]]:
    summary_path, per_class_path = run_directory / RUN_SUMMARY_FILE, run_directory / PER_CLASS_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    per_class = pd.read_csv(per_class_path) if per_class_path.is_file() else None
    return summary, per_class


def write_model_card(model_directory: Path, run_summary: Optional[dict] = None,
                     per_class: Optional[pd.DataFrame] = None) -> Path:
    manifest = json.loads((model_directory / MANIFEST_FILE).read_text())
    path = model_directory / CARD_FILE
    path.write_text(render_card(manifest, run_summary, per_class))
    return path


def write_run_cards(run_directory: Path, run_summary: dict) -> None:
    """The run's card (its all_data model with the run's cross-validation) at the top of the run, and the same
    in all_data/ (fold models keep their own)."""
    per_class = pd.read_csv(run_directory / PER_CLASS_FILE) if (run_directory / PER_CLASS_FILE).is_file() else None
    final = run_directory / ALL_DATA_DIR
    manifest = json.loads((final / MANIFEST_FILE).read_text())
    text = render_card(manifest, run_summary, per_class)
    (final / CARD_FILE).write_text(text)
    (run_directory / CARD_FILE).write_text(
        text.replace("# scnym cell-type classifier: all_data",
                     f"# scnym training run: {len(manifest.get('classes', []))} cell types\n\nThe run's final model "
                     "(all_data/, trained on every labeled cell) and its cross-validation folds; given as "
                     "--model_path, the run predicts with its models together (--ensemble).", 1))


def card_text(path: Path) -> str:
    """The card of a model directory or training run: its README.md, else one written from its manifest (a
    model of an older scnym)."""
    path = Path(path)
    if (path / CARD_FILE).is_file():
        return (path / CARD_FILE).read_text()
    if (path / ALL_DATA_DIR / MANIFEST_FILE).is_file():   # a run without a card
        summary, per_class = _run_facts(path)
        return render_card(json.loads((path / ALL_DATA_DIR / MANIFEST_FILE).read_text()), summary, per_class)
    if (path / MANIFEST_FILE).is_file():
        return render_card(json.loads((path / MANIFEST_FILE).read_text()))
    raise ScnymError(f"{path} is not a scnym model (no {MANIFEST_FILE}) nor a training run (no "
                     f"{ALL_DATA_DIR}/{MANIFEST_FILE}); give a model directory or a run directory")
