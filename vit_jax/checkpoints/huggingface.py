"""Hugging Face transformers ViT and DeiT state dicts (``pytorch_model.bin`` or ``model.safetensors``).

Two generations of names, both accepted:
- files on the Hub (transformers 4.x): ``{vit,deit}.encoder.layer.{i}.{layernorm_before,
  attention.attention.{query,key,value}, attention.output.dense, layernorm_after, intermediate.dense, output.dense}``;
- transformers 5.x: ``{vit,deit}.layers.{i}.{layernorm_before, attention.{q,k,v,o}_proj, layernorm_after, mlp.fc1,
  mlp.fc2}``.
Heads: ``classifier`` (ViT, DeiT without teacher) or ``cls_classifier`` + ``distillation_classifier`` (DeiT with
teacher). A ``pooler`` (ViTModel's tanh pooler, unused by the image classifiers) is reported and skipped.

HF configs default to ``layer_norm_eps=1e-12``; the released ViT / DeiT weights were trained with 1e-6. The model you
load into decides (``layer_norm_eps`` override).
"""

from __future__ import annotations

import numpy as np

from vit_jax.checkpoints.common import Flat, Source, attention_out, conv, layer_norm, linear, put


def hf_prefix(keys: list[str]) -> str | None:
    for prefix in ('vit.', 'deit.'):
        if any(k.startswith(prefix + 'embeddings.') for k in keys):
            return prefix
    return None


def convert(src: Source, num_heads: int) -> Flat:
    p = hf_prefix(src.keys())
    out: Flat = {}
    e = p + 'embeddings.'
    put(out, 'class_token', src.take(e + 'cls_token'))
    put(out, 'distillation_token', src.take(e + 'distillation_token'))
    put(out, 'pos_embed', src.take(e + 'position_embeddings'))
    conv(out, 'patch_embed', src, e + 'patch_embeddings.projection')

    new = any(k.startswith(p + 'layers.') for k in src.keys())
    i = 0
    while f'{p}layers.{i}.layernorm_before.weight' in src or f'{p}encoder.layer.{i}.layernorm_before.weight' in src:
        ours = f'encoder/block_{i}/'
        if new:
            b = f'{p}layers.{i}.'
            q, k, v, o = (b + f'attention.{n}_proj' for n in 'qkvo')
            fc1, fc2 = b + 'mlp.fc1', b + 'mlp.fc2'
        else:
            b = f'{p}encoder.layer.{i}.'
            q, k, v = (b + f'attention.attention.{n}' for n in ('query', 'key', 'value'))
            o, fc1, fc2 = b + 'attention.output.dense', b + 'intermediate.dense', b + 'output.dense'
        layer_norm(out, ours + 'norm1', src, b + 'layernorm_before')
        layer_norm(out, ours + 'norm2', src, b + 'layernorm_after')
        weights = [src.take(f'{n}.weight') for n in (q, k, v)]
        biases = [src.take(f'{n}.bias') for n in (q, k, v)]
        if all(w is not None for w in weights):  # (out, in) each -> (D, 3, H, dh)
            d = weights[0].shape[1]
            out[ours + 'attn/qkv/kernel'] = np.stack([w.T.reshape(d, num_heads, -1) for w in weights], axis=1)
        if all(x is not None for x in biases):
            out[ours + 'attn/qkv/bias'] = np.stack([x.reshape(num_heads, -1) for x in biases])
        attention_out(out, ours + 'attn/out', src, o, num_heads)
        linear(out, ours + 'mlp/fc1', src, fc1)
        linear(out, ours + 'mlp/fc2', src, fc2)
        i += 1
    layer_norm(out, 'encoder/norm', src, p + 'layernorm')
    for key in src.keys():
        if key.startswith(p + 'pooler.'):
            src.take(key)  # ViTModel's pooler: not part of the image classifier
    if 'cls_classifier.weight' in src:
        linear(out, 'head', src, 'cls_classifier')
        linear(out, 'head_dist', src, 'distillation_classifier')
    else:
        linear(out, 'head', src, 'classifier')
    return out
