"""The one place where the command line's Config becomes the settings of the layers below (the trainer and
its objectives): nothing under data/, nn/ or train/ reads a Config."""

from __future__ import annotations

from dataclasses import fields

from ..config import Config
from ..train.mixmatch import MixMatchSettings
from ..train.settings import TrainingSettings


def _same_named(settings_class, config: Config) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(settings_class) if f.name in Config.__dataclass_fields__}


def training_settings(config: Config) -> TrainingSettings:
    """Every training key of ``config``, typed for the trainer; the semi-supervised keys nested."""
    return TrainingSettings(**_same_named(TrainingSettings, config),
                            semi_supervised=MixMatchSettings(**_same_named(MixMatchSettings, config)))
