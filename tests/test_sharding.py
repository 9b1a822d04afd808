"""The train step on 8 fake CPU devices: (data=4, tensor=2) and FSDP give the losses of one device (rel. 1e-5)."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vit_jax import models, sharding
from vit_jax.objectives import Supervised
from vit_jax.train.optim import create_optimizer
from vit_jax.train.step import init_state, make_train_step

IMAGE = 16
BATCH = 16


def optimizer_config(**overrides):
    defaults = dict(name='adamw', learning_rate=1e-3, warmup_steps=0, schedule='cosine', end_learning_rate=0.0,
                    b1=0.9, b2=0.999, eps=1e-8, momentum=0.9, nesterov=False, weight_decay=0.05, grad_clip_norm=1.0,
                    accumulation_steps=1, microbatches=1, ema_decay=0.0)
    return ml_collections.ConfigDict({**defaults, **overrides})


def batches(n, num_classes=10):
    rng = np.random.default_rng(0)
    for _ in range(n):
        labels = rng.integers(0, num_classes, BATCH)
        yield {'images': rng.normal(size=(BATCH, IMAGE, IMAGE, 3)).astype(np.float32),
               'labels': np.eye(num_classes, dtype=np.float32)[labels]}


def run(mesh, steps=4, opt=None, ema=0.0, microbatches=1):
    model = models.create_model('vit_ti16', num_classes=10, image_size=IMAGE, patch_size=4, hidden_size=64,
                                num_layers=2, num_heads=4, mlp_dim=128, dropout_rate=0.1, drop_path_rate=0.1)
    opt = opt or optimizer_config()
    tx, schedule = create_optimizer(opt, 10)
    state, shardings = init_state(model, tx, mesh, IMAGE, seed=0, use_ema=ema > 0)
    step = make_train_step(Supervised(model), tx, shardings, mesh, schedule, seed=0, ema_decay=ema,
                           accumulation_steps=opt.accumulation_steps, microbatches=microbatches)
    losses = []
    for batch in batches(steps):
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics['train_loss']))
    return np.array(losses), state


def test_eight_fake_devices():
    assert jax.device_count() == 8  # tests/conftest.py


SLOW = pytest.mark.slow  # meshes whose rules the faster cases already exercise


@pytest.mark.parametrize('axes', [dict(data=4, tensor=2), dict(data=2, fsdp=4), pytest.param(dict(fsdp=8), marks=SLOW),
                                  pytest.param(dict(data=8), marks=SLOW)])
def test_sharded_losses_match_one_device(axes):
    single, _ = run(sharding.create_mesh(devices=jax.devices()[:1]))
    mesh = sharding.create_mesh(**{'data': 1, **axes})
    sharded, state = run(mesh)
    assert np.all(np.diff(single) != 0)  # the model trains: the comparison is not between constants
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    qkv = state.params['encoder']['block_0']['attn']['qkv']['kernel']  # (embed, 3, heads, head_dim)
    fc1 = state.params['encoder']['block_0']['mlp']['fc1']['kernel']  # (embed, mlp)
    expected_qkv = P('fsdp' if mesh.shape['fsdp'] > 1 else None, None,
                     'tensor' if mesh.shape['tensor'] > 1 else None, None)
    assert qkv.sharding.spec == expected_qkv
    assert fc1.sharding.spec == P(expected_qkv[0], expected_qkv[2])
    # Adam's moments live where their parameter lives.
    mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
    mu = [x for x in mu if hasattr(x, 'mu')][0].mu['model']['encoder']['block_0']['mlp']['fc1']['kernel']
    assert mu.sharding.spec == fc1.sharding.spec


def test_gradient_accumulation_matches_the_large_batch():
    """Two micro-batches of 8 accumulated == one batch of 16, for a model without dropout."""
    model = models.create_model('vit_ti16', num_classes=10, image_size=IMAGE, patch_size=4, hidden_size=64,
                                num_layers=1, num_heads=4, mlp_dim=128)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    batch = next(batches(1))

    def final_params(opt, micro_batches):
        tx, schedule = create_optimizer(opt, 10)
        state, shardings = init_state(model, tx, mesh, IMAGE, seed=0, use_ema=False)
        state = state.replace(params=jax.tree.map(lambda x: x + 0.01, state.params))  # non-zero head
        step = make_train_step(Supervised(model), tx, shardings, mesh, schedule, 0, 0.0, opt.accumulation_steps)
        for mb in micro_batches:
            state, _ = step(state, mb)
        return state.params

    half = [{k: v[i * 8:(i + 1) * 8] for k, v in batch.items()} for i in range(2)]
    big = final_params(optimizer_config(grad_clip_norm=0.0), [batch])
    accumulated = final_params(optimizer_config(grad_clip_norm=0.0, accumulation_steps=2), half)
    for a, b in zip(jax.tree.leaves(big), jax.tree.leaves(accumulated)):
        np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize('axes', [pytest.param(dict(data=8), marks=SLOW), dict(data=2, fsdp=2, tensor=2)])
def test_microbatches_give_the_batch_gradient(axes):
    """A step computed as 2 slices of the batch == the whole batch at once, on a sharded mesh (no dropout)."""
    model = models.create_model('vit_ti16', num_classes=10, image_size=IMAGE, patch_size=4, hidden_size=64,
                                num_layers=2, num_heads=4, mlp_dim=128)
    mesh = sharding.create_mesh(**{'data': 1, **axes})
    opt = optimizer_config()
    tx, schedule = create_optimizer(opt, 10)
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in next(batches(1)).items()}
    results = {}
    for m in (1, 2):
        state, shardings = init_state(model, tx, mesh, IMAGE, seed=0, use_ema=False)
        step = make_train_step(Supervised(model), tx, shardings, mesh, schedule, 0, 0.0, microbatches=m)
        state, metrics = step(state, batch)
        results[m] = (jax.device_get(metrics), jax.device_get(state.params))
    (metrics1, params1), (metrics2, params2) = results[1], results[2]
    assert metrics1['grad_norm'] > 0.1
    for key in ('train_loss', 'train_accuracy', 'grad_norm'):
        np.testing.assert_allclose(metrics2[key], metrics1[key], rtol=1e-5, err_msg=key)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(
        init_state(model, tx, mesh, IMAGE, seed=0, use_ema=False)[0].params)))
    assert moved > 1e-4  # the update is not empty
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_microbatches_must_divide_the_batch():
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r'A batch of 16 does not split into 3 micro-batches over the 1 batch'):
        run(mesh, steps=1, microbatches=3)
    with pytest.raises(ValueError, match=r'into 4 micro-batches over the 8 batch shards .* multiple of .* = 32'):
        run(sharding.create_mesh(data=8), steps=1, microbatches=4)  # slices of 4 examples over 8 devices


def test_ema_tracks_the_parameters():
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    _, state = run(mesh, steps=3, ema=0.5)
    leaf = lambda t: t['encoder']['block_0']['mlp']['fc1']['kernel']  # noqa: E731
    assert not np.allclose(leaf(state.ema_params), leaf(state.params))
    assert np.abs(leaf(state.ema_params) - leaf(state.params)).max() < 0.01


def test_mesh_errors():
    with pytest.raises(ValueError, match=r'does not fit 8 devices'):
        sharding.create_mesh(data=3, tensor=1)
    with pytest.raises(ValueError, match=r'at most one axis may be -1'):
        sharding.create_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r'uses 4 of 8 devices'):
        sharding.create_mesh(data=2, fsdp=2, tensor=1)
