"""Count-space augmentations: they stay on the ln(CPM + 1) scale and drop what they say they drop."""

import pytest
import torch

from scnym_cli.train.augment import AUGMENTATIONS, log1p_drop, log1p_mask


def log_cpm_batch(cells: int = 64, genes: int = 500, density: float = 0.2) -> torch.Tensor:
    torch.manual_seed(0)
    counts = (torch.poisson(torch.full((cells, genes), 4.0)) + 1) * (torch.rand(cells, genes) < density)
    return torch.log1p(counts / counts.sum(1, keepdim=True) * 1e6)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_every_augmentation_keeps_the_log_cpm_scale(name):
    x = log_cpm_batch()
    out = AUGMENTATIONS[name](x, 0.2)
    assert out.shape == x.shape and out.dtype == x.dtype and (out >= 0).all()
    totals = torch.expm1(out.double()).sum(1)
    torch.testing.assert_close(totals, torch.full_like(totals, 1e6), rtol=1e-4, atol=1.0)


def test_log1p_drop_drops_measured_values_at_the_rate_and_never_adds_any():
    x = log_cpm_batch()
    torch.manual_seed(3)
    out = log1p_drop(x, 0.3)
    measured = x > 0
    assert not (out[~measured] != 0).any()  # zeros stay zero
    dropped = (out == 0) & measured
    assert 0.27 < dropped.sum() / measured.sum() < 0.33
    torch.manual_seed(3)
    assert torch.equal(out, log1p_drop(x, 0.3))  # seeded
    assert torch.equal(x, log_cpm_batch())  # the input is left as it was
    torch.testing.assert_close(log1p_drop(x, 0.0), x)


def test_log1p_mask_drops_the_same_genes_in_every_cell():
    x = log_cpm_batch(density=1.0)
    torch.manual_seed(1)
    out = log1p_mask(x, 0.25)
    zero_genes = (out == 0).all(dim=0)
    assert 0.15 < zero_genes.float().mean() < 0.35
    assert ((out == 0) == zero_genes.unsqueeze(0)).all()


def test_a_cell_left_without_counts_stays_zero_not_nan():
    """All of a cell's few measured values dropped: CPM / 0 must not turn its zeros into NaN (it did, and
    killed training on 12 highly variable genes with 'the training loss became nan')."""
    from scnym_cli.nn.classifier import InputDropout

    torch.manual_seed(0)
    x = torch.zeros(4, 6)
    x[1, 2] = 3.0
    for augment in (AUGMENTATIONS["log1p_drop"], AUGMENTATIONS["log1p_mask"], InputDropout(0.99).train()):
        out = augment(x, 0.99) if not isinstance(augment, torch.nn.Module) else augment(x)
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], torch.zeros(6))
