"""Masked patch prediction, MAE and the linear few-shot eval: by hand, sharded, resumed, fine-tuned from."""

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.core import meta

from vit_jax import fewshot, models, sharding
from vit_jax.objectives import create_objective
from vit_jax.objectives.masked import (colour_class, corrupt, mae_targets, mpp_targets, patchify, random_masking)
from vit_jax.train import config as config_lib
from vit_jax.train.loop import train_and_evaluate
from vit_jax.train.optim import create_optimizer
from vit_jax.train.step import init_state, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(patch_size=4, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)


def quick_config(objective: str, **overrides) -> ml_collections.ConfigDict:
    c = config_lib.load_config(str(ROOT / 'configs' / 'quickstart.py'))
    c.model.update(TINY)
    c.objective = objective
    c.mae.update(decoder_width=32, decoder_depth=1, decoder_heads=2)
    c.fewshot.update(shots=(1, 5), seeds=2)
    c.batch_size, c.total_steps = 32, 4
    c.optimizer.warmup_steps = 0
    c.log_every, c.eval_every, c.checkpoint_every = 1, 4, 2
    c.update(overrides)
    return c


# Masked patch prediction: corruption ---------------------------------------------------------------------------
def test_exactly_half_the_patches_corrupted_and_the_80_10_10_split():
    tokens = jax.random.normal(jax.random.key(0), (512, 196, 8))
    mask_token = jnp.full((8,), 7.0)
    out, corrupted, draws = corrupt(tokens, mask_token, jax.random.key(1))
    assert np.all(np.sum(corrupted, axis=1) == 98)  # exactly round(0.5 * 196) per image
    n = np.sum(corrupted)
    masked, replaced = np.sum(draws['masked']) / n, np.sum(draws['replaced']) / n
    assert abs(masked - 0.8) < 0.02 and abs(replaced - 0.1) < 0.02 and abs(1 - masked - replaced - 0.1) < 0.02
    # [mask] where masked; another patch of the same image where replaced; untouched elsewhere.
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(draws['masked'])], 7.0)
    other = np.asarray(draws['other'])
    assert np.all(other != np.arange(196)[None])
    rows, cols = np.nonzero(np.asarray(draws['replaced']))
    np.testing.assert_array_equal(np.asarray(out)[rows, cols], np.asarray(tokens)[rows, other[rows, cols]])
    kept = ~np.asarray(draws['masked']) & ~np.asarray(draws['replaced'])
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(tokens)[kept])


def test_loss_counts_only_corrupted_patches():
    config = quick_config('masked_patch_prediction')
    model = models.create_model('vit_ti16', num_classes=10, image_size=16, **TINY)
    objective = create_objective(config, model, 10)
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
    params = meta.unbox(model.init(jax.random.key(1), images)['params'])
    own = meta.unbox(objective.init(jax.random.key(2), 16))
    loss, per_patch, weights = jax.jit(lambda p, o, x: objective._loss(p, o, {'images': x}, jax.random.key(3), False))(
        params, own, images)
    assert np.all(np.sum(weights, 1) == 8)  # 16 patches, 8 corrupted
    np.testing.assert_allclose(float(loss), float(np.sum(per_patch * weights) / 32), rtol=1e-6)
    assert not np.allclose(float(loss), float(np.mean(per_patch)))  # the uncorrupted ones weigh nothing


# Masked patch prediction: targets ------------------------------------------------------------------------------
def test_mean_colour_class_is_pinned():
    # bin = min(floor(v * 8), 7); class = r * 64 + g * 8 + b: means (0, 0.5, 1) -> 0 * 64 + 4 * 8 + 7 = 39.
    patch = np.zeros((1, 4, 4, 3), np.float32)
    patch[..., 1] = 0.5
    patch[..., 2] = 1.0
    assert int(mpp_targets(jnp.asarray(patch), 4, 'mean_colour')[0, 0]) == 39
    assert int(colour_class(jnp.array([0.0, 0.5, 1.0]))) == 39


def test_every_one_of_the_512_colours_is_its_own_class():
    levels = (np.arange(8) + 0.5) / 8
    r, g, b = np.meshgrid(levels, levels, levels, indexing='ij')
    colours = np.stack([r, g, b], -1).reshape(512, 3)
    images = np.broadcast_to(colours[:, None, None, :], (512, 4, 4, 3))
    classes = np.asarray(mpp_targets(jnp.asarray(images), 4, 'mean_colour'))[:, 0]
    np.testing.assert_array_equal(classes, np.arange(512))


def test_downsampled_and_pixel_targets():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    down = mpp_targets(images, 16, 'downsampled')  # one 16 px patch: 4 x 4 cells of 4 x 4 pixels
    assert down.shape == (2, 1, 16)
    cell = images[0, 4:8, 8:12].mean(axis=(0, 1))  # cell (1, 2)
    assert int(down[0, 0, 1 * 4 + 2]) == int(colour_class(cell))
    pixels = mpp_targets(images, 8, 'pixels')
    assert pixels.shape == (2, 4, 192)
    np.testing.assert_array_equal(pixels[1, 3], images[1, 8:, 8:].reshape(-1))


# MAE -------------------------------------------------------------------------------------------------------------
def test_random_masking_keeps_49_of_196_and_restores_the_order():
    ids_keep, mask, ids_restore = random_masking(jax.random.key(0), 3, 196, 0.75)
    assert ids_keep.shape == (3, 49) and np.all(np.sum(mask, 1) == 147)
    shuffled = jnp.argsort(ids_restore, axis=1)  # ids_shuffle, whose first 49 are kept
    np.testing.assert_array_equal(jnp.take_along_axis(shuffled, ids_restore, 1), np.tile(np.arange(196), (3, 1)))
    np.testing.assert_array_equal(shuffled[:, :49], ids_keep)
    kept = np.zeros((3, 196))
    np.put_along_axis(kept, np.asarray(ids_keep), 1, axis=1)
    np.testing.assert_array_equal(1 - kept, mask)


def test_normalised_targets_have_per_patch_mean_zero_and_unbiased_variance_one():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    target = mae_targets(images, 4, True)
    np.testing.assert_allclose(target.mean(-1), 0.0, atol=1e-5)
    raw = np.asarray(patchify(images, 4))
    expected = (raw - raw.mean(-1, keepdims=True)) / np.sqrt(raw.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(target, expected, atol=1e-5)


def test_mae_encodes_the_kept_patches_with_their_positions():
    config = quick_config('mae')
    model = models.create_model('deit_ti16', num_classes=10, image_size=16, posemb='sincos2d', **TINY)
    objective = create_objective(config, model, 10)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    params = meta.unbox(model.init(jax.random.key(1), images)['params'])
    encoded, mask, ids_restore = objective.encode_visible(params, images, jax.random.key(2), False)
    ids_keep = jnp.argsort(ids_restore, axis=1)[:, :4]
    assert encoded.shape == (2, 1 + 4, 32)
    # By hand: patch tokens + their sin-cos positions, gathered, class token in front, the same encoder blocks.
    tokens = model.apply({'params': params}, images, method=lambda m, x: m.embed(x))
    positions = models.vit.sincos2d_posemb(4, 4, 32)[0]
    kept = jnp.take_along_axis(tokens + positions, ids_keep[..., None], axis=1)
    x = jnp.concatenate([jnp.broadcast_to(params['class_token'], (2, 1, 32)), kept], axis=1)
    by_hand = model.apply({'params': params}, x, method=lambda m, x: m.encoder(x, deterministic=True))
    np.testing.assert_allclose(encoded, by_hand, atol=1e-5)


# Few-shot --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('n, d', [(40, 6), (6, 40)])
def test_lsr_solution_equals_the_normal_equations(n, d):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)), rng.integers(0, 3, n)
    l2 = 2.0 ** 10
    w, mean, std = fewshot.lsr_weights(x, y, 3, l2)
    xw = np.pad((x - x.mean(0)) / (x.std(0) + 1e-5), ((0, 0), (0, 1)), constant_values=fewshot.BIAS_CONSTANT)
    targets = 2 * np.eye(3)[y] - 1
    expected = np.linalg.solve(xw.T @ xw + l2 * np.eye(d + 1), xw.T @ targets)
    np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-10)


def test_separable_data_give_accuracy_one():
    rng = np.random.default_rng(0)
    centres = 10 * np.eye(5, 16)
    y = np.repeat(np.arange(5), 40)
    x = centres[y] + rng.normal(size=(200, 16)) * (centres[y] > 0)  # spread within each class's own direction
    results = fewshot.fewshot_accuracies(x, y, x, y, 5, shots=(1, 5, 10), l2_reg=2.0 ** 10, seeds=3)
    assert all(acc == [1.0, 1.0, 1.0] for acc in results.values())


# Training: sharded, resumed, fine-tuned from ------------------------------------------------------------------------
# MPP's sharded run is slow (~40 s): MAE's covers the shared path and the harder case (a per-example gather).
@pytest.mark.parametrize('objective', [pytest.param('masked_patch_prediction', marks=pytest.mark.slow), 'mae'])
def test_sharded_losses_equal_one_device(objective):
    config = quick_config(objective)
    model = models.create_model('deit_ti16', num_classes=10, image_size=16, posemb='sincos2d', dropout_rate=0.1,
                                drop_path_rate=0.1, **TINY)
    obj = create_objective(config, model, 10)

    def losses(mesh):
        tx, schedule = create_optimizer(config.optimizer, 3)
        state, shardings = init_state(model, tx, mesh, 16, 0, False, obj)
        step = make_train_step(obj, tx, shardings, mesh, schedule, 0, 0.0)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(3):
            batch = {'images': rng.uniform(-1, 1, size=(16, 16, 16, 3)).astype(np.float32),
                     'labels': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]}
            state, metrics = step(state, {k: jax.device_put(v, sharding.batch_sharding(mesh))
                                          for k, v in batch.items()})
            out.append(float(metrics['train_loss']))
        return np.array(out), state

    single, state = losses(sharding.create_mesh(devices=jax.devices()[:1]))
    sharded, _ = losses(sharding.create_mesh(data=4, tensor=2))
    assert len(set(single)) == 3
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert jax.tree.leaves(state.objective_params)  # the objective's own parameters are in the state


@pytest.fixture(scope='module', params=['masked_patch_prediction', 'mae'])
def pretrained(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    config = quick_config(request.param)
    config.model.posemb = 'sincos2d' if request.param == 'mae' else None
    metrics = train_and_evaluate(config, str(workdir))
    return request.param, config, workdir, metrics


def test_pretraining_logs_loss_and_fewshot(pretrained):
    _, _, workdir, metrics = pretrained
    assert np.isfinite(metrics['eval_loss']) and 0.1 <= metrics['fewshot_5shot'] <= 1.0
    lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert [m['step'] for m in lines if 'train_loss' in m] == [1, 2, 3, 4]
    assert len({m['train_loss'] for m in lines if 'train_loss' in m}) == 4


def test_resume_continues_exactly(pretrained, tmp_path):
    _, config, workdir, _ = pretrained
    resumed = tmp_path / 'resumed'
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / 'checkpoints' / '4')  # interrupted after the step-2 checkpoint
    (resumed / 'DONE').unlink()
    train_and_evaluate(config, str(resumed))
    a = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    b = [json.loads(line) for line in (resumed / 'metrics.jsonl').read_text().splitlines()]
    assert [x.keys() for x in a] == [y.keys() for y in b]
    for x, y in zip(a, b):
        np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(y)], rtol=1e-6)


def test_finetune_drops_the_objectives_parameters(pretrained, tmp_path, caplog):
    objective, config, workdir, _ = pretrained
    c = quick_config('supervised')
    c.model.posemb = config.model.posemb
    c.init_from.path = str(workdir)
    c.total_steps = 2
    # On absl's logger by name: an entry point run earlier in this process (predict, analyze) may have quietened it.
    with caplog.at_level(logging.INFO, logger='absl'):
        metrics = train_and_evaluate(c, str(tmp_path / 'finetuned'))
    assert 0.0 <= metrics['eval_top1'] <= 1.0
    assert f'Dropped the {objective} objective\'s own parameters' in caplog.text
