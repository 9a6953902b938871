"""Semi-supervised domain adaptation: MixMatch with a domain adversary (scNym, 2021).

One step, for a labeled batch (reference cells) and an unlabeled batch (target cells):

1. The teacher (the model itself, or a mean teacher) guesses each target cell's class
   distribution, averaged over ``n_augmentations`` augmentations, in eval mode, without
   gradients. Cells whose guess is less confident than ``pseudolabel_min_confidence`` get no
   unsupervised loss and take no part in the mix. Guesses are sharpened with temperature T.
2. Labeled and confident target cells (augmented) are MixUp-ed with one pool: each sample keeps
   the larger share, lambda' = max(lambda, 1 - lambda), so its identity dominates its mix.
3. Loss = cross-entropy(labeled mixes) + w_unsup(t) x MSE(softmax(target mixes), mixed guesses)
   + cross-entropy of a domain classifier on the (unmixed) embedding, behind a gradient-reversal
   layer whose weight ramps up to ``dan_max_weight``
   [+ ``reconstruction_weight`` x the divergence of the mixes' un-augmented expression profiles from
   what an expression decoder makes of their embedding and domain (nn/decoder.py)].
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..nn.adversary import DomainClassifier
from ..nn.classifier import REFERENCE, TARGET, CellTypeClassifier, DomainRows
from ..nn.decoder import ExpressionDecoder, profile_divergence
from .augment import AUGMENTATIONS
from .losses import soft_cross_entropy
from .objectives import LabeledBatch, Objective, mixup


@dataclass
class UnlabeledBatch:
    x: torch.Tensor
    domains: Optional[torch.Tensor] = None
    covariates: Optional[torch.Tensor] = None


# what MixUp mixes, per cell: inputs, targets, covariates, domain one-hots, un-augmented inputs (the decoder's
# targets); the last three may be None
MixPart = tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass(frozen=True)
class MixMatchSettings:
    """The semi-supervised settings of the objective.

    Runs take every value from Config (workflows/settings.py; bench/results/ablation.md says why each default).
    These defaults serve objectives built by hand (tests): Config's, except that no target cell is gated
    (pseudolabel_min_confidence 0, no adaptive thresholds) unless asked.
    """

    unsup_max_weight: float = 1.0
    unsup_ramp_epochs: int = 15
    unsup_burn_in_epochs: int = 0
    sharpen_temperature: float = 0.5
    pseudolabel_min_confidence: float = 0.0
    pseudolabel_alignment: bool = False
    adaptive_thresholds: bool = False
    balance_target_classes: bool = False
    mixup_alpha: Optional[float] = 0.3
    augmentation: str = "log1p_drop"
    augmentation_rate: float = 0.2
    augment_pseudolabels: bool = False
    n_augmentations: int = 1
    unsup_mean_teacher: bool = False
    mean_teacher_decay: float = 0.999
    dan_max_weight: float = 0.1
    dan_ramp_epochs: int = 5
    dan_use_conf_pseudolabels: bool = False
    dan_n_layers: int = 1
    dan_conditional: bool = False
    dan_on_mixes: bool = True
    domain_batch_norm: bool = False
    domain_norm_by_class: bool = True
    reconstruction_weight: float = 0.0

    @property
    def needs_target_census(self) -> bool:
        """Whether the trainer must predict every target cell once per epoch (see :meth:`update_census`)."""
        return (self.adaptive_thresholds or self.balance_target_classes
                or (self.domain_batch_norm and self.domain_norm_by_class))


def sigmoid_ramp(epoch: float, ramp_epochs: int) -> float:
    """exp(-5 (1 - t)^2) for t = epoch / ramp_epochs in [0, 1]; 1 afterwards (Laine & Aila 2017)."""
    if ramp_epochs <= 0:
        return 1.0
    t = min(max(epoch / ramp_epochs, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalized; computed in log space so that T -> 0 gives a one-hot."""
    return torch.softmax(torch.log(probabilities.clamp_min(1e-12)) / temperature, dim=1)


def mix_with_pool(labeled: Sequence[Optional[torch.Tensor]], unlabeled: Sequence[Optional[torch.Tensor]],
                  alpha: float) -> tuple[list[Optional[torch.Tensor]], list[Optional[torch.Tensor]]]:
    """MixUp of labeled and unlabeled samples with one shuffled pool of both.

    ``labeled`` and ``unlabeled`` are matching tuples of per-cell tensors (inputs, targets,
    covariates, domain one-hots...; None entries stay None). Every sample gets its own
    lambda' = max(lambda, 1 - lambda) >= 0.5: it stays the dominant part of its mix, so the mix
    keeps its identity. Returns the mixed tuples of the labeled and the unlabeled samples.
    """
    inputs_l, inputs_u = labeled[0], unlabeled[0]
    if inputs_l is None or inputs_u is None:
        raise ValueError("mix_with_pool: the first tensors of both tuples (the inputs) are required")
    n_l = inputs_l.shape[0]
    n = n_l + inputs_u.shape[0]
    device = inputs_l.device
    partner = torch.randperm(n, device=device)
    lam = torch.distributions.Beta(alpha, alpha).sample((n, 1)).to(device)
    lam = torch.maximum(lam, 1 - lam)
    mixed_l: list[Optional[torch.Tensor]] = []
    mixed_u: list[Optional[torch.Tensor]] = []
    for a, b in zip(labeled, unlabeled):
        if a is None or b is None:
            mixed_l.append(None)
            mixed_u.append(None)
            continue
        pool = torch.cat([a, b])
        mixed = lam.to(pool.dtype) * pool + (1 - lam.to(pool.dtype)) * pool[partner]
        mixed_l.append(mixed[:n_l])
        mixed_u.append(mixed[n_l:])
    return mixed_l, mixed_u


def flexmatch_thresholds(classes: torch.Tensor, confidence: torch.Tensor, n_classes: int, base: float) -> torch.Tensor:
    """Per-class thresholds of FlexMatch (Zhang et al. 2021) from the latest guess of every target cell
    (its class, -1 for a cell not guessed yet, and its confidence).

    A class's learning effect is the number of target cells predicted as it above ``base``, relative
    to the best-learnt class (or to the cells not yet above ``base`` for any class, during warm-up);
    its threshold is ``base`` x M(effect) with the convex M(x) = x / (2 - x): classes the model
    places few cells in (often rare types) get lower thresholds, so their pseudolabels count.
    """
    above = (confidence >= base) & (classes >= 0)
    learnt = torch.bincount(classes[above], minlength=n_classes).float()
    unused = float((~above).sum())
    effect = learnt / max(float(learnt.max()), unused, 1.0)
    return base * effect / (2.0 - effect)


class SemiSupervisedObjective(Objective):
    """MixMatch + domain adversary; see the module docstring.

    Owns the domain classifier (its parameters join the optimizer) and the optional mean teacher.
    ``labeled_prior`` (class frequencies of the labeled training cells) is what distribution
    alignment aligns the target's pseudolabels to.
    """

    teacher: Optional[CellTypeClassifier]  # set with object.__setattr__: not a submodule (see __init__)
    labeled_prior: torch.Tensor            # buffers (register_buffer in __init__)
    target_marginal: torch.Tensor
    class_thresholds: torch.Tensor
    target_composition: torch.Tensor

    def __init__(self, model: CellTypeClassifier, settings: MixMatchSettings, n_domains: int,
                 class_weight: Optional[torch.Tensor] = None, labeled_prior: Optional[torch.Tensor] = None):
        super().__init__(model)
        self.settings = settings
        self.class_weight = class_weight
        self.n_domains = n_domains
        self.augment = AUGMENTATIONS[settings.augmentation]
        width = model.n_hidden * (model.n_classes if settings.dan_conditional else 1)
        self.domain_classifier = (DomainClassifier(width, n_domains, settings.dan_n_layers, n_hidden=model.n_hidden)
                                  if settings.dan_max_weight > 0 else None)
        self.decoder = (ExpressionDecoder(model.n_hidden, model.n_genes, n_domains)
                        if settings.reconstruction_weight > 0 else None)
        prior = (torch.full((model.n_classes,), 1.0 / model.n_classes) if labeled_prior is None
                 else labeled_prior.float() / labeled_prior.float().sum())
        # distribution alignment: the labeled prior and a running mean of the target's guesses
        self.register_buffer("labeled_prior", prior, persistent=False)
        self.register_buffer("target_marginal", prior.clone(), persistent=False)
        # per-class pseudolabel thresholds (FlexMatch updates them from the census of target predictions)
        self.register_buffer("class_thresholds", torch.full((model.n_classes,), settings.pseudolabel_min_confidence),
                             persistent=False)
        # class shares of the target's pseudolabels (the census; all 0 until the first): what the reference's
        # batch-norm statistics are weighted to with domain-specific batch norm (domain_norm_by_class)
        self.register_buffer("target_composition", torch.zeros(model.n_classes), persistent=False)
        self.last_guess: Optional[torch.Tensor] = None
        # domain-specific batch norm: reference rows (0) and target rows (1) normalized apart
        self.domain_specific_norm = getattr(model, "n_norm_domains", 1) > 1
        # the mean teacher is not a submodule: it is not trained, saved or synchronized
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if settings.unsup_mean_teacher else None
        object.__setattr__(self, "teacher", teacher)

    def _apply(self, fn, recurse: bool = True):
        # moving the objective (.to(device)) moves the teacher with it
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def get_extra_state(self) -> dict:
        """What a training checkpoint needs beyond the parameters and persistent buffers: the running target
        marginal, FlexMatch's thresholds and the mean teacher (none of which is part of a saved model)."""
        return {"target_marginal": self.target_marginal.detach().cpu(),
                "class_thresholds": self.class_thresholds.detach().cpu(),
                "target_composition": self.target_composition.detach().cpu(),
                "teacher": None if self.teacher is None else self.teacher.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.target_marginal.copy_(state["target_marginal"])
        self.class_thresholds.copy_(state["class_thresholds"])
        if "target_composition" in state:  # checkpoints written before it existed: the next census sets it
            self.target_composition.copy_(state["target_composition"])
        if self.teacher is not None and state["teacher"] is not None:
            self.teacher.load_state_dict(state["teacher"])

    @torch.no_grad()
    def after_step(self) -> None:
        """Mean teacher: exponential moving average of the student's weights (buffers copied)."""
        if self.teacher is None:
            return
        decay = self.settings.mean_teacher_decay
        for teacher_p, student_p in zip(self.teacher.parameters(), self.model.parameters()):
            teacher_p.mul_(decay).add_(student_p.detach(), alpha=1 - decay)
        for teacher_b, student_b in zip(self.teacher.buffers(), self.model.buffers()):
            teacher_b.copy_(student_b)

    # ------------------------------------------------------------------ pieces
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x, self.settings.augmentation_rate)

    @torch.no_grad()
    def guess_labels(self, model: CellTypeClassifier, x_u: torch.Tensor, cov_u: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class distribution averaged over augmentations, its confidence) for target cells."""
        teacher = self.teacher if self.teacher is not None else model
        was_training = teacher.training
        teacher.eval()
        views = self.settings.n_augmentations if self.settings.augment_pseudolabels else 1
        total: Optional[torch.Tensor] = None
        for _ in range(views):
            x = self._augment(x_u) if self.settings.augment_pseudolabels else x_u
            probabilities = torch.softmax(teacher(x, cov_u, **self._domain(TARGET)).float(), dim=1)
            total = probabilities if total is None else total + probabilities
        teacher.train(was_training)
        assert total is not None  # views >= 1
        average = total / views
        return average, average.max(dim=1).values

    def _domain(self, domain) -> dict:
        """The ``domain`` argument for a model with domain-specific batch norm; nothing for others."""
        return {"domain": domain} if self.domain_specific_norm else {}

    @staticmethod
    def _row_domains(n_reference: int, n_target: int, device) -> torch.Tensor:
        return torch.cat([torch.full((n_reference,), REFERENCE, dtype=torch.long, device=device),
                          torch.full((n_target,), TARGET, dtype=torch.long, device=device)])

    @torch.no_grad()
    def align_distribution(self, guess: torch.Tensor) -> torch.Tensor:
        """ReMixMatch's distribution alignment: guesses scaled by labeled prior / running target marginal,
        renormalized, so the pseudolabels as a whole do not drift towards the large classes."""
        if self.training:
            self.target_marginal.mul_(0.99).add_(guess.mean(dim=0), alpha=0.01)
        aligned = guess * (self.labeled_prior / self.target_marginal.clamp_min(1e-6))
        return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def update_census(self, classes: np.ndarray, confidence: np.ndarray) -> None:
        """The latest guess of every target cell (once per epoch): FlexMatch's per-class thresholds."""
        if self.settings.adaptive_thresholds:
            thresholds = flexmatch_thresholds(torch.from_numpy(classes), torch.from_numpy(confidence),
                                              self.model.n_classes, self.settings.pseudolabel_min_confidence)
            self.class_thresholds.copy_(thresholds.to(self.class_thresholds.device))
        guessed = classes[classes >= 0]
        if len(guessed):
            counts = np.bincount(guessed, minlength=self.model.n_classes)[: self.model.n_classes]
            self.target_composition.copy_(torch.from_numpy(counts / counts.sum()).float())

    def _domain_onehots(self, batch: LabeledBatch, unlabeled: Optional[UnlabeledBatch]
                        ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One-hot domains of the labeled and the target rows (a batch without domains: the reference's and the
        target's)."""
        def onehot(domains: Optional[torch.Tensor], n_rows: int, default: int, device) -> torch.Tensor:
            if domains is None:
                domains = torch.full((n_rows,), default, dtype=torch.long, device=device)
            return F.one_hot(domains, self.n_domains).float()
        domains_l = onehot(batch.domains, batch.x.shape[0], REFERENCE, batch.x.device)
        domains_u = (None if unlabeled is None
                     else onehot(unlabeled.domains, unlabeled.x.shape[0], TARGET, unlabeled.x.device))
        return domains_l, domains_u

    def _norm_domains(self, targets_l: torch.Tensor, n_target: int) -> dict:
        """The ``domain`` argument of a mixed batch's forward pass: the row domains and, with
        domain_norm_by_class once a census exists, weights on the reference rows that give each class the
        share the target's pseudolabels give it. Reference and target statistics then describe the same
        mix of cell types: with plain DSBN a target lacking some reference types is centred on a
        different composition than the reference (CellBench, 2 of 5 lines absent: 0.765 vs 1.000)."""
        if not self.domain_specific_norm:
            return {}
        domains = self._row_domains(targets_l.shape[0], n_target, targets_l.device)
        if not (self.settings.domain_norm_by_class and bool(self.target_composition.sum() > 0)):
            return {"domain": domains}
        soft = targets_l.detach().float()
        ratio = self.target_composition.to(soft.device) / soft.mean(dim=0).clamp_min(1e-6)
        weights = torch.cat([soft @ ratio, torch.ones(n_target, device=soft.device)])
        return {"domain": DomainRows(domains, weights)}

    def _domain_features(self, model: CellTypeClassifier, embedding: torch.Tensor, logits: Optional[torch.Tensor]):
        """What the domain classifier sees: the embedding, or (conditional adversary, CDAN) the outer product
        of the class probabilities (not back-propagated through) and the embedding."""
        if not self.settings.dan_conditional:
            return embedding
        if logits is None:
            logits = model.classifier(embedding)
        probabilities = torch.softmax(logits.detach().float(), dim=1).to(embedding.dtype)
        return (probabilities.unsqueeze(2) * embedding.unsqueeze(1)).flatten(1)

    # ------------------------------------------------------------------ the step
    def forward(self, batch: LabeledBatch, epoch: float, unlabeled: Optional[UnlabeledBatch] = None):
        """Loss of one step; ``unlabeled`` may be None (domain adversary over labeled domains only).

        ``epoch`` counts from 1 and may be fractional (epoch + share of its steps done), so the ramps
        rise smoothly step by step.
        """
        s, model = self.settings, self.model
        progress = epoch - 1  # ramps start at 0 in the first epoch
        unsup_weight = 0.0
        if progress >= s.unsup_burn_in_epochs:
            unsup_weight = s.unsup_max_weight * sigmoid_ramp(progress - s.unsup_burn_in_epochs, s.unsup_ramp_epochs)
        dan_weight = s.dan_max_weight * sigmoid_ramp(progress, s.dan_ramp_epochs)
        terms: dict[str, float] = {}

        x_l = self._augment(batch.x)
        x_u: Optional[torch.Tensor] = None
        confident: Optional[torch.Tensor] = None
        targets_u: Optional[torch.Tensor] = None
        if unlabeled is not None:
            guess, _ = self.guess_labels(model, unlabeled.x, unlabeled.covariates)
            self.last_guess = guess  # the trainer's census of target pseudolabels reads it
            if s.pseudolabel_alignment:
                guess = self.align_distribution(guess)
            confidence, guessed = guess.max(dim=1)
            confident = confidence >= self.class_thresholds[guessed]
            targets_u = sharpen(guess, s.sharpen_temperature)
            x_u = self._augment(unlabeled.x)
            terms["confident_fraction"] = float(confident.float().mean())

        domains_l = domains_u = None  # domain one-hots of the rows, for the adversary on mixes and the decoder
        adversary_on_mixes = (self.domain_classifier is not None and s.dan_on_mixes and batch.domains is not None
                              and (unlabeled is None or unlabeled.domains is not None))
        if adversary_on_mixes or self.decoder is not None:
            domains_l, domains_u = self._domain_onehots(batch, unlabeled)
        mixed_embedding: Optional[torch.Tensor] = None
        mixed_logits: Optional[torch.Tensor] = None
        mixed_domains: Optional[torch.Tensor] = None
        reconstruction_loss: Optional[torch.Tensor] = None
        if (unlabeled is not None and x_u is not None and confident is not None and targets_u is not None
                and s.unsup_max_weight > 0 and bool(confident.any())):
            rows = confident
            clean = self.decoder is not None
            unlabeled_part: MixPart = (x_u[rows], targets_u[rows],
                              None if unlabeled.covariates is None else unlabeled.covariates[rows],
                              None if domains_u is None else domains_u[rows],
                              unlabeled.x[rows] if clean else None)
            labeled_part: MixPart = (x_l, batch.target, batch.covariates, domains_l, batch.x if clean else None)
            if s.mixup_alpha:
                mixed_l, mixed_u = mix_with_pool(labeled_part, unlabeled_part, s.mixup_alpha)
                # None stays None, so inputs and targets are still tensors
                labeled_part, unlabeled_part = cast(MixPart, tuple(mixed_l)), cast(MixPart, tuple(mixed_u))
            xl, yl, cl, dl, clean_l = labeled_part
            xu, yu, cu, du, clean_u = unlabeled_part
            # a mix keeps the domain of its dominant part (lambda' >= 0.5), the row's own
            logits, embedding = model(torch.cat([xl, xu]), None if cl is None or cu is None else torch.cat([cl, cu]),
                                      return_embedding=True, **self._norm_domains(yl, xu.shape[0]))
            logits_l, logits_u = logits[: xl.shape[0]], logits[xl.shape[0]:]
            per_cell = ((torch.softmax(logits_u.float(), dim=1) - yu) ** 2).mean(dim=1)
            # divided by all target cells of the batch: those below the threshold add exactly 0
            unsup_loss = per_cell.sum() / unlabeled.x.shape[0]
            if dl is not None and du is not None:
                if adversary_on_mixes:
                    mixed_embedding, mixed_logits, mixed_domains = embedding, logits, torch.cat([dl, du])
                if self.decoder is not None and clean_l is not None and clean_u is not None:
                    reconstruction_loss = profile_divergence(torch.cat([clean_l, clean_u]),
                                                             self.decoder(embedding, torch.cat([dl, du])))
        else:
            xl, yl, cl = mixup(x_l, batch.target, batch.covariates, s.mixup_alpha) if s.mixup_alpha \
                else (x_l, batch.target, batch.covariates)
            if self.decoder is not None and domains_l is not None:
                # the labeled cells alone: their mixes (domains of the dominant part unmixed) are the targets
                logits_l, embedding_l = model(xl, cl, return_embedding=True)
                reconstruction_loss = profile_divergence(xl, self.decoder(embedding_l, domains_l))
            else:
                logits_l = model(xl, cl)
            unsup_loss = torch.zeros((), device=xl.device)
        weight = None if self.class_weight is None else self.class_weight.to(logits_l.device)
        sup_loss = soft_cross_entropy(logits_l, yl, weight)
        loss = sup_loss + unsup_weight * unsup_loss
        terms.update(supervised_loss=float(sup_loss.detach()), unsupervised_loss=float(unsup_loss.detach()),
                     unsup_weight=unsup_weight)
        if reconstruction_loss is not None:
            loss = loss + s.reconstruction_weight * reconstruction_loss
            terms.update(reconstruction_loss=float(reconstruction_loss.detach()))
        if self.domain_classifier is not None:
            if mixed_embedding is not None and mixed_domains is not None:  # the adversary on the mixed batch: no second forward pass
                domain_logits = self.domain_classifier(
                    self._domain_features(model, mixed_embedding, mixed_logits), dan_weight)
                domain_loss = soft_cross_entropy(domain_logits, mixed_domains)
                domain_accuracy = float((domain_logits.argmax(1) == mixed_domains.argmax(1)).float().mean())
            else:
                domain_loss, domain_accuracy = self.domain_loss(model, batch, x_l, unlabeled, x_u, confident,
                                                                dan_weight)
            loss = loss + domain_loss
            terms.update(domain_loss=float(domain_loss.detach()), domain_accuracy=domain_accuracy,
                         dan_weight=dan_weight)
        return loss, terms, logits_l.detach()

    def domain_loss(self, model, batch, x_l, unlabeled, x_u, confident, dan_weight):
        """Domain cross-entropy on unmixed embeddings; the gradient reaching the model is reversed and
        scaled by ``dan_weight``. With ``dan_use_conf_pseudolabels`` only confident target cells enter."""
        inputs, domains, covariates = [x_l], [batch.domains], [batch.covariates]
        if unlabeled is not None:
            rows = confident if self.settings.dan_use_conf_pseudolabels else torch.ones_like(confident)
            inputs.append(x_u[rows])
            domains.append(unlabeled.domains[rows])
            covariates.append(None if unlabeled.covariates is None else unlabeled.covariates[rows])
        n_target = sum(x.shape[0] for x in inputs[1:])
        embedding = model.embed(torch.cat(inputs), None if covariates[0] is None else torch.cat(covariates),
                                **self._domain(self._row_domains(x_l.shape[0], n_target, x_l.device)))
        domains = torch.cat(domains)
        logits = self.domain_classifier(self._domain_features(model, embedding, None), dan_weight)
        loss = F.cross_entropy(logits.float(), domains)
        return loss, float((logits.argmax(1) == domains).float().mean())
