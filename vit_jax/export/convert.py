"""Flax model + parameters -> the PyTorch mirror, and the safetensors layouts that ``load_params`` reads back.

    module = to_torch(model, params)     # model: a Flax VisionTransformer / ResNet, or its fields as a dict

No JAX here: the model is read through its dataclass fields (``model_config``), the parameters are a nested dict of
arrays (scanned or not). Only configurations whose every field the exporter knows are accepted; anything else is an
``ExportError`` naming the field, rather than a PyTorch model that silently computes something else.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import numpy as np
import torch

from vit_jax.export import torch_models


class ExportError(ValueError):
    """A model, configuration or torch build the exporter cannot handle; the message says which and why."""


# The fields of the Flax models and the values the torch mirrors implement. Fields that only matter while training
# (dropout, stochastic depth) or compiling (scan, remat, which attention kernel computes the same numbers) are accepted
# and ignored.
CHOICES = {'classifier': ('token', 'gap', 'unpooled', 'token_unpooled'), 'posemb': ('learned', 'sinusoid', 'sincos2d'),
           'stem': ('patch', 'resnet', 't2t'), 'tokens_type': ('performer', 'transformer'),
           'dtype': ('float32', 'bfloat16', 'float16'), 'param_dtype': ('float32', 'bfloat16', 'float16')}
TRAINING_ONLY = ('dropout_rate', 'attention_dropout_rate', 'drop_path_rate', 'scan_layers', 'remat', 'attention_impl',
                 'platform')
KNOWN_FIELDS = {
    'VisionTransformer': {'num_classes', 'image_size', 'patch_size', 'hidden_size', 'num_layers', 'num_heads',
                          'mlp_dim', 'classifier', 'representation_size', 'dtype', 'param_dtype', 'gelu_approximate',
                          'layer_norm_eps', 'qkv_bias', 'posemb', 'distilled', 'stem', 'resnet_layers', 'resnet_width',
                          'token_dim', 'tokens_type', *TRAINING_ONLY},
    'ResNet': {'num_classes', 'image_size', 'resnet_layers', 'resnet_width', 'dtype', 'param_dtype'},
}


def _plain(value: Any) -> Any:
    """A field value as JSON-able Python: dtypes by name, tuples as lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    name = getattr(value, 'name', None) or getattr(value, '__name__', None)  # np.dtype / jnp.float32 / jnp.bfloat16
    return str(name) if name else str(value)


def model_config(model: Any) -> dict[str, Any]:
    """The Flax model's fields as a plain dict, with ``module`` its class name (no JAX import needed)."""
    if isinstance(model, Mapping):
        return dict(model)
    kind = type(model).__name__
    if kind not in KNOWN_FIELDS or not dataclasses.is_dataclass(model):
        raise ExportError(f'No PyTorch exporter for {kind}: vit_jax.export handles the VisionTransformer family '
                          f'(ViT, DeiT, T2T-ViT, hybrids) and the BiT ResNet.')
    fields = {f.name: _plain(getattr(model, f.name)) for f in dataclasses.fields(model)
              if f.init and f.name not in ('parent', 'name')}
    return {'module': kind, **fields}


def check_supported(config: Mapping[str, Any]) -> None:
    """Raises ExportError for a module, field or value without an exporter."""
    kind = config.get('module')
    if kind not in KNOWN_FIELDS:
        raise ExportError(f'No PyTorch exporter for module {kind!r}; known: {sorted(KNOWN_FIELDS)}.')
    unknown = sorted(set(config) - KNOWN_FIELDS[kind] - {'module'})
    if unknown:
        raise ExportError(f'{kind} field(s) {unknown} have no PyTorch exporter yet (it mirrors only the fields it '
                          f'knows, so parity would not be guaranteed): extend vit_jax/export/torch_models.py.')
    for field, options in CHOICES.items():
        if field in config and config[field] not in options:
            raise ExportError(f'{field}={config[field]!r} has no PyTorch exporter (supported: {options}).')


def family(config: Mapping[str, Any]) -> str:
    """'vit' | 'deit' (distilled) | 't2t' | 'hybrid' | 'resnet', from the fields."""
    if config['module'] == 'ResNet':
        return 'resnet'
    stem = config.get('stem', 'patch')
    if stem == 't2t':
        return 't2t'
    if stem == 'resnet':
        return 'hybrid'
    return 'deit' if config.get('distilled') else 'vit'


# Parameters -----------------------------------------------------------------------------------------------------------
def flatten(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested params -> ``{'encoder/block_0/attn/qkv/kernel': float32 array}``, scanned blocks split per layer."""
    out: dict[str, np.ndarray] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(f'{prefix}{key}/', value)
            return
        value = np.asarray(getattr(node, 'value', node), dtype=np.float32)  # unbox flax Partitioned leaves
        name = prefix[:-1]
        if name.startswith('encoder/blocks/'):  # scan_layers: a leading layer axis
            for i in range(value.shape[0]):
                out[name.replace('encoder/blocks/', f'encoder/block_{i}/')] = value[i]
        else:
            out[name] = value

    visit('', params)
    return out


_TORCH_RENAMES = [  # applied in order to our flat names; then '/' becomes '.'
    (r'^encoder/block_(\d+)/', r'blocks/\1/'),
    (r'^encoder/norm/', 'norm/'),
    (r'^class_token$', 'cls_token'),
    (r'^distillation_token$', 'dist_token'),
    (r'^sinusoid_pos_embed$', 'pos_embed'),  # T2T's name for its frozen table
    (r'^patch_embed/', 'patch_embed/proj/'),
    (r'^pre_logits/', 'pre_logits/fc/'),
    (r'^resnet/block', 'resnet/body/block'),
    (r'/attn/out/', '/attn/proj/'),
    (r'^(tokens_to_token/attention\d)/qkv/', r'\1/attn/qkv/'),  # token Transformer
    (r'^(tokens_to_token/attention\d)/out/', r'\1/attn/proj/'),
    (r'^(tokens_to_token/attention\d)/fc1/', r'\1/mlp/0/'),  # token Performer: the original's mlp Sequential
    (r'^(tokens_to_token/attention\d)/fc2/', r'\1/mlp/2/'),
    (r'/random_features$', '/w'),
    (r'/(scale|kernel)$', '/weight'),
]


def _torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    """Our layouts -> torch's: Dense (in, out) -> Linear (out, in); conv HWIO -> OIHW; fused qkv / per-head out."""
    if name.endswith('qkv/kernel'):  # (D, 3, H, dh) or T2T's (dim, 3, token_dim) -> (3D, D) = [q | k | v]
        return value.reshape(value.shape[0], -1).T
    if name.endswith('qkv/bias'):
        return value.reshape(-1)
    if name.endswith('attn/out/kernel'):  # (H, dh, D) -> (D, D)
        return value.reshape(-1, value.shape[-1]).T
    if name.endswith('kernel') and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if name.endswith('kernel'):
        return value.T
    return value


def torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params -> the state dict of the ``torch_models`` mirror (timm / T2T names for ViT, DeiT, T2T-ViT)."""
    out = {}
    for name, value in flatten(params).items():
        key = name
        for pattern, repl in _TORCH_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key.replace('/', '.')] = np.ascontiguousarray(_torch_layout(name, value))
    return out


def vision_transformer_arrays(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params -> google-research/vision_transformer names (current Flax numbering), e.g. for hybrids."""
    out = {}
    for name, value in flatten(params).items():
        block = re.match(r'^encoder/block_(\d+)/(.*)$', name)
        if block:
            i, rest = block.groups()
            prefix = f'Transformer/encoderblock_{i}/'
            if rest.startswith('attn/qkv/'):  # (D, 3, H, dh) / (3, H, dh) -> query, key, value
                part = rest.rsplit('/', 1)[1]
                for j, qkv in enumerate(('query', 'key', 'value')):
                    out[f'{prefix}MultiHeadDotProductAttention_0/{qkv}/{part}'] = np.take(value, j, axis=-3)
                continue
            for ours, theirs in (('norm1/', 'LayerNorm_0/'), ('norm2/', 'LayerNorm_1/'),
                                 ('attn/out/', 'MultiHeadDotProductAttention_0/out/'),
                                 ('mlp/fc1/', 'MlpBlock_0/Dense_0/'), ('mlp/fc2/', 'MlpBlock_0/Dense_1/')):
                rest = rest.replace(ours, theirs)
            out[prefix + rest] = value
            continue
        for ours, theirs in (('patch_embed/', 'embedding/'), ('encoder/norm/', 'Transformer/encoder_norm/'),
                             ('resnet/', '')):
            if name.startswith(ours):
                name = theirs + name[len(ours):]
        name = {'class_token': 'cls', 'pos_embed': 'Transformer/posembed_input/pos_embedding'}.get(name, name)
        out[name] = value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def checkpoint_arrays(config: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[str, dict[str, np.ndarray]]:
    """The state dict to publish and its layout: timm's names for ViT / DeiT, the official T2T-ViT names for
    T2T-ViT, google-research/vision_transformer's for hybrids and ResNets (timm's hybrid layout is another model)."""
    fam = family(config)
    if fam in ('vit', 'deit'):
        return 'timm', torch_state_dict(params)
    if fam == 't2t':
        return 't2t', torch_state_dict(params)
    return 'vision_transformer', vision_transformer_arrays(params)


# The PyTorch module --------------------------------------------------------------------------------------------------
def load_torch_state(module: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Loads numpy arrays into ``module``, listing every missing, unexpected and mis-shaped key on a mismatch."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f'{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}' for k in sorted(expected)
                  if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise ExportError(f'The parameters do not fit the PyTorch model: missing {missing}, unexpected {unexpected}, '
                          f'other shapes (params vs torch) {mismatched}. Give the params of this very model.')
    module.load_state_dict({k: torch.tensor(np.asarray(v, np.float32)) for k, v in state.items()}, strict=True)


def to_torch(model: Any, params: Mapping[str, Any]) -> torch.nn.Module:
    """The PyTorch mirror of ``model`` (a Flax module or its ``model_config`` dict) holding ``params``, in eval mode."""
    config = model_config(model)
    check_supported(config)
    module = torch_models.build(config)
    load_torch_state(module, torch_state_dict(params))
    return module.eval()
