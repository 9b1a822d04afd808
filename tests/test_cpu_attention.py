"""The fused CPU attention kernel: builds here, matches XLA's attention (values and gradients), shards by heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import models, sharding
from vit_jax.kernels import cpu_attention
from vit_jax.models.encoder import softmax_attention


def value_and_grads(fn, q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(dout))


def inputs(shape, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    # Logits of a few units, as in a trained model: the softmax is peaked, not uniform.
    return [2.0 * jax.random.normal(key, shape, jnp.float32) for key in keys]


def test_kernel_builds_on_this_machine():
    # CI's machine has g++; a build failure here would silently cost every CPU user the kernel's speed.
    path = cpu_attention.build()
    assert path.exists() and path.stat().st_size > 0
    assert cpu_attention.available()


@pytest.mark.parametrize('shape', [(2, 3, 197, 64), (3, 1, 5, 16), (1, 2, 50, 80), (2, 2, 33, 128), (1, 1, 16, 32)])
def test_matches_xla_attention(shape):
    """Output and the three input gradients equal XLA's softmax attention (tokens not a multiple of 16 included)."""
    q, k, v, dout = inputs(shape)
    scale = shape[-1] ** -0.5
    ours = jax.jit(lambda *a: value_and_grads(lambda q, k, v: cpu_attention.attention(q, k, v, scale), *a))
    ref = jax.jit(lambda *a: value_and_grads(lambda q, k, v: softmax_attention(q, k, v, scale), *a))
    for name, a, b in zip(('out', 'dq', 'dk', 'dv'), ours(q, k, v, dout), ref(q, k, v, dout)):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()), rtol=0, err_msg=name)


def test_sharded_over_batch_and_heads_without_gathering():
    """On a (data=2, fsdp=2, tensor=2) mesh each device runs its own (batch, head) slices: same numbers, no gather."""
    shape = (8, 4, 50, 32)
    q, k, v, dout = inputs(shape, seed=1)
    scale = shape[-1] ** -0.5
    fn = jax.jit(lambda *a: value_and_grads(lambda q, k, v: cpu_attention.attention(q, k, v, scale), *a))
    expected = fn(q, k, v, dout)
    mesh = sharding.create_mesh(2, 2, 2)
    spec = P(('data', 'fsdp'), 'tensor')
    args = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, dout)]
    hlo = fn.lower(*args).compile().as_text()
    assert 'vit_attention_forward' in hlo and 'vit_attention_backward' in hlo
    assert 'all-gather' not in hlo and 'all-to-all' not in hlo
    got = fn(*args)
    assert got[0].sharding.spec == spec
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)

    # Tokens sharded: the partitioner gathers them (the kernel needs each head whole) and the numbers still hold.
    args = [jax.device_put(x, NamedSharding(sharding.create_mesh(2, 1, 4), P(None, None, 'tensor'))) for x in
            (q[:, :, :48], k[:, :, :48], v[:, :, :48], dout[:, :, :48])]
    expected = fn(*(x[:, :, :48] for x in (q, k, v, dout)))
    for a, b in zip(fn(*args), expected):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_vit_uses_the_kernel_on_cpu_and_matches_xla_path():
    """A ViT's logits and gradients are the same through the kernel and XLA's ops, and the kernel is what runs."""
    model = models.create_model('vit_ti16', num_classes=10, image_size=32, patch_size=8, hidden_size=64,
                                num_layers=2, num_heads=2, mlp_dim=128)
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
    assert cpu_attention.supports(jnp.zeros((2, 3, 197, 64), jnp.float32))
    assert not cpu_attention.supports(jnp.zeros((2, 3, 197, 64), jnp.bfloat16))
    assert not cpu_attention.supports(jnp.zeros((2, 3, 197, 24), jnp.float32))  # head dimension not a multiple of 16
    with cpu_attention.xla_attention():
        assert not cpu_attention.supports(jnp.zeros((2, 3, 197, 64), jnp.float32))


def test_build_failure_names_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv('VIT_JAX_CACHE', str(tmp_path))
    monkeypatch.setenv('CXX', '/bin/false')
    with pytest.raises(RuntimeError, match='/bin/false .* failed'):
        cpu_attention.build()
    assert not list(tmp_path.glob('*.so'))
