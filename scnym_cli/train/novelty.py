"""Novelty: how unlike the reference's known types a cell is, and "Unknown" at a chosen rate of false Unknowns.

Two views of a cell in the model's embedding, each read as a quantile among the model-selection cells (known
types the weights were not fit on):

* **distance**: the mean cosine distance to the ``k`` nearest reference cells of a bank kept with the model;
* **mixing**: the share of the cell's own dataset among its 10 nearest neighbours in a pool of reference and
  query cells in equal numbers. Adaptation pulls a new type towards the reference, so its distance can be small;
  it still sits among its own cells rather than among reference cells. A known type's query cells, once
  adapted, sit among reference cells as a model-selection cell sits among query cells: the two datasets'
  shares are read the same way from either side, so the model-selection cells' shares set the scale. A model
  not adapted to the query leaves the whole query apart from the reference; the query's median share above the
  model-selection cells' is taken off (a new type is a minority of the query).

A cell's novelty is the mean of its two quantiles (:class:`QueryNovelty`; 0: less unusual than every known
held-out cell, 1: more than every one). A classifier's embedding keeps only what tells the reference's types
apart, so one cell's score is a noisy signal; a new type is a group of query cells, and the query's own gene
expression still shows that group: :class:`QueryClusters` groups the query's cells in gene space (k-means on
principal components of a sample of them) and gives every cell the mean novelty of its group. Leave one class
out on the visible splits this ranks the cells of a type the model was not trained on above known ones far
better than 1 - confidence, or the distance alone (bench/results/novelty.md).

``--unknown_rate r`` calls a query cell Unknown when its novelty is above the (1 - r) quantile of the
model-selection cells' own, so about r of the known cells of a query like the reference are lost. A model saved
before the mixing view (no model-selection embeddings kept) scores the distance alone, unscaled.
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
# of those, the cells whose embeddings are kept with the model, to set the mixing view's scale against a query
SELECTION_KEPT = 2000
# a cell's neighbours in the pool of reference and query cells whose share from its own dataset is its mixing
MIXING_NEIGHBOURS = 10
# cells of each dataset in the pool at the least: fewer (a query of a few dozen cells) and the distance alone is used
MIN_POOL_CELLS = 50
# a query cell of the pool is not its own neighbour: pool cells this similar to it are itself
SELF_SIMILARITY = 1 - 1e-5
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
    """The reference bank (unit-length embeddings), the model-selection cells' sorted distances, and (models
    of this scnym) the unit-length embeddings of up to SELECTION_KEPT model-selection cells."""

    bank: torch.Tensor
    selection_scores: np.ndarray
    k: int = K_NEAREST
    selection: Optional[torch.Tensor] = None

    @classmethod
    def build(cls, bank_embedding: np.ndarray, selection_embedding: np.ndarray, k: int = K_NEAREST,
              seed: int = 0) -> "NoveltyReference":
        reference = cls(_unit(torch.as_tensor(bank_embedding, dtype=torch.float32)), np.zeros(0), k)
        reference.selection_scores = np.sort(reference.score(selection_embedding))
        kept = np.sort(np.random.default_rng(seed).permutation(len(selection_embedding))[:SELECTION_KEPT])
        reference.selection = _unit(torch.as_tensor(np.asarray(selection_embedding)[kept], dtype=torch.float32))
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
        tensors = {"bank": self.bank.contiguous(), "selection_scores": torch.from_numpy(
            np.ascontiguousarray(self.selection_scores, dtype=np.float32)), "k": torch.tensor([self.k])}
        if self.selection is not None:
            tensors["selection"] = self.selection.contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
        return path

    @classmethod
    def load(cls, directory: Path) -> Optional["NoveltyReference"]:
        """The model's novelty reference, or None for a model trained without one (older scnym)."""
        path = Path(directory) / NOVELTY_FILE
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        return cls(tensors["bank"].float(), tensors["selection_scores"].numpy().astype(np.float64),
                   int(tensors["k"][0]), tensors["selection"].float() if "selection" in tensors else None)


def _quantile_of(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """The share of the (sorted) ``known`` values at or below each of ``values``."""
    return np.searchsorted(known, values, side="right") / max(len(known), 1)


@dataclass
class QueryNovelty:
    """A query's novelty for one model: the mean of a cell's distance quantile and (with a pool) its mixing
    quantile among the model-selection cells' (see the module docstring).

    Fit once per query (:meth:`fit`) on the embedding of a sample of its cells; every block is then scored
    against the same pool and scale (:meth:`score`).
    """

    reference: NoveltyReference
    pool: Optional[torch.Tensor]       # unit embeddings: n bank cells, then n query cells (None: distance alone)
    selection_distance: np.ndarray     # sorted, of the kept model-selection cells
    selection_mixing: np.ndarray       # sorted (empty without a pool)
    selection_novelty: np.ndarray      # sorted: the model-selection cells' own novelty, which sets thresholds
    # taken off a query cell's own share: how far the query's median share is above the model-selection cells'
    # (a query the model was not adapted to sits apart from the reference as a whole)
    mixing_offset: float = 0.0

    @classmethod
    def fit(cls, reference: NoveltyReference, query_embedding: np.ndarray, seed: int) -> Optional["QueryNovelty"]:
        """The scale of ``reference``'s model against a query (``query_embedding``: a sample of its cells); None
        for a model saved without model-selection embeddings."""
        selection = reference.selection
        if selection is None or len(selection) == 0:
            return None
        n = min(len(reference.bank), len(query_embedding))
        pool = None
        if n >= MIN_POOL_CELLS:
            rng = np.random.default_rng(seed)
            drawn_bank = np.sort(rng.permutation(len(reference.bank))[:n])
            drawn_query = np.sort(rng.permutation(len(query_embedding))[:n])
            query = torch.as_tensor(np.asarray(query_embedding)[drawn_query], dtype=torch.float32)
            pool = torch.cat([reference.bank[drawn_bank], _unit(query)])
        distance = np.sort(reference.score(selection.numpy()))
        scale = cls(reference, pool, distance, np.zeros(0), np.zeros(0))
        if pool is not None:
            scale.selection_mixing = np.sort(scale.own_share(selection, from_query=False))
            # a model trained without the query (supervised, or adapted to another one) leaves the whole query apart
            # from the reference: every query cell then sits among query cells, known types too. A new type is a
            # minority of the query, so the query's median share above the model-selection cells' is that
            # distance, not novelty (on the demo's supervised model: 0.60 against 0.40, which without this would
            # have called 24% of a known donor's cells Unknown at rate 0.05)
            query_share = scale.own_share(torch.as_tensor(np.asarray(query_embedding), dtype=torch.float32),
                                          from_query=True)
            scale.mixing_offset = max(0.0, float(np.median(query_share) - np.median(scale.selection_mixing)))
        scale.selection_novelty = np.sort(scale.score(selection.numpy(), from_query=False))
        return scale

    def own_share(self, cells: torch.Tensor, from_query: bool) -> np.ndarray:
        """The mixing view: the share of each cell's MIXING_NEIGHBOURS nearest pool cells that come from its own
        dataset (the query's for query cells, the reference's for model-selection cells)."""
        pool = self.pool
        if pool is None:
            raise ValueError("mixing needs a pool of reference and query cells")
        n_reference = len(pool) // 2
        k = min(MIXING_NEIGHBOURS, len(pool) - 1)
        shares = []
        for start in range(0, len(cells), SCORE_ROWS):
            similarity = _unit(cells[start:start + SCORE_ROWS]) @ pool.T
            if from_query:   # a query cell drawn into the pool is not its own neighbour
                similarity[:, n_reference:] = similarity[:, n_reference:].masked_fill(
                    similarity[:, n_reference:] >= SELF_SIMILARITY, -2.0)
            nearest = similarity.topk(k, dim=1).indices
            own = nearest >= n_reference if from_query else nearest < n_reference
            shares.append(own.float().mean(dim=1).numpy())
        return np.concatenate(shares) if shares else np.zeros(0, dtype=np.float32)

    def score(self, embedding: np.ndarray, dtype: torch.dtype = torch.float32, *,
              from_query: bool = True) -> np.ndarray:
        """Each cell's novelty in [0, 1]. ``dtype``: of the distance's matrix product (prediction's
        --inference_precision); the mixing view's is float32 (a pool of at most 2 x BANK_CELLS cells)."""
        distance = _quantile_of(self.reference.score(embedding, dtype), self.selection_distance)
        if self.pool is None:
            return distance.astype(np.float32)
        share = self.own_share(torch.as_tensor(embedding, dtype=torch.float32), from_query)
        mixing = _quantile_of(share - self.mixing_offset if from_query else share, self.selection_mixing)
        return ((distance + mixing) / 2).astype(np.float32)

    def threshold(self, rate: float) -> float:
        """The novelty above which a share ``rate`` of the kept model-selection cells lies."""
        return float(np.quantile(self.selection_novelty, 1.0 - rate))

    def describe(self) -> dict:
        return {"views": "distance and mixing" if self.pool is not None else "distance",
                "pool_cells": 0 if self.pool is None else len(self.pool) // 2,
                "selection_cells": len(self.selection_novelty), "mixing_offset": self.mixing_offset}


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
