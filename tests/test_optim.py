"""The optimizer against its sources: which parameters decay, each source's update formula (torch.optim.AdamW with
timm's parameter groups, big_vision/optax.py::make, flax.optim.Adam, torch.optim.SGD), and the schedules."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
from flax.core import meta

from vit_jax.export.convert import torch_state_dict
from vit_jax.models import create_model
from vit_jax.train import config as config_lib
from vit_jax.train import optim

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)
BLOCK = ['attn/out/kernel', 'attn/qkv/kernel', 'mlp/fc1/kernel', 'mlp/fc2/kernel']
T2T_PERFORMER = ['tokens_to_token/attention1/fc1/kernel', 'tokens_to_token/attention1/fc2/kernel',
                 'tokens_to_token/attention1/kqv/kernel', 'tokens_to_token/attention1/proj/kernel',
                 'tokens_to_token/attention2/fc1/kernel', 'tokens_to_token/attention2/fc2/kernel',
                 'tokens_to_token/attention2/kqv/kernel', 'tokens_to_token/attention2/proj/kernel',
                 'tokens_to_token/project/kernel']
RESNET = ['resnet/block1/unit1/conv1/kernel', 'resnet/block1/unit1/conv2/kernel', 'resnet/block1/unit1/conv3/kernel',
          'resnet/block1/unit1/conv_proj/kernel', 'resnet/conv_root/kernel']
# (model, overrides) -> the decayed parameters, the encoder block's named by DECAYED_BLOCK below.
DECAYED = {
    ('vit_s16', (('mlp_dim', 64), ('representation_size', 32))):
        ['head/kernel', 'patch_embed/kernel', 'pre_logits/kernel'],
    ('deit_ti16_distilled', (('mlp_dim', 64),)): ['head/kernel', 'head_dist/kernel', 'patch_embed/kernel'],
    ('t2t_vit_14', (('token_dim', 16),)): ['head/kernel'] + T2T_PERFORMER,
    ('r50_vit_b16', (('mlp_dim', 64), ('resnet_layers', (1,)), ('resnet_width', 0.5))):
        ['head/kernel', 'patch_embed/kernel'] + RESNET,
}


def abstract_params(name: str, **overrides):
    model = create_model(name, num_classes=10, image_size=32, **overrides)
    return meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))['params'])


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('name, overrides', list(DECAYED))
def test_decayed_parameters_are_exactly_the_kernels(name, overrides, scan_layers):
    params = abstract_params(name, **TINY, **dict(overrides), scan_layers=scan_layers)
    block = 'encoder/blocks/' if scan_layers else 'encoder/block_0/'
    assert optim.decayed_names(params) == sorted(DECAYED[name, overrides] + [block + b for b in BLOCK])


def test_decay_mask_reads_names_in_any_tree():
    """The train step may hand the optimizer (model params, objective params): the rule is by name, not by root."""
    params = abstract_params('vit_s16', **TINY, mlp_dim=64)
    objective = {'mask_token': jnp.zeros((1, 1, 32)), 'decoder': {'kernel': jnp.zeros((32, 8)),
                                                                  'bias': jnp.zeros((8,))}}
    names = optim.decayed_names((params, objective))
    assert names == sorted(['0/' + n for n in optim.decayed_names(params)] + ['1/decoder/kernel'])


def test_layer_decay_scales_as_mae_and_scanned_blocks_like_unrolled_ones():
    """MAE util/lr_decay.py ``param_groups_lrd``: each update times decay^(L + 1 - layer_id), layer_id 0 for the class
    token, position and patch embeddings, i + 1 for block i, L + 1 for the rest (final norm, head). The stacked blocks
    of ``scan_layers`` get block i's scale on slice i."""
    decay, depth = 0.65, 3
    scales = {}
    for scan_layers in (False, True):
        params = abstract_params('vit_ti16', **dict(TINY, num_layers=depth), mlp_dim=64, scan_layers=scan_layers)
        ones = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params)
        tx = optim.layerwise_lr_decay(decay)
        updates, _ = tx.update(ones, tx.init(ones))
        flat, _ = jax.tree_util.tree_flatten_with_path(updates)
        scales[scan_layers] = {'/'.join(optim.param_names(path)): np.asarray(u) for path, u in flat}
    unrolled, scanned = scales[False], scales[True]
    for name in ('class_token', 'pos_embed', 'patch_embed/kernel', 'patch_embed/bias'):
        np.testing.assert_allclose(unrolled[name], decay ** (depth + 1), rtol=1e-6)
        np.testing.assert_allclose(scanned[name], decay ** (depth + 1), rtol=1e-6)
    for name in ('encoder/norm/scale', 'head/kernel', 'head/bias'):
        assert np.all(unrolled[name] == 1.0) and np.all(scanned[name] == 1.0)
    block_leaves = [n for n in unrolled if n.startswith('encoder/block_0/')]
    assert len(block_leaves) >= 8
    for i in range(depth):
        for leaf in block_leaves:
            rest = leaf.removeprefix('encoder/block_0/')
            np.testing.assert_allclose(unrolled[f'encoder/block_{i}/{rest}'], decay ** (depth - i), rtol=1e-6)
            np.testing.assert_allclose(scanned[f'encoder/blocks/{rest}'][i], decay ** (depth - i), rtol=1e-6)


def opt_config(**overrides) -> ml_collections.ConfigDict:
    opt = config_lib.base_config().optimizer
    opt.update(overrides)
    return opt


def random_like(tree, seed: int, scale: float = 1.0):
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [(scale * rng.normal(size=x.shape)).astype(np.float32) for x in leaves])


def run_ours(opt, params, grads_per_step, total_steps):
    tx, schedule = optim.create_optimizer(opt, total_steps)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_per_step:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, schedule


STEPS = 20


def test_deit_adamw_equals_torch_adamw_with_timm_param_groups():
    """DeiT / T2T: timm's create_optimizer('adamw') = torch.optim.AdamW over add_weight_decay's two groups."""
    params = random_like(abstract_params('deit_ti16_distilled', **TINY, mlp_dim=64), 0, 0.1)  # init-like scale
    grads = [random_like(params, 1 + i) for i in range(STEPS)]
    opt = opt_config(name='adamw', learning_rate=1e-2, weight_decay=0.05, warmup_steps=5, end_learning_rate=1e-4,
                     warmup_init_learning_rate=1e-6)
    ours, schedule = run_ours(opt, params, grads, STEPS)

    # timm/optim/optim_factory.py::add_weight_decay with the model's no_weight_decay() of timm's / DeiT's ViT.
    skip = {'pos_embed', 'cls_token', 'dist_token'}
    state = {k: torch.tensor(v, requires_grad=True) for k, v in torch_state_dict(params).items()}
    decay = [p for k, p in state.items() if not (p.ndim == 1 or k.endswith('.bias') or k in skip)]
    no_decay = [p for k, p in state.items() if p.ndim == 1 or k.endswith('.bias') or k in skip]
    assert len(decay) == 7  # patch_embed, qkv, proj, fc1, fc2, head, head_dist
    torch_opt = torch.optim.AdamW([{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': 0.05}],
                                  lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for t, g in enumerate(grads):
        for group in torch_opt.param_groups:
            group['lr'] = float(schedule(t))  # timm's scheduler sets each group's lr
        for k, v in torch_state_dict(g).items():
            state[k].grad = torch.tensor(v)
        torch_opt.step()
    expected = torch_state_dict(ours)
    for k, p in state.items():
        np.testing.assert_allclose(p.detach().numpy(), expected[k], atol=1e-6, rtol=0, err_msg=k)


def adam_reference(params, grads_per_step, lr, wd, decay_of, b1=0.9, b2=0.999, eps=1e-8):
    """Adam with bias correction; ``decay_of(t, name, p)`` returns the decoupled decay to subtract from p."""
    flat = {'/'.join(optim.param_names(path)): np.array(x, np.float64)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    mu = {k: np.zeros_like(v) for k, v in flat.items()}
    nu = {k: np.zeros_like(v) for k, v in flat.items()}
    for t, grads in enumerate(grads_per_step):
        g_flat = {'/'.join(optim.param_names(path)): np.array(x, np.float64)
                  for path, x in jax.tree_util.tree_flatten_with_path(grads)[0]}
        for k in flat:
            mu[k] = b1 * mu[k] + (1 - b1) * g_flat[k]
            nu[k] = b2 * nu[k] + (1 - b2) * g_flat[k] ** 2
            m_hat, v_hat = mu[k] / (1 - b1 ** (t + 1)), nu[k] / (1 - b2 ** (t + 1))
            flat[k] = flat[k] - lr(t) * m_hat / (np.sqrt(v_hat) + eps) - decay_of(t, k, flat[k])
    return flat


def flat_names(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {'/'.join(optim.param_names(path)): np.asarray(x) for path, x in flat}


def test_big_vision_decay_is_scaled_by_the_schedule_not_the_learning_rate():
    """big_vision/optax.py::make: p += -sched(t) * (lr * adam(g) + wd * p) on '.*/kernel$' (vit_s16_i1k: wd 1e-4)."""
    params = random_like(abstract_params('vit_s16', **TINY, mlp_dim=64, scan_layers=True), 0)
    grads = [random_like(params, 1 + i) for i in range(STEPS)]
    lr, wd = 1e-3, 1e-4
    opt = opt_config(name='adam', learning_rate=lr, weight_decay=wd, weight_decay_mode='schedule', warmup_steps=5,
                     schedule='cosine')
    ours, schedule = run_ours(opt, params, grads, STEPS)
    kernel = re.compile(r'.*/kernel$')
    multiplier = lambda t: float(schedule(t)) / lr  # noqa: E731 - big_vision's schedule: a multiplier in [0, 1]
    expected = adam_reference(params, grads, lambda t: lr * multiplier(t), wd,
                              lambda t, k, p: multiplier(t) * wd * p if kernel.match(k) else 0.0)
    got = flat_names(ours)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, rtol=0, err_msg=k)
    # At the peak a kernel loses wd = 1e-4 of itself per step (optax.adamw(lr, 1e-4) would take lr * 1e-4 = 1e-7).
    zero = jax.tree.map(jnp.zeros_like, params)
    tx, _ = optim.create_optimizer(opt_config(name='adam', learning_rate=lr, weight_decay=wd,
                                              weight_decay_mode='schedule', schedule='constant'), 10)
    updates, _ = tx.update(zero, tx.init(params), params)
    head = params['head']['kernel']
    np.testing.assert_allclose(updates['head']['kernel'], -1e-4 * head, rtol=1e-5)
    np.testing.assert_array_equal(updates['head']['bias'], 0.0)


def test_vit_paper_adam_decays_like_flax_optim_adam():
    """flax/optim/adam.py: new_param = param - lr * adam - lr * weight_decay * param (decoupled, times the lr)."""
    params = random_like(abstract_params('vit_s16', **TINY, mlp_dim=64, representation_size=32), 0)
    grads = [random_like(params, 1 + i) for i in range(STEPS)]
    wd = 0.03
    opt = opt_config(name='adam', learning_rate=1e-3, weight_decay=wd, warmup_steps=5, schedule='linear',
                     end_learning_rate=1e-5)
    ours, schedule = run_ours(opt, params, grads, STEPS)
    lr = lambda t: float(schedule(t))  # noqa: E731
    expected = adam_reference(params, grads, lr, wd,
                              lambda t, k, p: lr(t) * wd * p if k.endswith('/kernel') else 0.0)
    got = flat_names(ours)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, rtol=0, err_msg=k)


def test_sgd_l2_equals_torch_sgd_weight_decay():
    params = random_like(abstract_params('vit_s16', **TINY, mlp_dim=64), 0)
    grads = [random_like(params, 1 + i) for i in range(STEPS)]
    opt = opt_config(name='sgd', learning_rate=0.03, momentum=0.9, weight_decay=1e-4, weight_decay_mode='l2',
                     schedule='constant')
    ours, _ = run_ours(opt, params, grads, STEPS)
    flat = flat_names(params)
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in flat.items()}
    decay = [p for k, p in tensors.items() if k.endswith('/kernel')]
    torch_opt = torch.optim.SGD([{'params': decay, 'weight_decay': 1e-4},
                                 {'params': [p for k, p in tensors.items() if not k.endswith('/kernel')]}],
                                lr=0.03, momentum=0.9, weight_decay=0.0)
    for g in grads:
        for k, v in flat_names(g).items():
            tensors[k].grad = torch.tensor(v)
        torch_opt.step()
    got = flat_names(ours)
    for k, p in tensors.items():
        np.testing.assert_allclose(got[k], p.detach().numpy(), atol=1e-6, rtol=0, err_msg=k)


def test_mu_dtype_bfloat16_keeps_params_float32():
    params = abstract_params('vit_s16', **TINY, mlp_dim=64)
    params = jax.tree.map(lambda x: jnp.ones(x.shape, jnp.float32), params)
    tx, _ = optim.create_optimizer(opt_config(name='adam', mu_dtype='bfloat16', weight_decay=1e-4,
                                              weight_decay_mode='schedule'), 10)
    state = tx.init(params)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
    updates, _ = tx.update(params, state, params)
    assert {x.dtype for x in jax.tree.leaves(optax.apply_updates(params, updates))} == {jnp.dtype(jnp.float32)}


def test_frozen_parameters_never_move():
    params = random_like(abstract_params('t2t_vit_14', **TINY, token_dim=16), 0)
    ours, _ = run_ours(opt_config(weight_decay=0.05, learning_rate=0.1), params,
                       [random_like(params, 1)] * 3, 3)
    for name in ('sinusoid_pos_embed',):
        np.testing.assert_array_equal(ours[name], params[name])
    np.testing.assert_array_equal(ours['tokens_to_token']['attention1']['random_features'],
                                  params['tokens_to_token']['attention1']['random_features'])
    assert not np.allclose(ours['head']['kernel'], params['head']['kernel'])


# Schedules.

def test_schedule_counts_updates_under_accumulation():
    """Warmup start, peak and end are in optimizer updates: with accumulation 2, update u moves by -lr(u)."""
    opt = opt_config(name='sgd', momentum=0.0, learning_rate=1.0, warmup_steps=4, warmup_init_learning_rate=0.1,
                     schedule='linear', end_learning_rate=0.2, accumulation_steps=2)
    updates = 10
    tx, schedule = optim.create_optimizer(opt, updates)
    params = {'w': jnp.zeros(())}
    state = tx.init(params)
    moves = []
    for _ in range(2 * updates):
        delta, state = tx.update({'w': jnp.ones(())}, state, params)
        moves.append(float(delta['w']))
    np.testing.assert_allclose(moves[0::2], 0.0)  # the first micro-step of each update only accumulates
    expected = [0.1, 0.325, 0.55, 0.775, 1.0, 0.8667, 0.7333, 0.6, 0.4667, 0.3333]  # 0.1 -> 1 in 4, -> 0.2 in 6
    np.testing.assert_allclose([-m for m in moves[1::2]], expected, atol=1e-4)
    np.testing.assert_allclose([float(schedule(u)) for u in range(updates)], expected, atol=1e-4)


def test_cosine_schedule_shape():
    schedule = optim.learning_rate_schedule(opt_config(learning_rate=1e-3, warmup_steps=100, end_learning_rate=1e-5),
                                            1100)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 50, 100, 600, 1100)],
                               [0.0, 5e-4, 1e-3, 1e-5 + (1e-3 - 1e-5) / 2, 1e-5], rtol=1e-5)


def test_timm_cosine_as_deit_steps_it():
    """timm 0.3.2 CosineLRScheduler(t_initial=300, warmup_t=5, warmup_lr_init=1e-6, lr_min=1e-5), stepped by DeiT's
    main.py with ``lr_scheduler.step(epoch)`` after each epoch: epoch e trains at the rate of epoch max(e - 1, 0)."""
    epoch_steps = 10
    opt = opt_config(learning_rate=1e-3, warmup_steps=5 * epoch_steps, warmup_init_learning_rate=1e-6,
                     end_learning_rate=1e-5, schedule='timm_cosine', schedule_epoch_steps=epoch_steps,
                     schedule_epoch_lag=1, cosine_epochs=300)
    schedule = optim.learning_rate_schedule(opt, 300 * epoch_steps)

    def timm_lr(t):  # timm/scheduler/cosine_lr.py::_get_lr, warmup_prefix=False, cycle_limit=1
        if t < 5:
            return 1e-6 + t * (1e-3 - 1e-6) / 5
        return 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 300))

    for epoch in (0, 1, 2, 5, 6, 150, 299):
        for step in (epoch * epoch_steps, epoch * epoch_steps + epoch_steps - 1):
            np.testing.assert_allclose(float(schedule(step)), timm_lr(max(epoch - 1, 0)), rtol=1e-5)


def test_ema_update_weights_the_old_average_by_the_decay():
    """Polyak averaging, ema <- decay * ema + (1 - decay) * params, at an asymmetric decay (0.5 cannot tell the two
    terms apart)."""
    ema = optim.ema_update({'w': jnp.array([1.0, 10.0])}, {'w': jnp.array([0.0, 20.0])}, 0.9)
    np.testing.assert_allclose(ema['w'], [0.9, 11.0], rtol=1e-6)
