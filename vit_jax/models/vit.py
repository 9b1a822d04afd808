"""Vision Transformer (Dosovitskiy et al. 2021) and the families built on it: DeiT, T2T-ViT and ResNet hybrids.

    tokens = stem(images)                      # patches (ViT, DeiT) | ResNet features (hybrid) | tokens-to-token (T2T)
    z0 = [class_token; distillation_token; tokens] + pos_embed          # ViT eq. 1 (+ DeiT's distillation token)
    zL = Encoder(z0)                                                   # ViT eq. 2-4, shared by every family
    logits = head(pre_logits(pool(zL)))                                # + DeiT's head_dist on the distillation token

The model is split into stages so that objectives can reach inside it: ``embed`` (images -> patch tokens),
``encode`` (patch tokens + their positions, ``patch_positions()``, -> prefix tokens prepended -> encoded tokens) and
``classify`` (encoded tokens -> logits). Masked patch prediction, for
instance, corrupts the output of ``embed`` before ``encode``. Intermediate outputs are sown, not returned:
``mutable=['intermediates']`` gives every block's tokens and the pre-logits features, ``mutable=['attention_weights']``
every block's attention maps.
"""

from __future__ import annotations

import re
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models.encoder import ATTENTION_IMPLS, PORTABLE, Encoder, dense_bias_init, dense_kernel_init
from vit_jax.models.resnet import ResNetStem, check_width
from vit_jax.models.t2t import TokensToToken, sinusoid_table

CLASSIFIERS = ('token', 'gap', 'unpooled', 'token_unpooled')
POSEMBS = ('learned', 'sinusoid', 'sincos2d')
STEMS = ('patch', 'resnet', 't2t')
TOKENS_TYPES = ('performer', 'transformer')
DTYPES = ('float32', 'bfloat16', 'float16')
T2T_STRIDE = 16  # 4 * 2 * 2: the strides of the three soft splits


def sincos2d_posemb(h: int, w: int, dim: int, temperature: float = 10_000.0) -> jax.Array:
    """big_vision's fixed 2D sin-cos position embedding, (1, h * w, dim)."""
    if dim % 4:
        raise ValueError(f'hidden_size={dim} must be a multiple of 4 for posemb="sincos2d".')
    y, x = np.mgrid[:h, :w]
    omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4 - 1))
    y = np.einsum('m,d->md', y.flatten(), omega)
    x = np.einsum('m,d->md', x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe[None], jnp.float32)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches, linearly projected: a strided conv written as a reshape and one matmul.

    The kernel keeps the conv layout (p, p, C, D) of the original checkpoints.
    """

    patch_size: int
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                                  (None, None, None, 'embed')),
                            (p, p, x.shape[-1], self.hidden_size), self.param_dtype)
        bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                          (self.hidden_size,), self.param_dtype)
        x = einops.rearrange(x, 'b (h ph) (w pw) c -> b h w (ph pw c)', ph=p, pw=p)
        y = x.astype(self.dtype) @ kernel.reshape(-1, self.hidden_size).astype(self.dtype)
        return y + bias.astype(self.dtype)


class VisionTransformer(nn.Module):
    """ViT / DeiT / T2T-ViT / hybrid. Every architectural quirk of an original is a field (see ``models.registry``)."""

    num_classes: int
    image_size: int = 224
    patch_size: int = 16  # pixels per side of a patch (ViT eq. 1)
    hidden_size: int = 768  # D, the width of every token
    num_layers: int = 12  # Transformer blocks
    num_heads: int = 12  # attention heads (hidden_size must divide by it)
    mlp_dim: int = 3072  # the MLP's hidden width
    classifier: str = 'token'  # 'token' (class token) | 'gap' (mean of the tokens) | 'unpooled' | 'token_unpooled'
    representation_size: int | None = None  # a tanh pre-logits layer of this width (ViT pre-training), None = none
    dropout_rate: float = 0.0  # after the embeddings, the MLP's layers and each residual branch
    attention_dropout_rate: float = 0.0  # on the attention probabilities
    drop_path_rate: float = 0.0  # stochastic depth of the last block (linear in depth from 0, as DeiT / timm)
    dtype: Any = 'float32'  # what activations are computed in: 'float32' | 'bfloat16' | 'float16'
    param_dtype: Any = 'float32'  # what parameters are stored in
    # The originals' quirks.
    gelu_approximate: bool = True  # Flax nn.gelu default (tanh) in the JAX originals; exact erf in DeiT and T2T
    layer_norm_eps: float = 1e-6  # 1e-5 (torch default) in T2T-ViT
    qkv_bias: bool = True  # off in T2T-ViT's backbone
    posemb: str = 'learned'  # 'learned' | 'sinusoid' (T2T, frozen) | 'sincos2d' (big_vision, not a parameter)
    distilled: bool = False  # DeiT's distillation token and head
    # What turns images into tokens.
    stem: str = 'patch'
    resnet_layers: tuple[int, ...] = ()  # the hybrid's ResNet stem: blocks per stage, e.g. (3, 4, 9)
    resnet_width: float = 1.0  # width factor: root width 64 * resnet_width
    token_dim: int = 64  # T2T-ViT: the width of the tokens-to-token layers
    tokens_type: str = 'performer'  # T2T-ViT's tokens-to-token layer: 'performer' | 'transformer'
    # Compilation.
    scan_layers: bool = False  # one block compiled and looped over stacked parameters (compile time)
    remat: bool = False  # recompute each block's activations in the backward pass (memory)
    # 'auto' | 'xla' | 'cudnn' | 'cpu_kernel' (encoder.resolve_attention); not a parameter: legal to change mid-run.
    attention_impl: str = 'auto'
    # What the model is compiled for: 'cpu', 'tpu', 'cuda:9.0', ... or 'portable' (encoder.PORTABLE). Set from the
    # mesh's devices by the training system (vit_jax.hardware); it decides 'auto' attention and the CPU kernels.
    platform: str = PORTABLE

    def __post_init__(self):
        validate(self)
        super().__post_init__()

    # Derived sizes -------------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def stem_stride(self) -> int:
        if self.stem == 'resnet':
            return 4 * 2 ** max(len(self.resnet_layers) - 1, 0)
        return 1

    @property
    def grid_size(self) -> int:
        if self.stem == 't2t':
            return self.image_size // T2T_STRIDE
        return self.image_size // (self.stem_stride * self.patch_size)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token (token classifiers) and DeiT's distillation token."""
        return int(self.classifier in ('token', 'token_unpooled')) + int(self.distilled)

    def setup(self):
        dtype, pdtype = self.compute_dtype, jnp.dtype(self.param_dtype)
        d = self.hidden_size
        if self.stem == 't2t':
            self.tokens_to_token = TokensToToken(d, self.token_dim, self.tokens_type, self.layer_norm_eps,
                                                 dtype, pdtype, self.platform)
        else:
            if self.stem == 'resnet':
                self.resnet = ResNetStem(tuple(self.resnet_layers), self.resnet_width, dtype, pdtype)
            self.patch_embed = PatchEmbed(self.patch_size, d, dtype, pdtype)

        token_init = nn.with_logical_partitioning(nn.initializers.zeros, (None, None, 'embed'))
        if self.classifier in ('token', 'token_unpooled'):
            self.class_token = self.param('class_token', token_init, (1, 1, d), pdtype)
        if self.distilled:
            self.distillation_token = self.param(
                'distillation_token', nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
                (1, 1, d), pdtype)
        n = self.grid_size ** 2 + self.num_prefix_tokens
        if self.posemb == 'learned':
            self.pos_embed = self.param(
                'pos_embed', nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, None, 'embed')),
                (1, n, d), pdtype)
        elif self.posemb == 'sinusoid':
            # T2T keeps its fixed table as a frozen parameter in the checkpoint; stop_gradient in ``encode``.
            self.sinusoid_pos_embed = self.param(
                'sinusoid_pos_embed',
                nn.with_logical_partitioning(lambda *_: sinusoid_table(n, d), (None, None, 'embed')))

        self.encoder = Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate,
                               self.attention_dropout_rate, self.drop_path_rate, self.qkv_bias, self.gelu_approximate,
                               self.layer_norm_eps, self.scan_layers, self.remat, dtype, pdtype,
                               self.attention_impl, self.platform)
        self.embedding_dropout = nn.Dropout(self.dropout_rate)
        dense = lambda features, name, kernel_init: nn.Dense(  # noqa: E731
            features, name=name, dtype=dtype, param_dtype=pdtype,
            kernel_init=nn.with_logical_partitioning(kernel_init, ('embed', 'classes')),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('classes',)))
        if self.representation_size:
            self.pre_logits = nn.Dense(self.representation_size, name='pre_logits', dtype=dtype, param_dtype=pdtype,
                                       kernel_init=nn.with_logical_partitioning(dense_kernel_init, ('embed', 'mlp')),
                                       bias_init=nn.with_logical_partitioning(dense_bias_init, ('mlp',)))
        if self.num_classes:
            # Zero-initialised head, as vision_transformer (and its fine-tuning recipe).
            self.head = dense(self.num_classes, 'head', nn.initializers.zeros)
            if self.distilled:
                self.head_dist = dense(self.num_classes, 'head_dist', nn.initializers.zeros)

    # The three stages ----------------------------------------------------------------------------------------------
    def embed(self, images: jax.Array, train: bool = False) -> jax.Array:
        """Images (B, H, W, 3) -> patch tokens (B, N, D), before any class token or position embedding."""
        expected = (self.image_size, self.image_size)
        if tuple(images.shape[1:3]) != expected:
            raise ValueError(
                f'Images are {tuple(images.shape[1:3])} but the model was built for image_size={self.image_size}: '
                f'resize the images, or create the model with image_size={images.shape[1]} (and resize the position '
                f'embeddings of pretrained weights with vit_jax.checkpoints).')
        x = images.astype(self.compute_dtype)
        if self.stem == 't2t':
            return self.tokens_to_token(x, not train)
        if self.stem == 'resnet':
            x = self.resnet(x)
        x = self.patch_embed(x)
        return einops.rearrange(x, 'b h w d -> b (h w) d')

    def patch_positions(self) -> jax.Array:
        """The position embeddings of the patch tokens, (1, N, D), in the grid's row-major order."""
        p = self.num_prefix_tokens
        if self.posemb == 'sincos2d':  # big_vision: fixed, and it covers the patches only
            return sincos2d_posemb(self.grid_size, self.grid_size, self.hidden_size)
        table = self.pos_embed if self.posemb == 'learned' else jax.lax.stop_gradient(self.sinusoid_pos_embed)
        return table[:, p:]

    def prefix_tokens(self, batch_size: int) -> jax.Array:
        """The class token and DeiT's distillation token with their position embeddings, (B, prefix, D)."""
        d = self.hidden_size
        prefix = []
        if self.classifier in ('token', 'token_unpooled'):
            prefix.append(self.class_token)
        if self.distilled:
            prefix.append(self.distillation_token)
        if not prefix:
            return jnp.zeros((batch_size, 0, d), self.compute_dtype)
        x = jnp.concatenate(prefix, axis=1)
        if self.posemb != 'sincos2d':
            table = self.pos_embed if self.posemb == 'learned' else jax.lax.stop_gradient(self.sinusoid_pos_embed)
            x = x + table[:, :len(prefix)]
        return jnp.broadcast_to(x, (batch_size, *x.shape[1:])).astype(self.compute_dtype)

    def encode(self, tokens: jax.Array, train: bool = False, positions: jax.Array | None = None) -> jax.Array:
        """Patch tokens (B, n, D) -> encoded tokens (B, prefix + n, D) (ViT eq. 1-4).

        ``positions`` are the tokens' position embeddings, (1 or B, n, D); by default every patch's, in order. MAE
        encodes the patches it keeps with their own positions (``patch_positions()`` gathered), so the position
        embeddings are added here, per token, not to a full-length sequence.
        """
        positions = self.patch_positions() if positions is None else positions
        x = tokens + positions.astype(tokens.dtype)
        x = jnp.concatenate([self.prefix_tokens(tokens.shape[0]).astype(tokens.dtype), x], axis=1)
        x = self.embedding_dropout(x, deterministic=not train)
        return self.encoder(x, deterministic=not train)

    def classify(self, x: jax.Array, train: bool = False, both_heads: bool = False):
        """Encoded tokens -> logits (B, classes) in float32.

        Distilled DeiT: both heads' logits while training (or with ``both_heads``), else their mean (DeiT inference).
        """
        if self.classifier == 'token':
            features = x[:, 0]
        elif self.classifier == 'gap':
            features = jnp.mean(x, axis=1)
        else:  # 'unpooled', 'token_unpooled': one output per token
            features = x
        if self.representation_size:
            features = jnp.tanh(self.pre_logits(features))
        self.sow('intermediates', 'pre_logits', features)
        if not self.num_classes:
            return features
        logits = self.head(features).astype(jnp.float32)
        if not self.distilled:
            return logits
        distillation_logits = self.head_dist(x[:, 1]).astype(jnp.float32)
        if train or both_heads:
            return logits, distillation_logits
        return (logits + distillation_logits) / 2  # DeiT inference: average of the two heads

    def __call__(self, images: jax.Array, train: bool = False):
        return self.classify(self.encode(self.embed(images, train), train), train)


def validate(m: VisionTransformer) -> None:
    """Raises ValueError naming the field and the valid choices for a configuration that cannot work."""

    def choice(field: str, options: tuple):
        value = getattr(m, field)
        if value not in options:
            raise ValueError(f'{field}={value!r} is not one of {options}.')

    choice('classifier', CLASSIFIERS)
    choice('posemb', POSEMBS)
    choice('stem', STEMS)
    choice('tokens_type', TOKENS_TYPES)
    choice('attention_impl', ATTENTION_IMPLS)
    if m.platform not in (PORTABLE, 'cpu', 'tpu', 'rocm') and not re.fullmatch(r'cuda:\d+\.\d+', m.platform):
        raise ValueError(f'platform={m.platform!r} is not one of {PORTABLE!r}, \'cpu\', \'tpu\', \'rocm\' or '
                         f'\'cuda:<compute capability>\' (e.g. \'cuda:9.0\'); vit_jax.hardware.platform_of(mesh) '
                         f'gives the one of a mesh.')
    for field in ('dtype', 'param_dtype'):
        try:
            name = jnp.dtype(getattr(m, field)).name
        except TypeError:
            name = None
        if name not in DTYPES:
            raise ValueError(f'{field}={getattr(m, field)!r} is not one of {DTYPES}.')
    for field in ('image_size', 'patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim'):
        if int(getattr(m, field)) <= 0:
            raise ValueError(f'{field}={getattr(m, field)} must be positive.')
    if m.num_classes < 0:
        raise ValueError(f'num_classes={m.num_classes} must be >= 0 (0 means no head).')
    if m.hidden_size % m.num_heads:
        raise ValueError(f'hidden_size={m.hidden_size} is not divisible by num_heads={m.num_heads}: choose num_heads '
                         f'among the divisors {[h for h in range(1, m.hidden_size + 1) if m.hidden_size % h == 0]}.')
    if m.stem == 't2t':
        if m.patch_size != T2T_STRIDE:
            raise ValueError(f'patch_size={m.patch_size}: T2T-ViT\'s tokens-to-token module has a fixed stride of '
                             f'{T2T_STRIDE}; leave patch_size={T2T_STRIDE}.')
        if m.image_size % T2T_STRIDE:
            raise ValueError(f'image_size={m.image_size} is not divisible by {T2T_STRIDE}, the stride of T2T-ViT\'s '
                             f'tokens-to-token module: use e.g. {max(T2T_STRIDE, m.image_size // T2T_STRIDE * 16)}.')
    else:
        stride = m.stem_stride * m.patch_size
        if m.image_size % stride:
            what = f'patch_size={m.patch_size}' if m.stem == 'patch' else (
                f'the ResNet stride {m.stem_stride} x patch_size={m.patch_size}')
            raise ValueError(f'image_size={m.image_size} is not divisible by {what}: use an image size that is a '
                             f'multiple of {stride} (e.g. {max(stride, m.image_size // stride * stride)}).')
    if m.stem == 'resnet' and not all(int(n) > 0 for n in m.resnet_layers):
        raise ValueError(f'resnet_layers={m.resnet_layers} must be positive block counts, e.g. (3, 4, 9).')
    if m.stem == 'resnet':
        check_width(m.resnet_width)
    if m.distilled and m.classifier != 'token':
        raise ValueError(f'classifier={m.classifier!r}: a distilled model needs classifier="token" (DeiT).')
    if m.posemb == 'sincos2d' and m.hidden_size % 4:
        raise ValueError(f'hidden_size={m.hidden_size} must be a multiple of 4 for posemb="sincos2d".')
    for field in ('dropout_rate', 'attention_dropout_rate', 'drop_path_rate'):
        if not 0.0 <= getattr(m, field) < 1.0:
            raise ValueError(f'{field}={getattr(m, field)} must be in [0, 1).')
