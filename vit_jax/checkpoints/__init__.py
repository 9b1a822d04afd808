"""Weights from the original implementations, converted to vit_jax parameter trees.

    params = load_params('ViT-B_16.npz', create_model('vit_b16', num_classes=1000))

``load_params`` reads the file, detects its format, converts the names and layouts, and checks every key and shape
against the model before returning anything. Formats (one module each):

- ``vision_transformer``: google-research/vision_transformer and big_vision ``.npz``;
- ``timm``: timm / DeiT PyTorch state dicts (``.pth``, weights under ``model`` in DeiT's release files);
- ``t2t``: official T2T-ViT ``.pth.tar`` (``state_dict_ema`` preferred, ``module.`` stripped);
- ``huggingface``: transformers ViT / DeiT (``pytorch_model.bin`` or ``.safetensors``), 4.x and 5.x names;
- ``vit_jax``: our own orbax training checkpoints (a workdir, its ``checkpoints/`` or one step directory).

``load_pretrained`` adds what fine-tuning needs: a new head for another class count, position embeddings resized to
another resolution, a dropped representation layer, and parameters left at init by regex.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import zipfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from vit_jax.checkpoints import huggingface, t2t, timm, vision_transformer
from vit_jax.checkpoints.common import (CheckpointError, CheckpointMismatchError, Source, fit_to_model,
                                        model_param_shapes, stack_layers, unstack_layers)
from vit_jax.checkpoints.posemb import resize_posemb

FORMATS = ('auto', 'vision_transformer', 'timm', 't2t', 'huggingface', 'vit_jax')

__all__ = ['FORMATS', 'CheckpointError', 'CheckpointMismatchError', 'convert_checkpoint', 'detect_format',
           'load_params', 'load_pretrained', 'model_param_shapes', 'read_arrays', 'resize_posemb', 'restore_vit_jax',
           'stack_layers',
           'unstack_layers']


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


def restore_vit_jax(path: str, step: int | None = None,
                    ema: bool = True) -> tuple[dict[str, np.ndarray], str, str]:
    """The parameters of a vit_jax training checkpoint (orbax): a workdir, its checkpoints/ or one step directory.

    Returns (flat parameter names -> host arrays, the step directory, 'ema_params' or 'params'). Only the parameters
    are restored, as numpy, whatever mesh and optimizer the run used; the EMA parameters are taken where the run kept
    them (they are what it evaluated), unless ``ema=False``. ``step`` defaults to the newest checkpoint that restores:
    newer ones that do not are skipped with a warning naming the step and the reason, and left in place.
    """
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        path = os.path.join(path, 'checkpoints')
    steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
    if not steps:  # one step directory
        return _restore_step(path, ema)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f'{path} has no checkpoint at step {step}; it has {steps}.')
        return _restore_step(os.path.join(path, str(step)), ema)
    failed = []
    for candidate in reversed(steps):
        try:
            restored = _restore_step(os.path.join(path, str(candidate)), ema)
        except CheckpointError as e:
            failed.append((candidate, e.reason))
            continue
        for bad, reason in failed:
            logging.getLogger(__name__).warning(
                'Checkpoint step %d in %s does not restore (%s); using step %d instead. Step %d is left in place.',
                bad, path, reason, candidate, bad)
        return restored
    reasons = '\n'.join(f'  step {s}: {r}' for s, r in failed)
    raise CheckpointError(f'No checkpoint in {path} restores:\n{reasons}')


def _restore_step(path: str, ema: bool) -> tuple[dict[str, np.ndarray], str, str]:
    import orbax.checkpoint as ocp

    from vit_jax.train.checkpointing import failure_reason, quiet_orbax_failures
    item = os.path.join(os.path.abspath(path), 'default')
    if not os.path.isdir(item):
        error = CheckpointError(f'{path} is not a vit_jax checkpoint: expected a training workdir, its checkpoints/ '
                                'directory or one step directory in it (with a default/ folder).')
        error.reason = f'no {item} folder'
        raise error
    try:
        with quiet_orbax_failures():
            tree = ocp.StandardCheckpointer().metadata(item).item_metadata
            key = 'ema_params' if ema and tree.get('ema_params') is not None else 'params'
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree[key])
            args = ocp.args.PyTreeRestore(item={key: tree[key]}, restore_args={key: restore_args},
                                          partial_restore=True)
            params = ocp.PyTreeCheckpointer().restore(item, args=args)[key]
    except Exception as e:  # orbax raises several types for damaged directories
        error = CheckpointError(f'Cannot restore the orbax checkpoint {path} ({failure_reason(e)}).')
        error.reason = failure_reason(e)
        raise error from e
    params = unstack_layers(params) if 'blocks' in params.get('encoder', {}) else params
    flat = {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    return flat, path, key


def convert_checkpoint(path: str | os.PathLike, model: nn.Module, format: str = 'auto', trust_pickle: bool = False,
                       step: int | None = None) -> tuple[dict[str, np.ndarray], list[str], str]:
    """Reads and renames a checkpoint: (our flat names -> arrays, its keys no rule mapped, a description).

    ``step``: which checkpoint of a vit_jax workdir (default: the newest that restores)."""
    if format not in FORMATS:
        raise ValueError(f'format={format!r} is not one of {FORMATS}.')
    path = os.fspath(path)
    if format == 'vit_jax' or (format == 'auto' and os.path.isdir(path)):
        flat, step_dir, _ = restore_vit_jax(path, step)
        return flat, [], f'{step_dir} (vit_jax)'
    if step is not None:
        raise ValueError(f'step={step} applies to vit_jax workdirs; {path} is a single checkpoint file.')
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
    return converted, src.unused(), f'{path} ({format})'


def load_params(path: str | os.PathLike, model: nn.Module, format: str = 'auto',
                trust_pickle: bool = False, step: int | None = None) -> dict[str, Any]:
    """Reads and converts the checkpoint at ``path`` into ``model``'s ``params`` tree (numpy arrays), exactly.

    Raises CheckpointMismatchError listing every missing and unexpected key and every shape mismatch, and
    CheckpointError for unreadable files or unknown layouts. For fine-tuning (another resolution or class count)
    use ``load_pretrained``. ``step`` picks a checkpoint of a vit_jax workdir (default: the newest that restores).
    """
    converted, unused, source = convert_checkpoint(path, model, format, trust_pickle, step)
    return fit_to_model(converted, model, source, unused)


def load_pretrained(path: str | os.PathLike, model: nn.Module, init_params: Any, format: str = 'auto',
                    posemb_resize: str = 'bilinear', skip: str = '', trust_pickle: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Pretrained weights adapted to ``model`` for fine-tuning; ``init_params`` supply whatever is not taken over.

    As vision_transformer / DeiT do when fine-tuning: a head (and distillation head) whose class count differs is
    replaced by the model's zero-initialised one; a pre-logits layer the model does not have is dropped; position
    embeddings are resized to the model's grid (``posemb_resize``: 'bilinear' or 'bicubic'); parameters whose flat
    name matches the regex ``skip`` keep their init values. Every change is reported through ``log``. Anything else
    that does not fit raises CheckpointMismatchError as ``load_params`` does.
    """
    converted, unused, source = convert_checkpoint(path, model, format, trust_pickle)
    expected = model_param_shapes(model)
    init_flat = {'/'.join(k): np.asarray(v) for k, v in
                 traverse_util.flatten_dict(unstack_layers(init_params) if getattr(model, 'scan_layers', False)
                                            else init_params).items()}
    for name in ('head/kernel', 'head/bias', 'head_dist/kernel', 'head_dist/bias'):
        if name in converted and name in expected and converted[name].shape != expected[name]:
            log(f'{name}: new zero-initialised head, {converted[name].shape} -> {expected[name]} (class count).')
            converted[name] = init_flat[name]
    for name in [k for k in converted if k.startswith('pre_logits/') and k not in expected]:
        log(f'{name}: dropped (the model has no representation layer, as when fine-tuning).')
        del converted[name]
    for name in ('pos_embed', 'sinusoid_pos_embed'):
        if name in converted and name in expected and converted[name].shape != expected[name]:
            prefix = model.num_prefix_tokens if model.posemb != 'sincos2d' else 0
            grid = model.grid_size
            converted[name] = resize_posemb(converted[name], prefix, (grid, grid), posemb_resize)
            log(f'{name}: resized {posemb_resize} to a {grid}x{grid} grid, {tuple(converted[name].shape)}.')
    if skip:
        pattern = re.compile(skip)
        for name in [k for k in expected if pattern.search(k)]:
            converted[name] = init_flat[name]
            log(f'{name}: left at init (matches skip={skip!r}).')
    return fit_to_model(converted, model, source, unused, expected)
