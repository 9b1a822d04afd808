"""The train state across steps: EMA once per optimizer update, metrics kept across checkpoint checks."""

import json
import pathlib

import jax
import ml_collections
import numpy as np

from vit_jax import models, sharding
from vit_jax.train import config as config_lib
from vit_jax.train.loop import train_and_evaluate
from vit_jax.train.optim import create_optimizer
from vit_jax.train.step import init_state, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)


def test_ema_updates_once_per_optimizer_update_under_accumulation():
    """Accumulating 2 steps per update, EMA(0.5) after 4 steps is 0.25 p0 + 0.25 p2 + 0.5 p4, not decay^k per step."""
    model = models.create_model('vit_ti16', num_classes=4, image_size=8, **TINY)
    opt = config_lib.base_config().optimizer
    opt.update(learning_rate=0.1, warmup_steps=0, schedule='constant', accumulation_steps=2, ema_decay=0.5)
    tx, schedule = create_optimizer(opt, 2)
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    state, shardings = init_state(model, tx, mesh, 8, 0, True)
    step = make_train_step(_supervised(model), tx, shardings, mesh, schedule, 0, 0.5, accumulation_steps=2)
    rng = np.random.default_rng(0)
    seen = [jax.device_get(state.params)]
    for _ in range(4):
        batch = {'images': rng.normal(size=(4, 8, 8, 3)).astype(np.float32),
                 'labels': np.eye(4, dtype=np.float32)[rng.integers(0, 4, 4)]}
        state, _ = step(state, batch)
        seen.append(jax.device_get(state.params))
    p0, p2, p4 = seen[0], seen[2], seen[4]
    np.testing.assert_array_equal(seen[1]['head']['kernel'], p0['head']['kernel'])  # no update on odd steps
    assert not np.allclose(p2['head']['kernel'], p0['head']['kernel'])
    expected = jax.tree.map(lambda a, b, c: 0.25 * a + 0.25 * b + 0.5 * c, p0, p2, p4)
    jax.tree.map(lambda e, x: np.testing.assert_allclose(x, e, rtol=1e-6, atol=1e-7), expected,
                 jax.device_get(state.ema_params))


def _supervised(model):
    from vit_jax.objectives import Supervised
    return Supervised(model)


def quick(**overrides) -> ml_collections.ConfigDict:
    c = config_lib.load_config(str(ROOT / 'configs' / 'quickstart.py'))
    c.model.update(TINY)
    c.batch_size, c.total_steps, c.optimizer.warmup_steps = 16, 8, 0
    c.eval_every = 8
    c.update(overrides)
    return c


def test_a_checkpoint_between_logs_loses_no_step_of_the_logged_means(tmp_path):
    """checkpoint_every=3, log_every=4: the loss logged at step 4 is the mean of steps 1-4 (step 3's check kept them)."""
    train_and_evaluate(quick(log_every=1, checkpoint_every=8), str(tmp_path / 'every'))
    train_and_evaluate(quick(log_every=4, checkpoint_every=3), str(tmp_path / 'fourth'))
    read = lambda d: [json.loads(line) for line in (tmp_path / d / 'metrics.jsonl').read_text().splitlines()]  # noqa
    every = {m['step']: m['train_loss'] for m in read('every') if 'train_loss' in m}
    fourth = {m['step']: m['train_loss'] for m in read('fourth') if 'train_loss' in m}
    assert sorted(fourth) == [4, 8] and len(set(every.values())) == 8
    np.testing.assert_allclose(fourth[4], np.mean([every[s] for s in range(1, 5)]), rtol=1e-6)
    np.testing.assert_allclose(fourth[8], np.mean([every[s] for s in range(5, 9)]), rtol=1e-6)
