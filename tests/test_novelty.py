"""Novelty scores: distance to the nearest reference cells and mixing with them, thresholds from known held-out
cells."""

import numpy as np
import pytest
import torch

from scnym_cli.train.novelty import NoveltyReference, bank_rows


def test_the_bank_draws_the_same_share_of_every_class():
    codes = np.array([0] * 900 + [1] * 90 + [2] * 10)
    rows = bank_rows(codes, np.arange(1000), seed=0, cells=300)
    assert list(np.bincount(codes[rows])) == [100, 90, 10]          # a small class is taken whole
    assert np.array_equal(rows, np.sort(rows)) and len(set(rows)) == len(rows)
    assert np.array_equal(rows, bank_rows(codes, np.arange(1000), seed=0, cells=300))   # seeded


def test_scores_thresholds_and_a_saved_reference(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:3] * 10
    bank = np.repeat(centres, 50, axis=0) + rng.normal(size=(150, 16))
    selection = np.repeat(centres, 20, axis=0) + rng.normal(size=(60, 16))
    reference = NoveltyReference.build(bank, selection, k=5)
    assert np.all(np.diff(reference.selection_scores) >= 0)
    known = centres[1] + rng.normal(size=(10, 16))
    novel = np.eye(16)[7] * 10 + rng.normal(size=(10, 16))     # a direction no reference cell has
    scores = reference.score(np.vstack([known, novel]))
    assert scores[10:].min() > scores[:10].max()
    assert scores.min() >= 0 and scores.max() <= 2                 # cosine distances
    for rate in (0.05, 0.2, 0.5):                                  # the share of known held-out cells above
        above = np.mean(reference.selection_scores > reference.threshold(rate))
        assert above <= rate + 1 / 60
    assert np.all(scores[10:] > reference.threshold(0.05))
    reference.save(tmp_path)
    again = NoveltyReference.load(tmp_path)
    np.testing.assert_allclose(again.score(novel), reference.score(novel), rtol=1e-6)
    assert again.k == 5 and again.threshold(0.1) == pytest.approx(reference.threshold(0.1), rel=1e-6)
    assert NoveltyReference.load(tmp_path / "nowhere") is None
    np.testing.assert_array_equal(again.selection.numpy(), reference.selection.numpy())
    assert again.selection.shape == (60, 16)


def _adapted(seed=0, shift=0.3):
    """A reference of three types (bank and model-selection cells), and a query of the same types a little shifted
    (as adaptation leaves them) with a new type: a tight group next to type 1, about as far from it as type 1's
    own cells spread, with no reference cell among it."""
    rng = np.random.default_rng(seed)
    centres = np.eye(16)[:3] * 10
    bank = np.repeat(centres, 60, axis=0) + rng.normal(size=(180, 16))
    selection = np.repeat(centres, 40, axis=0) + rng.normal(size=(120, 16))
    known = np.repeat(centres, 60, axis=0) + rng.normal(size=(180, 16)) + shift * np.eye(16)[5]
    new = centres[1] + 4 * np.eye(16)[8] + 0.3 * rng.normal(size=(60, 16))
    return NoveltyReference.build(bank, selection, k=5), np.vstack([known, new]), np.r_[np.zeros(180, bool),
                                                                                       np.ones(60, bool)]


def test_query_novelty_ranks_a_new_type_by_distance_and_mixing():
    from scnym_cli.train.novelty import QueryNovelty

    reference, query, is_new = _adapted()
    scale = QueryNovelty.fit(reference, query, seed=0)
    assert scale.pool is not None and scale.describe()["pool_cells"] == 180
    novelty = scale.score(query)
    assert novelty.min() >= 0 and novelty.max() <= 1
    # the new type is near type 1 (its distance to reference cells overlaps the known cells') but sits among its
    # own cells: mixing tells it apart where the distance alone does not
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(is_new, reference.score(query)) < 0.8
    assert roc_auc_score(is_new, novelty) > 0.9
    mixing = scale.own_share(torch.as_tensor(query, dtype=torch.float32), from_query=True)
    assert mixing[is_new].min() > np.quantile(mixing[~is_new], 0.9)
    # the known query cells are scaled as the model-selection cells are: about a share `rate` above the threshold
    for rate in (0.05, 0.2, 0.5):
        threshold = scale.threshold(rate)
        assert np.mean(scale.selection_novelty > threshold) <= rate + 1 / 120
        assert np.mean(novelty[~is_new] > threshold) <= rate + 0.1
    assert np.mean(novelty[is_new] > scale.threshold(0.05)) > 0.5
    # seeded; a block is scored as the whole is
    again = QueryNovelty.fit(reference, query, seed=0)
    np.testing.assert_array_equal(again.score(query), novelty)
    np.testing.assert_array_equal(scale.score(query[100:]), novelty[100:])


def test_a_query_apart_from_the_reference_as_a_whole_is_not_read_as_novel():
    """A model not adapted to the query (supervised, or adapted to another) leaves every query cell a little apart
    from the reference: the query's median own share above the model-selection cells' is taken off."""
    from scnym_cli.train.novelty import QueryNovelty

    reference, query, is_new = _adapted(shift=1.5)
    scale = QueryNovelty.fit(reference, query, seed=0)
    assert scale.mixing_offset > 0 and scale.describe()["mixing_offset"] == scale.mixing_offset
    novelty, threshold = scale.score(query), scale.threshold(0.05)
    offset, scale.mixing_offset = scale.mixing_offset, 0.0
    uncorrected = scale.score(query)
    assert np.mean(novelty[~is_new] > threshold) < np.mean(uncorrected[~is_new] > threshold)
    assert np.median(novelty[~is_new]) < np.median(uncorrected[~is_new])
    # the new type still ranks above the known ones, and the model-selection cells' own scale is untouched
    assert novelty[is_new].mean() > novelty[~is_new].mean() + 0.2
    scale.mixing_offset = offset
    np.testing.assert_array_equal(np.sort(scale.score(reference.selection.numpy(), from_query=False)),
                                  scale.selection_novelty)
    # a query already among the reference cells (the adapted default) gets no offset
    assert QueryNovelty.fit(*_adapted(shift=0.3)[:2], seed=0).mixing_offset == 0


def test_a_query_cell_of_the_pool_is_not_its_own_neighbour():
    from scnym_cli.train.novelty import MIN_POOL_CELLS, QueryNovelty

    rng = np.random.default_rng(0)
    centres = np.eye(16)[:2] * 10
    bank = centres[0] + rng.normal(size=(60, 16))
    reference = NoveltyReference.build(bank, centres[0] + rng.normal(size=(30, 16)), k=5)
    # one query cell among the reference cells, the rest far away: its neighbours are reference cells only
    query = np.vstack([centres[0] + rng.normal(size=(1, 16)), centres[1] + rng.normal(size=(59, 16))])
    scale = QueryNovelty.fit(reference, query, seed=0)
    shares = scale.own_share(torch.as_tensor(query, dtype=torch.float32), from_query=True)
    assert shares[0] == 0 and (shares[1:] == 1).all()
    # a query too small for a pool: the distance's quantile alone; a model saved without model-selection
    # embeddings (older scnym): no scale at all
    small = QueryNovelty.fit(reference, query[:MIN_POOL_CELLS - 1], seed=0)
    assert small.pool is None and small.describe()["views"] == "distance"
    np.testing.assert_allclose(small.score(query[:5]), np.searchsorted(
        small.selection_distance, reference.score(query[:5]), side="right") / 30)
    reference.selection = None
    assert QueryNovelty.fit(reference, query, seed=0) is None


def _two_populations(n_known=300, n_new=60, genes=50, seed=0):
    """ln(CPM+1)-like expression: a new population with genes of its own, and each cell's own novelty (noisy,
    overlapping between the populations)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    known = rng.poisson(1.0, size=(n_known, genes)).astype(np.float32)
    new = rng.poisson(1.0, size=(n_new, genes)).astype(np.float32)
    new[:, :10] += rng.poisson(8.0, size=(n_new, 10))
    X = sp.csr_matrix(np.log1p(np.vstack([known, new])))
    novelty = np.r_[rng.normal(0.10, 0.03, n_known), rng.normal(0.13, 0.03, n_new)]
    return X, novelty, np.r_[np.zeros(n_known, bool), np.ones(n_new, bool)]


def test_query_clusters_give_each_cell_its_groups_mean_novelty():
    from scnym_cli.train.novelty import QueryClusters

    X, novelty, is_new = _two_populations()
    clusters = QueryClusters.fit(X, novelty, n_clusters=4, seed=0)
    labels = clusters.assign(X)
    # the new population is a cluster (or clusters) of its own
    assert not set(labels[is_new]) & set(labels[~is_new])
    scores = clusters.score(X)
    for c in np.unique(labels):
        np.testing.assert_allclose(scores[labels == c], novelty[labels == c].mean(), rtol=1e-5)
    # each cell alone separates the populations partly; their clusters' means separate them entirely
    assert scores[is_new].min() > scores[~is_new].max()
    assert novelty[is_new].min() < novelty[~is_new].max()
    # seeded, and a block is scored as the whole is
    again = QueryClusters.fit(X, novelty, n_clusters=4, seed=0)
    np.testing.assert_array_equal(again.assign(X), labels)
    np.testing.assert_array_equal(clusters.score(X[100:]), scores[100:])


def test_query_clusters_need_enough_cells_and_varying_genes():
    import scipy.sparse as sp

    from scnym_cli.train.novelty import MIN_CELLS_PER_CLUSTER, QueryClusters

    X, novelty, _ = _two_populations(n_known=30, n_new=10)
    # as many clusters as there are MIN_CELLS_PER_CLUSTER sampled cells, and at least two
    assert len(QueryClusters.fit(X[:2 * MIN_CELLS_PER_CLUSTER], novelty[:40], 16, 0).novelty) == 2
    assert QueryClusters.fit(X[:2 * MIN_CELLS_PER_CLUSTER - 1], novelty[:39], 16, 0) is None
    flat = sp.csr_matrix(np.ones((100, 5), dtype=np.float32))
    assert QueryClusters.fit(flat, np.zeros(100), 4, 0) is None                   # no gene varies
