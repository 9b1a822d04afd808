"""What every weight converter shares: flat parameter names, the mismatch check and the (un)stacking of layers.

A converter maps a foreign checkpoint (a flat ``{name: array}`` dict) to our flat names, ``'encoder/block_0/attn/qkv/
kernel'`` and so on, always in the unscanned layout. ``fit_to_model`` then checks the result against the model and
builds its parameter tree.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

Flat = dict[str, np.ndarray]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the problem and the fix."""


class CheckpointMismatchError(CheckpointError):
    """The converted checkpoint and the model disagree; lists every missing / unexpected key and shape mismatch."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple, tuple]], hint: str = ''):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f'Checkpoint {source} does not match the model:']
        if missing:
            lines.append(f'  {len(missing)} missing (in the model, not in the checkpoint):')
            lines += [f'    {k}' for k in missing]
        if unexpected:
            lines.append(f'  {len(unexpected)} unexpected (in the checkpoint, not in the model):')
            lines += [f'    {k}' for k in unexpected]
        if mismatched:
            lines.append(f'  {len(mismatched)} with another shape (checkpoint vs model):')
            lines += [f'    {k}: {c} vs {m}' for k, c, m in mismatched]
        lines.append(hint or '  Create the model with the overrides the checkpoint was trained with (hidden_size, '
                             'num_layers, classifier, representation_size, num_classes, image_size, ...).')
        super().__init__('\n'.join(lines))


def model_param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape of the model's parameters in the unscanned layout, without allocating them."""
    if getattr(model, 'scan_layers', False):
        model = model.clone(scan_layers=False)
    size = getattr(model, 'image_size', 224)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32)))
    params = meta.unbox(variables['params'])
    return {'/'.join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}


def fit_to_model(converted: Flat, model: nn.Module, source: str, unused: Iterable[str] = (),
                 expected: dict[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """Checks converted weights against ``model`` (every key, every shape) and returns its ``params`` tree.

    ``unused`` are the checkpoint's own keys that the converter could not map; they are reported as unexpected.
    ``expected`` is ``model_param_shapes(model)`` where the caller has it already.
    """
    expected = model_param_shapes(model) if expected is None else expected
    missing = sorted(k for k in expected if k not in converted)
    unexpected = sorted(k for k in converted if k not in expected) + [f'{k} (checkpoint name)' for k in unused]
    mismatched = [(k, tuple(converted[k].shape), expected[k]) for k in sorted(expected)
                  if k in converted and tuple(converted[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        hint = ''
        if any(k in ('pos_embed', 'sinusoid_pos_embed') for k, *_ in mismatched):
            hint = ('  The position embedding is for another grid: the checkpoint was trained at another image_size '
                    'or patch_size. Create the model with the checkpoint\'s image_size, or resize the position '
                    'embedding for fine-tuning.')
        raise CheckpointMismatchError(source, missing, unexpected, mismatched, hint)
    dtype = jnp.dtype(getattr(model, 'param_dtype', 'float32'))
    flat = {tuple(k.split('/')): np.asarray(v, dtype=dtype) for k, v in converted.items()}
    params = traverse_util.unflatten_dict(flat)
    if getattr(model, 'scan_layers', False):
        params = stack_layers(params)
    return params


_BLOCK = re.compile(r'block_(\d+)$')


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Unscanned ``encoder/block_{i}/...`` -> scanned ``encoder/blocks/...`` with a leading layer axis."""
    params = dict(params)
    encoder = dict(params['encoder'])
    blocks = sorted((k for k in encoder if _BLOCK.match(k)), key=lambda k: int(_BLOCK.match(k).group(1)))
    encoder['blocks'] = jax.tree.map(lambda *xs: np.stack(xs), *[encoder.pop(k) for k in blocks])
    params['encoder'] = encoder
    return params


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned ``encoder/blocks/...`` -> unscanned ``encoder/block_{i}/...`` (the inverse of ``stack_layers``)."""
    params = dict(params)
    encoder = dict(params['encoder'])
    if 'blocks' in encoder:
        stacked = encoder.pop('blocks')
        n = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(n):
            encoder[f'block_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
    params['encoder'] = encoder
    return params


class Source:
    """A foreign checkpoint's flat ``{name: array}``, remembering which keys a converter consumed.

    Converters ``take`` what they map; a key that is absent gives None (the mismatch check then reports the
    parameter as missing), and ``unused()`` lists what no rule consumed (reported as unexpected, by its own name).
    """

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self.arrays = dict(arrays)
        self.taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def keys(self) -> list[str]:
        return list(self.arrays)

    def take(self, key: str) -> np.ndarray | None:
        if key not in self.arrays:
            return None
        self.taken.add(key)
        return np.asarray(self.arrays[key])

    def unused(self) -> list[str]:
        return sorted(k for k in self.arrays if k not in self.taken)


def put(out: Flat, name: str, value: np.ndarray | None) -> None:
    if value is not None:
        out[name] = value


# Shared conversions of PyTorch layouts ------------------------------------------------------------------------------
def linear(out: Flat, name: str, src: Source, key: str) -> None:
    """torch Linear (out, in) -> Dense kernel (in, out) and bias."""
    weight = src.take(f'{key}.weight')
    put(out, f'{name}/kernel', None if weight is None else weight.T)
    put(out, f'{name}/bias', src.take(f'{key}.bias'))


def layer_norm(out: Flat, name: str, src: Source, key: str) -> None:
    put(out, f'{name}/scale', src.take(f'{key}.weight'))
    put(out, f'{name}/bias', src.take(f'{key}.bias'))


def conv(out: Flat, name: str, src: Source, key: str) -> None:
    """torch conv weight OIHW -> Flax HWIO, and bias."""
    weight = src.take(f'{key}.weight')
    put(out, f'{name}/kernel', None if weight is None else np.transpose(weight, (2, 3, 1, 0)))
    put(out, f'{name}/bias', src.take(f'{key}.bias'))


def fused_qkv(out: Flat, name: str, weight: np.ndarray | None, bias: np.ndarray | None, num_heads: int) -> None:
    """A fused torch qkv Linear, weight (3D, D) = [q | k | v] head-major -> kernel (D, 3, H, D/H), bias (3, H, D/H)."""
    if weight is not None:
        three_d, d = weight.shape
        out[f'{name}/kernel'] = weight.reshape(3, num_heads, three_d // 3 // num_heads, d).transpose(3, 0, 1, 2)
    if bias is not None:
        out[f'{name}/bias'] = bias.reshape(3, num_heads, -1)


def attention_out(out: Flat, name: str, src: Source, key: str, num_heads: int) -> None:
    """torch out-projection Linear (D, D) -> kernel (H, D/H, D), and bias."""
    weight = src.take(f'{key}.weight')
    if weight is not None:
        out[f'{name}/kernel'] = weight.T.reshape(num_heads, -1, weight.shape[0])
    put(out, f'{name}/bias', src.take(f'{key}.bias'))


def timm_blocks(out: Flat, src: Source, prefix: str, num_heads: int) -> None:
    """timm's ``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`` (also DeiT's and T2T's backbone)."""
    i = 0
    while f'{prefix}blocks.{i}.norm1.weight' in src:
        b, ours = f'{prefix}blocks.{i}.', f'encoder/block_{i}/'
        layer_norm(out, ours + 'norm1', src, b + 'norm1')
        fused_qkv(out, ours + 'attn/qkv', src.take(b + 'attn.qkv.weight'), src.take(b + 'attn.qkv.bias'), num_heads)
        attention_out(out, ours + 'attn/out', src, b + 'attn.proj', num_heads)
        layer_norm(out, ours + 'norm2', src, b + 'norm2')
        linear(out, ours + 'mlp/fc1', src, b + 'mlp.fc1')
        linear(out, ours + 'mlp/fc2', src, b + 'mlp.fc2')
        i += 1
