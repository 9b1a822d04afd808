"""Fused softmax attention on CPU: a C++ kernel (``cpu_attention.cc``) called from XLA through its FFI.

XLA:CPU runs attention as separate batched matmuls at 197 x 197 x 64 (ViT-Ti, -S, -B at 224 px), with the (N, N)
scores written to memory between them, at ~35% of this machine's matmul peak; the attention core (q k^T, softmax,
attn v and their backward) took ~30% of ViT-Ti's train step for 14% of its FLOPs. The kernel does each (batch, head)
whole while its scores sit in the core's cache, forward and backward (the backward recomputes the probabilities from
the saved log-sum-exp, as flash attention does), on XLA's own intra-op threads. It takes the qkv projection's output
token-major and packed, (B, N, 3, H, dh), and returns (B, N, H, dh) for the output projection: the projections on
either side are then plain (B N, D) matmuls, and no activation is transposed or sliced on the way.

The library is compiled on first use with the machine's C++ compiler (``g++ -O3 -march=native``, ~5 s) into
``$VIT_JAX_CACHE`` (default ``~/.cache/vit_jax``) and loaded from there afterwards (``kernels/build.py``). Where it
cannot be built (no compiler, say), ``available()`` is False with the reason logged once, and attention takes XLA's
path: the kernel is a speed-up, never a requirement.
``VIT_JAX_CPU_ATTENTION=0`` turns it off for the process. Which attention a model runs is its field
``attention_impl`` (``models/encoder.resolve_attention``: 'auto' takes the kernel where ``supports`` says it can
and, at shapes large enough to measure, where it ran faster than XLA's attention here (``faster_than_xla``),
'cpu_kernel' insists, 'xla' avoids it), which jit caches on. ``xla_attention()`` turns it off for the traces made
within it only (a global, so a function jitted before keeps its trace: the benchmark jits a new one inside it to
count model FLOPs on XLA's path, since XLA's cost analysis cannot see into a custom call); prefer the field.

It runs in float32 or bfloat16, a model's dtype. In bf16, q, k, v, the output and the gradients are bf16 and the
scores, softmax and matmul accumulations fp32: the matmuls take pairs of bf16 per fp32 multiply-add (AVX512-BF16's
vdpbf16ps where the CPU has it, else the same sum widened to fp32), twice the FLOPs per instruction and half the
bytes of fp32.

Its matmuls (q k^T, p v and the backward's) are register-blocked kernels of its own; where MKL is installed a second
build runs them through ``cblas_sgemm`` (bf16: ``cblas_gemm_bf16bf16f32``, AMX where the CPU has it) instead, and
each call takes whichever ran faster here at its shape and dtype (measured at first use and cached, as
``kernels/cpu_gemm`` does for the projections; ``VIT_JAX_CPU_GEMM=xla`` keeps the kernel's own, ``=mkl`` the MKL
build).

Sharding: the call is partitioned over its batch and head dimensions (each device runs its own heads) and needs
the tokens and the head dimension whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import timing
from vit_jax.kernels.build import compile_library

SOURCE = pathlib.Path(__file__).with_name('cpu_attention.cc')
VECTOR = 16  # floats per vector in the kernel: the head dimension must be a multiple of it
DTYPES = ('float32', 'bfloat16')  # what it computes in
# Calls of fewer FLOPs (4 B H N^2 dh) take the kernel's own matmuls unmeasured: on an AVX2 EPYC MKL's build already
# ran ViT-Ti's attention at batch 1 (30 MFLOP) 2.5-3x faster, so the bar is lower than the projections'.
MIN_FLOPS = 2 ** 24

_enabled = os.environ.get('VIT_JAX_CPU_ATTENTION', '1') != '0'


@contextlib.contextmanager
def xla_attention():
    """Within it, models trace attention through XLA's ops instead of the kernel (for FLOP counts, A/B timing)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


def build() -> pathlib.Path:
    """Compiles the kernel library (or finds it compiled) and returns its path; raises RuntimeError if it can't."""
    return compile_library(SOURCE)


@functools.cache
def _registered() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        logging.warning('The fused CPU attention kernel is not available, so attention runs through XLA\'s ops '
                        '(slower on CPU, same results): %s', e)
        return False
    _register(library, '')
    return True


def _register(library, variant: str):
    # Each direction and dtype's handler (VitAttentionForward, VitAttentionForwardBF16, ...) under its target name.
    for direction in ('forward', 'backward'):
        for dtype, suffix in (('float32', ''), ('bfloat16', 'BF16')):
            symbol = getattr(library, f'VitAttention{direction.capitalize()}{suffix}')
            jax.ffi.register_ffi_target(_target(direction, dtype, variant), jax.ffi.pycapsule(symbol), platform='cpu')


def _target(direction: str, dtype, variant: str) -> str:
    """The FFI target's name: vit_attention_forward, vit_attention_backward_bf16_mkl, ..."""
    return f'vit_attention_{direction}{"_bf16" if jnp.dtype(dtype) == jnp.bfloat16 else ""}{variant}'


def available() -> bool:
    """Whether the kernel is on (``VIT_JAX_CPU_ATTENTION``, ``xla_attention``) and built. Only a model compiled for
    the CPU asks (its ``platform``, from the mesh: ``vit_jax.hardware``), whatever the host process runs on."""
    return _enabled and _registered()


def supports(dtype, head_dim: int) -> bool:
    """Whether ``attention`` can take qkv of this dtype and head dimension: float32 or bfloat16, a multiple of 16,
    with the kernel built."""
    return available() and jnp.dtype(dtype).name in DTYPES and head_dim % VECTOR == 0


# The FFI calls, each partitioned over batch and heads: whatever the partitioner gives those two dimensions, the
# tokens and head dimension are gathered whole and every device runs the kernel on its own (batch, head) slices.
# Each operand and result is named by its layout, in the letters of the sharding rules.
QKV, OUT, LSE = 'bnthd', 'bnhd', 'bhn'


def _heads_sharding(qkv_sharding, layout: str):
    """qkv's sharding of batch and heads, carried over to an array of the given layout; all else replicated."""
    spec = tuple(qkv_sharding.spec) + (None,) * len(QKV)
    by_axis = {axis: spec[QKV.index(axis)] for axis in 'bh'}
    return NamedSharding(qkv_sharding.mesh, P(*(by_axis.get(axis) for axis in layout)))


def _partitioned(fn, args: tuple[str, ...], results: tuple[str, ...]):
    wrapped = custom_partitioning(fn, static_argnums=(0,))

    def infer(scale, mesh, arg_shapes, result_shape):
        shardings = tuple(_heads_sharding(arg_shapes[0].sharding, layout) for layout in results)
        return shardings if len(shardings) > 1 else shardings[0]

    def partition(scale, mesh, arg_shapes, result_shape):
        arg_shardings = tuple(_heads_sharding(arg_shapes[0].sharding, layout) for layout in args)
        return mesh, functools.partial(fn, scale), infer(scale, mesh, arg_shapes, result_shape), arg_shardings

    rule = ', '.join(' '.join(layout) for layout in args) + ' -> ' + ', '.join(' '.join(layout) for layout in results)
    wrapped.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                          need_replication_factors=('n', 't', 'd'))
    return wrapped


@functools.cache
def _blas_registered() -> bool:
    """The kernel's MKL variant (its matmuls through cblas_sgemm), where MKL is installed."""
    from vit_jax.kernels import cpu_gemm
    mkl = cpu_gemm.mkl_libraries()
    if mkl is None:
        return False  # cpu_gemm says so, once
    try:
        library = ctypes.cdll.LoadLibrary(str(compile_library(SOURCE, link=cpu_gemm.mkl_link(mkl),
                                                              defines=('VIT_ATTENTION_BLAS',), variant='mkl')))
    except (RuntimeError, OSError) as e:
        logging.warning('The CPU attention kernel\'s MKL variant is not available, so its own matmuls run: %s', e)
        return False
    _register(library, '_mkl')
    return True


def _time_variants(direction: str, shape: tuple[int, ...], dtype: str, rounds: int = 5) -> dict[str, float]:
    """Best seconds of the kernel's own matmuls and of its MKL variant, one direction at one qkv shape and dtype,
    in turns."""
    qkv = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype)
    o, lse = jax.jit(functools.partial(_forward_ffi, '', 0.125))(qkv)
    call = _forward_ffi if direction == 'forward' else _backward_ffi
    calls = {name: jax.jit(functools.partial(call, variant, 0.125)) for name, variant in (('kernel', ''), ('mkl', '_mkl'))}
    args = (qkv,) if direction == 'forward' else (qkv, o, lse, o)
    times = timing.round_robin_seconds({name: lambda fn=fn: jax.block_until_ready(fn(*args))
                                        for name, fn in calls.items()}, warmup=1, rounds=rounds)
    return {name: min(t) for name, t in times.items()}


def _variant(direction: str, shape: tuple[int, ...], dtype) -> str:
    """'_mkl' where the MKL variant ran this call faster here (measured once, cached: kernels/choices.py), else ''.
    ``VIT_JAX_CPU_GEMM`` rules it as it does the projections: xla never takes MKL, mkl always."""
    from vit_jax.kernels import choices, cpu_gemm
    mode = cpu_gemm.mode()
    if mode == 'xla' or not _blas_registered():
        return ''
    if mode == 'mkl':
        return '_mkl'
    b, n, _, h, dh = shape
    if 4 * b * h * n * n * dh < MIN_FLOPS:
        return ''
    dtype = jnp.dtype(dtype).name
    key = f'{direction} {b}x{n}x3x{h}x{dh}' + ('' if dtype == 'float32' else f' {dtype}')
    timer = functools.partial(_time_variants, direction, tuple(shape), dtype)
    choice = choices.choose('cpu_attention', key, timer, default='kernel',
                            parts=(*cpu_gemm.mkl_key(), SOURCE.read_text()))
    return '_mkl' if choice == 'mkl' else ''


def _time_against_xla(batch: int, tokens: int, heads: int, head_dim: int, dtype: str = 'float32',
                      rounds: int = 5) -> dict[str, float]:
    """Best seconds of attention's forward and backward through the kernel (its faster build) and through XLA's
    batched matmuls (head-major, as the model runs them without the kernel), in turns, in the model's dtype."""
    from vit_jax.models.encoder import softmax_attention
    rng = np.random.default_rng(0)
    qkv = jnp.asarray(rng.standard_normal((batch, tokens, 3, heads, head_dim)), dtype)
    heads_first = jnp.asarray(rng.standard_normal((3, batch, heads, tokens, head_dim)), dtype)
    scale = head_dim ** -0.5

    def train(fn, x):
        out, vjp = jax.vjp(fn, x)
        return vjp(out)[0]

    calls = {'kernel': (jax.jit(functools.partial(train, lambda x: attention(x, scale))), qkv),
             'xla': (jax.jit(functools.partial(train, lambda x: softmax_attention(*x, scale))), heads_first)}
    times = timing.round_robin_seconds({name: lambda fn=fn, x=x: jax.block_until_ready(fn(x))
                                        for name, (fn, x) in calls.items()}, warmup=1, rounds=rounds)
    return {name: min(t) for name, t in times.items()}


def faster_than_xla(batch: int, tokens: int, heads: int, head_dim: int, dtype='float32') -> bool:
    """Whether the kernel (forward and backward) ran faster here than XLA's attention at this shape and model dtype
    (float32 or bfloat16): measured once per machine and cached (kernels/choices.py); calls too small to measure
    keep the kernel."""
    from vit_jax.kernels import choices, cpu_gemm
    if 4 * batch * heads * tokens * tokens * head_dim < MIN_FLOPS:
        return True
    dtype = jnp.dtype(dtype).name
    timer = functools.partial(_time_against_xla, batch, tokens, heads, head_dim, dtype)
    key = f'{dtype} {batch}x{tokens}x{heads}x{head_dim} {cpu_gemm.mode()}'
    return choices.choose('cpu_attention_vs_xla', key, timer, default='kernel',
                          parts=(*cpu_gemm.mkl_key(), SOURCE.read_text())) == 'kernel'


def _require_kernel():
    # The FFI targets exist only once the library is loaded: a caller that goes straight to ``attention`` (without
    # ``supports``) loads it here, or learns why it can't.
    if not _registered():
        raise RuntimeError('the fused CPU attention kernel could not be built (see the warning above); call '
                           '`supports(dtype, head_dim)` first and take XLA\'s attention where it is False.')


def _forward_ffi(variant: str, scale: float, qkv):
    _require_kernel()
    b, n, _, h, dh = qkv.shape
    return jax.ffi.ffi_call(_target('forward', qkv.dtype, variant), (jax.ShapeDtypeStruct((b, n, h, dh), qkv.dtype),
                                     jax.ShapeDtypeStruct((b, h, n), jnp.float32)))(qkv, scale=np.float32(scale))


def _backward_ffi(variant: str, scale: float, qkv, o, lse, do):
    _require_kernel()
    return jax.ffi.ffi_call(_target('backward', qkv.dtype, variant), jax.ShapeDtypeStruct(qkv.shape, qkv.dtype))(
        qkv, o, lse, do, scale=np.float32(scale))


# What the partitioner calls on each device's slices: the build measured faster at that (local) shape and dtype.
def _forward_call(scale: float, qkv):
    return _forward_ffi(_variant('forward', qkv.shape, qkv.dtype), scale, qkv)


def _backward_call(scale: float, qkv, o, lse, do):
    return _backward_ffi(_variant('backward', qkv.shape, qkv.dtype), scale, qkv, o, lse, do)


_forward = _partitioned(_forward_call, (QKV,), (OUT, LSE))
_backward = _partitioned(_backward_call, (QKV, OUT, LSE, OUT), (QKV,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attention(qkv: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v for each head, token-major: qkv (B, N, 3, H, dh) = [q | k | v], float32 or
    bfloat16, with dh a multiple of 16 (see ``supports``) -> (B, N, H, dh) in qkv's dtype. In bf16 the scores,
    softmax and every matmul's accumulation are fp32; the probabilities and their gradient are rounded to bf16 for
    the matmuls that take them, as XLA's bf16 attention (``encoder.softmax_attention``) does."""
    return _forward(scale, qkv)[0]


def _attention_forward(qkv, scale):
    o, lse = _forward(scale, qkv)
    return o, (qkv, o, lse)


def _attention_backward(scale, residuals, do):
    return (_backward(scale, *residuals, do),)


attention.defvjp(_attention_forward, _attention_backward)

