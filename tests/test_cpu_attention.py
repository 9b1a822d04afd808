"""The fused CPU attention kernel: builds here, matches XLA's attention (values and gradients), shards by heads."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import models, sharding
from vit_jax.kernels import cpu_attention
from vit_jax.models import encoder
from vit_jax.models.encoder import softmax_attention


def value_and_grad(fn, qkv, dout):
    out, vjp = jax.vjp(fn, qkv)
    return out, vjp(dout)[0]


def xla_reference(qkv, scale):
    """XLA's softmax attention on the same packed, token-major qkv (B, N, 3, H, dh) -> (B, N, H, dh)."""
    q, k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in range(3))
    return jnp.swapaxes(softmax_attention(q, k, v, scale), 1, 2)


def inputs(shape, seed=0):
    """qkv (B, N, 3, H, dh) and an output gradient (B, N, H, dh) for shape (B, N, H, dh)."""
    b, n, h, dh = shape
    keys = jax.random.split(jax.random.key(seed))
    # Logits of a few units, as in a trained model: the softmax is peaked, not uniform.
    return (2.0 * jax.random.normal(keys[0], (b, n, 3, h, dh), jnp.float32),
            jax.random.normal(keys[1], shape, jnp.float32))


def test_kernel_builds_on_this_machine():
    # CI's machine has g++; a build failure here would silently cost every CPU user the kernel's speed.
    path = cpu_attention.build()
    assert path.exists() and path.stat().st_size > 0
    assert cpu_attention.available()


# VIT_JAX_CPU_GEMM=xla: the kernel's own matmuls; =mkl: its build with MKL's (cpu_attention._variant).
@pytest.mark.parametrize('matmuls, target', [('xla', 'vit_attention_forward('), ('mkl', 'vit_attention_forward_mkl(')])
@pytest.mark.parametrize('shape', [(2, 197, 3, 64), (3, 5, 1, 16), (1, 50, 2, 80), (2, 33, 2, 128), (1, 16, 1, 32)])
def test_matches_xla_attention(monkeypatch, shape, matmuls, target):
    """Output and the qkv gradient equal XLA's softmax attention (tokens not a multiple of 16 included)."""
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', matmuls)
    qkv, dout = inputs(shape)
    scale = shape[-1] ** -0.5
    ours = jax.jit(lambda *a: value_and_grad(lambda x: cpu_attention.attention(x, scale), *a))
    assert target in ours.lower(qkv, dout).as_text().replace('"', '').replace('@', '')
    ref = jax.jit(lambda *a: value_and_grad(lambda x: xla_reference(x, scale), *a))
    (out, dqkv), (ref_out, ref_dqkv) = ours(qkv, dout), ref(qkv, dout)
    assert out.shape == dout.shape and dqkv.shape == qkv.shape
    np.testing.assert_allclose(out, ref_out, atol=2e-5 * float(jnp.abs(ref_out).max()), rtol=0)
    for i, name in enumerate(('dq', 'dk', 'dv')):
        b = ref_dqkv[:, :, i]
        np.testing.assert_allclose(dqkv[:, :, i], b, atol=2e-5 * float(jnp.abs(b).max()), rtol=0, err_msg=name)


def bf16_reference(qkv, scale):
    """XLA's attention in fp32 on bf16 values: what the bf16 kernel computes before its roundings."""
    return xla_reference(qkv.astype(jnp.float32), scale)


@pytest.mark.parametrize('matmuls, target', [('xla', 'vit_attention_forward_bf16('),
                                             ('mkl', 'vit_attention_forward_bf16_mkl(')])
@pytest.mark.parametrize('shape', [(2, 197, 3, 64), (3, 5, 1, 16), (1, 50, 2, 80), (2, 33, 2, 128), (1, 17, 1, 48)])
def test_bfloat16_matches_float32_attention_to_bf16_rounding(monkeypatch, shape, matmuls, target):
    """bf16 in, bf16 out: within bf16 rounding (2^-8 relative) of fp32 attention on the same bf16 values, and no
    further off than XLA's own bf16 attention (its scores and products are rounded to bf16 too)."""
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', matmuls)
    qkv, dout = (x.astype(jnp.bfloat16) for x in inputs(shape, seed=2))
    scale = shape[-1] ** -0.5
    ours = jax.jit(lambda *a: value_and_grad(lambda x: cpu_attention.attention(x, scale), *a))
    assert target in ours.lower(qkv, dout).as_text().replace('"', '').replace('@', '')
    (out, dqkv) = ours(qkv, dout)
    assert out.dtype == dqkv.dtype == jnp.bfloat16
    ref_out, ref_dqkv = jax.jit(lambda *a: value_and_grad(lambda x: bf16_reference(x, scale), *a))(
        qkv, dout.astype(jnp.float32))
    xla_out, xla_dqkv = jax.jit(lambda *a: value_and_grad(lambda x: xla_reference(x, scale), *a))(qkv, dout)

    def error(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
    assert error(out, ref_out) < 2 ** -7 and error(out, ref_out) <= error(xla_out, ref_out)
    for i, name in enumerate(('dq', 'dk', 'dv')):
        b = ref_dqkv[:, :, i]
        assert error(dqkv[:, :, i], b) < 2 ** -6, name
        assert error(dqkv[:, :, i], b) <= error(xla_dqkv[:, :, i], b), name


def test_bfloat16_single_token_is_exact():
    """One token: the softmax is 1, so o = v and dv = dout bit for bit (rounded once from an fp32 sum of one term),
    and dq, dk vanish up to the fp32 rounding of dP - rowsum(dO * O) (two sums of the same terms)."""
    qkv, dout = (x.astype(jnp.bfloat16) for x in inputs((3, 1, 2, 32), seed=3))
    out, dqkv = jax.jit(lambda *a: value_and_grad(lambda x: cpu_attention.attention(x, 0.3), *a))(qkv, dout)
    np.testing.assert_array_equal(out, qkv[:, :, 2])
    np.testing.assert_array_equal(dqkv[:, :, 2], dout)
    np.testing.assert_allclose(dqkv[:, :, :2].astype(jnp.float32), 0, atol=1e-4)


def _runs_here(march):
    """A pytest.param of ``march``, skipped (with the instruction sets it lacks) on a CPU that cannot run its code."""
    from vit_jax.kernels.build import missing_instructions
    missing = missing_instructions(march) if __import__('platform').machine() == 'x86_64' else ['x86-64']
    return pytest.param(march, marks=pytest.mark.skipif(
        bool(missing), reason=f'this CPU lacks {", ".join(missing)}, which a -march={march} build may use'))


@pytest.mark.parametrize('march', [_runs_here('x86-64-v4'), _runs_here('x86-64-v3')])
def test_portable_builds_match_this_one(march):
    """The kernel compiled for AVX-512 without AVX512-BF16 (v4: bf16 widened to fp32 in the matmuls) and for AVX2
    (v3: narrower register blocks) gives this machine's build's numbers, fp32 and bf16: what a researcher's older
    CPU runs. Each runs only on a CPU with its instruction sets (on an AVX2 CPU the v4 build would die of SIGILL)."""
    import ctypes
    from vit_jax.kernels.build import compile_library
    variant = '_' + march.replace('-', '_')
    library = ctypes.cdll.LoadLibrary(str(compile_library(cpu_attention.SOURCE, link=(f'-march={march}',),
                                                          variant=march)))
    cpu_attention._register(library, variant)
    scale = 0.125
    for dtype, tolerance in ((jnp.float32, 1e-5), (jnp.bfloat16, 2 ** -7)):
        qkv, dout = (x.astype(dtype) for x in inputs((2, 41, 2, 64), seed=4))
        native_o, native_lse = cpu_attention._forward_ffi('', scale, qkv)
        o, lse = cpu_attention._forward_ffi(variant, scale, qkv)
        grads = [cpu_attention._backward_ffi(v, scale, qkv, o, lse, dout) for v in ('', variant)]
        for a, b in ((o, native_o), (lse, native_lse), tuple(grads)):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) < tolerance, (march, dtype)


@pytest.mark.parametrize('dtype, suffix', [('float32', ''), ('bfloat16', ' bfloat16')])
def test_auto_measures_own_and_mkl_matmuls_once(monkeypatch, tmp_path, dtype, suffix):
    """By default each direction at each shape and dtype takes whichever build ran faster here, measured at first
    use."""
    from vit_jax.kernels import choices
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    monkeypatch.setenv('VIT_JAX_CPU_GEMM', 'auto')
    monkeypatch.setattr(cpu_attention, 'MIN_FLOPS', 0)
    choices.forget()
    shape = (2, 40, 2, 32)
    qkv, dout = (x.astype(dtype) for x in inputs(shape))
    got = jax.jit(lambda *a: value_and_grad(lambda x: cpu_attention.attention(x, 0.2), *a))(qkv, dout)
    saved = json.loads(next(tmp_path.glob('cpu_attention-choices-*.json')).read_text())
    assert sorted(saved) == [f'backward 2x40x3x2x32{suffix}', f'forward 2x40x3x2x32{suffix}']
    assert all(set(entry['seconds']) == {'kernel', 'mkl'} for entry in saved.values())
    expected = jax.jit(lambda *a: value_and_grad(lambda x: bf16_reference(x, 0.2), *a))(
        qkv, dout.astype(jnp.float32))
    for a, b in zip(got, expected):
        tolerance = 2e-5 if dtype == 'float32' else 2 ** -6
        np.testing.assert_allclose(a.astype(jnp.float32), b, atol=tolerance * float(jnp.abs(b).max()), rtol=0)
    choices.forget()


@pytest.mark.parametrize('kernel_s, xla_s, expected', [(1.0, 2.0, 'cpu_kernel'), (2.0, 1.0, 'xla'),
                                                      (1.0, 1.02, 'cpu_kernel')])  # a tie keeps the kernel
def test_auto_takes_the_kernel_only_where_it_beat_xla_here(monkeypatch, tmp_path, kernel_s, xla_s, expected):
    """On a CPU where the kernel is slower than XLA's attention (its register blocks once spilled on AVX2), 'auto'
    runs XLA's: measured once per shape; shapes too small to measure keep the kernel."""
    from vit_jax.kernels import choices
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    choices.forget()
    timed = []
    monkeypatch.setattr(cpu_attention, '_time_against_xla',
                        lambda *shape: timed.append(shape) or {'kernel': kernel_s, 'xla': xla_s})
    assert encoder.resolve_attention('auto', jnp.float32, 64, (32, 197, 3), 'cpu') == expected
    assert encoder.resolve_attention('auto', jnp.float32, 64, (32, 197, 3), 'cpu') == expected
    assert encoder.resolve_attention('auto', jnp.float32, 64, (2, 17, 2), 'cpu') == 'cpu_kernel'
    assert encoder.resolve_attention('cpu_kernel', jnp.float32, 64, (32, 197, 3), 'cpu') == 'cpu_kernel'  # asked for
    assert encoder.resolve_attention('auto', jnp.bfloat16, 64, (32, 197, 3), 'cpu') == expected
    # Compiled for a GPU or TPU (or portable), nothing of the CPU's is timed or taken.
    for platform in ('cuda:9.0', 'tpu', 'portable'):
        assert encoder.resolve_attention('auto', jnp.float32, 64, (64, 197, 3), platform) == 'xla'
    assert timed == [(32, 197, 3, 64, 'float32'), (32, 197, 3, 64, 'bfloat16')]  # each dtype measured on its own
    choices.forget()


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_measures_the_kernel_against_xla_for_real(dtype):
    seconds = cpu_attention._time_against_xla(2, 40, 2, 32, dtype, rounds=1)
    assert set(seconds) == {'kernel', 'xla'} and all(0 < s < 10 for s in seconds.values())


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_sharded_over_batch_and_heads_without_gathering(dtype):
    """On a (data=2, fsdp=2, tensor=2) mesh each device runs its own (batch, head) slices: same numbers, no gather."""
    shape = (8, 50, 4, 32)
    qkv, dout = (x.astype(dtype) for x in inputs(shape, seed=1))
    scale = shape[-1] ** -0.5
    fn = jax.jit(lambda *a: value_and_grad(lambda x: cpu_attention.attention(x, scale), *a))
    expected = fn(qkv, dout)
    mesh = sharding.create_mesh(2, 2, 2)
    batch = ('data', 'fsdp')
    args = (jax.device_put(qkv, NamedSharding(mesh, P(batch, None, None, 'tensor'))),
            jax.device_put(dout, NamedSharding(mesh, P(batch, None, 'tensor'))))
    hlo = fn.lower(*args).compile().as_text()
    assert 'vit_attention_forward' in hlo and 'vit_attention_backward' in hlo
    assert 'all-gather' not in hlo and 'all-to-all' not in hlo
    got = fn(*args)
    assert got[0].sharding.is_equivalent_to(NamedSharding(mesh, P(batch, None, 'tensor')), 4)
    assert got[1].sharding.is_equivalent_to(NamedSharding(mesh, P(batch, None, None, 'tensor')), 5)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=1e-6, rtol=0)

    # Tokens sharded: the partitioner gathers them (the kernel needs each head whole) and the numbers still hold.
    mesh = sharding.create_mesh(2, 1, 4)
    args = (jax.device_put(qkv[:, :48], NamedSharding(mesh, P(None, 'tensor'))),
            jax.device_put(dout[:, :48], NamedSharding(mesh, P(None, 'tensor'))))
    expected = fn(qkv[:, :48], dout[:, :48])
    for a, b in zip(fn(*args), expected):
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), atol=1e-6, rtol=0)


def test_vit_uses_the_kernel_on_cpu_and_matches_xla_path():
    """A ViT's logits and gradients are the same through the kernel and XLA's ops, and the kernel is what runs."""
    model = models.create_model('vit_ti16', num_classes=10, image_size=32, patch_size=8, hidden_size=64,
                                num_layers=2, num_heads=2, mlp_dim=128, platform='cpu')
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    params = model.init(jax.random.key(1), x)

    def loss(p):
        return jnp.sum(model.apply(p, x) ** 2)

    fused = jax.jit(jax.value_and_grad(loss))
    assert 'vit_attention_backward' in fused.lower(params).as_text()
    with cpu_attention.xla_attention():
        plain = jax.jit(jax.value_and_grad(loss))
        assert 'vit_attention' not in plain.lower(params).as_text()
        expected = plain(params)
    got = fused(params)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(expected[1])):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()) + 1e-7, rtol=0)


def test_supports_only_what_the_kernel_computes():
    assert cpu_attention.supports(jnp.float32, 64) and cpu_attention.supports(jnp.bfloat16, 64)
    assert not cpu_attention.supports(jnp.float16, 64)
    assert not cpu_attention.supports(jnp.float32, 24)  # head dimension not a multiple of 16
    with cpu_attention.xla_attention():
        assert not cpu_attention.supports(jnp.float32, 64)


def test_build_failure_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    monkeypatch.setenv('CXX', '/bin/false')
    with pytest.raises(RuntimeError, match='/bin/false .* failed'):
        cpu_attention.build()
    assert not list(tmp_path.glob('*.so'))


def _tiny_vit(**overrides):
    return models.create_model('vit_ti16', num_classes=10, image_size=32, patch_size=8, hidden_size=64,
                               num_layers=1, num_heads=2, mlp_dim=128, **{'platform': 'cpu', **overrides})


def test_attention_impl_is_a_field_that_jit_sees():
    """'auto' on CPU in float32 runs the kernel, 'xla' XLA's ops: the same numbers, and one jitted function traces
    each model afresh (the choice is part of the model, not a global read at trace time)."""
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    auto, xla = _tiny_vit(), _tiny_vit(attention_impl='xla')
    params = auto.init(jax.random.key(1), x)
    apply = jax.jit(lambda model, p, x: model.apply(p, x), static_argnums=0)
    assert 'vit_attention_forward' in apply.lower(auto, params, x).as_text()
    assert 'vit_attention' not in apply.lower(xla, params, x).as_text()
    np.testing.assert_allclose(apply(auto, params, x), apply(xla, params, x), atol=1e-5, rtol=1e-5)
    assert 'vit_attention_forward' in apply.lower(_tiny_vit(attention_impl='cpu_kernel'), params, x).as_text()


def test_bfloat16_model_runs_the_kernel_in_bfloat16():
    """bf16 on CPU: the kernel takes the bf16 qkv as it is; logits and gradients agree with XLA's bf16 attention to
    bf16 rounding (the kernel's side is the more precise)."""
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    kernel = _tiny_vit(dtype='bfloat16', attention_impl='cpu_kernel')
    xla = _tiny_vit(dtype='bfloat16', attention_impl='xla')
    params = kernel.init(jax.random.key(1), x)

    def loss(model, p):
        return jnp.mean(jnp.square(model.apply(p, x)))
    run = jax.jit(lambda model, p: jax.value_and_grad(functools.partial(loss, model))(p), static_argnums=0)
    assert 'vit_attention_backward_bf16' in run.lower(kernel, params).as_text()
    assert encoder.resolve_attention('auto', jnp.bfloat16, 64, (2, 17, 2), 'cpu') == 'cpu_kernel'  # too small
    (got, got_grads), (ref, ref_grads) = run(kernel, params), run(xla, params)
    np.testing.assert_allclose(got, ref, rtol=2e-2)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=3e-2 * float(np.abs(b).max()))


def test_impossible_attention_impl_names_why_and_the_fix():
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU .* platform cpu, dtype float32, head "
                                         "dim 32.*attention_impl='auto'"):
        _tiny_vit(attention_impl='cudnn').init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU .* platform cuda:7.5, dtype bfloat16"):
        _tiny_vit(attention_impl='cudnn', platform='cuda:7.5', dtype='bfloat16').init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="attention_impl='cpu_kernel' needs .* dtype float16"):
        _tiny_vit(attention_impl='cpu_kernel', dtype='float16').init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="attention_impl='cpu_kernel' needs the CPU platform.*platform tpu"):
        _tiny_vit(attention_impl='cpu_kernel', platform='tpu').init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"platform='gpu' is not one of 'portable', 'cpu'.*'cuda:9.0'"):
        _tiny_vit(platform='gpu')
    with pytest.raises(ValueError, match=r"attention_impl='flash' is not one of \('auto', 'xla', 'cudnn'"):
        _tiny_vit(attention_impl='flash')


@pytest.mark.parametrize('capability, dtype, head_dim, expected', [
    ('9.0', 'bfloat16', 64, 'cudnn'), ('8.0', 'float16', 128, 'cudnn'), ('9.0', 'bfloat16', 256, 'cudnn'),
    ('8.0', 'bfloat16', 256, 'xla'),  # > 128 before Hopper
    ('9.0', 'float32', 64, 'xla'), ('9.0', 'bfloat16', 20, 'xla'), ('7.5', 'bfloat16', 64, 'xla')])
def test_auto_on_gpu_is_cudnn_where_it_can_run(capability, dtype, head_dim, expected):
    assert encoder.resolve_attention('auto', jnp.dtype(dtype), head_dim, (8, 197, 12), f'cuda:{capability}') == expected


def test_cudnn_is_asked_for_explicitly_and_the_host_is_never_asked(monkeypatch):
    """jax.nn.dot_product_attention's default (implementation=None) is XLA's attention in this jax: 'auto' compiled
    for a GPU in bfloat16 must name cuDNN; compiled for a TPU, XLA's. The model decides from its platform alone: a
    host that says it is a GPU changes nothing."""
    calls = []
    monkeypatch.setattr(jax, 'default_backend', lambda: pytest.fail('the model asked the host for its backend'))
    monkeypatch.setattr(jax, 'devices', lambda *a: pytest.fail('the model asked the host for its devices'))
    monkeypatch.setattr(jax.nn, 'dot_product_attention', lambda q, k, v, scale, implementation, **lengths:
                        calls.append((implementation, q.shape[1], sorted(lengths))) or q)
    x = jnp.zeros((1, 32, 32, 3))
    for platform in ('cuda:9.0', 'tpu'):
        model = _tiny_vit(dtype='bfloat16', platform=platform)
        params = jax.eval_shape(model.init, jax.random.key(0), x)  # init takes the maps' path (all collections mutable)
        jax.eval_shape(model.apply, params, x)
    # 17 tokens: cuDNN's call padded to 24 with both lengths given; XLA's call as it is.
    assert calls == [('cudnn', 24, ['key_value_seq_lengths', 'query_seq_lengths']), ('xla', 17, [])]


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN runs on a GPU (benchmarks/gpu.sh runs this there)')
def test_cudnn_matches_xla_attention_on_gpu():
    """On a GPU, 'auto' in bfloat16 compiles to cuDNN's fused attention and gives XLA's logits and gradients."""
    from vit_jax import hardware
    model = _tiny_vit(dtype='bfloat16', platform=hardware.host_platform())
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    params = model.init(jax.random.key(1), x)

    def grads(m):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2)))

    assert '__cudnn$fmha' in grads(model).lower(params).compile().as_text()
    (got, got_g), (ref, ref_g) = grads(model)(params), grads(model.clone(attention_impl='xla'))(params)
    np.testing.assert_allclose(got, ref, rtol=2e-2)  # bfloat16: ~3 significant digits
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0,
                                   atol=5e-2 * float(jnp.abs(b.astype(jnp.float32)).max()) + 1e-3)
