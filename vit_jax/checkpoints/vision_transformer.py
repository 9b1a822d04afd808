"""google-research/vision_transformer and big_vision ``.npz`` checkpoints (flat keys joined with '/').

Handled layouts:
- vision_transformer: ``Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
  MlpBlock_3}`` (old Flax numbering) or ``{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}``
  (current Flax); per-head attention kernels (D, H, D/H) and (H, D/H, D); ``Transformer/posembed_input``; ``cls``;
  hybrids' ResNet stem with GroupNorm parameters stored as (1, 1, 1, C).
- big_vision: the same blocks, optionally scanned (``Transformer/encoderblock/...`` with a leading layer axis), a
  top-level ``pos_embedding`` that does not cover the class token (we prepend a zero row, which is the same model),
  or none at all for ``sincos2d``.
"""

from __future__ import annotations

import re

import numpy as np

from vit_jax.checkpoints.common import CheckpointError, Flat, Source, put

_RESNET_KEY = re.compile(r'^(conv_root|gn_root|block\d+/unit\d+/\w+)/(kernel|scale|bias)$')


def is_vision_transformer(keys: list[str]) -> bool:
    return any(k.startswith('Transformer/') for k in keys)


def _unscan(src: Source) -> None:
    """big_vision with ``scan=True``: split ``Transformer/encoderblock/...`` (L, ...) into per-layer keys."""
    stacked = [k for k in src.keys() if k.startswith('Transformer/encoderblock/')]
    for key in stacked:
        value = src.take(key)
        for i in range(value.shape[0]):
            src.arrays[key.replace('encoderblock/', f'encoderblock_{i}/')] = value[i]


def convert(src: Source) -> Flat:
    """vision_transformer / big_vision names -> ours (see ``models/encoder.py`` and ``models/vit.py``)."""
    if any(k.startswith('MAPHead') for k in src.keys()):
        raise CheckpointError('This big_vision checkpoint uses a MAP (attention-pooling) head, which vit_jax does not '
                              'implement: use a checkpoint with pool_type "tok" or "gap".')
    _unscan(src)
    out: Flat = {}
    put(out, 'patch_embed/kernel', src.take('embedding/kernel'))
    put(out, 'patch_embed/bias', src.take('embedding/bias'))
    put(out, 'class_token', src.take('cls'))
    put(out, 'pos_embed', src.take('Transformer/posembed_input/pos_embedding'))
    if 'pos_embedding' in src:  # big_vision: added before the class token is prepended
        pos = src.take('pos_embedding')
        if 'class_token' in out:
            pos = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
        out['pos_embed'] = pos
    put(out, 'encoder/norm/scale', src.take('Transformer/encoder_norm/scale'))
    put(out, 'encoder/norm/bias', src.take('Transformer/encoder_norm/bias'))

    i = 0
    while any(k.startswith(f'Transformer/encoderblock_{i}/') for k in src.keys()):
        block, ours = f'Transformer/encoderblock_{i}/', f'encoder/block_{i}/'
        old = f'{block}MultiHeadDotProductAttention_1/query/kernel' in src  # old Flax numbering
        names = (('LayerNorm_0', 'MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3') if old else
                 ('LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0'))
        norm1, attn, norm2, mlp = (block + n for n in names)
        for name, key in (('norm1', norm1), ('norm2', norm2)):
            put(out, f'{ours}{name}/scale', src.take(f'{key}/scale'))
            put(out, f'{ours}{name}/bias', src.take(f'{key}/bias'))
        for part in ('kernel', 'bias'):
            qkv = [src.take(f'{attn}/{p}/{part}') for p in ('query', 'key', 'value')]
            if all(x is not None for x in qkv):
                # (D, H, dh) x3 -> (D, 3, H, dh); biases (H, dh) x3 -> (3, H, dh).
                out[f'{ours}attn/qkv/{part}'] = np.stack(qkv, axis=-3)
            put(out, f'{ours}attn/out/{part}', src.take(f'{attn}/out/{part}'))
        for dense, fc in (('Dense_0', 'fc1'), ('Dense_1', 'fc2')):
            put(out, f'{ours}mlp/{fc}/kernel', src.take(f'{mlp}/{dense}/kernel'))
            put(out, f'{ours}mlp/{fc}/bias', src.take(f'{mlp}/{dense}/bias'))
        i += 1

    for name in ('pre_logits', 'head'):
        put(out, f'{name}/kernel', src.take(f'{name}/kernel'))
        put(out, f'{name}/bias', src.take(f'{name}/bias'))

    # Hybrid ResNet stem: same names under resnet/, GroupNorm parameters squeezed from (1, 1, 1, C).
    for key in src.keys():
        match = _RESNET_KEY.match(key)
        if match:
            value = src.take(key)
            out[f'resnet/{key}'] = value.reshape(-1) if match.group(2) != 'kernel' else value
    return out
