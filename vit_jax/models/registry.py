"""One registry of model names: each name is a documented variant of a paper, with the paper's numbers beside it.

``create_model(name, num_classes=..., **overrides)`` builds the Flax module; ``list_models()`` lists the names.
The registry is the source of truth for architectures; training recipes live in ``configs/``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from vit_jax.models.resnet import ResNet
from vit_jax.models.vit import VisionTransformer


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A registered variant: its family, its module and defaults, and what its paper reports."""

    name: str
    family: str
    module: type[nn.Module]
    defaults: dict[str, Any]
    paper: str  # the published result, or '' where the papers give none


_REGISTRY: dict[str, ModelInfo] = {}

# Family defaults: each family's quirks, with the original's values (see MODEL_SPEC.md).
VIT = dict(gelu_approximate=True, layer_norm_eps=1e-6, qkv_bias=True, posemb='learned', classifier='token')
DEIT = dict(VIT, gelu_approximate=False)  # timm's nn.GELU is exact erf
T2T = dict(stem='t2t', patch_size=16, gelu_approximate=False, layer_norm_eps=1e-5, qkv_bias=False,
           posemb='sinusoid', classifier='token', token_dim=64)
HYBRID = dict(VIT, stem='resnet', patch_size=1, resnet_width=1.0)

# (hidden_size, mlp_dim, num_heads, num_layers) of ViT Table 1 (Ti from DeiT).
VIT_SIZES = {'ti': (192, 768, 3, 12), 's': (384, 1536, 6, 12), 'b': (768, 3072, 12, 12),
             'l': (1024, 4096, 16, 24), 'h': (1280, 5120, 16, 32)}


def _size(size: str) -> dict[str, int]:
    hidden, mlp, heads, layers = VIT_SIZES[size]
    return dict(hidden_size=hidden, mlp_dim=mlp, num_heads=heads, num_layers=layers)


def register(name: str, family: str, module: type[nn.Module], paper: str = '', **defaults) -> None:
    if name in _REGISTRY:
        raise ValueError(f'Model {name!r} is registered twice.')
    _REGISTRY[name] = ModelInfo(name, family, module, defaults, paper)


# ViT (Dosovitskiy et al. 2021). ImageNet top-1 of the paper, by pretraining data.
_VIT_PAPER = {
    'vit_b16': 'IN-1k pretrain 77.91',
    'vit_l16': 'JFT 87.76 / IN-21k 85.30 / IN-1k 76.53',
    'vit_h14': 'JFT 88.55',
}
for _size_name, _patch in [('ti', 16), ('s', 16), ('s', 32), ('b', 8), ('b', 16), ('b', 32), ('l', 16), ('l', 32),
                           ('h', 14)]:
    _name = f'vit_{_size_name}{_patch}'
    register(_name, 'vit', VisionTransformer, _VIT_PAPER.get(_name, ''), patch_size=_patch, **VIT, **_size(_size_name))

# DeiT (Touvron et al. 2021): ViT-Ti/S/B at patch 16; the distilled models add a token and a head.
for _size_name, _top1, _top1_distilled in [('ti', 72.2, 74.5), ('s', 79.8, 81.2), ('b', 81.8, 83.4)]:
    register(f'deit_{_size_name}16', 'deit', VisionTransformer, f'IN-1k {_top1}', patch_size=16, **DEIT,
             **_size(_size_name))
    register(f'deit_{_size_name}16_distilled', 'deit', VisionTransformer, f'IN-1k {_top1_distilled}', patch_size=16,
             distilled=True, **DEIT, **_size(_size_name))

# T2T-ViT (Yuan et al. 2021): (hidden, depth, heads, mlp ratio, top-1); the _t variants use Transformer token layers.
for _variant, (_hidden, _depth, _heads, _ratio, _top1) in {
        '7': (256, 7, 4, 2, 71.7), '10': (256, 10, 4, 2, 75.2), '12': (256, 12, 4, 2, 76.5),
        '14': (384, 14, 6, 3, 81.5), '19': (448, 19, 7, 3, 81.9), '24': (512, 24, 8, 3, 82.3),
        't14': (384, 14, 6, 3, 81.7), 't19': (448, 19, 7, 3, 82.4), 't24': (512, 24, 8, 3, 82.6)}.items():
    register(f't2t_vit_{_variant}', 't2t', VisionTransformer, f'IN-1k {_top1}', hidden_size=_hidden,
             num_layers=_depth, num_heads=_heads, mlp_dim=_hidden * _ratio,
             tokens_type='transformer' if _variant.startswith('t') else 'performer', **T2T)

# Hybrids (ViT section 3.1): a BiT ResNet stem, then 1x1 patches on its feature map. Named by the true stride.
R50_STAGES_3 = (3, 4, 9)  # ResNet-50 with stage 4 removed and its units moved to stage 3: stride 16
R50_STAGES = (3, 4, 6, 3)
R26_STAGES = (2, 2, 2, 2)
register('r50_vit_b16', 'hybrid', VisionTransformer, resnet_layers=R50_STAGES_3, **HYBRID, **_size('b'))
register('r26_vit_s32', 'hybrid', VisionTransformer, resnet_layers=R26_STAGES, **HYBRID, **_size('s'))
register('r26_vit_b32', 'hybrid', VisionTransformer, resnet_layers=R26_STAGES, **HYBRID, **_size('b'))
register('r50_vit_l32', 'hybrid', VisionTransformer, resnet_layers=R50_STAGES, **HYBRID, **_size('l'))

# BiT-style ResNets alone: the CNN baseline and a distillation teacher.
register('resnet26', 'resnet', ResNet, resnet_layers=R26_STAGES)
register('resnet50', 'resnet', ResNet, resnet_layers=R50_STAGES)


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (of one family: 'vit', 'deit', 't2t', 'hybrid', 'resnet'), in registration order."""
    return [n for n, info in _REGISTRY.items() if family is None or info.family == family]


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; a ValueError lists the registered names when it is unknown."""
    if name not in _REGISTRY:
        raise ValueError(f'Unknown model {name!r}. Registered models: {", ".join(_REGISTRY)}.')
    return _REGISTRY[name]


def model_fields(name: str) -> list[str]:
    """The override fields that ``create_model(name, ...)`` accepts."""
    module = model_info(name).module
    return [f.name for f in dataclasses.fields(module) if f.init and f.name not in ('parent', 'name', 'num_classes')]


def create_model(name: str, *, num_classes: int, platform: str | None = None, **overrides) -> nn.Module:
    """Builds registered model ``name`` with ``num_classes`` outputs; ``overrides`` replace the family defaults.

    ``platform``: what the model is compiled for ('cpu', 'tpu', 'cuda:9.0', ...: ``vit_jax.hardware``), for the
    families that have a hardware choice to make (attention, the CPU kernels); the others (BiT ResNets) ignore it.
    None keeps the family's default ('portable': XLA's own ops).
    Raises ValueError for an unknown name, an unknown field (listing the valid ones) or a configuration that cannot
    work (e.g. a patch size that does not divide the image size), before anything is compiled.
    """
    info = model_info(name)
    if platform is not None and 'platform' in model_fields(name):
        overrides = {**overrides, 'platform': platform}
    valid = model_fields(name)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f'Unknown field(s) {unknown} for model {name!r} ({info.family}). Valid fields: {valid}.')
    kwargs = {**info.defaults, **overrides}
    if 'resnet_layers' in kwargs:
        kwargs['resnet_layers'] = tuple(int(n) for n in kwargs['resnet_layers'])
    return info.module(num_classes=num_classes, **kwargs)
