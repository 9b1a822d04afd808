"""Weights from the original implementations, converted to vit_jax parameter trees.

    params = load_params('ViT-B_16.npz', create_model('vit_b16', num_classes=1000))

``load_params`` reads the file, detects its format, converts the names and layouts, and checks every key and shape
against the model before returning anything. Formats (one module each):

- ``vision_transformer``: google-research/vision_transformer and big_vision ``.npz``;
- ``timm``: timm / DeiT PyTorch state dicts (``.pth``, weights under ``model`` in DeiT's release files);
- ``t2t``: official T2T-ViT ``.pth.tar`` (``state_dict_ema`` preferred, ``module.`` stripped);
- ``huggingface``: transformers ViT / DeiT (``pytorch_model.bin`` or ``.safetensors``), 4.x and 5.x names.
"""

from __future__ import annotations

import argparse
import os
import zipfile
from typing import Any, Mapping

import flax.linen as nn
import numpy as np

from vit_jax.checkpoints import huggingface, t2t, timm, vision_transformer
from vit_jax.checkpoints.common import (CheckpointError, CheckpointMismatchError, Source, fit_to_model,
                                        model_param_shapes, stack_layers, unstack_layers)

FORMATS = ('auto', 'vision_transformer', 'timm', 't2t', 'huggingface')

__all__ = ['FORMATS', 'CheckpointError', 'CheckpointMismatchError', 'detect_format', 'load_params',
           'model_param_shapes', 'read_arrays', 'stack_layers', 'unstack_layers']


def _read_torch(path: str, trust_pickle: bool) -> Mapping[str, Any]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f'{path} is a PyTorch file: install the torch extra (pip install "vit_jax[torch]", '
                              'with torch==2.13.0 on CPU machines).') from e
    try:
        # DeiT's release files also hold the training args (an argparse.Namespace): allow that, and nothing else.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f'Cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e}). The file may be '
                              'truncated or corrupt: download it again. If it holds Python objects besides tensors '
                              'and you trust its source, pass trust_pickle=True.') from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a state dict.')
    for key in ('state_dict_ema', 'model', 'state_dict', 'model_ema'):  # T2T prefers EMA; DeiT uses 'model'
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    arrays = {}
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            name = name[len('module.'):] if name.startswith('module.') else name
            arrays[name] = value.detach().float().numpy() if value.is_floating_point() else value.numpy()
    return arrays


def read_arrays(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """The checkpoint at ``path`` as a flat ``{name: array}`` dict, whatever its container (npz, torch, safetensors)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f'No checkpoint at {path}.')
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a directory: give the checkpoint file itself (.npz, .pth, .pth.tar, .bin, '
                              '.safetensors).')
    if path.endswith('.npz'):
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            raise CheckpointError(f'Cannot read {path} as an .npz archive ({type(e).__name__}: {e}); the file is '
                                  'truncated or corrupt: download it again.') from e
    if path.endswith('.safetensors'):
        from safetensors.numpy import load_file
        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise CheckpointError(f'Cannot read {path} as safetensors ({e}); the file is truncated or corrupt.') from e
    return dict(_read_torch(path, trust_pickle))


def detect_format(keys: list[str]) -> str:
    """Which converter fits these checkpoint keys."""
    if vision_transformer.is_vision_transformer(keys) or 'conv_root/kernel' in keys:
        return 'vision_transformer'
    if t2t.is_t2t(keys):
        return 't2t'
    if huggingface.hf_prefix(keys):
        return 'huggingface'
    if timm.is_timm(keys):
        return 'timm'
    raise CheckpointError(f'Unrecognised checkpoint layout (first keys: {keys[:8]}). Known formats: {FORMATS[1:]}.')


def load_params(path: str | os.PathLike, model: nn.Module, format: str = 'auto',
                trust_pickle: bool = False) -> dict[str, Any]:
    """Reads and converts the checkpoint at ``path`` into ``model``'s ``params`` tree (numpy arrays).

    Raises CheckpointMismatchError listing every missing and unexpected key and every shape mismatch, and
    CheckpointError for unreadable files or unknown layouts.
    """
    if format not in FORMATS:
        raise ValueError(f'format={format!r} is not one of {FORMATS}.')
    src = Source(read_arrays(path, trust_pickle))
    if format == 'auto':
        format = detect_format(src.keys())
    num_heads = getattr(model, 'num_heads', 1)
    if format == 'vision_transformer':
        converted = vision_transformer.convert(src)
    elif format == 't2t':
        converted = t2t.convert(src, num_heads)
    elif format == 'huggingface':
        converted = huggingface.convert(src, num_heads)
    else:
        converted = timm.convert(src, num_heads)
    return fit_to_model(converted, model, f'{os.fspath(path)} ({format})', src.unused())
