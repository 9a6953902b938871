"""Novelty scores: distance to the nearest reference cells, thresholds from known held-out cells."""

import numpy as np
import pytest

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
