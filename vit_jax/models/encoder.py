"""The Transformer encoder shared by every family (ViT paper, section 3.1 and eq. 2-4).

A pre-norm block: ``x = x + MSA(LN(x))``, ``x = x + MLP(LN(x))``, then a final LayerNorm. Each family feeds it its
own tokens (patches, ResNet features, tokens-to-token output) and keeps its own quirks as fields: the GELU variant,
the LayerNorm epsilon and whether the qkv projection has a bias.

Parameter names are stable (loaders and exporters depend on them)::

    encoder/block_{i}/norm1/{scale,bias}
    encoder/block_{i}/attn/qkv/{kernel (D, 3, H, D/H), bias (3, H, D/H)}     # [q | k | v], head-major
    encoder/block_{i}/attn/out/{kernel (H, D/H, D), bias (D,)}
    encoder/block_{i}/norm2/{scale,bias}
    encoder/block_{i}/mlp/{fc1,fc2}/{kernel,bias}
    encoder/norm/{scale,bias}

With ``scan_layers=True`` the blocks live under ``encoder/blocks`` with a leading layer axis instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.kernels import cpu_attention, cpu_gemm

Dtype = Any

# What a model is compiled for (its ``platform`` field, set from the mesh's devices by ``vit_jax.hardware``): 'cpu',
# 'tpu', 'cuda:<compute capability>' ('cuda:9.0' for an H100), 'rocm', or 'portable' (XLA's own ops only, for any
# platform: what a model built without a mesh gets).
PORTABLE = 'portable'

# Initialisers of google-research/vision_transformer, which trained the public checkpoints.
dense_kernel_init = nn.initializers.xavier_uniform()
dense_bias_init = nn.initializers.normal(stddev=1e-6)


def qkv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """Xavier-uniform for q, k and v separately, as the original's three (D, D) projections (not one (D, 3D))."""
    d, three = shape[0], shape[1]  # (D, 3, H, dh)
    keys = jax.random.split(key, three)
    parts = [dense_kernel_init(k, (d, math.prod(shape[2:])), dtype).reshape(d, *shape[2:]) for k in keys]
    return jnp.stack(parts, axis=1)


def token_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None, *, cpu: bool = False) -> jax.Array:
    """``lax.dot_general`` for a projection of tokens, with the lhs's leading (batch, token) dims merged into one.

    The numbers are the same; the backward pass is not. Differentiating a projection of (B, N, D) activations gives a
    weight gradient contracting over both B and N, which XLA:CPU runs through a transposed copy of the output
    gradient; over one merged (B N) dimension it is a plain matmul. ViT-Ti's weight gradients took 0.30 s of a 1.0 s
    train step before and 0.21 s after (~86% of the matmul peak), and the step went 4-8% faster (paired rounds).
    On CPU the merged (B N, K) x (K, N') product and its two gradients each run through MKL where the machine ran it
    faster than XLA's dot (``kernels/cpu_gemm``: measured per shape, off with ``VIT_JAX_CPU_GEMM=xla``).
    Passed to ``nn.Dense`` / ``nn.DenseGeneral`` as their ``dot_general``; any other contraction goes to lax as is.
    ``cpu``: whether the product may leave XLA's plain dot for ``cpu_gemm.matmul`` at all: True only in a model
    compiled for the CPU (``platform='cpu'``), so that a program for a GPU or TPU holds no CPU call.
    """
    (lhs_contract, rhs_contract), batch = dimension_numbers
    lead = lhs.ndim - len(lhs_contract)
    if batch != ((), ()) or lead < 2:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    if cpu and precision is None and preferred_element_type is None and \
            tuple(rhs_contract) == tuple(range(len(rhs_contract))):
        # Contracted dims moved last (a head-major attention output, (B, H, N, dh) over H and dh): a transpose,
        # taken only where MKL then runs the product.
        free = [i for i in range(lhs.ndim) if i not in lhs_contract]
        tokens = lhs.transpose(*free, *lhs_contract) if list(lhs_contract) != list(range(lead, lhs.ndim)) else lhs
        depth = math.prod(tokens.shape[lead:])
        y = cpu_gemm.matmul(tokens.reshape(-1, depth), rhs.reshape(depth, -1))
        if y is not None:
            return y.reshape(*tokens.shape[:lead], *rhs.shape[len(rhs_contract):])
    if tuple(lhs_contract) != tuple(range(lead, lhs.ndim)):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    flat = lhs.reshape(-1, *lhs.shape[lead:])
    y = jax.lax.dot_general(flat, rhs, ((tuple(range(1, flat.ndim)), tuple(rhs_contract)), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
    return y.reshape(*lhs.shape[:lead], *y.shape[1:])


def bias_add(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y + bias over y's trailing dims, in y's dtype.

    Where y is of a lower precision than the bias (bf16 activations, fp32 parameters) the bias's gradient, the sum of
    the output gradient over every token, is accumulated in fp32 and kept so (``_bias_add``). Autodiff of
    ``y + bias.astype(y.dtype)`` sums in bf16 instead, and XLA:CPU ran that sum as a tree of windowed reductions
    over an fp32 copy of the gradient: a bf16 ViT-S train step took 4.05 s that way and 3.66 s with this (medians of six
    alternating runs, benchmarks/README.md).
    """
    if y.dtype == bias.dtype or y.shape[y.ndim - bias.ndim:] != bias.shape:
        return y + bias.astype(y.dtype)
    return _bias_add(y, bias)


@jax.custom_vjp
def _bias_add(y, bias):
    return y + bias.astype(y.dtype)


def _bias_add_forward(y, bias):
    return _bias_add(y, bias), bias


def _bias_add_backward(bias, dy):
    rows = dy.reshape(-1, bias.size)  # the tokens in one dimension: a plain column sum
    return dy, jnp.sum(rows, axis=0, dtype=jnp.float32).reshape(bias.shape).astype(bias.dtype)


_bias_add.defvjp(_bias_add_forward, _bias_add_backward)


def dot_general_for(platform: str):
    """``token_dot_general`` for a model compiled for ``platform``."""
    return functools.partial(token_dot_general, cpu=platform == 'cpu')


class TokenDense(nn.Module):
    """A projection of tokens: flax's ``DenseGeneral`` over ``axis`` (its parameters, names and initialisation)
    through ``token_dot_general`` (its CPU products only where ``platform`` is 'cpu'), with its bias added by
    ``bias_add``."""

    features: int
    axis: int | tuple[int, ...] = -1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = dense_kernel_init
    bias_init: Any = dense_bias_init
    platform: str = PORTABLE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # The kernel is DenseGeneral's own, in this module's scope: 'kernel' and 'bias' side by side as before.
        general = nn.DenseGeneral(self.features, axis=self.axis, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                                  dot_general=dot_general_for(self.platform))
        nn.share_scope(self, general)
        y = general(x)
        if not self.use_bias:
            return y
        return bias_add(y, self.param('bias', self.bias_init, (self.features,), self.param_dtype))


# The sharding of the tokens between blocks while the training system traces a step (``sharding.batch_sharding``:
# the batch split over data x fsdp, the rest whole), so that fsdp gathers parameters, not activations; None (a model
# applied on its own): no constraint.
_token_sharding: contextvars.ContextVar = contextvars.ContextVar('token_sharding', default=None)


@contextlib.contextmanager
def token_sharding(sharding):
    """Within it, every block's input and output tokens are constrained to ``sharding``."""
    reset = _token_sharding.set(sharding)
    try:
        yield
    finally:
        _token_sharding.reset(reset)


def constrain_tokens(x: jax.Array) -> jax.Array:
    sharding = _token_sharding.get()
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def partitioned(init, names: tuple[str | None, ...]):
    """Attaches logical axis names to an initialiser, so the train step can shard the parameter by rules."""
    return nn.with_logical_partitioning(init, names)


def drop_path(x: jax.Array, rate: float | jax.Array, rng: jax.Array) -> jax.Array:
    """Stochastic depth (Huang et al. 2016): drops a whole residual branch per example and rescales the survivors.

    ``rate`` may be a traced scalar (the scanned encoder feeds each layer its own rate).
    """
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dropout -> Dense -> Dropout."""

    mlp_dim: int
    dropout_rate: float = 0.0
    gelu_approximate: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    platform: str = PORTABLE

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        dense = functools.partial(TokenDense, dtype=self.dtype, param_dtype=self.param_dtype, platform=self.platform)
        x = dense(self.mlp_dim, name='fc1',
                  kernel_init=partitioned(dense_kernel_init, ('embed', 'mlp')),
                  bias_init=partitioned(dense_bias_init, ('mlp',)))(x)
        # In fp32 whatever the dtype: XLA:CPU ran a bf16 GELU's fwd + bwd ~4x slower than the same in fp32 and rounded.
        x = nn.gelu(x.astype(jnp.float32), approximate=self.gelu_approximate).astype(self.dtype)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = dense(d, name='fc2',
                  kernel_init=partitioned(dense_kernel_init, ('mlp', 'embed')),
                  bias_init=partitioned(dense_bias_init, ('embed',)))(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'cpu_kernel')
CUDNN_DTYPES = ('bfloat16', 'float16')
# cuDNN's fused attention gradient refuses token counts such as 197 (every ViT/DeiT with a class token at 224 px):
# the tokens are padded to a multiple of this, the padded keys masked and the padded queries dropped
# (``padded_attention``).
CUDNN_TOKEN_MULTIPLE = 8


def compute_capability(platform: str) -> float:
    """The GPU compute capability in a platform name 'cuda:9.0' (0.0 for any other platform)."""
    name, _, capability = platform.partition(':')
    return float(capability) if name == 'cuda' and capability else 0.0


def _cudnn_supports(dtype, head_dim: int, platform: str) -> bool:
    """cuDNN flash attention's conditions (jax's ``check_is_flash_attention``): bf16 / fp16, head dim a multiple of 8
    and <= 128 (256 from Hopper on), a GPU of compute capability >= 8.0 (Ampere)."""
    capability = compute_capability(platform)
    if capability < 8.0 or jnp.dtype(dtype).name not in CUDNN_DTYPES or head_dim % 8:
        return False
    return head_dim <= (256 if capability >= 9.0 else 128)


def resolve_attention(impl: str, dtype, head_dim: int, shape: tuple[int, int, int] | None = None,
                      platform: str = PORTABLE) -> str:
    """``attention_impl`` -> what runs in a model compiled for ``platform`` (``vit_jax.hardware``: the devices of the
    mesh, never the host process): 'auto' is cuDNN's flash attention on a GPU where the dtype and head size allow,
    the C++ kernel on CPU in float32 or bfloat16 (given the (batch, tokens, heads) ``shape``, only where it ran
    faster than XLA's attention on this machine: ``cpu_attention.faster_than_xla``), XLA's attention otherwise (a TPU,
    fp32 on a GPU, a 'portable' model); an explicit choice that cannot run there raises, naming why."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f'attention_impl={impl!r} is not one of {ATTENTION_IMPLS}.')
    on_cpu = platform == 'cpu'
    if impl == 'auto':
        if _cudnn_supports(dtype, head_dim, platform):
            return 'cudnn'
        kernel = on_cpu and cpu_attention.supports(dtype, head_dim) and (
            shape is None or cpu_attention.faster_than_xla(*shape, head_dim, dtype))
        return 'cpu_kernel' if kernel else 'xla'
    if impl == 'cudnn' and not _cudnn_supports(dtype, head_dim, platform):
        raise ValueError(f'attention_impl=\'cudnn\' needs a GPU of compute capability >= 8.0 and dtype in '
                         f'{CUDNN_DTYPES} with a head dimension that is a multiple of 8 (<= 128, or 256 on Hopper); '
                         f'here: platform {platform}, dtype {jnp.dtype(dtype).name}, head dim {head_dim}. '
                         f'Use attention_impl=\'auto\' (it falls back to XLA\'s attention) or model.dtype=bfloat16.')
    if impl == 'cpu_kernel' and not (on_cpu and cpu_attention.supports(dtype, head_dim)):
        raise ValueError(f'attention_impl=\'cpu_kernel\' needs the CPU platform, float32 or bfloat16 and a head '
                         f'dimension that is a multiple of {cpu_attention.VECTOR}, with the kernel built; here: '
                         f'platform {platform}, dtype {jnp.dtype(dtype).name}, head dim {head_dim}. Use '
                         f'attention_impl=\'auto\'.')
    return impl


def padded_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, implementation: str | None,
                     multiple: int = CUDNN_TOKEN_MULTIPLE) -> jax.Array:
    """``jax.nn.dot_product_attention`` of token-major q, k, v (B, N, H, dh) with the tokens padded to a multiple of
    ``multiple``: the padded keys are masked (``key_value_seq_lengths``; ``query_seq_lengths`` too, which cuDNN's
    padding mask takes) and the padded queries' outputs dropped, so the result and its gradients are those of the
    unpadded attention. cuDNN's fused backward takes the padded lengths where it refuses 197, 257 or 577."""
    n = q.shape[1]
    padded = -(-n // multiple) * multiple
    if padded == n:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    widths = ((0, 0), (0, padded - n), (0, 0), (0, 0))
    q, k, v = (jnp.pad(t, widths) for t in (q, k, v))
    lengths = jnp.full((q.shape[0],), n, jnp.int32)
    y = jax.nn.dot_product_attention(q, k, v, scale=scale, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                     implementation=implementation)
    return y[:, :n]


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v for q, k, v of shape (B, H, N, dh); returns (B, H, N, dh).

    The softmax is normalised after the value matmul (exp(s - max) v / sum exp(s - max)): the same numbers, but
    the (N, N) probabilities are never divided or stored normalised, which makes the backward pass on CPU ~30%
    cheaper than ``jax.nn.dot_product_attention``'s (measured at ViT-Ti shapes, fwd + bwd).
    """
    logits = jnp.einsum('bhqd,bhkd->bhqk', q * jnp.asarray(scale, q.dtype), k).astype(jnp.float32)
    e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum('bhqk,bhkd->bhqd', e.astype(v.dtype), v)
    return out / jnp.sum(e, axis=-1, keepdims=True).astype(out.dtype)


class QKVProjection(nn.Module):
    """x (B, N, D) -> [q | k | v] with one kernel (D, 3, H, dh) and bias (3, H, dh), in one of two layouts.

    Token-major (the default): one array qkv (B, N, 3, H, dh), a plain (B N, D) x (D, 3 D) matmul, as the fused
    attention kernels take it. Head-major: q, k, v (B, H, N, dh) each, which XLA's own batched attention matmuls
    want (it would transpose token-major ones itself, at a higher cost).
    """

    num_heads: int
    use_bias: bool = True
    head_major: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    platform: str = PORTABLE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array, jax.Array]:
        d = x.shape[-1]
        shape = (d, 3, self.num_heads, d // self.num_heads)
        kernel = self.param('kernel', partitioned(qkv_kernel_init, ('embed', None, 'heads', 'kv')), shape,
                            self.param_dtype)
        if self.head_major:
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
            # Token-major through MKL and then transposed, where MKL takes the product (kernels/cpu_gemm).
            flat = cpu_gemm.matmul(x.reshape(-1, d), kernel.reshape(d, -1)) if self.platform == 'cpu' else None
            if flat is None:
                qkv = jnp.einsum('bnd,dthk->tbhnk', x, kernel)
            else:
                qkv = flat.reshape(*x.shape[:2], *shape[1:]).transpose(2, 0, 3, 1, 4)
            bias_shape = (3, 1, self.num_heads, 1, shape[3])
        else:
            qkv = dot_general_for(self.platform)(x.astype(self.dtype), kernel.astype(self.dtype),
                                                 (((2,), (0,)), ((), ())))
            bias_shape = shape[1:]
        if self.use_bias:
            bias = self.param('bias', partitioned(dense_bias_init, (None, 'heads', 'kv')), shape[1:],
                              self.param_dtype)
            qkv = bias_add(qkv, bias.reshape(bias_shape))
        return (qkv[0], qkv[1], qkv[2]) if self.head_major else qkv


class MultiHeadSelfAttention(nn.Module):
    """softmax(q k^T / sqrt(d_head)) v over all heads, with one fused qkv projection.

    The fused ``qkv`` kernel (D, 3, H, dh) makes one matmul instead of three. ``attention_impl`` picks the kernel
    (``resolve_attention``): 'cudnn' is ``jax.nn.dot_product_attention(implementation='cudnn')``, cuDNN's flash
    attention (``implementation=None`` would run XLA's in this jax); 'cpu_kernel' the fused C++ kernel of
    ``vit_jax.kernels.cpu_attention`` (float32 or bfloat16, head dimension a multiple of 16). Both take q, k, v
    token-major (B, N, H, dh) and give the output so, and the projections on either side are plain matmuls; cuDNN's
    call pads the tokens to a length its backward takes (``padded_attention``). 'xla' is
    ``jax.nn.dot_product_attention(implementation='xla')`` on GPU / TPU, and on CPU XLA's own batched matmuls,
    head-major (``softmax_attention``). Which of them 'auto' is depends on ``platform``, the devices the model is
    compiled for (``vit_jax.hardware``), never on the process that traces it. A field, not a global: jit caches on
    the module. The explicit-softmax path, head-major too, is taken when it is needed: attention dropout while
    training, or when the caller asks for the attention maps by making the ``'attention_weights'`` collection mutable
    (``model.apply(..., mutable=['attention_weights'])``).
    """

    num_heads: int
    qkv_bias: bool = True
    attention_dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = 'auto'
    platform: str = PORTABLE

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        h = self.num_heads
        dh = d // h
        scale = dh ** -0.5
        explicit = (not deterministic and self.attention_dropout_rate > 0.0) or self.is_mutable_collection(
            'attention_weights')
        impl = resolve_attention(self.attention_impl, self.dtype, dh, (x.shape[0], x.shape[1], h), self.platform)
        head_major = explicit or (impl == 'xla' and self.platform == 'cpu')
        qkv = QKVProjection(h, self.qkv_bias, head_major, self.dtype, self.param_dtype, self.platform, name='qkv')(x)
        if explicit:
            q, k, v = qkv  # (B, H, N, dh)
            logits = jnp.einsum('bhqd,bhkd->bhqk', q * jnp.asarray(scale, q.dtype), k)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
            self.sow('attention_weights', 'weights', weights)
            weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=deterministic)
            y = jnp.einsum('bhqk,bhkd->bhqd', weights.astype(v.dtype), v)
        elif head_major:
            y = softmax_attention(*qkv, scale)  # (B, H, N, dh)
        elif impl == 'cpu_kernel':
            y = cpu_attention.attention(qkv, scale)  # (B, N, H, dh)
        elif impl == 'cudnn':
            y = padded_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale, impl)
        else:
            y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=scale,
                                             implementation=impl)
        # The output projection contracts heads and head dims in whichever layout attention gave: a head-major
        # output written token-major first would cost a transpose of every activation (on CPU ~40% of the attention
        # block's fwd + bwd time at ViT-Ti shapes, through XLA's ops).
        return TokenDense(d, axis=(1, 3) if head_major else (2, 3), name='out', dtype=self.dtype,
                          param_dtype=self.param_dtype, platform=self.platform,
                          kernel_init=partitioned(dense_kernel_init, ('heads', 'kv', 'embed')),
                          bias_init=partitioned(dense_bias_init, ('embed',)))(y)


class EncoderBlock(nn.Module):
    """One pre-norm Transformer block (ViT eq. 2-3), with dropout and stochastic depth on both branches."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    gelu_approximate: bool = True
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = 'auto'
    platform: str = PORTABLE

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, drop_path_rate: float | jax.Array | None = None):
        # The field is this block's rate; a scanned encoder sets it to the largest rate (so that it is static and
        # nonzero exactly when stochastic depth is on) and passes each layer's own rate as ``drop_path_rate``.
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        stochastic_depth = not deterministic and self.drop_path_rate > 0.0
        norm = functools.partial(layer_norm, self.layer_norm_eps, self.dtype, self.param_dtype)
        x = constrain_tokens(x)

        y = norm('norm1')(x)
        y = MultiHeadSelfAttention(self.num_heads, self.qkv_bias, self.attention_dropout_rate,
                                   self.dtype, self.param_dtype, self.attention_impl, self.platform,
                                   name='attn')(y, deterministic)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
        if stochastic_depth:
            y = drop_path(y, rate, self.make_rng('dropout'))
        x = x + y

        y = norm('norm2')(x)
        y = MlpBlock(self.mlp_dim, self.dropout_rate, self.gelu_approximate, self.dtype, self.param_dtype,
                     self.platform, name='mlp')(y, deterministic)
        if stochastic_depth:
            y = drop_path(y, rate, self.make_rng('dropout'))
        x = constrain_tokens(x + y)
        self.sow('intermediates', 'tokens', x)
        return x


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm with logical axis names on its parameters (statistics are computed in float32)."""
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=partitioned(nn.initializers.ones, ('embed',)),
                        bias_init=partitioned(nn.initializers.zeros, ('embed',)))


class _ScannedBlock(EncoderBlock):
    """EncoderBlock with the ``(carry, x) -> (carry, y)`` signature of ``nn.scan``; x is this layer's drop-path rate."""

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array, deterministic: bool):  # type: ignore[override]
        return super().__call__(x, deterministic, rate), None


class Encoder(nn.Module):
    """A stack of ``num_layers`` EncoderBlocks and the final LayerNorm.

    Stochastic depth follows the linear rule of Huang et al. (as in DeiT / timm): block i drops its residual branches
    with probability ``drop_path_rate * i / (num_layers - 1)``. ``scan_layers`` compiles one block and loops over
    stacked parameters (compile time independent of depth); ``remat`` recomputes each block's activations in the
    backward pass instead of storing them.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    drop_path_rate: float = 0.0
    qkv_bias: bool = True
    gelu_approximate: bool = True
    layer_norm_eps: float = 1e-6
    scan_layers: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = 'auto'
    platform: str = PORTABLE

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        block_kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                            attention_dropout_rate=self.attention_dropout_rate, qkv_bias=self.qkv_bias,
                            gelu_approximate=self.gelu_approximate, layer_norm_eps=self.layer_norm_eps,
                            dtype=self.dtype, param_dtype=self.param_dtype, attention_impl=self.attention_impl,
                            platform=self.platform)
        rates = [self.drop_path_rate * i / max(self.num_layers - 1, 1) for i in range(self.num_layers)]
        if self.scan_layers:
            block_cls = _ScannedBlock
            if self.remat:
                block_cls = nn.remat(block_cls, static_argnums=(3,), prevent_cse=False)
            scanned = nn.scan(block_cls, variable_axes={'params': 0, 'intermediates': 0, 'attention_weights': 0},
                              split_rngs={'params': True, 'dropout': True}, in_axes=(0, nn.broadcast),
                              length=self.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
            x, _ = scanned(drop_path_rate=self.drop_path_rate, name='blocks', **block_kwargs)(
                x, jnp.asarray(rates, jnp.float32), deterministic)
        else:
            block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.remat else EncoderBlock
            for i in range(self.num_layers):
                x = block_cls(drop_path_rate=rates[i], name=f'block_{i}', **block_kwargs)(x, deterministic)
        return layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, 'norm')(x)
