"""timm / DeiT PyTorch ViT state dicts (``.pth``; DeiT release files keep the weights under ``model``).

Names: ``cls_token``, ``dist_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.{norm1, attn.qkv, attn.proj,
norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``pre_logits.fc``, ``head``, ``head_dist``. The fused qkv weight is (3D, D) =
[q | k | v], head-major inside each.
"""

from __future__ import annotations

from vit_jax.checkpoints.common import Flat, Source, conv, layer_norm, linear, put, timm_blocks


def is_timm(keys: list[str]) -> bool:
    return 'patch_embed.proj.weight' in keys and 'blocks.0.attn.qkv.weight' in keys


def convert(src: Source, num_heads: int) -> Flat:
    out: Flat = {}
    conv(out, 'patch_embed', src, 'patch_embed.proj')
    put(out, 'class_token', src.take('cls_token'))
    put(out, 'distillation_token', src.take('dist_token'))
    put(out, 'pos_embed', src.take('pos_embed'))
    timm_blocks(out, src, '', num_heads)
    layer_norm(out, 'encoder/norm', src, 'norm')
    if 'pre_logits.fc.weight' in src:
        linear(out, 'pre_logits', src, 'pre_logits.fc')
    linear(out, 'head', src, 'head')
    if 'head_dist.weight' in src:
        linear(out, 'head_dist', src, 'head_dist')
    return out
