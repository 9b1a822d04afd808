"""Projections through MKL on CPU: build here, equal XLA's dot (values, both gradients; fp32 and bf16), shard like a
matmul, and the per-shape choice is measured once, cached on disk and overridable."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from vit_jax import models
from vit_jax.kernels import choices, cpu_gemm


@pytest.fixture
def mkl_everywhere(monkeypatch):
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'mkl')


def loss_and_grads(matmul, x, w, dy):
    y, vjp = jax.vjp(matmul, x, w)
    return y, *vjp(dy)


def operands(m, k, n, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype)
                 for key, shape in zip(keys, ((m, k), (k, n), (m, n))))


def assert_close(got, expected, tol):
    for a, b in zip(got, expected):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=tol * float(np.abs(b).max()), rtol=0)


@pytest.mark.skipif(platform.machine() != 'x86_64', reason='MKL is installed (pyproject) on x86_64 only')
def test_builds_against_mkl_here():
    # CI installs MKL with the package: a failure here would silently cost Intel users the products' speed.
    assert cpu_gemm.mkl_libraries() is not None
    path = cpu_gemm.build()
    assert path.exists() and path.stat().st_size > 0
    assert cpu_gemm.available()


@pytest.mark.parametrize('shape', [(64, 32, 48), (197 * 3, 192, 576), (130, 768, 33), (1, 16, 8)])
def test_matches_xla_dot_with_both_gradients(mkl_everywhere, shape):
    x, w, dy = operands(*shape)
    ours = jax.jit(lambda *a: loss_and_grads(cpu_gemm.matmul, *a))
    plain = jax.jit(lambda *a: loss_and_grads(jnp.matmul, *a))
    assert ours.lower(x, w, dy).as_text().count('vit_gemm_f32') == 3  # forward, input and weight gradients
    assert_close(ours(x, w, dy), plain(x, w, dy), 2e-6)


def test_bfloat16_within_bfloat16_rounding(mkl_everywhere):
    x, w, dy = operands(256, 192, 320, jnp.bfloat16)
    ours = jax.jit(lambda *a: loss_and_grads(cpu_gemm.matmul, *a))
    assert 'vit_gemm_bf16' in ours.lower(x, w, dy).as_text()
    # The exact products of the bf16 operands in fp32, rounded once to bf16: ours round once too (fp32 accumulation).
    exact = loss_and_grads(lambda a, b: (a.astype(jnp.float32) @ b.astype(jnp.float32)).astype(jnp.bfloat16),
                           x, w, dy)
    assert_close(ours(x, w, dy), exact, 2 ** -8)


def test_bfloat16_through_xla_accumulates_in_float32(monkeypatch):
    """Without MKL, bf16 projections still come through matmul: all three products are bf16 x bf16 dots with an fp32
    result (XLA:CPU's bf16-hardware path), rounded once to bf16; a plain bf16 dot's autodiff would not be."""
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'xla')
    x, w, dy = operands(256, 192, 320, jnp.bfloat16)
    ours = jax.jit(lambda *a: loss_and_grads(cpu_gemm.matmul, *a))
    hlo = ours.lower(x, w, dy).as_text()
    assert 'vit_gemm' not in hlo
    dots = [line for line in hlo.splitlines() if 'stablehlo.dot_general' in line]
    assert len(dots) == 3 and all('bf16>, tensor<' in d and d.rstrip().endswith('xf32>') for d in dots), dots
    exact = loss_and_grads(lambda a, b: (a.astype(jnp.float32) @ b.astype(jnp.float32)).astype(jnp.bfloat16),
                           x, w, dy)
    assert_close(ours(x, w, dy), exact, 2 ** -8)
    assert cpu_gemm.matmul(x.astype(jnp.float32), w.astype(jnp.float32)) is None  # fp32 keeps the caller's dot
    with cpu_gemm.xla_gemm():
        assert cpu_gemm.matmul(x, w) is None  # the FLOP-count twin traces plain dots


def test_transposed_products_match(mkl_everywhere):
    a, b, _ = operands(96, 80, 112)
    for trans_a, trans_b in ((False, False), (True, False), (False, True), (True, True)):
        a_ = a.T if trans_a else a
        b_ = b.T if trans_b else b
        expected = (a_.T if trans_a else a_) @ (b_.T if trans_b else b_)
        got = jax.jit(lambda p, q: cpu_gemm.mkl_product(p, q, trans_a, trans_b))(a_, b_)
        assert_close((got,), (expected,), 2e-6)


@pytest.mark.parametrize('x_spec, w_spec', [
    (P('data', None), P(None, None)),            # data parallel: weight gradient all-reduced over data
    (P('data', None), P(None, 'model')),         # columns of the weight over model (qkv, fc1)
    (P('data', 'model'), P('model', None)),      # contraction over model (out, fc2): partial sums all-reduced
    (P(('data', 'model'), None), P(None, None)),  # batch over all eight devices
])
def test_sharded_products_equal_unsharded(mkl_everywhere, x_spec, w_spec):
    mesh = jax.make_mesh((4, 2), ('data', 'model'), axis_types=(AxisType.Auto,) * 2)
    x, w, dy = operands(128, 64, 96)
    fn = jax.jit(lambda *a: loss_and_grads(cpu_gemm.matmul, *a))
    sharded = (jax.device_put(x, NamedSharding(mesh, x_spec)), jax.device_put(w, NamedSharding(mesh, w_spec)),
               jax.device_put(dy, NamedSharding(mesh, P(x_spec[0], w_spec[1]))))
    compiled = fn.lower(*sharded).compile().as_text()
    assert compiled.count('vit_gemm_f32') == 3
    assert 'all-gather' not in compiled  # no operand is gathered whole: each device multiplies its own blocks
    assert_close(fn(*sharded), jax.jit(lambda *a: loss_and_grads(jnp.matmul, *a))(x, w, dy), 2e-6)


def _tiny_vit(**overrides):
    return models.create_model('vit_ti16', num_classes=10, image_size=32, patch_size=8, hidden_size=64,
                               num_layers=1, num_heads=2, mlp_dim=128, **{'platform': 'cpu', **overrides})


# fp32 runs attention through the CPU kernel, token-major; bf16 and explicit attention maps head-major through XLA's
# ops, with the projections token-major through MKL and transposed.
@pytest.mark.parametrize('dtype, impl, tol', [('float32', 'auto', 1e-5), ('float32', 'xla', 1e-5),
                                              ('bfloat16', 'auto', 3e-2)])
def test_vit_train_gradients_through_mkl_equal_xla(monkeypatch, dtype, impl, tol):
    """The projections of tokens take MKL (forward and both gradients), and the loss and gradients equal XLA's."""
    model = _tiny_vit(dtype=dtype, attention_impl=impl)
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    params = model.init(jax.random.key(1), images)

    def loss(p):
        return jnp.mean(model.apply(p, images).astype(jnp.float32) ** 2)

    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'xla')
    expected = jax.jit(jax.value_and_grad(loss))(params)
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'mkl')
    fused = jax.jit(jax.value_and_grad(loss))
    assert fused.lower(params).as_text().count('vit_gemm') == 4 * 3  # qkv, out, fc1, fc2
    got = fused(params)
    np.testing.assert_allclose(got[0], expected[0], rtol=tol)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.abs(b).max()), rtol=0)


def test_choice_is_measured_once_and_cached_on_disk(monkeypatch, tmp_path):
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'auto')
    choices.forget()
    timed = []

    def fake_time_candidates(dtype, rows, depth, cols, trans_a, trans_b):
        timed.append((rows, depth, cols, trans_a, trans_b))
        return {'mkl': 1.0, 'xla': 2.0} if trans_a else {'mkl': 1.0, 'xla': 1.02}  # a tie keeps XLA's dot

    monkeypatch.setattr(cpu_gemm, '_time_candidates', fake_time_candidates)
    big = 2048  # 2 * 2048^3 flops: above MIN_FLOPS
    assert cpu_gemm.use_mkl(jnp.float32, big, big, big, trans_a=True)
    assert not cpu_gemm.use_mkl(jnp.float32, big, big, big)
    assert not cpu_gemm.use_mkl(jnp.float32, 64, 64, 64)  # too small to measure: XLA's dot
    assert not cpu_gemm.use_mkl(jnp.int32, big, big, big)  # a dtype MKL's products do not take
    assert timed == [(big, big, big, True, False), (big, big, big, False, False)]
    saved = json.loads(next(tmp_path.glob('cpu_gemm-choices-*.json')).read_text())
    assert saved['float32 2048x2048x2048 TN'] == {'choice': 'mkl', 'seconds': {'mkl': 1.0, 'xla': 2.0}}
    assert saved['float32 2048x2048x2048 NN']['choice'] == 'xla'
    # A new process (no choices in memory) reads them from disk instead of measuring again.
    choices.forget()
    assert cpu_gemm.use_mkl(jnp.float32, big, big, big, trans_a=True)
    assert len(timed) == 2
    choices.forget()


def test_measures_real_products(monkeypatch, tmp_path):
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    seconds = cpu_gemm._time_candidates(jnp.float32, 256, 128, 192, False, True, rounds=2)
    assert set(seconds) == {'mkl', 'xla'} and all(0 < s < 10 for s in seconds.values())
    # A bf16 weight gradient (TN) also tries XLA's dot of a transposed copy; an odd number of rows cannot take it.
    seconds = cpu_gemm._time_candidates(jnp.bfloat16, 256, 128, 192, True, False, rounds=2)
    assert set(seconds) == {'mkl', 'xla', 'xla_transposed'} and all(0 < s < 10 for s in seconds.values())
    assert cpu_gemm._candidates(jnp.bfloat16, 255, True) == ('xla', 'mkl')
    assert cpu_gemm._candidates(jnp.float32, 256, True) == ('xla', 'mkl')  # fp32: see _candidates


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_transposed_copy_is_the_transpose_and_is_not_folded_into_the_dot(dtype):
    a, _, b = operands(80, 96, 112, dtype)  # a (80, 96), b (80, 112): op(a) = a^T (96, 80)
    np.testing.assert_array_equal(cpu_gemm.transposed_copy(a), a.T)
    fn = jax.jit(lambda p, q: cpu_gemm.run_product('xla_transposed', p, q, True, False))
    dots = [line for line in fn.lower(a, b).compile().as_text().splitlines() if ' dot(' in line]
    assert dots and all('lhs_contracting_dims={1}' in line for line in dots)  # a row-major lhs: NN, not TN
    expected = a.astype(jnp.float32).T @ b.astype(jnp.float32)
    assert_close((fn(a, b).astype(jnp.float32),), (expected,), 2e-6 if dtype == jnp.float32 else 2 ** -8)


def test_off_and_bad_settings(monkeypatch):
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'xla')
    assert not cpu_gemm.available()
    x, w, _ = operands(64, 32, 48)
    assert cpu_gemm.matmul(x, w) is None  # the caller keeps its own dot
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'mkl')
    with cpu_gemm.xla_gemm():
        assert not cpu_gemm.available()
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'fast')
    with pytest.raises(ValueError, match=r"VIT_JAX_CPU_GEMM='fast' is not one of \('auto', 'xla', 'mkl'\)"):
        cpu_gemm.available()


def test_missing_mkl_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv('VIT_JAX_MKL_LIB', str(tmp_path / 'libmkl_core.so.3'))
    assert cpu_gemm.mkl_libraries() is None
    with pytest.raises(RuntimeError, match='pip install mkl'):
        cpu_gemm.build()


@pytest.mark.skipif(platform.machine() != 'x86_64', reason='MKL is installed (pyproject) on x86_64 only')
def test_pytorch_imported_after_an_mkl_product_keeps_its_own_mkl():
    """Our MKL stays out of the process's global symbols: a PyTorch imported after one of our MKL products keeps its
    own MKL and threads (through libmkl_rt, its calls had bound to our sequential layer: one thread)."""
    pytest.importorskip('torch')
    script = textwrap.dedent("""
        import jax.numpy as jnp
        from vit_jax.kernels import cpu_gemm
        x = jnp.ones((64, 64), jnp.float32)
        assert float(cpu_gemm.mkl_product(x, x)[0, 0]) == 64.0
        import torch
        torch.set_num_threads(2)
        print([line.strip() for line in torch.__config__.parallel_info().splitlines() if 'mkl_get_max_threads' in line])
    """)
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, VIT_JAX_CPU_GEMM='mkl'))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "['mkl_get_max_threads() : 2']" in out.stdout, out.stdout


def test_auto_measures_while_a_step_is_traced(monkeypatch, tmp_path):
    """The first trace of a projection times MKL against XLA for real (forward and both gradients), in a thread of
    its own, and the jitted result equals XLA's whichever won."""
    from vit_jax.models.encoder import token_dot_general
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'auto')
    monkeypatch.setattr(cpu_gemm, 'MIN_FLOPS', 0)
    choices.forget()
    x, w, dy = operands(2 * 96, 64, 80)
    projection = lambda x, w: token_dot_general(  # noqa: E731
        x.reshape(2, 96, 64), w, (((2,), (0,)), ((), ())), cpu=True).reshape(-1, 80)
    got = jax.jit(lambda *a: loss_and_grads(projection, *a))(x, w, dy)
    saved = json.loads(next(tmp_path.glob('cpu_gemm-choices-*.json')).read_text())
    assert sorted(saved) == ['float32 192x64x80 NN', 'float32 192x80x64 NT', 'float32 64x192x80 TN']
    assert all(entry['choice'] in entry['seconds'] and entry['seconds']['mkl'] > 0 for entry in saved.values())
    assert set(saved['float32 64x192x80 TN']['seconds']) == {'mkl', 'xla'}
    assert_close(got, jax.jit(lambda *a: loss_and_grads(jnp.matmul, *a))(x, w, dy), 2e-6)
    choices.forget()
