"""The benchmark scripts run (quick mode: tiny subsample, 2 epochs) so they cannot rot."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import shared_data

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.real_data, pytest.mark.slow]  # benchmark harnesses: the full tier (--all)


def load_bench(name):
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # registered as importing it would (a dataclass of the script looks its module up there)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_accuracy_benchmark_quick(tmp_path, monkeypatch):
    shared_data("kang2018_ctrl_stim_small.h5ad")
    accuracy = load_bench("accuracy")
    rows = accuracy.main(["--quick", "--splits", "kang_ctrl_to_stim", "--seeds", "0", "--out", str(tmp_path / "r"),
                          "--work", str(tmp_path / "w"), "--tag", "t", "--methods", "supervised", "semi_supervised",
                          "no_adversary", "--variant", "wide=--unlabeled_counts QUERY --n_hidden 64"])
    assert list(rows["method"]) == ["supervised", "semi_supervised", "no_adversary", "wide"]
    table = pd.read_csv(tmp_path / "r" / "t.csv")
    assert {"balanced_accuracy", "accuracy", "macro_f1", "ece", "train_seconds", "novel_auroc"} <= set(table.columns)
    assert table["balanced_accuracy"].between(0, 1).all()
    payload = json.loads((tmp_path / "r" / "t.json").read_text())
    assert payload["machine"]["cores"] and "python bench/accuracy.py" in payload["command"]
    assert (tmp_path / "r" / "t.png").stat().st_size > 0
    report = (tmp_path / "r" / "t.md").read_text()
    assert "Kang ctrl -> stim" in report and "## Ablation" in report and "MixMatch only" in report
    # a --variant's row names what it sets beyond the target data
    assert "| wide | `--n_hidden 64` | 0 |" in report
    # --resume reuses finished runs with the same command
    again = accuracy.main(["--quick", "--splits", "kang_ctrl_to_stim", "--seeds", "0", "--out", str(tmp_path / "r"),
                           "--work", str(tmp_path / "w"), "--tag", "t2", "--methods", "supervised", "--resume"])
    assert again["balanced_accuracy"].iloc[0] == rows["balanced_accuracy"].iloc[0]
    # --reuse_only reports what ran and runs nothing; --before shows an earlier commit's figures
    before = tmp_path / "before.csv"
    pd.DataFrame({"split": ["kang_ctrl_to_stim"] * 2, "method": ["supervised"] * 2, "seed": [0, 1],
                  "balanced_accuracy": [0.5, 0.7], "commit": ["abc1234"] * 2}).to_csv(before, index=False)
    only = accuracy.main(["--quick", "--splits", "kang_ctrl_to_stim", "--seeds", "0", "1", "--out", str(tmp_path / "r"),
                          "--work", str(tmp_path / "w"), "--tag", "t3", "--methods", "supervised", "--resume",
                          "--reuse_only", "--before", str(before)])
    assert only["seed"].tolist() == [0]
    report = (tmp_path / "r" / "t3.md").read_text()
    assert "supervised at abc1234" in report and "| 0.600 |" in report


def test_normalization_probes_quick(tmp_path):
    import torch

    import scnym_cli.workflows.ensemble as ensemble_module

    shared_data("kang2018_ctrl_stim_small.h5ad")
    common = ["--quick", "--splits", "kang_ctrl_to_stim", "--seeds", "0", "--out", str(tmp_path / "r"),
              "--work", str(tmp_path / "w")]
    load_bench("accuracy").main([*common, "--methods", "supervised", "semi_supervised"])
    probes = load_bench("normalization_probes")
    original = ensemble_module.forward_rows
    probes.main([*common, "--tag", "p"])
    assert ensemble_module.forward_rows is original          # the AdaBN patch is undone
    rows = pd.DataFrame(json.loads((tmp_path / "r" / "p.json").read_text())["rows"])
    assert sorted(rows["method"]) == sorted(["supervised", "supervised+adabn", "semi_supervised",
                                             "semi_supervised+adabn", "semi_supervised+gene_means"])
    assert rows["balanced_accuracy"].between(0, 1).all()
    report = (tmp_path / "r" / "p.md").read_text()
    assert "Kang ctrl -> stim" in report and "mean over splits" in report
    # the scaled query: same cells, ln(CPM + 1) rows, gene means moved towards the reference's
    import anndata as ad

    data = tmp_path / "w" / "data"
    scaled = ad.read_h5ad(next((tmp_path / "w" / "probes" / "data").glob("*_gene_means.h5ad")))
    query = ad.read_h5ad(data / "kang_ctrl_to_stim_max200_query.h5ad")
    assert list(scaled.obs_names) == list(query.obs_names)
    np.testing.assert_allclose(np.expm1(scaled.X.toarray().astype(np.float64)).sum(axis=1), 1e6, rtol=1e-3)
    # AdaBN leaves the model's own statistics as they were
    from scnym_cli.nn import CellTypeClassifier

    model = CellTypeClassifier(n_genes=3, n_classes=2, n_hidden=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    import scipy.sparse as sp

    with probes.adabn_prediction():
        outputs = ensemble_module.forward_rows(
            model, sp.csr_matrix(np.random.default_rng(0).random((10, 3), np.float32)), None, torch.device("cpu"))
    assert outputs.logits.shape == (10, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_novelty_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_stim_small.h5ad")
    novelty = load_bench("novelty")
    frame = novelty.main(["--quick", "--splits", "kang_ctrl_to_stim", "--min_cells", "30", "--seeds", "0", "1",
                          "--work", str(tmp_path / "w"), "--out", str(tmp_path / "r"), "--tag", "n"])
    assert set(frame["protocol"]) == {"left out"} and len(frame) >= 3
    together = [name.format(n=2) for name in novelty.ENSEMBLE_SCORES]
    for score in [*novelty.SCORES, *together]:
        assert frame[score].between(0, 1).all()
    assert (frame["novelty: lowest"] <= frame["novelty"] + 1e-12).all()
    assert (frame["novelty"] <= frame["novelty: highest"] + 1e-12).all()
    for name in novelty.CALLED:
        assert frame[f"{name}: known Unknown"].between(0, 1).all()
    report = (tmp_path / "r" / "n.md").read_text()
    assert "Kang ctrl -> stim" in report and "knn" in report and together[0] in report
    # the seeds' models together: a cell far from the reference in every model is the most novel, and calls
    # that differ between the models are disagreement
    def scored(knn, probabilities):
        return novelty.ScoredRun(np.arange(3).astype(str), np.array(["a", "a", "new"]), np.array([True, True, False]),
                                 {"knn by cluster": np.asarray(knn, float), "novelty": 2 * np.asarray(knn, float)},
                                 np.asarray(probabilities, float), {"knn": 1.0}, np.array([0, 0, 1]))
    runs = [scored([0.1, 0.2, 0.9], [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]]),
            scored([0.2, 0.1, 0.5], [[0.9, 0.1], [0.7, 0.3], [0.3, 0.7]])]
    combined = novelty.together(runs)
    assert np.allclose(combined[together[0]], [0.3, 0.3, 1.4])
    assert np.allclose(combined[together[1]], [0.15, 0.15, 0.7])
    assert np.allclose(combined[together[2]], [0.1, 0.25, 0.45])
    assert np.allclose(combined[together[3]], [0.0, 0.0, 0.5])
    # the scores on made-up embeddings: a cell far from every reference cell is the most novel
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(40, 8)) + np.repeat(np.eye(8)[:2] * 5, 20, axis=0)
    query = np.vstack([bank[:3] + 0.01, -np.eye(8)[:1] * 5])
    scores = novelty.novelty_scores(np.zeros((4, 2), np.float32), np.full(4, 0.9), query, bank,
                                    np.repeat(["a", "b"], 20))
    assert scores["knn"].argmax() == 3 and scores["prototype"].argmax() == 3


def test_trust_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_stim_small.h5ad")
    trust = load_bench("trust")
    frame = trust.main(["--quick", "--splits", "kang_ctrl_to_stim", "--seeds", "0", "--in-process", "--work",
                        str(tmp_path / "w"), "--out", str(tmp_path / "r")])
    row = frame.iloc[0]
    for ensemble in trust.ENSEMBLES:
        assert 0 <= row[f"{ensemble}_balanced_accuracy"] <= 1 and 0 <= row[f"{ensemble}_ece"] <= 1
    for prefix in ("cv_all", "cv_per_class", "query_all", "query_per_class", "query_weighted"):
        assert 0 <= row[f"{prefix}_coverage"] <= 1 and row[f"{prefix}_mean_set_size"] >= 0
    # split conformal on the held-out folds: near the target even on 200 cells
    assert abs(row["cv_all_coverage"] - trust.COVERAGE) < 0.08
    report = (tmp_path / "r" / "trust.md").read_text()
    assert "Kang ctrl -> stim" in report and "## Targets" in report


def test_conformal_holdout_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_stim_small.h5ad")
    holdout = load_bench("conformal_holdout")
    frame = holdout.main(["--quick", "--splits", "kang_ctrl_to_stim", "--seeds", "0", "--in-process", "--work",
                          str(tmp_path / "w"), "--out", str(tmp_path / "r")])
    row = frame.iloc[0]
    assert row["cells"] > 0 and row["all_method"] == "cross-conformal"
    for kind in ("all", "per_class"):
        for name in ("pooled_all_data", "pooled_average", "cross", "written"):
            assert 0 <= row[f"{kind}_{name}_coverage"] <= 1
        # the written sets are the cross-conformal sets with the call added: never less coverage
        assert row[f"{kind}_written_coverage"] >= row[f"{kind}_cross_coverage"]
    report = (tmp_path / "r" / "conformal_holdout.md").read_text()
    assert "Kang ctrl -> stim" in report and "cross-conformal" in report


def test_precision_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_stim_small.h5ad")
    precision = load_bench("precision")
    frame = precision.main(["--quick", "--splits", "kang_ctrl_to_stim", "--seeds", "0", "--in-process", "--work",
                            str(tmp_path / "w"), "--out", str(tmp_path / "r")])
    row = frame.iloc[0]
    assert 0 <= row["labels_changed"] <= 0.05 and 0 < row["max_probability_change"] < 0.1
    for name in precision.PRECISIONS:
        assert 0 <= row[f"{name}_balanced_accuracy"] <= 1
    assert "Labels changed" in (tmp_path / "r" / "precision.md").read_text()


def test_strong_shift_splits_are_built_from_two_studies(tmp_path):
    shared_data("zheng2017_sorted_pbmc.h5ad")
    shared_data("zilionis2019_mouse_lung_immune.h5ad")
    import anndata as ad

    common = load_bench("common")
    reference, query = common.materialize(common.SPLITS["human_pbmc_to_mouse_lung"], tmp_path, max_cells=100)
    reference, query = ad.read_h5ad(reference), ad.read_h5ad(query)
    assert set(reference.obs["cell_type"]) == {"B cell", "NK cell", "T cell", "monocyte"}
    assert "neutrophil" in set(query.obs["cell_type"])
    assert reference.var_names.isin(query.var_names).sum() > 7000     # mouse genes in human names (orthologs)
    scores = common.query_scores(["B cell", "T cell", "neutrophil", "neutrophil"], ["B cell", "B cell", "T cell",
                                 "B cell"], [0.9, 0.8, 0.3, 0.6], ["B cell", "T cell", "NK cell"])
    assert scores["balanced_accuracy"] == 0.5 and scores["n_novel"] == 2      # over the known types only
    assert scores["novel_auroc"] == 1.0 and scores["novel_called_as"] == {"T cell": 1, "B cell": 1}


def test_markers_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_8donors.h5ad")
    payload = load_bench("markers").main(["--quick", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    assert set(payload["hit_rates"]) == {"expected_gradients", "input_optimization"}
    assert "B cells" in (tmp_path / "r" / "markers.md").read_text()
    assert (tmp_path / "r" / "markers_heatmap.png").stat().st_size > 0


def test_tissues_benchmark_quick(tmp_path):
    shared_data("pbmc_3chemistries_small.h5ad")
    table = load_bench("tissues").main(["--quick", "--datasets", "pbmc_chemistries", "--out", str(tmp_path / "r"),
                                        "--work", str(tmp_path / "w")])
    assert list(table["command"]) == ["train_tissue_independent", "train_tissue_dependent", "train_tissue_specific"]
    assert table["balanced_accuracy"].between(0, 1).all()


def test_scale_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_8donors.h5ad")
    table = load_bench("scale").main(["--quick", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    assert set(table["mode"]) == {"supervised", "semi-supervised", "prediction"}
    payload = json.loads((tmp_path / "r" / "scale.json").read_text())
    assert payload["matmul_ceiling"]["square_2048"] > 1e9
    assert (tmp_path / "r" / "scale.png").stat().st_size > 0
    generated = load_bench("generate")
    info = generated.generate(300, 1500, tmp_path / "g.h5ad", seed=3)   # pseudo-genes beyond Kang's 1,287
    import anndata as ad

    adata = ad.read_h5ad(tmp_path / "g.h5ad")
    assert adata.shape == (300, 1500) and info["nnz"] == adata.X.nnz
    assert adata.var_names.is_unique and (adata.X.data == adata.X.data.round()).all()
    generated.generate(50, 1500, tmp_path / "g0.h5ad", seed=0)  # a target file aligns with its reference
    other = ad.read_h5ad(tmp_path / "g0.h5ad")
    assert list(other.var_names) == list(adata.var_names)
    assert not np.array_equal(other.obs["cell_type"].to_numpy()[:50], adata.obs["cell_type"].to_numpy()[:50])


def test_scale_out_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_8donors.h5ad")
    table = load_bench("scale_out").main(["--quick", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    assert set(table["experiment"]) == {"memory", "data parallel"} and len(table) == 4
    assert (table["cells_per_second"] > 0).all()
    assert "torchrun" in (tmp_path / "r" / "scale_out.md").read_text()


def test_atlas_benchmark_quick(tmp_path):
    shared_data("kang2018_ctrl_8donors.h5ad")
    load_bench("atlas").main(["--sizes", "2000", "4000", "--out", str(tmp_path / "r"), "--work", str(tmp_path / "w")])
    rows = pd.DataFrame(json.loads((tmp_path / "r" / "atlas.json").read_text())["rows"])
    # training: 2 at the smaller size, 1 at the larger; prediction: 2 precisions and as by default, at each size
    assert len(rows) == 9 and set(rows["task"]) == {"training", "prediction"}
    assert set(rows["inference_precision"].dropna()) <= {"float32", "bfloat16"}
    assert (rows["cells_per_second"] > 0).all() and (rows["peak_memory_mb"] > 0).all()
    report = (tmp_path / "r" / "atlas.md").read_text()
    assert "Against the targets" in report and "annotated copy written" in report


def test_report_benchmark_quick(tmp_path):
    import shutil

    shared_data("kang2018_ctrl_8donors.h5ad")
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
        pytest.skip("no headless Chromium (apt-get install chromium)")
    payload = load_bench("report").main(["--cells", "2000", "--folds", "2", "--out", str(tmp_path / "r"),
                                         "--work", str(tmp_path / "w")])
    assert set(payload["pages"]) == {"training run", "prediction"}
    assert all(page["bytes"] > 0 and page["load_seconds"] > 0 for page in payload["pages"].values())


def test_loader_benchmark_quick(tmp_path):
    """scnym's disk loader against annbatch (which needs Python >= 3.12: its own virtualenv, see bench/loader.py)."""
    shared_data("kang2018_ctrl_8donors.h5ad")
    annbatch_python = Path("/tmp/annbatch-venv/bin/python")
    if not annbatch_python.exists():
        pytest.skip("no annbatch virtualenv at /tmp/annbatch-venv (bench/loader.py's docstring says how to make it)")
    import subprocess
    import sys

    subprocess.run([sys.executable, str(REPO / "bench" / "loader.py"), "--quick", "--out", str(tmp_path / "r"),
                    "--work", str(tmp_path / "w")], check=True, cwd=REPO, timeout=900)
    payload = json.loads((tmp_path / "r" / "loader.json").read_text())
    assert "Recommendation" in (tmp_path / "r" / "loader.md").read_text() and payload
