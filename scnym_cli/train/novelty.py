"""Novelty: how unlike every reference cell a cell is, and "Unknown" at a chosen rate of false Unknowns.

A cell's own score is the mean cosine distance from its embedding to its ``k`` nearest reference cells.
Left-one-class-out on the visible splits it separates cells of a type the model was not trained on
from known ones far better than 1 - confidence, which a model trained to be confident about every
reference type gives away for neighbours of a known type (bench/results/novelty.md).

A classifier's embedding keeps only what tells the reference's types apart, so a cell of a new type lands
close to a known type, and one cell's distance is a noisy signal. A new type is a group of query cells,
though, and the query's own gene expression still shows that group: :class:`QueryClusters` groups the query's
cells in gene space (k-means on principal components of a sample of them) and gives every cell the mean
distance of its group, which separates new types from known ones markedly better on the visible splits.

At training a bank of reference embeddings (fit cells, at most ``BANK_CELLS``, drawn per class) is
kept beside the model, with the sorted scores of the model-selection cells: known types the weights
were not fit on. ``--unknown_rate r`` calls a query cell Unknown when its score is above the
(1 - r) quantile of theirs, so about r of the known cells of a query like the reference are lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.torch import load_file, save_file

from ..data.matrix import sparse_product

# the bank's size sets the cost: a 256-wide embedding scored against 2,000 cells is a 1 GFLOP matrix product
# per 1,000 query cells, about what the classifier's own forward pass costs on 2,000 genes
BANK_CELLS = 2000
K_NEAREST = 10
# model-selection cells whose scores set the thresholds (a random draw of them on large data)
SELECTION_CELLS = 5000
NOVELTY_FILE = "novelty_reference.safetensors"
# query rows scored against the bank at once: 1,024 x 2,000 distances = 8 MB
SCORE_ROWS = 1024

# query clusters: fit on a random sample of the query's cells, over its most variable genes of the model's
# (a dense 10,000 x 2,000 sample is 80 MB whatever the query's size), on that many principal components
CLUSTER_CELLS = 10_000
CLUSTER_GENES = 2000
CLUSTER_COMPONENTS = 30
# a cluster needs this many sampled cells for its mean to say more than one cell's score
MIN_CELLS_PER_CLUSTER = 20
# standardized expression is clipped here for fitting the clusters (as scanpy's scale(max_value=10)): without
# it, the visible splits' leave-one-class-out AUROC of the cluster-profile score fell from 0.815 to 0.755
CLIP = 10.0
# below this a gene's variance over the sample is the float error of E[x^2] - E[x]^2 (ln(CPM+1) units): constant
MIN_VARIANCE = 1e-6


def bank_rows(codes: np.ndarray, rows: np.ndarray, seed: int, cells: int = BANK_CELLS) -> np.ndarray:
    """At most ``cells`` of ``rows``, the same share of each class (all of a smaller class), sorted."""
    rng = np.random.default_rng(seed)
    classes = np.unique(codes[rows])
    share = max(1, cells // max(len(classes), 1))
    drawn = [rng.permutation(rows[codes[rows] == c])[:share] for c in classes]
    return np.sort(np.concatenate(drawn)) if drawn else np.array([], dtype=np.int64)


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class NoveltyReference:
    """The reference bank (unit-length embeddings) and the model-selection cells' sorted scores."""

    bank: torch.Tensor
    selection_scores: np.ndarray
    k: int = K_NEAREST

    @classmethod
    def build(cls, bank_embedding: np.ndarray, selection_embedding: np.ndarray,
              k: int = K_NEAREST) -> "NoveltyReference":
        reference = cls(_unit(torch.as_tensor(bank_embedding, dtype=torch.float32)), np.zeros(0), k)
        reference.selection_scores = np.sort(reference.score(selection_embedding))
        return reference

    def score(self, embedding: np.ndarray, dtype: torch.dtype = torch.float32) -> np.ndarray:
        """Mean cosine distance of each embedding to its k nearest bank cells (0 = on top of reference cells).

        ``dtype``: the similarities' matrix product in bfloat16 (prediction's --inference_precision) is 3x
        faster on CPUs with bfloat16 instructions and moves a score by at most ~1e-3.
        """
        k = min(self.k, self.bank.shape[0])
        bank = self.bank if dtype == torch.float32 else self.bank.to(dtype)
        scores = []
        for start in range(0, len(embedding), SCORE_ROWS):
            query = _unit(torch.as_tensor(embedding[start:start + SCORE_ROWS], dtype=torch.float32))
            similarity = query.to(dtype) @ bank.T
            # the k largest picked in the product's own format (exactly those of it in float32, and cheaper)
            nearest = similarity.topk(k, dim=1).values.float()
            scores.append((1 - nearest).mean(dim=1).numpy())
        return np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)

    def threshold(self, rate: float) -> float:
        """The score above which a share ``rate`` of the model-selection (known) cells lies."""
        if len(self.selection_scores) == 0:
            return float("inf")
        return float(np.quantile(self.selection_scores, 1.0 - rate))

    def save(self, directory: Path) -> Path:
        path = Path(directory) / NOVELTY_FILE
        save_file({"bank": self.bank.contiguous(), "selection_scores": torch.from_numpy(
            np.ascontiguousarray(self.selection_scores, dtype=np.float32)), "k": torch.tensor([self.k])},
                  str(path), metadata={"format": "pt"})
        return path

    @classmethod
    def load(cls, directory: Path) -> Optional["NoveltyReference"]:
        """The model's novelty reference, or None for a model trained without one (older scnym)."""
        path = Path(directory) / NOVELTY_FILE
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        return cls(tensors["bank"].float(), tensors["selection_scores"].numpy().astype(np.float64),
                   int(tensors["k"][0]))


@dataclass
class QueryClusters:
    """Groups of a query's cells in its own gene space, each with the mean novelty of its sampled cells.

    Fit once per query on a random sample (:meth:`fit`); every block of the query is then assigned to the
    nearest group (:meth:`score`), so a cell's novelty is its group's and memory does not grow with the query.
    Genes are standardized over the query's sample (each dataset on its own scale: a shift in a gene's
    baseline between reference and query moves no cell). Standardizing and projecting onto the principal
    components is one linear map, so a block is placed by one sparse-dense product, never densified.
    """

    projection: np.ndarray   # model genes x components: a cell's components are X @ projection - offset
    offset: np.ndarray
    centroids: np.ndarray    # clusters x components
    novelty: np.ndarray      # each cluster's mean cell novelty

    @classmethod
    def fit(cls, X: sp.csr_matrix, cell_novelty: np.ndarray, n_clusters: int,
            seed: int) -> Optional["QueryClusters"]:
        """Clusters of the sample ``X`` (ln(CPM+1) over the model's genes); None when it is too small to hold
        two clusters of MIN_CELLS_PER_CLUSTER cells (a cell's own novelty is then used)."""
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        n_clusters = min(n_clusters, X.shape[0] // MIN_CELLS_PER_CLUSTER)
        if n_clusters < 2:
            return None
        X = sp.csr_matrix(X, dtype=np.float32)
        mean = np.asarray(X.mean(axis=0), dtype=np.float64).ravel()
        variance = np.asarray(X.multiply(X).mean(axis=0), dtype=np.float64).ravel() - mean ** 2
        genes = np.sort(np.argsort(-variance, kind="stable")[:CLUSTER_GENES])
        genes = genes[variance[genes] > MIN_VARIANCE]
        if len(genes) < 2:
            return None
        # float32 from here: the dense sample and the decomposition's copies of it are the memory this costs
        scale, center = np.sqrt(variance[genes]).astype(np.float32), mean[genes].astype(np.float32)
        # bounded: at most CLUSTER_CELLS x CLUSTER_GENES; clipped, so that a few extreme cells do not make
        # components and clusters of their own (placing cells later skips the clip: the same cluster for all but
        # such cells, and one sparse product)
        Z = X[:, genes].toarray()
        Z -= center
        Z /= scale
        np.clip(Z, -CLIP, CLIP, out=Z)
        pca = PCA(min(CLUSTER_COMPONENTS, len(genes), X.shape[0] - 1), svd_solver="randomized", random_state=seed,
                  copy=False)   # centers Z in place: one dense copy of the sample, not two
        P = pca.fit_transform(Z)
        kmeans = KMeans(n_clusters, n_init=3, random_state=seed).fit(P)
        members = np.bincount(kmeans.labels_, minlength=n_clusters)
        sums = np.bincount(kmeans.labels_, weights=np.asarray(cell_novelty, dtype=np.float64), minlength=n_clusters)
        # ((x - mean) / scale - pca.mean_) @ components.T = x @ (components / scale).T - offset (unclipped)
        projection = np.zeros((X.shape[1], pca.n_components_))
        projection[genes] = (pca.components_ / scale).T
        offset = (center / scale + pca.mean_) @ pca.components_.T
        return cls(projection.astype(np.float32), offset.astype(np.float32),
                   kmeans.cluster_centers_.astype(np.float32), (sums / np.maximum(members, 1)).astype(np.float32))

    def assign(self, X: sp.csr_matrix) -> np.ndarray:
        """The nearest cluster of each cell of ``X`` (ln(CPM+1) over the model's genes)."""
        P = sparse_product(X, self.projection) - self.offset
        distances = (P ** 2).sum(axis=1, keepdims=True) - 2 * P @ self.centroids.T + (self.centroids ** 2).sum(axis=1)
        return distances.argmin(axis=1)

    def score(self, X: sp.csr_matrix) -> np.ndarray:
        """Each cell's novelty: the mean novelty of the sampled cells of its cluster."""
        return self.novelty[self.assign(X)]
