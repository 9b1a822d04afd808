"""Official T2T-ViT checkpoints (yitu-opensource/T2T-ViT ``.pth.tar``).

The file holds ``state_dict_ema`` (the EMA weights, which the paper evaluates and releases) and/or ``state_dict``;
the reader prefers EMA and strips DataParallel's ``module.`` prefix. The Performer's frozen random features
(``tokens_to_token.attention{1,2}.w``) and the frozen sinusoid ``pos_embed`` are loaded, never re-sampled.
"""

from __future__ import annotations

from vit_jax.checkpoints.common import Flat, Source, layer_norm, linear, put, timm_blocks


def is_t2t(keys: list[str]) -> bool:
    return any(k.startswith('tokens_to_token.') for k in keys)


def convert(src: Source, num_heads: int) -> Flat:
    out: Flat = {}
    for layer in ('attention1', 'attention2'):
        key, ours = f'tokens_to_token.{layer}.', f'tokens_to_token/{layer}/'
        layer_norm(out, ours + 'norm1', src, key + 'norm1')
        layer_norm(out, ours + 'norm2', src, key + 'norm2')
        if key + 'w' in src:  # Performer: kqv (k, q, v order), random features, proj, a 2-layer MLP
            linear(out, ours + 'kqv', src, key + 'kqv')
            put(out, ours + 'random_features', src.take(key + 'w'))
            linear(out, ours + 'proj', src, key + 'proj')
            linear(out, ours + 'fc1', src, key + 'mlp.0')
            linear(out, ours + 'fc2', src, key + 'mlp.2')
        else:  # Transformer: one head; qkv (dim, 3 * token_dim) without bias -> (dim, 3, token_dim)
            qkv = src.take(key + 'attn.qkv.weight')
            if qkv is not None:
                out[ours + 'qkv/kernel'] = qkv.T.reshape(qkv.shape[1], 3, -1)
            linear(out, ours + 'out', src, key + 'attn.proj')
            linear(out, ours + 'mlp/fc1', src, key + 'mlp.fc1')
            linear(out, ours + 'mlp/fc2', src, key + 'mlp.fc2')
    linear(out, 'tokens_to_token/project', src, 'tokens_to_token.project')
    put(out, 'class_token', src.take('cls_token'))
    put(out, 'sinusoid_pos_embed', src.take('pos_embed'))
    timm_blocks(out, src, '', num_heads)
    layer_norm(out, 'encoder/norm', src, 'norm')
    linear(out, 'head', src, 'head')
    return out
