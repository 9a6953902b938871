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
   layer whose weight ramps up to ``dan_max_weight``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.adversary import DomainClassifier
from .augment import AUGMENTATIONS
from .losses import soft_cross_entropy
from .objectives import LabeledBatch, Objective, mixup


@dataclass
class UnlabeledBatch:
    x: torch.Tensor
    domains: Optional[torch.Tensor] = None
    covariates: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class MixMatchSettings:
    """The semi-supervised keys of a Config, gathered for the objective."""

    unsup_max_weight: float = 1.0
    unsup_ramp_epochs: int = 100
    unsup_burn_in_epochs: int = 0
    sharpen_temperature: float = 0.5
    pseudolabel_min_confidence: float = 0.0
    mixup_alpha: Optional[float] = 0.3
    augmentation: str = "log1p_drop"
    augmentation_rate: float = 0.1
    augment_pseudolabels: bool = False
    n_augmentations: int = 1
    unsup_mean_teacher: bool = False
    mean_teacher_decay: float = 0.999
    dan_max_weight: float = 0.1
    dan_ramp_epochs: int = 20
    dan_use_conf_pseudolabels: bool = False
    dan_n_layers: int = 1

    @classmethod
    def from_config(cls, config) -> "MixMatchSettings":
        return cls(**{name: getattr(config, name) for name in cls.__dataclass_fields__})


def sigmoid_ramp(epoch: float, ramp_epochs: int) -> float:
    """exp(-5 (1 - t)^2) for t = epoch / ramp_epochs in [0, 1]; 1 afterwards (Laine & Aila 2017)."""
    if ramp_epochs <= 0:
        return 1.0
    t = min(max(epoch / ramp_epochs, 0.0), 1.0)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T), renormalized; computed in log space so that T -> 0 gives a one-hot."""
    return torch.softmax(torch.log(probabilities.clamp_min(1e-12)) / temperature, dim=1)


def mix_with_pool(x_l, y_l, x_u, q_u, alpha: float, cov_l=None, cov_u=None):
    """MixUp of labeled and unlabeled samples with one shuffled pool of both.

    Every sample gets its own lambda' = max(lambda, 1 - lambda) >= 0.5: it stays the dominant
    part of its mix, so the mix keeps its identity.
    """
    pool_x, pool_y = torch.cat([x_l, x_u]), torch.cat([y_l, q_u])
    n = pool_x.shape[0]
    partner = torch.randperm(n, device=pool_x.device)
    lam = torch.distributions.Beta(alpha, alpha).sample((n, 1)).to(pool_x.device)
    lam = torch.maximum(lam, 1 - lam)
    mixed_x = lam * pool_x + (1 - lam) * pool_x[partner]
    mixed_y = lam * pool_y + (1 - lam) * pool_y[partner]
    mixed_cov = None
    if cov_l is not None:
        pool_c = torch.cat([cov_l, cov_u])
        mixed_cov = lam * pool_c + (1 - lam) * pool_c[partner]
    n_l = x_l.shape[0]
    cl, cu = (mixed_cov[:n_l], mixed_cov[n_l:]) if mixed_cov is not None else (None, None)
    return mixed_x[:n_l], mixed_y[:n_l], mixed_x[n_l:], mixed_y[n_l:], cl, cu


class SemiSupervisedObjective(Objective):
    """MixMatch + domain adversary; see the module docstring.

    Owns the domain classifier (its parameters join the optimizer) and the optional mean teacher.
    """

    def __init__(self, model: nn.Module, settings: MixMatchSettings, n_domains: int,
                 class_weight: Optional[torch.Tensor] = None):
        super().__init__(model)
        self.settings = settings
        self.class_weight = class_weight
        self.augment = AUGMENTATIONS[settings.augmentation]
        self.domain_classifier = (DomainClassifier(model.n_hidden, n_domains, settings.dan_n_layers)
                                  if settings.dan_max_weight > 0 else None)
        # the mean teacher is not a submodule: it is not trained, saved or synchronized
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if settings.unsup_mean_teacher else None
        object.__setattr__(self, "teacher", teacher)

    def _apply(self, fn, recurse: bool = True):
        # moving the objective (.to(device)) moves the teacher with it
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

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
    def guess_labels(self, model: nn.Module, x_u: torch.Tensor, cov_u: Optional[torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class distribution averaged over augmentations, its confidence) for target cells."""
        teacher = self.teacher if self.teacher is not None else model
        was_training = teacher.training
        teacher.eval()
        views = self.settings.n_augmentations if self.settings.augment_pseudolabels else 1
        total = 0.0
        for _ in range(views):
            x = self._augment(x_u) if self.settings.augment_pseudolabels else x_u
            total = total + torch.softmax(teacher(x, cov_u).float(), dim=1)
        teacher.train(was_training)
        average = total / views
        return average, average.max(dim=1).values

    # ------------------------------------------------------------------ the step
    def forward(self, batch: LabeledBatch, epoch: int, unlabeled: Optional[UnlabeledBatch] = None):
        """Loss of one step; ``unlabeled`` may be None (domain adversary over labeled domains only)."""
        s, model = self.settings, self.model
        progress = epoch - 1  # ramps start at 0 in the first epoch
        unsup_weight = 0.0
        if progress >= s.unsup_burn_in_epochs:
            unsup_weight = s.unsup_max_weight * sigmoid_ramp(progress - s.unsup_burn_in_epochs, s.unsup_ramp_epochs)
        dan_weight = s.dan_max_weight * sigmoid_ramp(progress, s.dan_ramp_epochs)
        terms: dict[str, float] = {}

        x_l = self._augment(batch.x)
        x_u = confident = None
        if unlabeled is not None:
            guess, confidence = self.guess_labels(model, unlabeled.x, unlabeled.covariates)
            confident = confidence >= s.pseudolabel_min_confidence
            targets_u = sharpen(guess, s.sharpen_temperature)
            x_u = self._augment(unlabeled.x)
            terms["confident_fraction"] = float(confident.float().mean())

        if unlabeled is not None and s.unsup_max_weight > 0 and bool(confident.any()):
            cov_u = None if unlabeled.covariates is None else unlabeled.covariates[confident]
            if s.mixup_alpha:
                xl, yl, xu, yu, cl, cu = mix_with_pool(x_l, batch.target, x_u[confident], targets_u[confident],
                                                       s.mixup_alpha, batch.covariates, cov_u)
            else:
                xl, yl, xu, yu, cl, cu = x_l, batch.target, x_u[confident], targets_u[confident], batch.covariates, cov_u
            logits = model(torch.cat([xl, xu]), None if cl is None else torch.cat([cl, cu]))
            logits_l, logits_u = logits[: xl.shape[0]], logits[xl.shape[0]:]
            per_cell = ((torch.softmax(logits_u.float(), dim=1) - yu) ** 2).mean(dim=1)
            # divided by all target cells of the batch: those below the threshold add exactly 0
            unsup_loss = per_cell.sum() / unlabeled.x.shape[0]
        else:
            xl, yl, cl = mixup(x_l, batch.target, batch.covariates, s.mixup_alpha) if s.mixup_alpha \
                else (x_l, batch.target, batch.covariates)
            logits_l = model(xl, cl)
            unsup_loss = torch.zeros((), device=xl.device)
        weight = None if self.class_weight is None else self.class_weight.to(logits_l.device)
        sup_loss = soft_cross_entropy(logits_l, yl, weight)
        loss = sup_loss + unsup_weight * unsup_loss
        terms.update(supervised_loss=float(sup_loss.detach()), unsupervised_loss=float(unsup_loss.detach()),
                     unsup_weight=unsup_weight)
        if self.domain_classifier is not None:
            domain_loss, domain_accuracy = self.domain_loss(model, batch, x_l, unlabeled, x_u, confident, dan_weight)
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
        embedding = model.embed(torch.cat(inputs), None if covariates[0] is None else torch.cat(covariates))
        domains = torch.cat(domains)
        logits = self.domain_classifier(embedding, dan_weight)
        loss = F.cross_entropy(logits.float(), domains)
        return loss, float((logits.argmax(1) == domains).float().mean())
