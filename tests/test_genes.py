"""Gene alignment: reordered, missing, extra genes, and too little overlap."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scnym_cli.data import CellMatrix, align_genes
from scnym_cli.data.genes import reindex_columns
from scnym_cli.errors import ScnymError


def cells_from(dense, genes):
    return CellMatrix(sp.csr_matrix(np.asarray(dense, dtype=np.float32)), pd.Index(genes),
                      pd.DataFrame(index=[f"c{i}" for i in range(len(dense))]), "test")


def dense_reference(dense, genes, target):
    frame = pd.DataFrame(dense, columns=genes)
    return frame.reindex(columns=target, fill_value=0.0).to_numpy()


@pytest.mark.parametrize("seed", range(5))
def test_reindex_matches_a_dense_reference(seed):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.7, size=(30, 12)).astype(np.float32)
    dense[[0, 7, 29]] = 0  # empty rows, including the last
    genes = [f"g{i}" for i in range(12)]
    target = list(rng.permutation(genes)[:8]) + ["new1", "new2"]
    out = reindex_columns(sp.csr_matrix(dense), pd.Index(genes), pd.Index(target))
    np.testing.assert_array_equal(out.toarray(), dense_reference(dense, genes, target))
    assert out.has_sorted_indices


def test_reordered_genes_align_exactly():
    dense = np.arange(12, dtype=np.float32).reshape(3, 4)
    cells = cells_from(dense, ["a", "b", "c", "d"])
    aligned, overlap = align_genes(cells, ["d", "c", "b", "a"])
    np.testing.assert_array_equal(aligned.X.toarray(), dense[:, ::-1])
    assert overlap.fraction_found == 1.0 and overlap.n_missing == 0 and overlap.n_extra == 0


def test_missing_genes_are_zero_and_extra_genes_dropped():
    dense = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    cells = cells_from(dense, ["a", "b", "extra"])
    aligned, overlap = align_genes(cells, ["b", "a", "missing"], min_overlap=0.5)
    np.testing.assert_array_equal(aligned.X.toarray(), [[2, 1, 0], [5, 4, 0]])
    assert (overlap.n_found, overlap.n_missing, overlap.n_extra) == (2, 1, 1)
    assert overlap.missing_examples == ("missing",)
    assert list(aligned.genes) == ["b", "a", "missing"]


def test_too_little_overlap_stops_and_says_what_matched():
    cells = cells_from(np.ones((2, 3)), ["ENSG1", "ENSG2", "CD3E"])
    with pytest.raises(ScnymError) as error:
        align_genes(cells, ["CD3E", "CD4", "CD8A", "MS4A1"], min_overlap=0.5)
    message = str(error.value)
    assert "only 1 of 4 model genes" in message and "ENSG1" in message and "--min_gene_overlap" in message
    aligned, overlap = align_genes(cells, ["CD3E", "CD4", "CD8A", "MS4A1"], min_overlap=0.2)
    assert overlap.n_found == 1


def test_no_overlap_is_an_error_even_with_zero_minimum():
    with pytest.raises(ScnymError, match="only 0 of"):
        align_genes(cells_from(np.ones((1, 2)), ["x", "y"]), ["a", "b"], min_overlap=0.0)


def test_stacked_rows_select_like_one_matrix():
    from scnym_cli.data.matrix import dense_rows
    from scnym_cli.data.stacked import StackedRows, stack_rows

    blocks = [sp.random(n, 9, density=0.3, format="csr", random_state=n, dtype=np.float32) for n in (5, 1, 7)]
    stacked = stack_rows(stack_rows(blocks[0], blocks[1]), blocks[2])
    assert isinstance(stacked, StackedRows) and stacked.shape == (13, 9) and len(stacked.blocks) == 3
    whole = sp.vstack(blocks, format="csr").toarray()
    rows = np.array([12, 0, 5, 5, 6, 3, 11])
    np.testing.assert_array_equal(dense_rows(stacked, rows), whole[rows])
    np.testing.assert_array_equal(stacked[2:9].toarray(), whole[2:9])
    assert stacked.nnz == sum(b.nnz for b in blocks)
    assert stack_rows(blocks[0]) is blocks[0]
