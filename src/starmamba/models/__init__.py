"""Models: the MambaMLP backbone and classifier, the STAR pretraining model, presets and conversions."""

from starmamba.models.backbone import BackboneConfig, ClassifierConfig, MambaMLP, MambaMLPClassifier
from starmamba.models.create import create_model
from starmamba.models.registry import SIZES, build_model, list_models, model_config
from starmamba.models.star import StarConfig, StarOutput, StarPretrainer

__all__ = [
    "SIZES",
    "BackboneConfig",
    "ClassifierConfig",
    "MambaMLP",
    "MambaMLPClassifier",
    "StarConfig",
    "StarOutput",
    "StarPretrainer",
    "build_model",
    "create_model",
    "list_models",
    "model_config",
]
