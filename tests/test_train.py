"""The main job end to end: resume after kill -9, every config for 2 steps, NaN handling, early config errors."""

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from conftest import mock_metadata
from flax.core import meta
from vit_jax.checkpoints import stack_layers
from vit_jax.models import create_model
from vit_jax.train.optim import create_optimizer
from vit_jax.train import config as config_lib
from vit_jax.train.loop import NonFiniteLossError, train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                 if not p.stem.endswith('_distilled'))  # they need a teacher: tests/test_distillation.py
MOCK_EXAMPLES = 24  # tfds.testing.mock_data gives every split this many examples
TINY_MODEL = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)


def load_config(name: str):
    return config_lib.load_config(str(ROOT / 'configs' / f'{name}.py'))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp('tfds')
    mock_metadata(root, 'imagenet2012', {'train': MOCK_EXAMPLES, 'validation': MOCK_EXAMPLES})
    return str(root)


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


def main_command(workdir, data_dir, *overrides):
    return [sys.executable, '-m', 'vit_jax.main', '--config', str(ROOT / 'configs' / 'quickstart.py'),
            '--workdir', str(workdir), f'--config.data_dir={data_dir}', '--config.model.hidden_size=48',
            '--config.model.num_layers=2', '--config.model.mlp_dim=96', '--config.total_steps=240',
            '--config.checkpoint_every=20', '--config.log_every=10', '--config.eval_every=80', *overrides]


@pytest.mark.slow  # ~100 s, three runs of 240 steps; the SIGTERM test below and the in-process exact-resume tests
# (test_resume_guards, test_distillation, test_self_supervised) take the same restore path in `make test`
def test_kill_minus_nine_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    reference = tmp_path / 'uninterrupted'
    subprocess.run(main_command(reference, data_dir), check=True, env=env, cwd=ROOT, capture_output=True)

    workdir = tmp_path / 'killed'
    proc = subprocess.Popen(main_command(workdir, data_dir), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (workdir / 'checkpoints' / '20').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, 'the run ended before it could be killed'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ocp.CheckpointManager(str(workdir / 'checkpoints')).latest_step()
    assert killed_at is not None and killed_at < 240

    subprocess.run(main_command(workdir, data_dir), check=True, env=env, cwd=ROOT, capture_output=True)
    resumed, uninterrupted = read_metrics(workdir), read_metrics(reference)
    assert [m['step'] for m in resumed] == [m['step'] for m in uninterrupted] == list(range(10, 241, 10))
    for a, b in zip(resumed, uninterrupted):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-6)
    assert resumed[-1]['eval_top1'] > 0.5  # and it learned something


def test_sigterm_saves_a_step_and_the_rerun_resumes_from_it(tmp_path, data_dir):
    workdir = tmp_path / 'preempted'
    short_warmup = '--config.optimizer.warmup_steps=10'  # the rerun is short
    proc = subprocess.Popen(main_command(workdir, data_dir, '--config.total_steps=100000', short_warmup),
                            env=dict(os.environ, JAX_PLATFORMS='cpu'), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (workdir / 'checkpoints' / '20').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143  # 128 + SIGTERM: saved, but not finished (schedulers and `make demo` see it)
    assert not (workdir / 'DONE').exists()
    said = int(stderr.split('SIGTERM: saved step ')[1].split()[0])
    saved = ocp.CheckpointManager(str(workdir / 'checkpoints')).latest_step()
    assert saved == said and 20 <= saved < 100000  # the step it stood at when the signal came, saved
    assert max(m['step'] for m in read_metrics(workdir)) <= saved
    # The same command (here with a nearby end) continues from that step, not from 0.
    rerun = subprocess.run(main_command(workdir, data_dir, f'--config.total_steps={saved + 5}', short_warmup),
                           cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f'Resumed from step {saved} ' in rerun.stderr
    assert ocp.CheckpointManager(str(workdir / 'checkpoints')).latest_step() == saved + 5


def tiny(config, data_dir):
    config.model.update(TINY_MODEL)
    config.mae.update(decoder_width=32, decoder_depth=1, decoder_heads=2)
    if config.model_name.startswith('t2t'):
        config.model.token_dim = 16
    elif config.model_name.startswith('r50'):
        config.model.update(resnet_layers=(1, 1), resnet_width=0.5)
    else:
        config.model.patch_size = 8
    config.image_size = 32
    config.batch_size = config.eval_batch_size = 8
    config.total_steps = 2
    config.optimizer.warmup_steps = 0  # the recipes warm up for thousands of steps: longer than 2 is refused
    config.log_every = config.eval_every = config.checkpoint_every = 2
    config.shuffle_buffer = 16
    config.data_dir = data_dir
    if config.dataset == 'imagenet21k':  # no TFDS builder to mock: the ImageNet-1k code path stands in
        config.dataset, config.train_split, config.eval_split = 'imagenet2012', 'train', 'validation'
    return config


# Slow: the hybrid (its ResNet stem compiles for ~50 s even at this size), T2T (~30 s), and the recipes whose code
# path another one takes at another size: deit_b16 (deit_s16's), vit_s16 (vit_ti16's), finetune_from_mpp
# (finetune_vit_b16's with a vit_jax workdir to load); the forward passes are in tests/test_models.py.
SLOW_CONFIGS = ('r50_vit_b16', 't2t_vit_14', 'deit_b16', 'vit_s16', 'finetune_from_mpp')


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CONFIGS else n
                                  for n in CONFIGS])
def test_every_config_runs_two_steps(tmp_path, data_dir, name):
    config = tiny(load_config(name), data_dir)
    real = config.dataset == 'sklearn_digits'  # the bundled data are real; ImageNet is mocked
    with contextlib.nullcontext() if real else tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=data_dir):
        metrics = train_and_evaluate(config, str(tmp_path))
    if config.objective in ('masked_patch_prediction', 'mae'):  # no labels: a masked loss and few-shot accuracy
        assert 0.0 <= metrics['fewshot_1shot'] <= 1.0
    else:
        assert 0.0 <= metrics['eval_top1'] <= metrics['eval_top5'] <= 1.0
    assert np.isfinite(metrics['eval_loss'])
    logged = read_metrics(tmp_path)
    assert logged[-1]['step'] == 2 and np.isfinite(logged[-1]['train_loss'])
    assert list(tmp_path.glob('events.out.tfevents.*'))  # TensorBoard
    assert ocp.CheckpointManager(str(tmp_path / 'checkpoints')).latest_step() == 2


def test_microbatches_train_like_the_whole_batch(tmp_path, data_dir):
    """config.optimizer.microbatches reaches the train step: 2 slices of 16 log the losses of the batch of 16."""
    logged = {}
    for m in (1, 2):
        config = tiny(load_config('quickstart'), data_dir)
        config.model.update(dropout_rate=0.0, drop_path_rate=0.0)  # no noise: slices draw theirs differently
        config.batch_size, config.total_steps, config.log_every = 16, 4, 1
        config.optimizer.microbatches = m
        train_and_evaluate(config, str(tmp_path / str(m)))
        logged[m] = read_metrics(tmp_path / str(m))
    losses = {m: [r['train_loss'] for r in logged[m] if 'train_loss' in r] for m in logged}
    assert len(losses[1]) == 4 and len(set(losses[1])) == 4  # it trains: four different losses
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-5)


def test_non_finite_loss_names_the_step_and_keeps_the_checkpoint(tmp_path, data_dir):
    config = load_config('quickstart')
    config.model.update(TINY_MODEL)
    config.data_dir = data_dir
    config.total_steps = 40
    config.log_every = 5
    config.checkpoint_every = 5
    # Five sane steps (lr 1e-3; a checkpoint at step 5), then lr 1e12 from step 6: timm_cosine's one-epoch warmup.
    config.optimizer.update(name='sgd', learning_rate=1e12, warmup_steps=5, warmup_init_learning_rate=1e-3,
                            schedule='timm_cosine', schedule_epoch_steps=5, cosine_epochs=1000, grad_clip_norm=0.0)
    with pytest.raises(NonFiniteLossError, match=r'Training loss is (nan|inf|-inf) at step (\d+)\. The last good '
                                                 r'checkpoint \(step 5\)') as info:
        train_and_evaluate(config, str(tmp_path))
    bad_step = int(str(info.value).split(' at step ')[1].split('.')[0])
    assert 5 < bad_step <= 10
    manager = ocp.CheckpointManager(str(tmp_path / 'checkpoints'))
    assert manager.all_steps() == [5]
    restored = manager.restore(5)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored['params']))


TRAIN_KWARGS = dict(num_classes=10, image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                    mlp_dim=64)


def adam_losses(model, params, images, labels):
    """The loss before each of len(images) Adam updates (lr 1e-2, weight decay 0.05), and the final params."""
    import optax
    opt = config_lib.base_config().optimizer
    opt.update(learning_rate=1e-2, weight_decay=0.05)
    tx, _ = create_optimizer(opt, len(images))
    state, out = tx.init(params), []

    @jax.jit
    def step(params, state, x, y):
        loss_fn = lambda p: optax.softmax_cross_entropy(model.apply({'params': p}, x, train=True), y).mean()  # noqa
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for x, y in zip(images, labels):
        params, state, loss = step(params, state, x, y)
        out.append(float(loss))
    return out, params


def random_batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 8, 32, 32, 3)).astype(np.float32),
            np.asarray(jax.nn.one_hot(rng.integers(0, 10, (n, 8)), 10)))


def init_params(model, seed: int = 0):
    params = meta.unbox(model.init(jax.random.key(seed), np.zeros((1, 32, 32, 3), np.float32))['params'])
    rng = np.random.default_rng(seed)  # a non-zero head, so that the first losses already differ
    return jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), params)


def test_scan_layers_and_remat_train_like_the_plain_model():
    """The same parameters (stacked for the scan) and batches: the losses of 4 Adam updates agree."""
    plain = create_model('vit_ti16', **TRAIN_KWARGS)
    scanned = create_model('vit_ti16', **TRAIN_KWARGS, scan_layers=True, remat=True)
    params = init_params(plain)
    images, labels = random_batches(4)
    expected, _ = adam_losses(plain, params, images, labels)
    assert len(set(expected)) == 4
    np.testing.assert_allclose(adam_losses(scanned, stack_layers(params), images, labels)[0], expected, rtol=1e-5)


def test_bfloat16_training_lowers_the_loss_and_keeps_float32_params():
    model = create_model('vit_ti16', **TRAIN_KWARGS, dtype='bfloat16')
    params = init_params(model)
    images, labels = random_batches(1)
    losses, trained = adam_losses(model, params, np.repeat(images, 12, 0), np.repeat(labels, 12, 0))
    assert losses[-1] < 0.5 * losses[0]  # it fits one batch
    assert {x.dtype for x in jax.tree.leaves(trained)} == {np.dtype(np.float32)}
    assert model.apply({'params': trained}, images[0], mutable=['intermediates'])[1]['intermediates'][
        'encoder']['block_0']['tokens'][0].dtype == np.dtype('bfloat16')  # it computes in bfloat16


@pytest.mark.parametrize('overrides,pattern', [
    (dict(batch_size=12), r'config.batch_size=12 is not divisible by the 8 batch shards'),
    (dict(dataset='not_a_dataset'), r'not_a_dataset'),
    (dict(model_name='vit_z16'), r"Unknown model 'vit_z16'"),
    (dict(image_size=18), r'image_size=18 is not divisible by patch_size=4'),
    (dict(dataset='cifar10'), r'cifar10.*(not prepared|not found|prepare)'),
    (dict(microbatches=3), r'batch_size=128 does not split into config.optimizer.microbatches=3 slices over the 8'),
])
def test_bad_configs_fail_before_compiling(tmp_path, data_dir, overrides, pattern):
    config = load_config('quickstart')
    config.data_dir = str(tmp_path / 'empty') if overrides.get('dataset') == 'cifar10' else data_dir
    overrides = dict(overrides)
    config.optimizer.microbatches = overrides.pop('microbatches', 1)
    config.update(overrides)
    with pytest.raises(ValueError, match=pattern):
        train_and_evaluate(config, str(tmp_path / 'work'))


def test_locked_config_rejects_a_misspelt_override(tmp_path, data_dir):
    result = subprocess.run(main_command(tmp_path, data_dir, '--config.optimizer.learnig_rate=0.1'), cwd=ROOT,
                            capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert result.returncode != 0
    assert 'learnig_rate' in result.stderr


@pytest.mark.parametrize('scan_layers', [False, True])
def test_stochastic_depth_drops_block_i_at_the_linear_rate(scan_layers):
    """DeiT / timm: block i's two branches are each dropped with probability rate * i / (depth - 1), so block 0 never
    and the last block at the full rate. A block returns its input exactly when both branches were dropped:
    measured over 3000 examples, that happens at rate_i ** 2 = 0, 0.09, 0.36 for rate 0.6 over 3 blocks."""
    model = create_model('vit_ti16', num_classes=10, image_size=16, patch_size=8, hidden_size=16, num_layers=3,
                         num_heads=2, mlp_dim=32, drop_path_rate=0.6, dropout_rate=0.0, attention_dropout_rate=0.0,
                         scan_layers=scan_layers)
    x = np.random.default_rng(0).normal(size=(3000, 16, 16, 3)).astype(np.float32)
    params = meta.unbox(model.init(jax.random.key(0), x[:1])['params'])
    embedded = model.apply({'params': params}, x, False, method='embed')
    _, state = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(1)},
                           mutable=['intermediates'])
    blocks = state['intermediates']['encoder']
    if scan_layers:
        outputs = [np.asarray(blocks['blocks']['tokens'][0][i]) for i in range(3)]
    else:
        outputs = [np.asarray(blocks[f'block_{i}']['tokens'][0]) for i in range(3)]
    inputs = [np.asarray(embedded)] + outputs[:-1]
    unchanged = [np.mean([np.array_equal(a, b) for a, b in zip(i, o)]) for i, o in zip(inputs, outputs)]
    assert unchanged[0] == 0.0
    np.testing.assert_allclose(unchanged[1:], [0.09, 0.36], atol=0.03)
