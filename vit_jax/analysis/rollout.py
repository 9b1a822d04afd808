"""Attention rollout (Abnar & Zuidema 2020; ViT paper appendix D.8, figure 6).

    Â_l = rownorm(fuse_heads(A_l) + I)          # the residual connection: half the signal skips attention
    R = Â_L Â_{L-1} ... Â_1                      # how much each input token flows into each output token
    map = R[class token, patches]                # reshaped to the patch grid, resized to the image

With the heads' rows summing to 1, ``rownorm(A + I) = (A + I) / 2``: uniform attention 1/N in every layer gives
``0.5^L I + (1 - 0.5^L) / N``. Optionally the lowest ``discard_ratio`` of each fused map's weights are zeroed first
(vit-explain's filter), never those on the prefix tokens' columns (the class token is where a layer parks attention).

Where jacobgil/vit-explain goes wrong, and this does not: it divides by the row sums without ``keepdim`` (its issue
#16), which broadcasts them along the wrong axis once discarding has unbalanced the rows; its discard spares only the
flat index 0, i.e. entry [0, 0], not the class column, and only for the first image of a batch.
"""

from __future__ import annotations

import numpy as np

HEAD_FUSIONS = ('mean', 'max', 'min')


def fuse_heads(attention: np.ndarray, head_fusion: str = 'mean') -> np.ndarray:
    """(B, H, N, N) -> (B, N, N): the heads' mean, max or min."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f'head_fusion={head_fusion!r} is not one of {HEAD_FUSIONS}.')
    return getattr(np, head_fusion)(attention, axis=1)


def discard_lowest(attention: np.ndarray, ratio: float, num_prefix_tokens: int = 1) -> np.ndarray:
    """(B, N, N) with the lowest ``ratio`` of each example's weights on patch columns set to 0; prefix columns kept."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f'discard_ratio={ratio} must be in [0, 1).')
    out = np.array(attention, dtype=np.float64, copy=True)
    patches = out[:, :, num_prefix_tokens:].reshape(out.shape[0], -1)  # a copy: written back below
    k = int(ratio * patches.shape[1])
    if k:
        lowest = np.argsort(patches, axis=1, kind='stable')[:, :k]
        np.put_along_axis(patches, lowest, 0.0, axis=1)
        out[:, :, num_prefix_tokens:] = patches.reshape(out.shape[0], out.shape[1], -1)
    return out


def attention_rollout(attentions: np.ndarray, head_fusion: str = 'mean', discard_ratio: float = 0.0,
                      num_prefix_tokens: int = 1) -> np.ndarray:
    """Every layer's attention (L, B, H, N, N) -> the rolled-out joint attention R (B, N, N), R = Â_L ... Â_1."""
    attentions = np.asarray(attentions, np.float64)
    n = attentions.shape[-1]
    joint = np.broadcast_to(np.eye(n), (attentions.shape[1], n, n))
    for attention in attentions:
        a = fuse_heads(attention, head_fusion)
        if discard_ratio:
            a = discard_lowest(a, discard_ratio, num_prefix_tokens)
        a = a + np.eye(n)  # the residual: each token also keeps itself
        a = a / a.sum(axis=-1, keepdims=True)
        joint = a @ joint
    return joint


def token_map(joint: np.ndarray, num_prefix_tokens: int, grid: int) -> np.ndarray:
    """(B, N, N) -> (B, grid, grid): the class token's row over the patches.

    Without a class token (``classifier='gap'``) the mean of the patch tokens' rows, which is what gap pools.
    """
    if num_prefix_tokens:
        rows = joint[:, 0, num_prefix_tokens:]
    else:
        rows = joint.mean(axis=1)
    return rows.reshape(-1, grid, grid)


def describe_token(num_prefix_tokens: int) -> str:
    """Which row ``token_map`` shows, in words (for plots and the JSON)."""
    if num_prefix_tokens == 0:
        return 'mean over the patch tokens\' rows (classifier="gap": no class token)'
    if num_prefix_tokens == 2:
        return 'class token row (not the distillation token\'s)'
    return 'class token row'
