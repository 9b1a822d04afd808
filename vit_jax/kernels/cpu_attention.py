"""Fused softmax attention on CPU: a C++ kernel (``cpu_attention.cc``) called from XLA through its FFI.

XLA:CPU runs attention as separate batched matmuls at 197 x 197 x 64 (ViT-Ti, -S, -B at 224 px), with the (N, N)
scores written to memory between them, at ~35% of this machine's matmul peak; the attention core (q k^T, softmax,
attn v and their backward) took ~30% of ViT-Ti's train step for 14% of its FLOPs. The kernel does each (batch, head)
whole while its scores sit in the core's cache, forward and backward (the backward recomputes the probabilities from
the saved log-sum-exp, as flash attention does), on XLA's own intra-op threads. It takes the qkv projection's output
token-major and packed, (B, N, 3, H, dh), and returns (B, N, H, dh) for the output projection: the projections on
either side are then plain (B N, D) matmuls, and no activation is transposed or sliced on the way.

The library is compiled on first use with the machine's C++ compiler (``g++ -O3 -march=native``, ~5 s) into
``$VIT_JAX_CACHE`` (default ``~/.cache/vit_jax``), keyed by the source, the compiler flags, jaxlib's version and the
CPU, and loaded from there afterwards. Where it cannot be built (no compiler, say), ``available()`` is False with
the reason logged once, and attention takes XLA's path: the kernel is a speed-up, never a requirement.
``VIT_JAX_CPU_ATTENTION=0`` turns it off for the process. Which attention a model runs is its field
``attention_impl`` (``models/encoder.resolve_attention``: 'auto' takes the kernel where ``supports`` says it can,
'cpu_kernel' insists, 'xla' avoids it), which jit caches on. ``xla_attention()`` turns it off for the traces made
within it only (a global, so a function jitted before keeps its trace: the benchmark jits a new one inside it to
count model FLOPs on XLA's path, since XLA's cost analysis cannot see into a custom call); prefer the field.

Sharding: the call is partitioned over its batch and head dimensions (each device runs its own heads) and needs
the tokens and the head dimension whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

SOURCE = pathlib.Path(__file__).with_name('cpu_attention.cc')
FLAGS = ('-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-w')
VECTOR = 16  # floats per vector in the kernel: the head dimension must be a multiple of it

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


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith(('flags', 'Features')):
                return line
    except OSError:
        pass
    return ''


def _library_path(compiler: str) -> pathlib.Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), ' '.join(FLAGS).encode(), compiler.encode(), _jaxlib_version().encode(),
                 _cpu_flags().encode()):
        key.update(part)
    cache = pathlib.Path(os.environ.get('VIT_JAX_CACHE', pathlib.Path.home() / '.cache' / 'vit_jax'))
    return cache / f'cpu_attention-{key.hexdigest()[:16]}.so'


def _jaxlib_version() -> str:
    import jaxlib
    return jaxlib.__version__


def build() -> pathlib.Path:
    """Compiles the kernel library (or finds it compiled) and returns its path; raises RuntimeError if it can't."""
    compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++') or shutil.which('clang++')
    if compiler is None:
        raise RuntimeError('no C++ compiler found (set CXX, or install g++)')
    path = _library_path(compiler)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: processes building at once (pytest-xdist workers) never load half a file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = pathlib.Path(tmp) / path.name
        cmd = [compiler, *FLAGS, f'-I{jax.ffi.include_dir()}', str(SOURCE), '-o', str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f'{" ".join(cmd)} failed:\n{result.stderr[-2000:]}')
        os.replace(out, path)
    return path


@functools.cache
def _registered() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        logging.warning('The fused CPU attention kernel is not available, so attention runs through XLA\'s ops '
                        '(slower on CPU, same results): %s', e)
        return False
    jax.ffi.register_ffi_target('vit_attention_forward', jax.ffi.pycapsule(library.VitAttentionForward),
                                platform='cpu')
    jax.ffi.register_ffi_target('vit_attention_backward', jax.ffi.pycapsule(library.VitAttentionBackward),
                                platform='cpu')
    return True


def available() -> bool:
    """Whether JAX runs on CPU and the kernel is on (``VIT_JAX_CPU_ATTENTION``, ``xla_attention``) and built."""
    return _enabled and jax.default_backend() == 'cpu' and _registered()


def supports(dtype, head_dim: int) -> bool:
    """Whether ``attention`` can take qkv of this dtype and head dimension: float32, a multiple of 16, on CPU."""
    return available() and jnp.dtype(dtype) == jnp.float32 and head_dim % VECTOR == 0


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


def _require_kernel():
    # The FFI targets exist only once the library is loaded: a caller that goes straight to ``attention`` (without
    # ``supports``) loads it here, or learns why it can't.
    if not _registered():
        raise RuntimeError('the fused CPU attention kernel could not be built (see the warning above); call '
                           '`supports(dtype, head_dim)` first and take XLA\'s attention where it is False.')


def _forward_call(scale: float, qkv):
    _require_kernel()
    b, n, _, h, dh = qkv.shape
    return jax.ffi.ffi_call('vit_attention_forward', (jax.ShapeDtypeStruct((b, n, h, dh), qkv.dtype),
                                                      jax.ShapeDtypeStruct((b, h, n), qkv.dtype)))(
        qkv, scale=np.float32(scale))


def _backward_call(scale: float, qkv, o, lse, do):
    _require_kernel()
    return jax.ffi.ffi_call('vit_attention_backward', jax.ShapeDtypeStruct(qkv.shape, qkv.dtype))(
        qkv, o, lse, do, scale=np.float32(scale))


_forward = _partitioned(_forward_call, (QKV,), (OUT, LSE))
_backward = _partitioned(_backward_call, (QKV, OUT, LSE, OUT), (QKV,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def attention(qkv: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v for each head, token-major: float32 qkv (B, N, 3, H, dh) = [q | k | v] with dh a
    multiple of 16 (see ``supports``) -> (B, N, H, dh)."""
    return _forward(scale, qkv)[0]


def _attention_forward(qkv, scale):
    o, lse = _forward(scale, qkv)
    return o, (qkv, o, lse)


def _attention_backward(scale, residuals, do):
    return (_backward(scale, *residuals, do),)


attention.defvjp(_attention_forward, _attention_backward)
