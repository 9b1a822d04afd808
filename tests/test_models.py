"""Every family, at a small size: jit-compiles and runs at two resolutions, in float32 and bfloat16, under train=True
with dropout and stochastic depth; the intermediate outputs and the scanned encoder behave as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from flax.core import meta

from vit_jax import models
from vit_jax.models.encoder import MlpBlock, TokenDense, bias_add, token_dot_general

SMALL = dict(hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96)
FAMILIES = {  # name -> (overrides, two resolutions)
    'vit_ti16': (dict(SMALL, patch_size=8), (32, 48)),
    'deit_ti16_distilled': (dict(SMALL, patch_size=8), (32, 48)),
    't2t_vit_7': (dict(hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128, token_dim=16), (32, 64)),
    't2t_vit_t14': (dict(hidden_size=64, num_layers=2, num_heads=2, mlp_dim=128, token_dim=16), (32, 64)),
    'r26_vit_s32': (dict(SMALL, resnet_layers=(1, 1), resnet_width=0.5), (32, 64)),
    'resnet26': (dict(resnet_layers=(1, 1), resnet_width=0.5), (32, 64)),
}
DROPOUT = dict(dropout_rate=0.1, attention_dropout_rate=0.1, drop_path_rate=0.2)


def init(model, seed=0):
    s = model.image_size  # jitted: eager init compiles every op on its own
    return meta.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, s, s, 3)))['params'])


def perturb(params, seed=1):
    """Zero-initialised heads make every logit 0: give every parameter some signal."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def images(size, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


# bf16 of a ViT and of the ResNet in `make test`; the other families' bf16 runs (~20 s each) are slow.
@pytest.mark.parametrize('dtype, name', [
    pytest.param(dtype, name, marks=pytest.mark.slow if dtype == 'bfloat16' and name not in ('vit_ti16', 'resnet26')
                 else ()) for dtype in ('float32', 'bfloat16') for name in sorted(FAMILIES)])
def test_family_forward_two_resolutions(dtype, name):
    overrides, sizes = FAMILIES[name]
    outputs = {}
    for size in sizes:
        model = models.create_model(name, num_classes=5, image_size=size, dtype=dtype, **overrides)
        params = perturb(init(model))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # fp32 master weights
        logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images(size))
        assert logits.shape == (2, 5) and logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits)) and np.std(logits) > 0
        outputs[size] = (model, params, logits)
    if dtype == 'bfloat16':  # same weights in float32: bf16 compute stays close
        size = sizes[0]
        model, params, logits = outputs[size]
        reference = jax.jit(model.clone(dtype='float32').apply)({'params': params}, images(size))
        assert np.abs(np.asarray(logits) - np.asarray(reference)).max() < 0.1 * np.abs(reference).max() + 0.05


@pytest.mark.parametrize('name', sorted(set(FAMILIES) - {'resnet26'}))
def test_train_mode_dropout_and_drop_path(name):
    overrides, (size, _) = FAMILIES[name]
    model = models.create_model(name, num_classes=5, image_size=size, **overrides, **DROPOUT)
    params = perturb(init(model))
    x = images(size, batch=4)
    apply = jax.jit(lambda p, x, rng: model.apply({'params': p}, x, train=True, rngs={'dropout': rng}))
    a, b = apply(params, x, jax.random.key(1)), apply(params, x, jax.random.key(2))
    a_again = apply(params, x, jax.random.key(1))
    if model.distilled:  # training returns (class logits, distillation logits)
        assert isinstance(a, tuple) and len(a) == 2
        a, b, a_again = a[0], b[0], a_again[0]
    assert a.shape == (4, 5)
    assert not np.allclose(a, b)  # the dropout rng matters
    np.testing.assert_array_equal(a, a_again)  # and is the only randomness


def test_distilled_inference_averages_the_heads():
    overrides, (size, _) = FAMILIES['deit_ti16_distilled']
    model = models.create_model('deit_ti16_distilled', num_classes=5, image_size=size, **overrides)
    params = perturb(init(model))
    x = images(size)
    cls_logits, dist_logits = model.apply({'params': params}, x, train=True)  # no dropout configured: deterministic
    assert not np.allclose(cls_logits, dist_logits)
    np.testing.assert_allclose(model.apply({'params': params}, x), (cls_logits + dist_logits) / 2, atol=1e-6)


def test_drop_path_linear_rule_in_scanned_and_unscanned_encoder():
    """Only drop path is on: at rate 0 for block 0, the first block is never dropped; scan and loop agree at eval."""
    model = models.create_model('vit_ti16', num_classes=5, image_size=32, patch_size=8, **SMALL, drop_path_rate=0.5)
    scanned = model.clone(scan_layers=True)
    params = perturb(init(model))
    from vit_jax.checkpoints import stack_layers
    x = images(32)
    np.testing.assert_allclose(model.apply({'params': params}, x),
                               scanned.apply({'params': stack_layers(params)}, x), atol=1e-5)
    train = lambda m, p, seed: m.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.key(seed)})  # noqa
    outs = [np.asarray(train(scanned, stack_layers(params), s)) for s in range(8)]
    assert len({o.tobytes() for o in outs}) > 1  # stochastic depth is active inside the scan


def test_intermediates_and_attention_weights():
    overrides, (size, _) = FAMILIES['vit_ti16']
    model = models.create_model('vit_ti16', num_classes=5, image_size=size, **overrides)
    params = perturb(init(model))
    logits, state = model.apply({'params': params}, images(size), mutable=['intermediates', 'attention_weights'])
    inter = state['intermediates']
    tokens = [inter['encoder'][f'block_{i}']['tokens'][0] for i in range(2)]
    assert [t.shape for t in tokens] == [(2, 17, 48)] * 2  # 16 patches + class token
    assert inter['pre_logits'][0].shape == (2, 48)
    weights = [state['attention_weights']['encoder'][f'block_{i}']['attn']['weights'][0] for i in range(2)]
    assert weights[0].shape == (2, 3, 17, 17)
    np.testing.assert_allclose(np.asarray(weights[0]).sum(-1), 1.0, atol=1e-5)
    # Asking for the maps takes the explicit-softmax path: the logits must not change.
    np.testing.assert_allclose(logits, model.apply({'params': params}, images(size)), atol=1e-5)


def test_accelerator_attention_path_matches_cpu_path(monkeypatch):
    """GPUs / TPUs take jax.nn.dot_product_attention, CPU the fused kernel: both token-major, (B, N, H, dh).

    Forcing the accelerator branch here (its XLA implementation runs on CPU) checks it against the kernel's, with
    gradients.
    """
    overrides, (size, _) = FAMILIES['vit_ti16']
    model = models.create_model('vit_ti16', num_classes=5, image_size=size, **overrides)
    params = perturb(init(model))

    def loss(p):
        return jnp.sum(model.apply({'params': p}, images(size)) ** 2)

    cpu_loss, cpu_grads = jax.value_and_grad(loss)(params)
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    accel_loss, accel_grads = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(accel_loss, cpu_loss, rtol=1e-5)
    for a, c in zip(jax.tree.leaves(accel_grads), jax.tree.leaves(cpu_grads)):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('lhs_shape, rhs_shape, contract', [
    ((2, 5, 8), (8, 3, 2, 4), ((2,), (0,))),            # qkv: (B, N, D) x (D, 3, H, dh)
    ((2, 5, 2, 4), (2, 4, 8), ((2, 3), (0, 1))),        # out: (B, N, H, dh) x (H, dh, D)
    ((3, 2, 5, 8), (8, 6), ((3,), (0,))),               # three leading dims merged
    ((5, 8), (8, 6), ((1,), (0,))),                     # one leading dim: lax's own call
    ((2, 8, 5), (8, 6), ((1,), (0,))),                  # not the trailing dims: lax's own call
])
def test_token_dot_general_is_dot_general(lhs_shape, rhs_shape, contract):
    """Merging the leading dims changes how XLA computes the gradients, not their values."""
    keys = jax.random.split(jax.random.key(0))
    lhs, rhs = jax.random.normal(keys[0], lhs_shape), jax.random.normal(keys[1], rhs_shape)
    dims = (contract, ((), ()))

    def value_and_grads(dot_general):
        out, vjp = jax.vjp(lambda a, b: dot_general(a, b, dims), lhs, rhs)
        return (out, *vjp(jnp.cos(out)))

    for got, want in zip(value_and_grads(token_dot_general), value_and_grads(jax.lax.dot_general)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('y_shape, bias_shape', [((2, 5, 8), (8,)), ((2, 5, 3, 2, 4), (3, 2, 4)), ((7, 6), (6,))])
def test_bias_add_sums_the_bias_gradient_in_fp32(y_shape, bias_shape):
    """bf16 activations, fp32 bias: the value is the bf16 add's; the bias's gradient is dy summed over every token in
    fp32 (not rounded to bf16), and y's gradient is dy."""
    keys = jax.random.split(jax.random.key(0), 3)
    y = jax.random.normal(keys[0], y_shape).astype(jnp.bfloat16)
    bias = jax.random.normal(keys[1], bias_shape)
    dy = (jax.random.normal(keys[2], y_shape) * 3).astype(jnp.bfloat16)
    out, vjp = jax.vjp(bias_add, y, bias)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(y + bias.astype(jnp.bfloat16), np.float32))
    dy_y, dbias = vjp(dy)
    assert dbias.dtype == jnp.float32 and dbias.shape == bias_shape
    want = np.asarray(dy, np.float64).reshape(-1, *bias_shape).sum(0)
    np.testing.assert_allclose(dbias, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(dy_y, np.float32), np.asarray(dy, np.float32))
    # The same dtype, or a bias broadcast over inner dims (head-major qkv): autodiff of the plain add.
    y32 = y.astype(jnp.float32)
    np.testing.assert_allclose(jax.vjp(bias_add, y32, bias)[1](dy.astype(jnp.float32))[1], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('axis, in_shape, features', [(-1, (2, 5, 12), 8), ((2, 3), (2, 5, 3, 4), 6)])
def test_token_dense_is_flax_dense_general(axis, in_shape, features):
    """The same parameters as flax's DenseGeneral (names, shapes, initial values, logical axes) and the same
    output and gradients in fp32: checkpoints and seeds carry over."""
    kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None,) * (len(in_shape) - 1) + ('mlp',)
                                               if axis == -1 else ('heads', 'kv', 'mlp'))
    bias_init = nn.with_logical_partitioning(nn.initializers.normal(0.1), ('mlp',))
    ours = TokenDense(features, axis=axis, kernel_init=kernel_init, bias_init=bias_init)
    flax = nn.DenseGeneral(features, axis=axis, kernel_init=kernel_init, bias_init=bias_init)
    x = jax.random.normal(jax.random.key(1), in_shape)
    boxed_ours, boxed_flax = ours.init(jax.random.key(0), x), flax.init(jax.random.key(0), x)
    names = lambda tree: jax.tree.map(lambda v: v.names, tree, is_leaf=lambda v: isinstance(v, meta.AxisMetadata))
    assert names(boxed_ours) == names(boxed_flax)
    params_ours, params_flax = meta.unbox(boxed_ours), meta.unbox(boxed_flax)
    assert jax.tree.structure(params_ours) == jax.tree.structure(params_flax)
    for a, b in zip(jax.tree.leaves(params_ours), jax.tree.leaves(params_flax)):
        np.testing.assert_array_equal(a, b)
    loss = lambda module, p: jnp.sum(jnp.sin(module.apply(p, x)))
    for a, b in zip(jax.tree.leaves(jax.grad(loss, 1)(ours, params_ours)),
                    jax.tree.leaves(jax.grad(loss, 1)(flax, params_flax))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_mlp_computes_gelu_in_fp32():
    """A bf16 MLP's hidden activations are the fp32 GELU of the bf16 pre-activations, rounded once to bf16."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 8)).astype(jnp.bfloat16)
    mlp = MlpBlock(16, dtype=jnp.bfloat16)
    params = perturb(meta.unbox(mlp.init(jax.random.key(1), x, True)))

    def dense(h, layer):  # a bf16 product accumulated in fp32, rounded, plus the rounded bias
        p = params['params'][layer]
        y = jnp.dot(h, p['kernel'].astype(jnp.bfloat16), preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return y + p['bias'].astype(jnp.bfloat16)

    hidden = jax.nn.gelu(dense(x, 'fc1').astype(jnp.float32), approximate=True).astype(jnp.bfloat16)
    want = dense(hidden, 'fc2')
    np.testing.assert_array_equal(np.asarray(mlp.apply(params, x, True), np.float32), np.asarray(want, np.float32))


def test_bf16_projection_gradients_leave_no_windowed_reduction():
    """The bias gradients of a bf16 MLP compile to plain column sums on CPU, not XLA's tree of windowed reductions
    over an fp32 copy (a bf16 ViT-S train step took ~10% longer when they did)."""
    x = jax.random.normal(jax.random.key(0), (4, 50, 32)).astype(jnp.bfloat16)
    mlp = MlpBlock(128, dtype=jnp.bfloat16)
    params = meta.unbox(mlp.init(jax.random.key(1), x, True))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(mlp.apply(p, x, True).astype(jnp.float32) ** 2)))
    hlo = grad.lower(params).compile().as_text()
    assert 'reduce-window' not in hlo
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grad(params)))


def test_embed_encode_classify_compose():
    """Objectives reach inside the model through these three methods (e.g. masked patch prediction)."""
    overrides, (size, _) = FAMILIES['vit_ti16']
    model = models.create_model('vit_ti16', num_classes=5, image_size=size, **overrides)
    variables = {'params': perturb(init(model))}
    patches = model.apply(variables, images(size), method='embed')
    assert patches.shape == (2, 16, 48)
    encoded = model.apply(variables, patches, method='encode')
    assert encoded.shape == (2, 17, 48)
    np.testing.assert_allclose(model.apply(variables, encoded, method='classify'),
                               model.apply(variables, images(size)), atol=1e-6)


@pytest.mark.parametrize('classifier,shape', [('gap', (2, 5)), ('unpooled', (2, 16, 5)),
                                              ('token_unpooled', (2, 17, 5))])
def test_classifiers(classifier, shape):
    overrides, (size, _) = FAMILIES['vit_ti16']
    model = models.create_model('vit_ti16', num_classes=5, image_size=size, classifier=classifier, **overrides)
    params = init(model)
    assert ('class_token' in params) == (classifier == 'token_unpooled')
    assert model.apply({'params': params}, images(size)).shape == shape


def test_sincos2d_posemb_has_no_parameter():
    overrides, (size, _) = FAMILIES['vit_ti16']
    model = models.create_model('vit_ti16', num_classes=5, image_size=size, posemb='sincos2d', **overrides)
    params = init(model)
    assert 'pos_embed' not in params
    assert np.all(np.isfinite(model.apply({'params': perturb(params)}, images(size))))


def test_t2t_frozen_parameters_get_no_gradient():
    overrides, (size, _) = FAMILIES['t2t_vit_7']
    model = models.create_model('t2t_vit_7', num_classes=5, image_size=size, **overrides)
    params = perturb(init(model))
    grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, images(size)) ** 2))(params)
    flat = {'/'.join(k): v for k, v in __import__('flax').traverse_util.flatten_dict(grads).items()}
    frozen = [k for k in flat if models.is_frozen(tuple(k.split('/')))]
    assert sorted(frozen) == ['sinusoid_pos_embed', 'tokens_to_token/attention1/random_features',
                              'tokens_to_token/attention2/random_features']
    assert all(np.all(flat[k] == 0) for k in frozen)
    assert np.abs(flat['class_token']).max() > 0


def test_logical_axis_names_on_parameters():
    model = models.create_model('vit_ti16', num_classes=5, image_size=32, patch_size=8, **SMALL)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    names = nn_names(boxed)
    assert names['encoder/block_0/attn/qkv/kernel'] == ('embed', None, 'heads', 'kv')
    assert names['encoder/block_0/mlp/fc1/kernel'] == ('embed', 'mlp')
    assert names['head/kernel'] == ('embed', 'classes')
    scanned = model.clone(scan_layers=True).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
    assert nn_names(scanned)['encoder/blocks/mlp/fc2/kernel'] == ('layers', 'mlp', 'embed')


def nn_names(boxed):
    from flax import traverse_util
    flat = traverse_util.flatten_dict(boxed, is_leaf=lambda _, v: isinstance(v, meta.Partitioned))
    return {'/'.join(k): v.names for k, v in flat.items() if isinstance(v, meta.Partitioned)}


def test_qkv_initialised_like_three_separate_projections():
    """Xavier-uniform per (D, D) projection, as vision_transformer's query/key/value: bound sqrt(6 / (D + D))."""
    model = models.create_model('vit_ti16', num_classes=5, image_size=32, patch_size=8, hidden_size=96,
                                num_layers=1, num_heads=3, mlp_dim=96)
    kernel = np.asarray(init(model)['encoder']['block_0']['attn']['qkv']['kernel'])  # (D, 3, H, dh)
    bound = np.sqrt(6 / (96 + 96))
    for i in range(3):
        part = np.abs(kernel[:, i])
        assert part.max() <= bound and part.max() > 0.95 * bound
    assert not np.allclose(kernel[:, 0], kernel[:, 1])
