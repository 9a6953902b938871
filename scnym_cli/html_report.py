"""``report.html``: the page a user opens first after a training run or a prediction.

One self-contained file (images inlined as PNG, no script, nothing fetched): the run's summary, per-class
metrics (low recall marked: a rare type lost shows at a glance), the confusion matrix, calibration, the
training curves of every model with every loss term, and a 2-D map of the embedding coloured by label,
prediction, confidence and domain. Written from the files the run already wrote, so the page and the tables
always agree.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import pandas as pd

from .report import EMBEDDING_MAP_FILE, plot_embedding_map

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
# per-class recall under this is marked on the page
LOW_RECALL = 0.5

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;
color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
tr.low td{background:#fde2e2}img{max-width:100%;height:auto;border:1px solid #eee;margin:.3em 0}
.muted{color:#666;font-size:.9em}nav a{margin-right:1em}code{background:#f4f4f4;padding:0 .2em}
"""


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="muted">({html.escape(alt)}: not available)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(frame: pd.DataFrame, low_rows: Optional[Iterable[bool]] = None, digits: int = 3) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    marks = list(low_rows) if low_rows is not None else [False] * len(frame)
    for (_, row), low in zip(frame.iterrows(), marks):
        cells = "".join(f"<td>{html.escape(f'{v:.{digits}f}' if isinstance(v, float) else str(v))}</td>"
                        for v in row)
        rows.append(f'<tr{" class=low" if low else ""}>{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _facts(items: dict[str, Any]) -> str:
    shown = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in items.values()]
    return _table(pd.DataFrame({"": list(items), "value": shown}))


def _per_class_section(directory: Path, what: str) -> str:
    path = directory / "per_class_metrics.csv"
    if not path.is_file():
        return ""
    per_class = pd.read_csv(path)
    shown = per_class[[c for c in ("class", "support", "predicted", "precision", "recall", "f1", "coverage",
                                   "mean_set_size") if c in per_class.columns]]
    low = (per_class["recall"] < LOW_RECALL) if "recall" in per_class.columns else None
    return (f'<h2 id="per-class">Per class ({html.escape(what)})</h2>'
            f'<p class="muted">Rows in red: recall under {LOW_RECALL} (a type this model mostly misses). '
            "coverage / mean_set_size: of the prediction sets at 0.9.</p>" + _table(shown, low)
            + '<h2 id="confusion">Confusion matrix</h2>' + _image(directory / "confusion_matrix.png", "confusion matrix")
            + '<h2 id="calibration">Calibration</h2><p class="muted">Accuracy against confidence: on the diagonal, '
              "a confidence of 0.8 is right 8 times in 10.</p>"
            + _image(directory / "reliability_diagram.png", "reliability diagram"))


def _map_section(map_file: Path, title: str) -> str:
    if not map_file.is_file():
        return ""
    cells = pd.read_csv(map_file)
    with tempfile.TemporaryDirectory(prefix="scnym-report-") as scratch:
        figure = Path(scratch) / "map.png"
        plot_embedding_map(cells, figure, title)
        image = _image(figure, "embedding map")
    return (f'<h2 id="map">Embedding map</h2><p class="muted">{len(cells)} cells (a seeded sample), the model\'s '
            "embedding on its first two principal components.</p>" + image)


def _page(title: str, subtitle: str, sections: list[tuple[str, str]], body: str) -> str:
    nav = "".join(f'<a href="#{anchor}">{html.escape(name)}</a>' for anchor, name in sections)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><style>{_STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=muted>{html.escape(subtitle)}</p><nav>{nav}</nav>{body}"
            "</body></html>")


def write_run_report(directory: Path, summary: dict[str, Any]) -> Path:
    """report.html of a training run, from its run_summary (given), tables, model logs and map."""
    config = json.loads((directory / "scnym_config.json").read_text())
    facts = {"command": summary.get("command"), "scnym": summary.get("package_version"),
             "cells": summary.get("n_cells"), "labeled cells": summary.get("n_labeled"),
             "target (unlabeled) cells": summary.get("n_target"), "genes": summary.get("n_genes"),
             "classes": ", ".join(summary.get("classes", [])), "folds": summary.get("n_folds"),
             "device": summary.get("device"), "seconds": summary.get("seconds"),
             "input": config.get("input_counts"), "settings": ", ".join(
                 f"{k}={config.get(k)}" for k in ("n_epochs", "batch_size", "lr", "optimizer", "seed")
                 + (("unsup_max_weight", "dan_max_weight") if summary.get("n_target") else ()) if k in config)}
    body = '<h2 id="summary">Summary</h2>' + _facts(facts)
    cv = summary.get("cross_validation")
    if cv:
        body += ('<h2 id="cv">Cross-validation</h2><p class="muted">Each fold\'s model scored on the cells it never '
                 "saw.</p>" + _table(pd.DataFrame([{"metric": k, "mean": v["mean"], "std": v["std"]}
                                                   for k, v in cv.items()]), digits=4))
        body += _per_class_section(directory, "held-out cells of all folds")
    # each model drew its own training curve when it was trained (every loss term): inlined, not drawn again
    models = sorted(p for p in directory.iterdir() if p.is_dir() and (p / "training_curve.png").is_file())
    curves = [f"<h3>{html.escape(model.name)}</h3>" + _image(model / "training_curve.png", f"{model.name} training curve")
              for model in models]
    body += '<h2 id="training">Training curves</h2>' + "".join(curves)
    body += _map_section(directory / "all_data" / EMBEDDING_MAP_FILE, "all_data model")
    sections = [("summary", "Summary"), ("cv", "Cross-validation"), ("per-class", "Per class"),
                ("confusion", "Confusion"), ("calibration", "Calibration"), ("training", "Training"),
                ("map", "Embedding map")]
    page = _page(f"scnym training run: {len(summary.get('classes', []))} cell types", str(config.get("out_path")),
                 [(a, n) for a, n in sections if f'id="{a}"' in body], body)
    path = directory / REPORT_FILE
    path.write_text(page)
    return path


def write_prediction_report(directory: Path, summary: dict[str, Any], label_column: Optional[str]) -> Path:
    """report.html of a prediction, from its summary (given), tables and map."""
    overlap = summary.get("gene_overlap", {})
    facts = {"model": summary.get("model"), "input": summary.get("input"), "cells": summary.get("n_cells"),
             "input normalization": summary.get("input_normalization"),
             "model genes found": f"{overlap.get('n_found')} of {overlap.get('n_model_genes')}",
             "mean confidence": summary.get("mean_confidence"), "Unknown cells": summary.get("unknown_cells"),
             "seconds": summary.get("seconds")}
    counts = pd.DataFrame({"predicted type": list(summary.get("predicted_counts", {})),
                           "cells": list(summary.get("predicted_counts", {}).values())})
    body = '<h2 id="summary">Summary</h2>' + _facts(facts) + '<h2 id="counts">Predicted types</h2>' + _table(counts)
    metrics = summary.get(f"metrics_vs_{label_column}") if label_column else None
    if metrics:
        body += (f'<h2 id="metrics">Against the query\'s labels ({html.escape(str(label_column))})</h2>'
                 + _table(pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())}), digits=4)
                 + _per_class_section(directory, f"query cells vs {label_column}"))
    body += _map_section(directory / EMBEDDING_MAP_FILE, "query cells")
    sections = [("summary", "Summary"), ("counts", "Predicted types"), ("metrics", "Metrics"),
                ("per-class", "Per class"), ("confusion", "Confusion"), ("calibration", "Calibration"),
                ("map", "Embedding map")]
    page = _page("scnym prediction", str(summary.get("input")), [(a, n) for a, n in sections if f'id="{a}"' in body],
                 body)
    path = directory / REPORT_FILE
    path.write_text(page)
    return path
