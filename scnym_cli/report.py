"""Plots and tables people look at: training curves, confusion matrices, reliability, embedding maps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import pandas as pd

from .data.labels import Labels

if TYPE_CHECKING:
    from .train.metrics import LabelCounts


def _figure(figsize: tuple[float, float]):
    """A figure drawn off-screen, outside pyplot: no backend is chosen or switched (a notebook keeps its own)
    and nothing is left registered to close."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def predictions_table(cell_ids, predicted, confidence, probabilities: np.ndarray, classes: Sequence[str], *,
                      known: Optional[dict] = None, extra: Optional[dict] = None) -> pd.DataFrame:
    """The per-cell table every predictions.csv has: cell_id, [``known`` columns: split, true_label],
    predicted_label, confidence, [``extra`` columns: novelty, disagreement, prediction_set, set_size],
    prob_<class> for every class."""
    table = pd.DataFrame({"cell_id": cell_ids, **(known or {}), "predicted_label": predicted,
                          "confidence": confidence, **(extra or {})})
    probability_columns = pd.DataFrame(probabilities, columns=[f"prob_{c}" for c in classes], index=table.index)
    return pd.concat([table, probability_columns], axis=1)


# what each logged column of an epoch means on the plot (semi-supervised runs log every term of the loss)
LOSS_TERMS = {"train_loss": "training loss (total)", "supervised_loss": "supervised (labeled cells)",
              "unsupervised_loss": "MixMatch consistency (target cells)", "domain_loss": "domain adversary",
              "select_loss": "selection-split loss"}
RATE_TERMS = {"train_accuracy": "training accuracy", "select_accuracy": "selection accuracy",
              "select_balanced_accuracy": "selection balanced accuracy", "domain_accuracy": "domain classifier accuracy",
              "confident_fraction": "confident target fraction", "unsup_weight": "consistency weight",
              "dan_weight": "adversary weight"}


def plot_training_curve(history: pd.DataFrame, path: Path, title: str, best_epoch: int | None = None) -> None:
    """Every loss term per epoch (the total, and for semi-supervised runs its supervised, consistency and
    adversary parts, and the selection split's loss), then accuracies and the ramped weights."""
    fig = _figure((11, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = history["epoch"]
    for axis, terms in ((ax_loss, LOSS_TERMS), (ax_acc, RATE_TERMS)):
        for column, label in terms.items():
            if column in history.columns:
                axis.plot(epochs, history[column], label=label,
                          linestyle="--" if column in ("unsup_weight", "dan_weight") else "-")
    for ax, ylabel in ((ax_loss, "loss"), (ax_acc, "accuracy / share / weight")):
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# cells drawn on an embedding map (a seeded sample): enough to see every type, small enough for a light page
MAP_CELLS = 5000
EMBEDDING_MAP_FILE = "embedding_map.csv"


def principal_components(embedding: np.ndarray, n: int = 2) -> np.ndarray:
    """The first ``n`` principal components of an embedding (deterministic: a full SVD)."""
    from sklearn.decomposition import PCA

    if len(embedding) < n:
        return np.zeros((len(embedding), n), dtype=np.float32)
    return PCA(n_components=n, svd_solver="full").fit_transform(embedding).astype(np.float32)


def plot_embedding_map(cells: pd.DataFrame, path: Path, title: str) -> None:
    """A 2-D map of the model's embedding (columns x, y), one panel per coloring column present: label,
    predicted, confidence, domain (categories coloured; confidence on a scale)."""
    panels = [c for c in ("label", "predicted", "confidence", "domain", "novelty") if c in cells.columns]
    fig = _figure((5.2 * min(len(panels), 2), 4.4 * ((len(panels) + 1) // 2)))
    axes = fig.subplots((len(panels) + 1) // 2, min(len(panels), 2), squeeze=False).ravel()
    for axis, column in zip(axes, panels):
        values = cells[column]
        if pd.api.types.is_numeric_dtype(values):
            points = axis.scatter(cells["x"], cells["y"], c=values, s=3, cmap="viridis", linewidths=0)
            fig.colorbar(points, ax=axis, shrink=0.8)
        else:
            categories = sorted(values.astype(str).unique())
            colours = _palette(len(categories))
            for index, category in enumerate(categories):
                at = values.astype(str) == category
                axis.scatter(cells.loc[at, "x"], cells.loc[at, "y"], s=3, color=colours[index], label=category,
                             linewidths=0)
            axis.legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        axis.set_title(column, fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    for axis in axes[len(panels):]:
        axis.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    name, size = ("tab20", 20) if n > 10 else ("tab10", 10)
    colormap = colormaps[name]
    return [colormap(i % size) for i in range(n)]


def confusion_table(truth: Labels, predicted: Labels, classes: Sequence[str]) -> pd.DataFrame:
    """Counts, rows = true class (classes + any other true labels), columns = predicted class (classes + any
    other predicted labels, e.g. Unknown)."""
    from .train.metrics import LabelCounts

    return confusion_frame(LabelCounts.of(truth, predicted, classes), len(classes))


def confusion_frame(table: "LabelCounts", n_classes: int) -> pd.DataFrame:
    """:func:`confusion_table` of counts whose first ``n_classes`` names are the model's classes."""
    names = np.arange(len(table.names))
    rows = (names < n_classes) | (table.support > 0)
    columns = (names < n_classes) | (table.called > 0)
    return pd.DataFrame(table.counts[np.ix_(rows, columns)],
                        index=pd.Index(np.asarray(table.names, dtype=object)[rows], name="true"),
                        columns=pd.Index(np.asarray(table.names, dtype=object)[columns], name="predicted"))


def plot_confusion_matrix(table: pd.DataFrame, path: Path, title: str) -> None:
    """Row-normalized confusion matrix (recall on the diagonal) with counts in each cell."""
    counts = table.to_numpy()
    totals = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, totals, out=np.zeros_like(counts, dtype=float), where=totals > 0)
    size = max(4.5, 0.55 * max(counts.shape) + 2)
    fig = _figure((size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(counts.shape[1]), table.columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(counts.shape[0]), table.index, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            if counts[i, j]:
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if fractions[i, j] > 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_reliability_diagram(table: pd.DataFrame, path: Path, title: str, ece: float, ece_floor: float) -> None:
    """Accuracy against confidence per bin (bars, width = bin), the diagonal of perfect calibration, and
    how many cells each bin holds; ``ece_floor``: what a calibrated model would show at this many cells."""
    fig = _figure((4.8, 5.6))
    ax, ax_count = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    filled = table[table["n_cells"] > 0]
    width = float((table["bin_high"] - table["bin_low"]).iloc[0])
    ax.bar(filled["bin_low"], filled["accuracy"], width=width, align="edge", edgecolor="black", color="#7aa6d6",
           label="accuracy")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    ax.scatter(filled["mean_confidence"], filled["accuracy"], color="black", s=10, zorder=3,
               label="mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(f"{title}\nECE {ece:.3f} (a calibrated model: ~{ece_floor:.3f} at this many cells)", fontsize=9)
    ax_count.bar(table["bin_low"], table["n_cells"], width=width, align="edge", edgecolor="black", color="#bbbbbb")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("cells")
    ax_count.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@dataclass
class LabeledEvaluation:
    """Predictions scored against known labels: per-class table, confusion matrix, reliability bins, ECE."""

    metrics: dict
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    reliability: pd.DataFrame

    def to_dict(self) -> dict:
        """Plain values (for JSON summaries and AnnData.uns)."""
        return {"metrics": self.metrics, "per_class": self.per_class.to_dict(orient="list"),
                "confusion": {"true": [str(i) for i in self.confusion.index],
                              "predicted": [str(c) for c in self.confusion.columns],
                              "counts": self.confusion.to_numpy().tolist()},
                "reliability": self.reliability.to_dict(orient="list")}


def evaluate_labeled(truth: Labels, predicted: Labels, confidence: np.ndarray,
                     classes: Sequence[str], in_set: Optional[np.ndarray] = None,
                     set_size: Optional[np.ndarray] = None) -> LabeledEvaluation:
    """Scores of predictions whose true labels are known. Confusion rows: the model's classes, then labels it
    does not know (they count as errors); the ECE and the reliability bins cover cells of known classes.

    With conformal prediction sets (``in_set``: whether a cell's set holds its true class; ``set_size``):
    their coverage and mean size, overall (cells of known classes) and per class."""
    tally = LabeledTally(classes, with_sets=in_set is not None and set_size is not None)
    tally.add(truth, predicted, confidence, in_set, set_size)
    return tally.evaluation()


class LabeledTally:
    """:func:`evaluate_labeled` gathered block by block (a streamed query): a table of counts over integer
    label codes, confidence bins and set coverage per true label; nothing is kept per cell, and no label is
    turned into per-cell text."""

    ECE_BINS, RELIABILITY_BINS = 15, 10

    def __init__(self, classes: Sequence[str], *, with_sets: bool = False):
        self.classes = [str(c) for c in classes]
        self.names = list(self.classes)             # classes first, then other labels as they come
        self.counts = np.zeros((len(self.names), len(self.names)), dtype=np.int64)
        self.ece_bins = np.zeros((3, self.ECE_BINS))
        self.reliability_bins = np.zeros((3, self.RELIABILITY_BINS))
        self.with_sets = with_sets
        self.set_sums = np.zeros((3, len(self.names)))  # per true label: cells, sets holding it, summed sizes
        self.empty_sets = 0

    def _codes(self, labels: Labels) -> np.ndarray:
        from .train.metrics import codes_in

        codes, names = codes_in(labels, self.names)
        if len(names) > len(self.names):             # labels not seen before: the tables grow
            grow = len(names) - len(self.names)
            self.counts = np.pad(self.counts, ((0, grow), (0, grow)))
            self.set_sums = np.pad(self.set_sums, ((0, 0), (0, grow)))
            self.names = names
        return codes

    def add(self, truth: Labels, predicted: Labels, confidence: np.ndarray,
            in_set: Optional[np.ndarray] = None, set_size: Optional[np.ndarray] = None) -> None:
        from .train.metrics import confidence_bins

        t, p = self._codes(truth), self._codes(predicted)
        n = len(self.names)
        self.counts += np.bincount(t * n + p, minlength=n * n).reshape(n, n)
        known = t < len(self.classes)
        confidence = np.asarray(confidence, dtype=np.float64)[known]
        correct = p[known] == t[known]
        self.ece_bins += confidence_bins(confidence, correct, self.ECE_BINS)
        self.reliability_bins += confidence_bins(confidence, correct, self.RELIABILITY_BINS)
        if self.with_sets and in_set is not None and set_size is not None:
            self.set_sums += np.stack([np.bincount(t, minlength=n),
                                       np.bincount(t, weights=np.asarray(in_set, dtype=np.float64), minlength=n),
                                       np.bincount(t, weights=np.asarray(set_size, dtype=np.float64), minlength=n)])
            self.empty_sets += int((np.asarray(set_size)[known] == 0).sum())

    def other_labels(self) -> dict[str, int]:
        """Cells per true label the classes lack (the query's own types, or typos in its labels)."""
        k = len(self.classes)
        return {self.names[i]: int(self.counts[i].sum()) for i in range(k, len(self.names)) if self.counts[i].sum()}

    def evaluation(self) -> LabeledEvaluation:
        from .train.metrics import (LabelCounts, calibration_error_floor, calibration_error_of, per_class_table,
                                    reliability_table_of, summary_metrics)

        # the vocabulary LabelCounts.of gives: classes, other true labels, other predicted labels (each sorted)
        k = len(self.classes)
        others = range(k, len(self.names))
        true_others = sorted((i for i in others if self.counts[i].sum() > 0), key=lambda i: self.names[i])
        order = list(range(k)) + true_others + sorted((i for i in others if i not in set(true_others)),
                                                      key=lambda i: self.names[i])
        table = LabelCounts([self.names[i] for i in order], self.counts[np.ix_(order, order)])
        metrics = {**summary_metrics(table), "ece": calibration_error_of(self.ece_bins),
                   "ece_floor": calibration_error_floor(self.ece_bins)}
        per_class = per_class_table(table, k)
        if self.with_sets:
            cells, covered, sizes = self.set_sums[:, order][:, :len(per_class)]
            n_known = cells[:k].sum()
            with np.errstate(invalid="ignore", divide="ignore"):
                metrics.update(coverage=float(covered[:k].sum() / n_known) if n_known else float("nan"),
                               mean_set_size=float(sizes[:k].sum() / n_known) if n_known else float("nan"),
                               empty_sets=float(self.empty_sets / n_known) if n_known else float("nan"))
                per_class["coverage"] = np.where(per_class["in_reference"] & (cells > 0), covered / cells, np.nan)
                per_class["mean_set_size"] = np.where(cells > 0, sizes / cells, np.nan)
        return LabeledEvaluation(metrics, per_class, confusion_frame(table, k),
                                 reliability_table_of(self.reliability_bins))


def write_labeled_report(directory: Path, evaluation: LabeledEvaluation, title: str) -> None:
    """``per_class_metrics.csv``, ``confusion_matrix.csv`` / ``.png`` (row-normalized colours, counts),
    ``reliability.csv`` / ``reliability_diagram.png`` in ``directory``."""
    evaluation.per_class.to_csv(directory / "per_class_metrics.csv", index=False)
    evaluation.confusion.to_csv(directory / "confusion_matrix.csv")
    n_cells = int(evaluation.confusion.to_numpy().sum())
    plot_confusion_matrix(evaluation.confusion, directory / "confusion_matrix.png", f"{title} ({n_cells} cells)")
    evaluation.reliability.to_csv(directory / "reliability.csv", index=False)
    plot_reliability_diagram(evaluation.reliability, directory / "reliability_diagram.png", title,
                             evaluation.metrics["ece"], evaluation.metrics["ece_floor"])


def plot_marker_heatmap(top_markers: dict[str, list[str]], genes: Sequence[str], cells, labels, path: Path,
                        title: str, n_top: int = 10) -> None:
    """Rows: the top markers of each class (in class order); columns: classes.

    With labeled cells, each cell shows the class's mean ln(CPM+1) expression, scaled per gene to
    [0, 1] (like scanpy's matrixplot); without cells, the marker's rank within its class.
    """
    classes = list(top_markers)
    rows = [(c, g) for c in classes for g in top_markers[c][:n_top]]
    row_genes = [g for _, g in rows]
    if cells is not None:
        positions = pd.Index(genes).get_indexer(row_genes)
        present = [c for c in classes if (labels == c).any()]
        means = np.vstack([np.asarray(cells.X[np.flatnonzero(labels == c)][:, positions].mean(axis=0)).ravel()
                           for c in present]).T
        span = means.max(axis=1, keepdims=True) - means.min(axis=1, keepdims=True)
        values = np.divide(means - means.min(axis=1, keepdims=True), span, out=np.zeros_like(means),
                           where=span > 0)
        columns, label = present, "mean expression, scaled per gene"
    else:
        values = np.array([[1.0 - k / n_top if c == owner else 0.0 for c in classes]
                           for owner in classes for k in range(min(n_top, len(top_markers[owner])))])
        columns, label = classes, "marker rank (1 = top)"
    fig = _figure((1.2 + 0.45 * len(columns) + 2, 1.5 + 0.16 * len(rows)))
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [f"{g}  ({c})" for c, g in rows], fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.05, label=label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
