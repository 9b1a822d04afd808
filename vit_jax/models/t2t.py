"""The tokens-to-token module of T2T-ViT (Yuan et al. 2021, section 3.1 and figure 3).

Three soft splits (overlapping unfolds: 7x7/4, 3x3/2, 3x3/2) with a re-structurization between them: a small token
layer (a Transformer or a Performer with one head of width ``token_dim``) whose output tokens are folded back into an
image. At 224 px: 56x56 -> 28x28 -> 14x14 = 196 tokens, then a Linear to the backbone width.

Ported from yitu-opensource/T2T-ViT with its quirks kept on purpose:
- the token Transformer scales q k^T by the INPUT width (``dim ** -0.5``: 147 ** -0.5, 576 ** -0.5), not the head
  width, and its attention residual adds ``v``, not the block input (the widths differ);
- the token Performer splits its projection in the order k, q, v, uses a frozen random-feature matrix stored in the
  checkpoint, and always applies dropout 0.1 while training (``dp1 = dp2 = 0.1`` in the original);
- LayerNorm eps 1e-5 (torch default), exact GELU.

Parameter names::

    tokens_to_token/attention{1,2}/{norm1, qkv, out, norm2, mlp/fc1, mlp/fc2}              # 'transformer'
    tokens_to_token/attention{1,2}/{norm1, kqv, random_features, proj, norm2, fc1, fc2}  # 'performer'
    tokens_to_token/project
"""

from __future__ import annotations

import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.encoder import PORTABLE, MlpBlock, TokenDense, dense_bias_init, dense_kernel_init, dot_general_for

Dtype = Any

# Parameters that the original keeps frozen (requires_grad=False); they stay in the checkpoint and the parameter
# count, and the optimizer must leave them alone (see ``vit_jax.models.is_frozen``).
FROZEN_PARAM_NAMES = ('random_features', 'sinusoid_pos_embed')


def soft_split(x: jax.Array, kernel: int, stride: int, padding: int) -> jax.Array:
    """Overlapping patches, like torch ``nn.Unfold``: (B, H, W, C) -> (B, H', W', C * kernel * kernel).

    Features are ordered channel-major, then kernel row, then column, which is Unfold's order and
    ``conv_general_dilated_patches``'s.
    """
    return jax.lax.conv_general_dilated_patches(
        x, filter_shape=(kernel, kernel), window_strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=('NHWC', 'OIHW', 'NHWC'), precision=jax.lax.Precision.HIGHEST)


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype, platform: str) -> TokenDense:
    return TokenDense(features, name=name, dtype=dtype, param_dtype=param_dtype, kernel_init=dense_kernel_init,
                      bias_init=dense_bias_init, platform=platform)


class TokenTransformer(nn.Module):
    """T2T's token Transformer layer: one head of width ``token_dim``; scale and residual as the original."""

    token_dim: int
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    platform: str = PORTABLE

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        dim = x.shape[-1]
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa
                                         name=name)
        y = norm('norm1')(x)
        qkv = nn.DenseGeneral((3, self.token_dim), use_bias=False, name='qkv', dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=dense_kernel_init,
                              dot_general=dot_general_for(self.platform))(y)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # Scaled by the input width, not token_dim: the original's head_dim = dim // num_heads with num_heads = 1.
        attn = jax.nn.softmax((q * dim ** -0.5) @ jnp.swapaxes(k, -1, -2), axis=-1)
        self.sow('attention_weights', 'weights', attn[:, None])
        y = _dense(self.token_dim, 'out', self.dtype, self.param_dtype, self.platform)(attn @ v)
        x = v + y  # the residual is v: the block's input has a different width
        return x + MlpBlock(self.token_dim, 0.0, False, self.dtype, self.param_dtype, self.platform, name='mlp')(
            norm('norm2')(x), deterministic)


class TokenPerformer(nn.Module):
    """T2T's token Performer layer: linear attention with positive random features (Choromanski et al. 2021)."""

    token_dim: int
    kernel_ratio: float = 0.5
    dropout_rate: float = 0.1  # hard-coded dp1 = dp2 = 0.1 in the original
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    platform: str = PORTABLE

    def _random_features_init(self, rng: jax.Array, shape: tuple[int, int], dtype: Dtype) -> jax.Array:
        # Orthogonal rows scaled by sqrt(m), as ``nn.init.orthogonal_(w) * sqrt(m)`` in the original.
        return nn.initializers.orthogonal(scale=math.sqrt(shape[0]))(rng, shape, dtype)

    def prm_exp(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """phi(x) = exp(w x - |x|^2 / 2) / sqrt(m), so that E[phi(q) . phi(k)] = exp(q . k)."""
        x = x.astype(jnp.float32)  # the original computes the features in float32 too
        xd = jnp.sum(x * x, axis=-1, keepdims=True) / 2
        wtx = jnp.einsum('bti,mi->btm', x, w, precision=jax.lax.Precision.HIGHEST)
        return jnp.exp(wtx - xd) / math.sqrt(w.shape[0])

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        emb = self.token_dim
        m = int(emb * self.kernel_ratio)
        w = jax.lax.stop_gradient(self.param('random_features', self._random_features_init, (m, emb), jnp.float32))
        norm = lambda name: nn.LayerNorm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa
                                         name=name)
        dropout = nn.Dropout(self.dropout_rate)

        kqv = _dense(3 * emb, 'kqv', self.dtype, self.param_dtype, self.platform)(norm('norm1')(x))
        k, q, v = jnp.split(kqv, 3, axis=-1)  # k, q, v: the original's order
        kp, qp = self.prm_exp(k, w), self.prm_exp(q, w)  # (B, T, m)
        hp = jax.lax.Precision.HIGHEST
        normaliser = jnp.einsum('bti,bi->bt', qp, kp.sum(axis=1), precision=hp)[..., None]  # (B, T, 1)
        kptv = jnp.einsum('bin,bim->bnm', v.astype(jnp.float32), kp, precision=hp)  # (B, emb, m)
        y = jnp.einsum('bti,bni->btn', qp, kptv, precision=hp) / (normaliser + 1e-8)  # (B, T, emb)
        y = _dense(emb, 'proj', self.dtype, self.param_dtype, self.platform)(y.astype(self.dtype))
        x = v + dropout(y, deterministic=deterministic)  # the residual is v, as in the token Transformer

        y = _dense(emb, 'fc1', self.dtype, self.param_dtype, self.platform)(norm('norm2')(x))
        y = _dense(emb, 'fc2', self.dtype, self.param_dtype, self.platform)(nn.gelu(y, approximate=False))
        # Dropout twice, as the original: once at the end of its ``mlp`` Sequential, once around it.
        return x + dropout(dropout(y, deterministic=deterministic), deterministic=deterministic)


class TokensToToken(nn.Module):
    """Soft split -> token layer -> re-structurize, twice; a last soft split and a Linear to ``hidden_size``."""

    hidden_size: int
    token_dim: int = 64
    tokens_type: str = 'performer'
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    platform: str = PORTABLE

    @nn.compact
    def __call__(self, images: jax.Array, deterministic: bool) -> jax.Array:
        if self.tokens_type == 'performer':
            layer = lambda name: TokenPerformer(self.token_dim, layer_norm_eps=self.layer_norm_eps,  # noqa: E731
                                                dtype=self.dtype, param_dtype=self.param_dtype,
                                                platform=self.platform, name=name)
        else:
            layer = lambda name: TokenTransformer(self.token_dim, self.layer_norm_eps,  # noqa: E731
                                                  self.dtype, self.param_dtype, self.platform, name=name)
        x = soft_split(images, kernel=7, stride=4, padding=2)
        for i, name in enumerate(('attention1', 'attention2')):
            h, w = x.shape[1:3]
            x = layer(name)(einops.rearrange(x, 'b h w c -> b (h w) c'), deterministic)
            x = einops.rearrange(x, 'b (h w) c -> b h w c', h=h, w=w)  # re-structurization
            x = soft_split(x, kernel=3, stride=2, padding=1)
        x = einops.rearrange(x, 'b h w c -> b (h w) c')
        return TokenDense(self.hidden_size, name='project', dtype=self.dtype, param_dtype=self.param_dtype,
                          platform=self.platform,
                          kernel_init=nn.with_logical_partitioning(dense_kernel_init, (None, 'embed')),
                          bias_init=nn.with_logical_partitioning(dense_bias_init, ('embed',)))(x)


def sinusoid_table(num_positions: int, dim: int) -> jax.Array:
    """T2T's fixed position table: interleaved sin/cos by dimension pair, angle pos / 10000^(2 (j // 2) / dim)."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]  # float64 like the original's numpy table
    j = np.arange(dim)[None, :]
    angle = pos / np.power(10000.0, 2 * (j // 2) / dim)
    table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
    return jnp.asarray(table[None], jnp.float32)
