"""The classifier module: independent layers, input dropout, covariates, embedding."""

import pytest
import torch

from scnym_cli.nn import CellTypeClassifier, InputDropout
from scnym_cli.nn.classifier import Dropout


@pytest.mark.parametrize("residual", [False, True])
def test_every_hidden_layer_has_its_own_weights(residual):
    model = CellTypeClassifier(n_genes=20, n_classes=3, n_hidden=8, n_layers=4, residual=residual)
    linears = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == (1 + 3 * 2 if residual else 4)
    hidden_weights = [m.weight for m in linears[1:]]
    assert len({id(w) for w in hidden_weights}) == len(hidden_weights)
    # changing one layer changes no other (the original tied them)
    with torch.no_grad():
        hidden_weights[0].add_(1.0)
    assert not torch.equal(hidden_weights[0], hidden_weights[1])
    n_params = sum(p.numel() for p in model.parameters())
    per_hidden = 8 * 8 + 8
    assert n_params > 20 * 8 + (2 * per_hidden if residual else per_hidden) * 3


def test_embedding_is_the_last_hidden_layer():
    model = CellTypeClassifier(n_genes=10, n_classes=4, n_hidden=6, n_layers=2).eval()
    x = torch.rand(5, 10)
    logits, embedding = model(x, return_embedding=True)
    assert embedding.shape == (5, 6) and logits.shape == (5, 4)
    torch.testing.assert_close(model.classifier(embedding), logits)


def test_input_dropout_keeps_the_log_cpm_scale_and_only_trains():
    torch.manual_seed(0)
    counts = torch.poisson(torch.full((16, 200), 3.0))
    x = torch.log1p(counts / counts.sum(1, keepdim=True) * 1e6)
    layer = InputDropout(0.3).train()
    out = layer(x)
    totals = torch.expm1(out.double()).sum(1)
    torch.testing.assert_close(totals, torch.full_like(totals, 1e6), rtol=1e-4, atol=1.0)
    dropped = (out == 0) & (x > 0)
    assert 0.2 < dropped.float().mean() / (x > 0).float().mean() < 0.4
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(InputDropout(0.0).train()(x), x)


def test_hidden_dropout_matches_torch_dropout_in_distribution():
    torch.manual_seed(0)
    x = torch.rand(400, 300) + 0.5
    x.requires_grad_(True)
    layer = Dropout(0.4).train()
    out = layer(x)
    dropped = out == 0
    assert abs(dropped.float().mean().item() - 0.4) < 0.01
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.6)  # survivors scaled by 1 / (1 - p)
    out.sum().backward()
    assert torch.equal(x.grad == 0, dropped)  # no gradient through dropped units
    assert torch.equal(layer.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    torch.manual_seed(1)
    first = Dropout(0.5).train()(x)
    torch.manual_seed(1)
    assert torch.equal(first, Dropout(0.5).train()(x))  # seeded


def test_covariates_enter_the_model_and_are_checked():
    model = CellTypeClassifier(n_genes=5, n_classes=2, n_hidden=4, n_covariates=3).eval()
    x = torch.rand(4, 5)
    a = model(x, torch.eye(3)[[0, 0, 0, 0]])
    b = model(x, torch.eye(3)[[1, 1, 1, 1]])
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="covariate one-hot of width 3"):
        model(x)


def test_hyperparameters_rebuild_the_same_architecture():
    model = CellTypeClassifier(n_genes=7, n_classes=3, n_hidden=5, n_layers=3, residual=True, dropout=0.2)
    clone = CellTypeClassifier(**model.hyperparameters)
    assert [k for k in model.state_dict()] == [k for k in clone.state_dict()]
    clone.load_state_dict(model.state_dict())


def test_domain_specific_batch_norm_normalizes_each_domain_by_its_own_statistics():
    from scnym_cli.nn.classifier import REFERENCE, TARGET, DomainBatchNorm

    torch.manual_seed(0)
    norm = DomainBatchNorm(4, 2, track_running_stats=True).train()
    x = torch.randn(40, 4)
    x[20:] = x[20:] * 3 + 10                                # the target: shifted and scaled
    domain = torch.tensor([REFERENCE] * 20 + [TARGET] * 20)
    out = norm(x, domain)
    for rows in (slice(0, 20), slice(20, 40)):              # each domain's rows centred and scaled apart
        torch.testing.assert_close(out[rows].mean(0), torch.zeros(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[rows].std(0, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
    # a plain batch norm over the mixed batch leaves the shift in
    assert torch.nn.BatchNorm1d(4)(x)[20:].mean() > 0.5
    assert norm.norms[TARGET].running_mean.mean() > 0.5 > norm.norms[REFERENCE].running_mean.abs().mean()
    # one cell of a domain in a batch: normalized by its domain's running statistics, no error
    single = norm(x[:3], torch.tensor([REFERENCE, REFERENCE, TARGET]))
    assert torch.isfinite(single).all()
    norm.eval()                                              # eval: each domain's running statistics
    torch.testing.assert_close(norm(x[20:], TARGET), norm(x[20:], torch.full((20,), TARGET)))
    assert not torch.allclose(norm(x[20:], TARGET), norm(x[20:], REFERENCE))


def test_weighted_batch_norm_weighs_rows_in_the_batch_statistics():
    from scnym_cli.nn.classifier import REFERENCE, TARGET, DomainBatchNorm, DomainRows, weighted_batch_norm

    torch.manual_seed(0)
    x = torch.randn(30, 5) * 2 + 1
    plain, weighted = torch.nn.BatchNorm1d(5).train(), torch.nn.BatchNorm1d(5).train()
    with torch.no_grad():
        weighted.weight.copy_(plain.weight.add_(0.5))
    # equal weights: BatchNorm1d's output and running statistics
    torch.testing.assert_close(weighted_batch_norm(weighted, x, torch.full((30,), 2.0)), plain(x))
    torch.testing.assert_close(weighted.running_mean, plain.running_mean)
    torch.testing.assert_close(weighted.running_var, plain.running_var)
    # rows of weight 0 leave the statistics: the others are centred and scaled as if alone
    x[20:] += 50
    out = weighted_batch_norm(torch.nn.BatchNorm1d(5, affine=False).train(), x,
                              torch.cat([torch.ones(20), torch.zeros(10)]))
    torch.testing.assert_close(out[:20].mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:20].std(0, unbiased=False), torch.ones(5), atol=1e-3, rtol=0)
    assert out[20:].mean() > 5
    # through DomainBatchNorm: weights act within each row's domain; in eval they are not used
    norm = DomainBatchNorm(5, 2, track_running_stats=True).train()
    domains = torch.tensor([REFERENCE] * 25 + [TARGET] * 5)
    out = norm(x, DomainRows(domains, torch.cat([torch.ones(20), torch.zeros(5), torch.ones(5)])))
    torch.testing.assert_close(out[:20].mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    norm.eval()
    torch.testing.assert_close(norm(x, DomainRows(domains, torch.rand(30))), norm(x, domains))


def test_a_classifier_with_domain_specific_batch_norm_routes_rows_and_reloads(tmp_path):
    from scnym_cli.nn.classifier import TARGET
    from scnym_cli.store import load_model, save_model

    torch.manual_seed(0)
    model = CellTypeClassifier(n_genes=10, n_classes=3, n_hidden=6, n_norm_domains=2).train()
    x = torch.rand(16, 10)
    model(x, domain=torch.tensor([0] * 8 + [1] * 8)).sum().backward()
    model.eval()
    assert model.hyperparameters["n_norm_domains"] == 2
    assert "n_norm_domains" not in CellTypeClassifier(n_genes=10, n_classes=3).hyperparameters
    save_model(tmp_path, model, genes=[f"g{i}" for i in range(10)], classes=["a", "b", "c"], config={})
    loaded = load_model(tmp_path).model
    torch.testing.assert_close(loaded(x, domain=TARGET), model(x, domain=TARGET))
    assert not torch.allclose(model(x, domain=TARGET), model(x))          # the reference's by default


def _edited(run, tmp_path, change, keep_checksum=True):
    import json
    import shutil

    copy = tmp_path / f"edited{len(list(tmp_path.iterdir()))}"
    shutil.copytree(run / "all_data", copy)
    manifest = json.loads((copy / "model.json").read_text())
    change(manifest)
    if not keep_checksum:
        manifest.pop("meaning_sha256", None)
    (copy / "model.json").write_text(json.dumps(manifest))
    return copy


@pytest.mark.parametrize("change, keep_checksum, fragment", [
    (lambda m: m.update(classes=m["classes"][::-1]), True, "was edited after training"),
    (lambda m: m.update(genes=m["genes"][::-1]), True, "was edited after training"),
    (lambda m: m.update(temperature=0), False, "'temperature' must be a positive number"),
    (lambda m: m.update(temperature="hot"), False, "'temperature' must be a positive number"),
    (lambda m: m["model"]["kwargs"].update(n_layers="two"), False, "'n_layers' must be a positive whole number"),
    (lambda m: m.update(classes=[m["classes"][0]] * len(m["classes"])), False, "lists a name twice"),
], ids=["classes swapped", "genes permuted", "temperature 0", "temperature text", "n_layers text", "classes repeated"])
def test_an_edited_or_damaged_manifest_is_refused(trained_run, tmp_path, change, keep_checksum, fragment):
    """The checksum covers what gives the weights meaning (genes, classes, temperature, architecture...), and
    every field is checked on load: an edited model.json never loads and predicts something else."""
    from scnym_cli.errors import ScnymError
    from scnym_cli.store import load_model

    with pytest.raises(ScnymError, match=fragment):
        load_model(_edited(trained_run, tmp_path, change, keep_checksum))


def test_models_written_before_the_meaning_checksum_still_load(trained_run, tmp_path):
    from scnym_cli.store import load_model

    loaded = load_model(_edited(trained_run, tmp_path, lambda m: None, keep_checksum=False))
    assert loaded.classes == ["type_0", "type_1", "type_2"]


def _sparse_block(n_cells: int, n_genes: int, density: float, seed: int):
    import numpy as np
    import scipy.sparse as sp

    X = sp.random(n_cells, n_genes, density=density, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.log1p(X.data * 100)
    X = X.tolil()
    X[[0, 7, n_cells - 1]] = 0        # cells with nothing expressed, the last one included
    return X.tocsr()


@pytest.mark.parametrize("n_norm_domains,n_covariates,depth_over_genes",
                         [(1, 3, False), (2, 3, False), (1, 0, False), (1, 3, True), (2, 0, True)])
def test_sparse_rows_give_the_dense_forward_pass(n_norm_domains, n_covariates, depth_over_genes):
    """Prediction on CPU feeds CSR rows to the first layer (embedding_bag); logits and embeddings equal the dense
    pass to float32 rounding, with a covariate one-hot appended and with domain-specific batch norm."""
    import numpy as np

    from scnym_cli.nn.sparse_input import SparseRows
    from scnym_cli.train.inference import forward_rows, input_batch

    torch.manual_seed(0)
    X = _sparse_block(300, 50, 0.1, seed=1)
    covariates = np.eye(3, dtype=np.float32)[np.arange(300) % 3] if n_covariates else None
    model = CellTypeClassifier(n_genes=50, n_classes=4, n_hidden=16, n_layers=2, n_covariates=n_covariates,
                               n_norm_domains=n_norm_domains, depth_over_genes=depth_over_genes)
    with torch.no_grad():   # batch-norm statistics that are not the identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm1d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    batch, _ = input_batch(X, slice(0, 300), torch.device("cpu"), sparse=True, covariates=covariates)
    assert isinstance(batch, SparseRows) and batch.n_columns == 50 + n_covariates
    domain = 1 if n_norm_domains > 1 else 0
    outputs = forward_rows(model, X, None, torch.device("cpu"), chunk_size=128, covariates=covariates,
                           with_embedding=True, domain=domain)
    model.eval()
    with torch.no_grad():
        embedding = model.embed(torch.from_numpy(X.toarray()),
                                None if covariates is None else torch.from_numpy(covariates),
                                **({"domain": domain} if domain else {}))
        logits = model.classifier(embedding)
    np.testing.assert_allclose(outputs.embedding, embedding.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs.logits, logits.numpy(), rtol=1e-5, atol=1e-5)
    # rows picked by index take the same path
    rows = np.array([5, 0, 299, 17])
    picked = forward_rows(model, X, rows, torch.device("cpu"), covariates=covariates, domain=domain)
    np.testing.assert_allclose(picked.logits, logits.numpy()[rows], rtol=1e-5, atol=1e-5)


def test_dense_rows_stay_dense_and_sparse_rows_are_checked():
    from scnym_cli.nn.sparse_input import SPARSE_INPUT_MAX_DENSITY, SparseRows
    from scnym_cli.train.inference import input_batch

    cpu = torch.device("cpu")
    dense_data = _sparse_block(64, 40, min(1.0, SPARSE_INPUT_MAX_DENSITY + 0.3), seed=2)
    x, _ = input_batch(dense_data, slice(0, 64), cpu, sparse=True)
    assert isinstance(x, torch.Tensor) and x.shape == (64, 40)
    x, _ = input_batch(_sparse_block(64, 40, 0.05, seed=2), slice(0, 64), cpu, sparse=False)
    assert isinstance(x, torch.Tensor)
    rows, _ = input_batch(_sparse_block(64, 40, 0.05, seed=2), slice(0, 64), cpu, sparse=True)
    assert isinstance(rows, SparseRows) and rows.n_rows == 64
    model = CellTypeClassifier(n_genes=41, n_classes=2, n_hidden=8).eval()
    with pytest.raises(ValueError, match="40 columns; the layer takes 41"):
        model.embed(rows)
    model = CellTypeClassifier(n_genes=40, n_classes=2, n_hidden=8, init_dropout=0.2)
    with pytest.raises(ValueError, match="input dropout needs dense rows"):
        model.embed(rows)
    with pytest.raises(ValueError, match="covariates as columns"):
        model.eval().embed(rows, torch.zeros(64, 1))


def test_depth_over_genes_makes_the_model_blind_to_a_cells_scale():
    """With depth_over_genes, rows scaled by any per-cell factor in count space (normalized over other genes)
    give the same outputs; the covariates are not part of the depth."""
    import numpy as np

    torch.manual_seed(0)
    counts = torch.poisson(torch.full((12, 30), 2.0))
    covariates = torch.eye(2)[torch.arange(12) % 2]
    x = torch.log1p(counts / counts.sum(1, keepdim=True) * 1e6)
    factors = torch.from_numpy(np.geomspace(0.1, 30, 12)).float().unsqueeze(1)
    shifted = torch.log1p(torch.expm1(x) * factors)
    model = CellTypeClassifier(n_genes=30, n_classes=3, n_hidden=8, n_covariates=2, depth_over_genes=True).eval()
    plain = CellTypeClassifier(n_genes=30, n_classes=3, n_hidden=8, n_covariates=2).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(shifted, covariates), model(x, covariates), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(x, covariates), plain(x, covariates), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(plain(shifted, covariates), plain(x, covariates), atol=1e-2)
    assert model.hyperparameters["depth_over_genes"] is True and "depth_over_genes" not in plain.hyperparameters

