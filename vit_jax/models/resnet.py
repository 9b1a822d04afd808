"""The BiT-style ResNet of the ViT hybrids (ViT paper section 3.1 "Hybrid Architecture", appendix D.4).

As in google-research/vision_transformer: weight-standardised convolutions (StdConv), GroupNorm (32 groups,
eps 1e-6) instead of BatchNorm, and post-activation bottleneck units. The root is a 7x7/2 StdConv + GroupNorm + ReLU
+ 3x3/2 max-pool; stage 1 keeps the stride, every later stage halves it. Stage widths are 64/128/256/512 times the
width factor, with a 4x bottleneck expansion.

Parameter names (loaders depend on them)::

    conv_root/kernel, gn_root/{scale,bias},
    block{s}/unit{u}/{conv1,conv2,conv3,conv_proj}/kernel, block{s}/unit{u}/{gn1,gn2,gn3,gn_proj}/{scale,bias}
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def weight_standardize(w: jax.Array, axis: Sequence[int], eps: float) -> jax.Array:
    """Weight standardisation (Qiao et al. 2019): zero mean, unit std per output channel."""
    w = w - jnp.mean(w, axis=axis)
    return w / (jnp.std(w, axis=axis) + eps)


class StdConv(nn.Conv):
    """A convolution whose kernel is weight-standardised every time it is used (eps 1e-5, as the original)."""

    def param(self, name, *args, **kwargs):
        param = super().param(name, *args, **kwargs)
        if name == 'kernel':
            param = weight_standardize(param, axis=[0, 1, 2], eps=1e-5)
        return param


def _conv(features: int, kernel: int, strides: int, name: str, dtype: Dtype, param_dtype: Dtype) -> StdConv:
    return StdConv(features, (kernel, kernel), (strides, strides), use_bias=False, name=name,
                   dtype=dtype, param_dtype=param_dtype,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            (None, None, 'conv_in', 'conv_out')))


GROUPS = 32  # GroupNorm's groups, as the original


def check_width(width: float) -> None:
    """Raises ValueError unless GroupNorm's groups divide the channels: every one is a multiple of the root's."""
    channels = int(64 * width)
    if channels <= 0 or channels % GROUPS:
        raise ValueError(f'resnet_width={width!r} gives the ResNet {channels} root channels (64 x resnet_width), which '
                         f"GroupNorm's {GROUPS} groups do not divide: use a multiple of 0.5 (0.5, 1, 1.5, 2, 3, 4).")


def _group_norm(name: str, dtype: Dtype, param_dtype: Dtype, zero_scale: bool = False) -> nn.GroupNorm:
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return nn.GroupNorm(num_groups=GROUPS, epsilon=1e-6, name=name, dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(scale_init, ('conv_out',)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('conv_out',)))


class BottleneckUnit(nn.Module):
    """Post-activation bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (4x wider), projection shortcut when shapes change."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s, name: _conv(f, k, s, name, self.dtype, self.param_dtype)  # noqa: E731
        gn = lambda name, zero=False: _group_norm(name, self.dtype, self.param_dtype, zero)  # noqa: E731
        residual = x
        if x.shape[-1] != self.features * 4 or self.strides != 1:
            residual = gn('gn_proj')(conv(self.features * 4, 1, self.strides, 'conv_proj')(residual))
        y = nn.relu(gn('gn1')(conv(self.features, 1, 1, 'conv1')(x)))
        y = nn.relu(gn('gn2')(conv(self.features, 3, self.strides, 'conv2')(y)))
        # Zero-initialised last norm: every unit starts as the identity (Goyal et al. 2017).
        y = gn('gn3', zero=True)(conv(self.features * 4, 1, 1, 'conv3')(y))
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """``block_size`` bottleneck units; the first one strides."""

    block_size: int
    features: int
    first_stride: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for unit in range(self.block_size):
            x = BottleneckUnit(self.features, self.first_stride if unit == 0 else 1, self.dtype, self.param_dtype,
                               name=f'unit{unit + 1}')(x)
        return x


class ResNetStem(nn.Module):
    """Root block and stages; returns the feature map (B, H/stride, W/stride, 256 * width * 2**(stages-1))."""

    layers: Sequence[int]
    width_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def stride(self) -> int:
        """Total downsampling: 4 from the root (conv /2, pool /2), then 2 per stage after the first."""
        return 4 * 2 ** max(len(self.layers) - 1, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = int(64 * self.width_factor)
        x = _conv(width, 7, 2, 'conv_root', self.dtype, self.param_dtype)(x)
        x = nn.relu(_group_norm('gn_root', self.dtype, self.param_dtype)(x))
        x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
        for stage, block_size in enumerate(self.layers):
            x = ResNetStage(block_size, width * 2 ** stage, 1 if stage == 0 else 2, self.dtype, self.param_dtype,
                            name=f'block{stage + 1}')(x)
        return x


class ResNet(nn.Module):
    """A BiT-style ResNet classifier (the hybrids' stem with all its stages, global average pooling and a head).

    Used alone as the CNN baseline of scaling sweeps and as a distillation teacher. Its weights use the hybrids'
    layout under ``resnet/`` plus ``head``, so a hybrid's stem and a ResNet share one loader.
    """

    num_classes: int
    image_size: int = 224
    resnet_layers: tuple[int, ...] = (3, 4, 6, 3)
    resnet_width: float = 1.0
    dtype: Any = 'float32'
    param_dtype: Any = 'float32'

    def __post_init__(self):
        if not self.resnet_layers or not all(int(n) > 0 for n in self.resnet_layers):
            raise ValueError(f'resnet_layers={self.resnet_layers} must be positive block counts, e.g. (3, 4, 6, 3).')
        check_width(self.resnet_width)
        for field in ('dtype', 'param_dtype'):
            if jnp.dtype(getattr(self, field)).name not in ('float32', 'bfloat16', 'float16'):
                raise ValueError(f'{field}={getattr(self, field)!r} is not one of (float32, bfloat16, float16).')
        super().__post_init__()

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        dtype, pdtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        x = ResNetStem(tuple(self.resnet_layers), self.resnet_width, dtype, pdtype, name='resnet')(images.astype(dtype))
        features = jnp.mean(x, axis=(1, 2))
        self.sow('intermediates', 'pre_logits', features)
        if not self.num_classes:
            return features
        head = nn.Dense(self.num_classes, name='head', dtype=dtype, param_dtype=pdtype,
                        kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed', 'classes')),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('classes',)))
        return head(features).astype(jnp.float32)
