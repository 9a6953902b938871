"""MixMatch, the domain adversary, calibration and presets: properties that fail on wrong code."""

import numpy as np
import pytest
import torch
from torch import nn

from scnym_cli.config import PRESETS, Config, load_config
from scnym_cli.nn.adversary import DomainClassifier, reverse_gradient
from scnym_cli.train.calibration import fit_temperature
from scnym_cli.train.metrics import expected_calibration_error
from scnym_cli.train.mixmatch import (MixMatchSettings, SemiSupervisedObjective, UnlabeledBatch, mix_with_pool,
                                      sharpen, sigmoid_ramp)
from scnym_cli.train.objectives import LabeledBatch


def test_mixup_keeps_the_dominant_identity():
    torch.manual_seed(0)
    n_l, n_u, k = 64, 48, 5
    y_l = torch.nn.functional.one_hot(torch.randint(k, (n_l,)), k).float()
    q_u = torch.softmax(torch.randn(n_u, k) * 4, dim=1)
    # identity-coded inputs: column i of a mix is the share of sample i in it
    codes = torch.eye(n_l + n_u)
    (xl, yl, none_l), (xu, yu, none_u) = mix_with_pool((codes[:n_l], y_l, None), (codes[n_l:], q_u, None), alpha=0.3)
    assert none_l is None and none_u is None
    own_share = torch.cat([xl, xu]).diagonal()
    assert (own_share >= 0.5).all() and (own_share < 1).any()
    assert torch.equal(yl.argmax(1), y_l.argmax(1))          # labeled mixes keep their class
    torch.testing.assert_close(torch.cat([yl, yu]).sum(1), torch.ones(n_l + n_u))
    assert (yu - own_share[n_l:, None] * q_u).min() >= -1e-6  # a target mix is dominated by its own guess


def test_sharpening_with_small_temperature_is_one_hot():
    # a seeded draw (unseeded, it depended on the tests run before; two near-equal top probabilities are not
    # one-hot at T = 1e-4), with the top probability clearly ahead
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    logits[torch.arange(10), logits.argmax(1)] += 1.0
    p = torch.softmax(logits, dim=1)
    torch.testing.assert_close(sharpen(p, 1e-4), torch.nn.functional.one_hot(p.argmax(1), 4).float())
    torch.testing.assert_close(sharpen(p, 1.0), p)
    sharper = sharpen(p, 0.5)
    assert (sharper.max(1).values >= p.max(1).values - 1e-6).all()
    torch.testing.assert_close(sharper.sum(1), torch.ones(10))


def test_gradient_reversal_flips_the_embedding_gradient_but_not_the_heads():
    torch.manual_seed(0)
    head = DomainClassifier(n_inputs=6, n_domains=3, n_layers=1)
    embedding = torch.randn(8, 6, requires_grad=True)
    domains = torch.randint(3, (8,))

    def gradients(weight):
        head.zero_grad()
        embedding.grad = None
        loss = nn.functional.cross_entropy(head(embedding, weight), domains)
        loss.backward()
        return embedding.grad.clone(), [p.grad.clone() for p in head.parameters()]

    plain_embedding_grad, plain_head_grads = None, None
    # the gradient without reversal: run the head directly
    head.zero_grad()
    loss = nn.functional.cross_entropy(head.head(embedding), domains)
    loss.backward()
    plain_embedding_grad = embedding.grad.clone()
    plain_head_grads = [p.grad.clone() for p in head.parameters()]
    for weight in (1.0, 0.1):
        reversed_grad, head_grads = gradients(weight)
        torch.testing.assert_close(reversed_grad, -weight * plain_embedding_grad)
        for got, expected in zip(head_grads, plain_head_grads):
            torch.testing.assert_close(got, expected)
    x = torch.randn(3, 2)
    assert torch.equal(reverse_gradient(x, 0.5), x)


class LogitsAreInputs(nn.Module):
    """A stand-in classifier whose logits are the first k inputs (so confidence is chosen by the test)."""

    def __init__(self, k):
        super().__init__()
        self.n_classes, self.n_hidden = k, k
        self.scale = nn.Parameter(torch.ones(()))

    def embed(self, x, covariates=None):
        return x[:, : self.n_classes] * self.scale

    def forward(self, x, covariates=None, return_embedding=False):
        logits = self.embed(x)
        return (logits, logits) if return_embedding else logits


@pytest.mark.parametrize("mixup_alpha", [None, 0.3])
def test_cells_below_the_confidence_threshold_add_zero_unsupervised_loss(mixup_alpha):
    torch.manual_seed(0)
    settings = MixMatchSettings(pseudolabel_min_confidence=0.9, dan_max_weight=0.0, augmentation="none",
                                mixup_alpha=mixup_alpha, unsup_ramp_epochs=0)
    model = LogitsAreInputs(3)
    objective = SemiSupervisedObjective(model, settings, n_domains=2)
    confident = torch.tensor([[8.0, 0, 0], [0, 9.0, 0]])
    doubtful = torch.tensor([[0.3, 0.2, 0.0], [0.0, 0.1, 0.2]])
    x_u = torch.cat([confident, doubtful]).requires_grad_(True)
    batch = LabeledBatch(torch.tensor([[3.0, 0, 0], [0, 0, 3.0]]), torch.eye(3)[[0, 2]])
    loss, terms, _ = objective(batch, epoch=1, unlabeled=UnlabeledBatch(x_u))
    assert terms["confident_fraction"] == 0.5
    loss.backward()
    assert torch.all(x_u.grad[2:] == 0)            # the doubtful cells take no part at all
    assert terms["unsup_weight"] == 1.0
    # without mixing the value is exactly the confident cells' MSE summed over all target cells
    if mixup_alpha is None:
        guesses = sharpen(torch.softmax(confident, 1), 0.5)
        per_cell = ((torch.softmax(confident, 1) - guesses) ** 2).mean(1)
        assert terms["unsupervised_loss"] == pytest.approx(float(per_cell.sum() / 4), rel=1e-5)


def test_domain_adversary_terms_and_confident_only_option():
    torch.manual_seed(0)
    model = LogitsAreInputs(3)
    x_u = torch.tensor([[8.0, 0, 0], [0.1, 0, 0.2]])
    batch = LabeledBatch(torch.tensor([[3.0, 0, 0], [0, 0, 3.0]]), torch.eye(3)[[0, 2]],
                         domains=torch.tensor([0, 0]))
    target = UnlabeledBatch(x_u, domains=torch.tensor([1, 1]))
    for only_confident, n_cells in ((False, 4), (True, 3)):
        settings = MixMatchSettings(pseudolabel_min_confidence=0.9, augmentation="none", dan_ramp_epochs=0,
                                    dan_use_conf_pseudolabels=only_confident, dan_on_mixes=False)
        objective = SemiSupervisedObjective(model, settings, n_domains=2)
        seen = []
        original = objective.domain_classifier.forward
        objective.domain_classifier.forward = lambda e, w: seen.append((e.shape[0], w)) or original(e, w)
        _, terms, _ = objective(batch, epoch=1, unlabeled=target)
        assert seen == [(n_cells, 0.1)]
        assert {"domain_loss", "domain_accuracy", "dan_weight"} <= set(terms)


def test_ramps():
    assert sigmoid_ramp(0, 100) == pytest.approx(np.exp(-5))
    assert sigmoid_ramp(50, 100) == pytest.approx(np.exp(-5 * 0.25))
    assert sigmoid_ramp(100, 100) == sigmoid_ramp(500, 100) == 1.0
    assert sigmoid_ramp(3, 0) == 1.0


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 4)) * 1.5
    probabilities = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in probabilities])
    overconfident = true_logits * 4
    before = expected_calibration_error(np.exp(overconfident) / np.exp(overconfident).sum(1, keepdims=True), labels)
    temperature = fit_temperature(overconfident, labels)
    scaled = overconfident / temperature
    after = expected_calibration_error(np.exp(scaled) / np.exp(scaled).sum(1, keepdims=True), labels)
    assert temperature == pytest.approx(4.0, rel=0.15)
    assert after < before / 3
    assert fit_temperature(overconfident[:1], labels[:1]) == 1.0
    # weighted (importance-weighted calibration): equal weights change nothing; weight on the misclassified cells
    # asks for a softer scale
    assert fit_temperature(overconfident, labels, weights=np.full(4000, 3.0)) == pytest.approx(temperature, rel=1e-6)
    wrong = overconfident.argmax(1) != labels
    assert fit_temperature(overconfident, labels, weights=np.where(wrong, 5.0, 1.0)) > temperature * 1.2


def test_presets_are_read_only_and_unchanged_by_runs():
    snapshot = {k: dict(v) for k, v in PRESETS.items()}
    config = load_config(None, [], {"preset": "new_identity_discovery", "pseudolabel_min_confidence": "0.5"})
    assert config.pseudolabel_min_confidence == 0.5 and config.dan_use_conf_pseudolabels is True
    assert load_config(None, [], {"preset": "no_ssl"}).unsup_max_weight == 0.0
    assert load_config(None, [], {"preset": "no_dan"}).dan_max_weight == 0.0
    with pytest.raises(TypeError):
        PRESETS["no_ssl"]["unsup_max_weight"] = 1.0
    with pytest.raises(TypeError):
        PRESETS["mine"] = {}
    assert {k: dict(v) for k, v in PRESETS.items()} == snapshot
    assert Config().unsup_max_weight == 1.0


def test_unknown_preset_is_suggested():
    from scnym_cli.errors import ScnymError

    with pytest.raises(ScnymError, match="did you mean 'no_dan'"):
        load_config(None, [], {"preset": "no-dan"})


def test_flexmatch_thresholds_are_lower_for_classes_few_cells_are_placed_in():
    from scnym_cli.train.mixmatch import flexmatch_thresholds

    classes = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    confident = torch.full((100,), 0.95)
    thresholds = flexmatch_thresholds(classes, confident, 3, base=0.9)
    assert thresholds[0] == pytest.approx(0.9)                       # the best-learnt class: the base
    assert thresholds[1] == pytest.approx(0.9 * 0.5 / 1.5)           # effect 1/2 -> M = 1/3
    assert thresholds[2] < thresholds[1] < thresholds[0]
    # warm-up: while most cells are not above the base (or not guessed yet: -1), every threshold is low
    early = flexmatch_thresholds(torch.tensor([0] * 10 + [-1] * 90), torch.full((100,), 0.95), 3, base=0.9)
    assert early[0] == pytest.approx(0.9 * (10 / 90) / (2 - 10 / 90)) and early[1] == 0


def test_distribution_alignment_pulls_guesses_towards_the_labeled_prior():
    model = LogitsAreInputs(2)
    settings = MixMatchSettings(pseudolabel_alignment=True, augmentation="none", dan_max_weight=0.0)
    objective = SemiSupervisedObjective(model, settings, n_domains=2, labeled_prior=torch.tensor([50, 50]))
    skewed = torch.tensor([[0.9, 0.1]]).repeat(8, 1)               # the target's guesses drift to class 0
    for _ in range(800):   # a running mean with momentum 0.99
        aligned = objective.align_distribution(skewed)
    torch.testing.assert_close(objective.target_marginal, torch.tensor([0.9, 0.1]), atol=0.01, rtol=0)
    torch.testing.assert_close(aligned[0], torch.tensor([0.5, 0.5]), atol=0.02, rtol=0)   # prior / marginal
    torch.testing.assert_close(aligned.sum(1), torch.ones(8))


def test_the_census_records_guesses_and_balances_target_batches_by_pseudolabel():
    from scnym_cli.data.batches import EpochSampler
    from scnym_cli.train.census import TargetCensus

    target_rows = np.arange(100, 400)
    settings = MixMatchSettings(adaptive_thresholds=True, balance_target_classes=True, pseudolabel_min_confidence=0.75,
                                dan_max_weight=0.0)
    objective = SemiSupervisedObjective(LogitsAreInputs(3), settings, n_domains=2)
    census = TargetCensus(objective, target_rows, record=True)
    guess = torch.zeros(300, 3)
    guess[:240, 0], guess[240:290, 1], guess[290:, 2] = 0.9, 0.8, 0.7   # pseudolabels: 240 / 50 / 10 cells
    objective.last_guess = guess.flip(0)
    census.record(target_rows[::-1].copy())                            # rows in any order
    assert list(np.bincount(census.classes)) == [240, 50, 10]
    sampler = EpochSampler(target_rows, 100, seed=0)
    census.apply(sampler, n_rows=400)
    drawn = np.concatenate([np.concatenate(list(sampler.epoch())) for _ in range(20)])
    shares = np.bincount(census.classes[drawn - 100], minlength=3) / len(drawn)
    np.testing.assert_allclose(shares, 1 / 3, atol=0.03)              # rare pseudolabels drawn as often
    # FlexMatch: class 2 (confidence 0.7, below the base 0.75) counts as unused, its threshold is 0
    assert objective.class_thresholds[2] == 0 and objective.class_thresholds[0] == pytest.approx(0.75)


@pytest.mark.parametrize("on_mixes", [True, False])
@pytest.mark.parametrize("conditional", [True, False])
def test_adversary_variants_train_a_real_classifier(on_mixes, conditional):
    from scnym_cli.nn import CellTypeClassifier

    torch.manual_seed(0)
    model = CellTypeClassifier(n_genes=20, n_classes=3, n_hidden=8)
    settings = MixMatchSettings(dan_on_mixes=on_mixes, dan_conditional=conditional, dan_ramp_epochs=0)
    objective = SemiSupervisedObjective(model, settings, n_domains=2)
    assert objective.domain_classifier.head[0].in_features == (24 if conditional else 8)
    embeds = []
    original = model.embed
    model.embed = lambda *a, **k: embeds.append(a[0].shape[0]) or original(*a, **k)
    x = torch.rand(16, 20) * 5
    batch = LabeledBatch(x[:8], torch.eye(3)[torch.arange(8) % 3], domains=torch.zeros(8, dtype=torch.long))
    target = UnlabeledBatch(x[8:], domains=torch.ones(8, dtype=torch.long))
    loss, terms, _ = objective(batch, epoch=1, unlabeled=target)
    loss.backward()
    assert terms["dan_weight"] == pytest.approx(0.1) and 0 <= terms["domain_accuracy"] <= 1
    # the teacher's guess, the mixed batch, and (unmixed adversary only) a second pass over 16 cells
    assert embeds == ([8, 16] if on_mixes else [8, 16, 16])
    assert all(p.grad is not None for p in objective.domain_classifier.parameters())


def test_with_domain_specific_batch_norm_reference_and_target_rows_are_normalized_apart():
    from scnym_cli.nn import CellTypeClassifier
    from scnym_cli.nn.classifier import REFERENCE, TARGET

    torch.manual_seed(0)
    model = CellTypeClassifier(n_genes=20, n_classes=3, n_hidden=8, n_norm_domains=2)
    objective = SemiSupervisedObjective(model, MixMatchSettings(dan_on_mixes=False), n_domains=2)
    seen = []
    original = model.embed
    model.embed = lambda x, covariates=None, domain=None: seen.append(domain) or original(x, covariates, domain)
    x = torch.rand(16, 20) * 5
    batch = LabeledBatch(x[:8], torch.eye(3)[torch.arange(8) % 3], domains=torch.zeros(8, dtype=torch.long))
    objective(batch, epoch=1, unlabeled=UnlabeledBatch(x[8:], domains=torch.ones(8, dtype=torch.long)))
    guess, mixed, adversary = seen
    assert guess == TARGET                                   # the teacher guesses with the target's statistics
    for rows in (mixed, adversary):                          # labeled rows first, then target rows
        assert rows.tolist() == [REFERENCE] * 8 + [TARGET] * 8


def test_reference_statistics_are_weighted_to_the_targets_pseudolabelled_composition():
    """domain_norm_by_class: once a census exists, the reference rows of the mixed batch carry weights that
    give each class its share of the target's pseudolabels (here: class 0 only); before it, or without the
    option, plain per-domain statistics."""
    from scnym_cli.nn import CellTypeClassifier
    from scnym_cli.nn.classifier import REFERENCE, TARGET, DomainRows

    for by_class in (True, False):
        torch.manual_seed(0)
        model = CellTypeClassifier(n_genes=20, n_classes=3, n_hidden=8, n_norm_domains=2)
        settings = MixMatchSettings(mixup_alpha=None, domain_batch_norm=True, domain_norm_by_class=by_class)
        assert settings.needs_target_census == by_class
        objective = SemiSupervisedObjective(model, settings, n_domains=2)
        seen = []
        original = model.embed
        model.embed = lambda x, covariates=None, domain=None: seen.append(domain) or original(x, covariates, domain)
        x = torch.rand(16, 20) * 5
        batch = LabeledBatch(x[:9], torch.eye(3)[torch.arange(9) % 3], domains=torch.zeros(9, dtype=torch.long))
        unlabeled = UnlabeledBatch(x[9:], domains=torch.ones(7, dtype=torch.long))
        objective(batch, epoch=1, unlabeled=unlabeled)
        assert isinstance(seen[1], torch.Tensor)             # no census yet: the domains alone
        objective.update_census(np.array([0, 0, 0, -1]), np.ones(4, dtype=np.float32))
        seen.clear()
        objective(batch, epoch=2, unlabeled=unlabeled)
        mixed = seen[1]
        if not by_class:
            assert isinstance(mixed, torch.Tensor)
            continue
        assert isinstance(mixed, DomainRows)
        assert mixed.domains.tolist() == [REFERENCE] * 9 + [TARGET] * 7
        expected = torch.tensor([3.0, 0.0, 0.0] * 3 + [1.0] * 7)   # class 0 is a third of the batch, all the target
        torch.testing.assert_close(mixed.weights, expected)
        state = objective.get_extra_state()
        torch.testing.assert_close(state["target_composition"], torch.tensor([1.0, 0.0, 0.0]))


def test_temperature_of_a_perfectly_classified_selection_split_does_not_collapse():
    """Every selection cell right: maximum likelihood would send T to zero (probability 1 for every call);
    the prior on log T keeps the model's own scale, while a few errors among few cells still raise T."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(150, 5))
    labels = rng.integers(0, 5, 150)
    logits[np.arange(150), labels] += 8
    assert 0.5 < fit_temperature(logits, labels) <= 1.0
    wrong = rng.choice(150, 5, replace=False)
    logits[wrong, (labels[wrong] + 1) % 5] += 16
    assert fit_temperature(logits, labels) > 1.2


def test_profile_divergence_is_zero_for_the_cells_own_profile_at_any_depth():
    from scnym_cli.nn.decoder import profile_divergence
    from scnym_cli.nn.expression import log_cpm

    counts = torch.tensor([[5.0, 3.0, 0.0, 2.0], [0.0, 1.0, 1.0, 8.0]])
    shares = torch.log(counts / counts.sum(1, keepdim=True)).clamp_min(-60.0)
    assert float(profile_divergence(log_cpm(counts), shares)) == pytest.approx(0.0, abs=1e-5)
    # a cell's depth does not change its profile; another profile scores above 0
    assert float(profile_divergence(log_cpm(counts * 7), shares)) == pytest.approx(0.0, abs=1e-5)
    uniform = torch.full((2, 4), -np.log(4.0))
    assert float(profile_divergence(log_cpm(counts), uniform)) > 0.1
    # a cell with no counts adds nothing
    empty = torch.cat([log_cpm(counts), torch.zeros(1, 4)])
    assert float(profile_divergence(empty, torch.cat([shares, uniform[:1]]))) == pytest.approx(0.0, abs=1e-5)


def test_the_expression_decoder_reconstructs_each_domain_from_its_one_hot():
    """With reconstruction_weight the objective owns a decoder that trains with the model: its term is logged,
    every part gets gradients, and two domains with the same cells but different gene baselines are told apart
    through the domain one-hot (a decoder that ignored it could not fit both)."""
    from scnym_cli.nn import CellTypeClassifier
    from scnym_cli.nn.expression import log_cpm

    torch.manual_seed(0)
    model = CellTypeClassifier(n_genes=12, n_classes=3, n_hidden=16, dropout=0.0)
    settings = MixMatchSettings(reconstruction_weight=1.0, dan_ramp_epochs=0, augmentation="none")
    objective = SemiSupervisedObjective(model, settings, n_domains=2)
    assert objective.decoder is not None and objective.decoder.output.out_features == 12
    assert SemiSupervisedObjective(model, MixMatchSettings(), n_domains=2).decoder is None
    classes = torch.arange(16) % 3
    profiles = torch.rand(3, 12) + torch.eye(3, 12) * 4
    counts = 200 * profiles[classes]
    baseline = torch.ones(12)
    baseline[6:] = 6.0  # the target's technology reads the second half of the genes 6x higher
    batch = LabeledBatch(log_cpm(counts), torch.eye(3)[classes], domains=torch.zeros(16, dtype=torch.long))
    target = UnlabeledBatch(log_cpm(counts * baseline), domains=torch.ones(16, dtype=torch.long))
    optimizer = torch.optim.Adam(objective.parameters(), lr=0.01)
    first = None
    for _ in range(150):
        optimizer.zero_grad()
        loss, terms, _ = objective(batch, epoch=3, unlabeled=target)
        loss.backward()
        assert all(p.grad is not None for p in objective.decoder.parameters())
        optimizer.step()
        first = terms["reconstruction_loss"] if first is None else first
    assert terms["reconstruction_loss"] < 0.1 * first
    with torch.no_grad():
        objective.eval()
        embedding = model.embed(batch.x)
        as_reference = objective.decoder(embedding, torch.eye(2)[[0] * 16]).exp()
        as_target = objective.decoder(embedding, torch.eye(2)[[1] * 16]).exp()
    # the same embedding decodes to the second half's larger share only with the target's one-hot
    ratio = (as_target[:, 6:].sum(1) / as_reference[:, 6:].sum(1))
    assert float(ratio.min()) > 1.5
