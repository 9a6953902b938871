"""Semi-supervised training through the CLI: target data, domains, gene maps, presets, bad target data."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_csv, write_h5ad, write_lines

SSL_LOG_COLUMNS = {"supervised_loss", "unsupervised_loss", "unsup_weight", "confident_fraction", "domain_loss",
                   "domain_accuracy", "dan_weight"}


def shifted_target(n_cells=120, seed=5):
    """Same cell types, another 'technology': a gene-wise multiplicative batch effect."""
    target = make_counts(n_cells=n_cells, seed=seed)
    effect = np.random.default_rng(seed).lognormal(0, 0.7, size=target.n_vars)
    target.X = sp.csr_matrix(np.round(target.X.toarray() * effect).astype(np.float32))
    target.obs_names = [f"t{i:04d}" for i in range(n_cells)]
    return target


@pytest.fixture
def files(tmp_path):
    return write_h5ad(make_counts(n_cells=150, seed=2), tmp_path / "ref.h5ad"), \
        write_h5ad(shifted_target(), tmp_path / "target.h5ad")


def train(runner, out, *args):
    result = invoke(runner, "train_tissue_independent", "--lower_group", "cell_type", "--out_path", out,
                    *FAST_FLAGS, *args)
    assert result.exit_code == 0, result.output
    return out


def test_semi_supervised_run_logs_every_term_and_records_the_target(runner, tmp_path, files):
    reference, target = files
    run = train(runner, tmp_path / "run", "--input_counts", reference, "--unlabeled_counts", target)
    log = pd.read_csv(run / "fold00" / "fold00_log.csv")
    assert SSL_LOG_COLUMNS <= set(log.columns)
    assert log["unsup_weight"].is_monotonic_increasing and log["dan_weight"].max() <= 0.1
    manifest = json.loads((run / "all_data" / "model.json").read_text())
    training = manifest["training"]
    assert training["semi_supervised"] and training["n_target"] == 120
    assert training["domains"] == ["reference", "target"]
    assert training["target_gene_overlap"]["fraction_found"] == 1.0
    assert manifest["temperature"] > 0
    folds = pd.read_csv(run / "fold_eval_acc.csv")
    assert {"ece", "ece_uncalibrated"} <= set(folds.columns)
    # target cells are never fit on, selected on or held out
    ids = set().union(*(set(pd.read_csv(run / "fold00" / f"{n}_idx.csv")["cell_id"]) for n in ("train", "test", "val")))
    assert not any(i.startswith("t") for i in ids)


def test_prediction_uses_the_stored_temperature(runner, tmp_path, files):
    reference, target = files
    run = train(runner, tmp_path / "run", "--input_counts", reference, "--unlabeled_counts", target)
    result = invoke(runner, "predict_cell_types", "--model_path", run, "--input_counts", target, "--out_path",
                    tmp_path / "p", "--write_logits", "true", "--ensemble", "all_data")
    assert result.exit_code == 0, result.output
    temperature = json.loads((run / "all_data" / "model.json").read_text())["temperature"]
    logits = pd.read_csv(tmp_path / "p" / "logits.csv").iloc[:, 1:].to_numpy()
    expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum(1, keepdims=True)
    predicted = pd.read_csv(tmp_path / "p" / "predictions.csv").filter(like="prob_").to_numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-6)


def test_domain_specific_batch_norm_is_trained_saved_and_used_for_the_query(runner, tmp_path, files):
    import anndata as ad
    import torch

    from scnym_cli.nn.classifier import REFERENCE, TARGET
    from scnym_cli.store import load_model

    reference, target = files
    run = train(runner, tmp_path / "run", "--input_counts", reference, "--unlabeled_counts", target,
                "--n_folds", "0", "--domain_batch_norm", "true")
    loaded = load_model(run)
    assert loaded.manifest["model"]["kwargs"]["n_norm_domains"] == 2
    norms = loaded.model.encoder[0].norm.norms
    assert not torch.allclose(norms[REFERENCE].running_mean, norms[TARGET].running_mean)   # both trained
    result = invoke(runner, "predict_cell_types", "--model_path", run, "--input_counts", target, "--out_path",
                    tmp_path / "p", "--write_logits", "true", "--inference_precision", "float32")  # exact products
    assert result.exit_code == 0, result.output
    x = ad.read_h5ad(target).X.toarray()
    x = torch.from_numpy(np.log1p(x / x.sum(1, keepdims=True) * 1e6)).float()
    genes = list(ad.read_h5ad(target).var_names)
    x = x[:, [genes.index(g) for g in loaded.genes]]
    written = pd.read_csv(tmp_path / "p" / "logits.csv").iloc[:, 1:].to_numpy()
    with torch.no_grad():
        np.testing.assert_allclose(written, loaded.model(x, domain=TARGET).numpy(), rtol=1e-4, atol=1e-4)
    # without the option, or without target cells, a plain model
    plain = train(runner, tmp_path / "plain", "--input_counts", reference, "--n_folds", "0",
                  "--domain_batch_norm", "true")
    assert "n_norm_domains" not in load_model(plain).manifest["model"]["kwargs"]


def test_no_ssl_really_turns_semi_supervision_off(runner, tmp_path, files):
    reference, target = files
    with_target = train(runner, tmp_path / "a", "--input_counts", reference, "--unlabeled_counts", target,
                        "--preset", "no_ssl")
    without = train(runner, tmp_path / "b", "--input_counts", reference)
    log = pd.read_csv(with_target / "all_data" / "all_data_log.csv")
    assert not {"unsupervised_loss", "domain_loss"} & set(log.columns)
    for run in (with_target, without):
        result = invoke(runner, "predict_cell_types", "--model_path", run, "--input_counts", target, "--out_path",
                        run / "p")
        assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_csv(with_target / "p" / "predictions.csv"),
                                  pd.read_csv(without / "p" / "predictions.csv"), check_exact=True)


def test_presets_change_the_objective(runner, tmp_path, files):
    reference, target = files
    run = train(runner, tmp_path / "nd", "--input_counts", reference, "--unlabeled_counts", target,
                "--preset", "no_dan")
    columns = set(pd.read_csv(run / "all_data" / "all_data_log.csv").columns)
    assert "unsupervised_loss" in columns and "domain_loss" not in columns
    run = train(runner, tmp_path / "nid", "--input_counts", reference, "--unlabeled_counts", target,
                "--preset", "new_identity_discovery")
    config = json.loads((run / "scnym_config.json").read_text())
    assert config["pseudolabel_min_confidence"] == 0.9 and config["dan_use_conf_pseudolabels"] is True


def test_unlabeled_cells_in_the_reference_file_and_domain_column(runner, tmp_path):
    adata = make_counts(n_cells=160, seed=4)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    adata.obs.iloc[::4, adata.obs.columns.get_loc("cell_type")] = "Unlabeled"
    run = train(runner, tmp_path / "run", "--input_counts", write_h5ad(adata, tmp_path / "x.h5ad"),
                "--input_domain_group", "donor")
    training = json.loads((run / "all_data" / "model.json").read_text())["training"]
    assert training["n_target"] == 40 and training["domains"] == ["donor_0", "donor_1"]
    assert training["semi_supervised"]


def test_gene_map_translates_target_and_query_names(runner, tmp_path, files):
    reference, _ = files
    target = shifted_target()
    target.var_names = [g.upper() for g in target.var_names]          # e.g. another species' spelling
    target_path = write_h5ad(target, tmp_path / "upper.h5ad")
    gene_map = tmp_path / "map.csv"
    pd.DataFrame({"from": target.var_names, "to": [g.lower() for g in target.var_names]}).to_csv(gene_map,
                                                                                                 index=False)
    run = train(runner, tmp_path / "run", "--input_counts", reference, "--unlabeled_counts", target_path,
                "--gene_map", gene_map)
    overlap = json.loads((run / "all_data" / "model.json").read_text())["training"]["target_gene_overlap"]
    assert overlap["fraction_found"] == 1.0
    result = invoke(runner, "predict_cell_types", "--model_path", run, "--input_counts", target_path,
                    "--gene_map", gene_map, "--out_path", tmp_path / "p")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "p" / "gene_overlap.json").read_text())["n_found"] == 60


def _all_unlabeled(tmp_path):
    adata = make_counts(n_cells=40)
    adata.obs["cell_type"] = "Unlabeled"
    return [write_h5ad(adata, tmp_path / "x.h5ad")]


def _barely_overlapping(tmp_path):
    target = shifted_target()
    target.var_names = [f"other{i}" if i >= 10 else g for i, g in enumerate(target.var_names)]
    return [write_h5ad(make_counts(n_cells=60), tmp_path / "r.h5ad"), "--unlabeled_counts",
            write_h5ad(target, tmp_path / "t.h5ad")]


def _useless_map(tmp_path):
    write_lines(tmp_path / "map.csv", ["from,to", "Xist,XIST", "Actb,ACTB"])
    return [write_h5ad(make_counts(n_cells=60), tmp_path / "r.h5ad"), "--unlabeled_counts",
            write_h5ad(shifted_target(), tmp_path / "t.h5ad"), "--gene_map", tmp_path / "map.csv"]


def _domain_with_gaps(tmp_path):
    adata = make_counts(n_cells=60)
    adata.obs["batch"] = ["a", None, "b"] * 20
    return [write_h5ad(adata, tmp_path / "x.h5ad"), "--input_domain_group", "batch"]


def _single_class(tmp_path):
    adata = make_counts(n_cells=60)
    adata.obs["cell_type"] = "type_0"
    return [write_h5ad(adata, tmp_path / "x.h5ad"), "--unlabeled_counts", write_h5ad(shifted_target(),
                                                                                    tmp_path / "t.h5ad")]


def _target_csv_without_genes(tmp_path):
    return [write_h5ad(make_counts(n_cells=60), tmp_path / "r.h5ad"), "--unlabeled_counts",
            write_csv(shifted_target(), tmp_path / "t.csv", header=False)]


@pytest.mark.parametrize("make_args,fragments", [
    (_all_unlabeled, ["every cell is 'Unlabeled'"]),
    (_barely_overlapping, ["only 10 of 60 model genes", "unlabeled target data"]),
    (_useless_map, ["--gene_map translates none", "Xist"]),
    (_domain_with_gaps, ["20 cells have no value", "--input_domain_group"]),
    (_single_class, ["at least 2 classes", "only 'type_0'"]),
    (_target_csv_without_genes, ["no gene names", "--unlabeled_genes"]),
], ids=["all unlabeled", "barely overlapping target genes", "gene map maps nothing", "domain column with gaps",
        "single class", "target without gene names"])
def test_bad_target_data(runner, tmp_path, make_args, fragments):
    data, *extra = make_args(tmp_path)
    result = invoke(runner, "train_tissue_independent", "--input_counts", data, "--lower_group", "cell_type",
                    "--out_path", tmp_path / "out", *FAST_FLAGS, *extra)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()
