"""Flax models: ViT, DeiT, T2T-ViT, ResNet hybrids and BiT ResNets, behind one registry."""

from vit_jax.models.flops import flops  # noqa: F401 (analytic FLOPs, the ViT paper's Table 6 convention)
from vit_jax.models.registry import ModelInfo, create_model, list_models, model_fields, model_info
from vit_jax.models.resnet import ResNet
from vit_jax.models.t2t import FROZEN_PARAM_NAMES
from vit_jax.models.vit import VisionTransformer


def is_frozen(path: tuple[str, ...]) -> bool:
    """True for parameters the originals keep frozen (T2T's sinusoid table and Performer random features)."""
    return path[-1] in FROZEN_PARAM_NAMES


__all__ = ['ModelInfo', 'ResNet', 'VisionTransformer', 'create_model', 'is_frozen', 'list_models', 'model_fields',
           'model_info']
