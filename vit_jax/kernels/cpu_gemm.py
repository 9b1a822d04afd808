"""Projections of tokens on CPU through Intel MKL where it is faster than XLA's own dot: chosen by measuring.

XLA:CPU's dot is not equally fast on every CPU: on an Intel Xeon it ran ViT-Ti's projections at ~40% of the fp32
matmul peak where MKL ran them at the peak, and it never uses AMX for bf16. ``matmul(x, w)`` (a (M, K) x (K, N)
projection, as ``models/encoder.token_dot_general`` merges every projection of tokens into) runs each of its three
products (forward, input gradient, weight gradient) through MKL (``cblas_sgemm``; bf16 through
``cblas_gemm_bf16bf16f32``, fp32 accumulation, AMX where the CPU has it) or through XLA's dot, whichever the machine
ran faster at that shape and dtype. The choice is measured at first use (both timed in turns on random operands) and
cached in ``$VIT_JAX_CACHE`` per CPU, MKL and jax (``kernels/choices.py``), never taken from a list of vendors. Products under ``MIN_FLOPS`` take XLA's dot unmeasured: there the call's
overhead decides, and tiny test models keep XLA's exact numbers.

``VIT_JAX_CPU_GEMM`` sets the choice for the process: ``auto`` (the default, measured), ``xla`` (never MKL) or
``mkl`` (MKL for every product it can take: for parity tests). Without MKL (``pip install mkl``; found in the
environment's ``lib``, or beside ``VIT_JAX_MKL_LIB``) or without a C++ compiler, every product takes XLA's dot, with
the reason logged once; the numbers are the same to fp32 rounding either way. ``xla_gemm()`` turns it off for the
traces made within it (for XLA's FLOP count, which cannot see into a custom call).

Sharding: each call is partitioned like a matmul. Its rows and columns keep their shardings; the contracted
dimension keeps the first operand's and the partial products are summed over those devices (the weight gradient,
contracted over a batch sharded over the data axis, is an all-reduce as in XLA's own partitioning).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import timing
from vit_jax.kernels import choices
from vit_jax.kernels.build import compile_library

SOURCE = pathlib.Path(__file__).with_name('cpu_gemm.cc')
MODES = ('auto', 'xla', 'mkl')
# 2 M K N below this (a few ms on one core) is not measured: XLA's dot, with no call overhead, is as good.
MIN_FLOPS = 2 ** 28
DTYPES = ('float32', 'bfloat16')
# In the choices' key: choices made against other candidates are measured again.
CANDIDATES_VERSION = 'xla (bf16 accumulates in fp32), mkl, xla_transposed (bf16)'

_disabled_here = False


@contextlib.contextmanager
def xla_gemm():
    """Within it, projections trace through XLA's dot only (for XLA's FLOP count, A/B timing)."""
    global _disabled_here
    saved, _disabled_here = _disabled_here, True
    try:
        yield
    finally:
        _disabled_here = saved


def mode() -> str:
    value = os.environ.get('VIT_JAX_CPU_GEMM', 'auto')
    if value not in MODES:
        raise ValueError(f'VIT_JAX_CPU_GEMM={value!r} is not one of {MODES}: auto measures MKL against XLA per shape, '
                         'xla turns MKL off, mkl takes it wherever it can.')
    return value


# MKL's LP64 interface, sequential threading layer and core, linked directly. Not through libmkl_rt, its single
# dynamic library: that loads its layers into the process's global symbol scope, where a PyTorch imported afterwards
# bound its own MKL calls to them, and so to our sequential layer: its ViT-S then ran at ~0.55x its speed.
MKL_LIBRARIES = ('mkl_intel_lp64', 'mkl_sequential', 'mkl_core')


def mkl_libraries() -> tuple[pathlib.Path, ...] | None:
    """MKL's libraries (``MKL_LIBRARIES``) as ``pip install mkl`` puts them in the environment's ``lib``, or in the
    folder of the file ``VIT_JAX_MKL_LIB`` names; None where they are not all there."""
    if os.environ.get('VIT_JAX_MKL_LIB'):
        path = pathlib.Path(os.environ['VIT_JAX_MKL_LIB'])
        folders = [path.parent] if path.exists() else []
    else:
        folders = [pathlib.Path(prefix, 'lib') for prefix in dict.fromkeys((sys.prefix, sys.base_prefix))]
    for folder in folders:
        found = [sorted(folder.glob(f'lib{name}.so*')) for name in MKL_LIBRARIES]
        if all(found):
            return tuple(paths[-1] for paths in found)
    return None


def build() -> pathlib.Path:
    """Compiles the library against MKL (or finds it compiled) and returns its path; RuntimeError if it can't."""
    libraries = mkl_libraries()
    if libraries is None:
        raise RuntimeError('Intel MKL was not found in the environment (pip install mkl; or set VIT_JAX_MKL_LIB to '
                           'its libmkl_core.so, beside libmkl_intel_lp64.so and libmkl_sequential.so)')
    return compile_library(SOURCE, link=mkl_link(libraries))


def mkl_link(libraries: tuple[pathlib.Path, ...]) -> tuple[str, ...]:
    """The linker arguments for MKL's libraries at these paths (found again at load time through their rpath).
    Calls into the sequential layer run on the calling thread only: XLA's threads, never MKL's own."""
    folder = libraries[0].parent
    return (f'-L{folder}', '-Wl,--no-as-needed', *(f'-l:{path.name}' for path in libraries),
            f'-Wl,-rpath,{folder}')


def mkl_key() -> tuple[str, ...]:
    """What a measured choice between MKL and another implementation depends on, besides the CPU: MKL's build."""
    libraries = mkl_libraries()
    return (str(libraries[-1]), str(libraries[-1].stat().st_size)) if libraries else ('no mkl',)


@functools.cache
def _registered() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as e:
        logging.warning('MKL products are not available, so projections run through XLA\'s dot (the same numbers; '
                        'slower on some CPUs): %s', e)
        return False
    jax.ffi.register_ffi_target('vit_gemm_f32', jax.ffi.pycapsule(library.VitGemmF32), platform='cpu')
    jax.ffi.register_ffi_target('vit_gemm_bf16', jax.ffi.pycapsule(library.VitGemmBF16), platform='cpu')
    return True


def _on_cpu_here() -> bool:
    """Not within ``xla_gemm()``: where projections may leave XLA's plain dot at all. Only a model compiled for the
    CPU calls this module (its ``platform``, from the mesh: ``vit_jax.hardware``), whatever the host runs on."""
    return not _disabled_here


def available() -> bool:
    """Whether projections may take MKL here: the mode not ``xla``, and the library built."""
    return _on_cpu_here() and mode() != 'xla' and _registered()


# The FFI call, partitioned like a matmul. Factors: r (rows of the result), c (its columns), k (contracted).
def _layouts(trans_a: bool, trans_b: bool) -> tuple[str, str]:
    return ('kr' if trans_a else 'rk'), ('ck' if trans_b else 'kc')


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _factor_axes(arg_shapes, trans_a: bool, trans_b: bool) -> dict[str, tuple[str, ...]]:
    """The mesh axes of r, k (from the first operand) and c (from the second), no axis used twice."""
    a_layout, b_layout = _layouts(trans_a, trans_b)
    a_spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 2
    b_spec = tuple(arg_shapes[1].sharding.spec) + (None,) * 2
    r, k = _axes(a_spec[a_layout.index('r')]), _axes(a_spec[a_layout.index('k')])
    c = _axes(b_spec[b_layout.index('c')])
    if set(c) & (set(r) | set(k)):
        c = ()
    return {'r': r, 'k': k, 'c': c}


def _spec(axes: dict[str, tuple[str, ...]], layout: str) -> P:
    return P(*((axes[f] or None) if len(axes[f]) != 1 else axes[f][0] for f in layout))


def _call(trans_a: bool, trans_b: bool, a, b):
    if not _registered():
        raise RuntimeError('the MKL product library could not be built (see the warning above); check '
                           '`available()` first and take XLA\'s dot where it is False.')
    rows = a.shape[1] if trans_a else a.shape[0]
    cols = b.shape[0] if trans_b else b.shape[1]
    target = 'vit_gemm_f32' if a.dtype == jnp.float32 else 'vit_gemm_bf16'
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, cols), jnp.float32))(
        a, b, trans_a=trans_a, trans_b=trans_b)


def _infer(trans_a, trans_b, mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, _spec(_factor_axes(arg_shapes, trans_a, trans_b), 'rc'))


def _partition(trans_a, trans_b, mesh, arg_shapes, result_shape):
    axes = _factor_axes(arg_shapes, trans_a, trans_b)
    a_layout, b_layout = _layouts(trans_a, trans_b)
    contracted = axes['k']

    def local(a, b):
        partial = _call(trans_a, trans_b, a, b)
        return jax.lax.psum(partial, contracted) if contracted else partial

    arg_shardings = (NamedSharding(mesh, _spec(axes, a_layout)), NamedSharding(mesh, _spec(axes, b_layout)))
    return mesh, local, NamedSharding(mesh, _spec(axes, 'rc')), arg_shardings


def _sharding_rule(trans_a: bool, trans_b: bool) -> str:
    a_layout, b_layout = _layouts(trans_a, trans_b)
    return f'{" ".join(a_layout)}, {" ".join(b_layout)} -> r c'


@functools.cache
def _partitioned(trans_a: bool, trans_b: bool):
    def product(a, b):
        return _call(trans_a, trans_b, a, b)

    wrapped = custom_partitioning(product)
    wrapped.def_partition(functools.partial(_partition, trans_a, trans_b),
                          infer_sharding_from_operands=functools.partial(_infer, trans_a, trans_b),
                          sharding_rule=_sharding_rule(trans_a, trans_b))
    return wrapped


def mkl_product(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """op(a) op(b) through MKL, in fp32 (bf16 operands accumulate in fp32); a, b 2-D of one dtype in ``DTYPES``."""
    return _partitioned(bool(trans_a), bool(trans_b))(a, b)


def xla_product(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """The same product through XLA's dot (dimension numbers, no transposed copies), in the operands' dtype. bf16
    operands accumulate in fp32, as MKL's do: XLA:CPU runs a bf16 dot with bf16 hardware (AVX512-BF16 through its
    YNNPACK fusion) only when its result is fp32; with a bf16 result it ran at under half that rate."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    if a.dtype == jnp.bfloat16:
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)
    return jax.lax.dot_general(a, b, dims)


def transposed_copy(a: jax.Array) -> jax.Array:
    """a.T (a 2-D, its columns even) written out row-major, in a form XLA cannot fold into the dot that reads it.

    A weight gradient contracts the tokens, the leading dimension of both of its operands (TN). XLA folds a plain
    transpose into the dot's dimension numbers, and XLA:CPU ran such bf16 dots at ~35% of the rate of the same
    product with its lhs row-major (NN), converting both operands to fp32 first; a 3-D transpose between reshapes is
    a real copy, which cost ~1-4 ms at ViT-S's shapes against ~30 ms saved (benchmarks/README.md)."""
    depth, rows = a.shape
    return a.reshape(depth, rows // 2, 2).transpose(1, 2, 0).reshape(rows, depth)


# The choice per shape: measured once per machine, cached in memory and on disk (kernels/choices.py).
def _product_key(dtype, rows: int, depth: int, cols: int, trans_a: bool, trans_b: bool) -> str:
    return f'{jnp.dtype(dtype).name} {rows}x{depth}x{cols} {"T" if trans_a else "N"}{"T" if trans_b else "N"}'


def _candidates(dtype, rows: int, trans_a: bool) -> tuple[str, ...]:
    """The implementations a product may take here: XLA's dot always; MKL's where it is built and allowed; for a bf16
    weight gradient (op(a) = a^T) with an even number of rows, XLA's dot of ``transposed_copy(a)``. Not in fp32: there
    it won alone by <= 10% at ViT-Ti's shapes, but ViT-Ti's and ViT-S's fp32 train steps ran ~10% slower with it."""
    transposed = trans_a and rows % 2 == 0 and jnp.dtype(dtype) == jnp.bfloat16
    return ('xla', *(('mkl',) if available() else ()), *(('xla_transposed',) if transposed else ()))


def run_product(name: str, a, b, trans_a: bool, trans_b: bool) -> jax.Array:
    """op(a) op(b) through the candidate ``name`` (``_candidates``); fp32 from MKL, else the operands' dtype."""
    if name == 'mkl':
        return mkl_product(a, b, trans_a, trans_b)
    if name == 'xla_transposed':
        return xla_product(transposed_copy(a), b, False, trans_b)
    return xla_product(a, b, trans_a, trans_b)


def _time_candidates(dtype, rows, depth, cols, trans_a, trans_b, rounds: int = 7) -> dict[str, float]:
    """Best seconds of each candidate product at this shape, timed in turns on random operands."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((depth, rows) if trans_a else (rows, depth)), dtype)
    b = jnp.asarray(rng.standard_normal((cols, depth) if trans_b else (depth, cols)), dtype)
    runners = {name: jax.jit(functools.partial(run_product, name, trans_a=trans_a, trans_b=trans_b))
               for name in _candidates(dtype, rows, trans_a)}
    times = timing.round_robin_seconds({name: lambda fn=fn: fn(a, b).block_until_ready()
                                        for name, fn in runners.items()}, warmup=1, rounds=rounds)
    return {name: min(t) for name, t in times.items()}


def applies(dtype) -> bool:
    """Whether projections of this dtype may leave XLA's plain dot here: a dtype in ``DTYPES``, and not within
    ``xla_gemm()``."""
    return jnp.dtype(dtype).name in DTYPES and _on_cpu_here()


def implementation(dtype, rows: int, depth: int, cols: int, trans_a: bool = False, trans_b: bool = False) -> str:
    """Which candidate (``_candidates``) the product op(a) (rows, depth) x op(b) (depth, cols) takes here: the one
    measured fastest, with XLA's plain dot the default (see the module's docstring)."""
    if not applies(dtype):
        return 'xla'
    if mode() == 'mkl' and available():
        return 'mkl'
    candidates = _candidates(dtype, rows, trans_a)
    if 2 * rows * depth * cols < MIN_FLOPS or len(candidates) == 1:
        return 'xla'
    key = _product_key(dtype, rows, depth, cols, trans_a, trans_b)
    timer = functools.partial(_time_candidates, dtype, rows, depth, cols, trans_a, trans_b)
    return choices.choose('cpu_gemm', key, timer, default='xla',
                          parts=(*mkl_key(), SOURCE.read_text(), CANDIDATES_VERSION, mode()))


def use_mkl(dtype, rows: int, depth: int, cols: int, trans_a: bool = False, trans_b: bool = False) -> bool:
    """Whether the product op(a) (rows, depth) x op(b) (depth, cols) takes MKL here."""
    return implementation(dtype, rows, depth, cols, trans_a, trans_b) == 'mkl'


def _product_of(a, b, trans_a: bool, trans_b: bool, dtype):
    rows, depth = (a.shape[1], a.shape[0]) if trans_a else a.shape
    cols = b.shape[0] if trans_b else b.shape[1]
    name = implementation(dtype, rows, depth, cols, trans_a, trans_b)
    return run_product(name, a, b, trans_a, trans_b).astype(dtype)


@jax.custom_vjp
def _matmul(x, w):
    return _product_of(x, w, False, False, x.dtype)


def _matmul_forward(x, w):
    return _matmul(x, w), (x, w)


def _matmul_backward(residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    return _product_of(dy, w, False, True, x.dtype), _product_of(x, dy, True, False, w.dtype)


_matmul.defvjp(_matmul_forward, _matmul_backward)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array | None:
    """x (M, K) @ w (K, N) with each of its products (forward and both gradients) through MKL or XLA, as measured;
    None where none of the three would take MKL and the dtype is fp32 (the caller keeps its plain dot, and XLA's
    autodiff of it). bf16 on CPU always comes here, MKL or not, so that all three products accumulate in fp32
    (``xla_product``; autodiff of one such dot would give fp32 x bf16 gradient products, which XLA runs in fp32)."""
    if x.ndim != 2 or w.ndim != 2 or x.dtype != w.dtype or not applies(x.dtype):
        return None
    (m, k), n = x.shape, w.shape[1]
    if x.dtype != jnp.bfloat16 and all(implementation(x.dtype, *shape) == 'xla' for shape in (
            (m, k, n), (m, n, k, False, True), (k, m, n, True, False))):
        return None
    return _matmul(x, w)
