"""DeiT distillation: the loss against hand computations, the frozen teacher, its input, sharding, resume, bad input."""

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.core import meta

from vit_jax import models, sharding
from vit_jax.objectives import Distillation, create_objective
from vit_jax.objectives.distillation import TeacherSpec, hard_distillation, soft_distillation
from vit_jax.train import config as config_lib
from vit_jax.train.loop import train_and_evaluate
from vit_jax.train.optim import create_optimizer
from vit_jax.train.step import init_state, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDENT = dict(patch_size=4, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)


def quick_config(**overrides) -> ml_collections.ConfigDict:
    c = config_lib.load_config(str(ROOT / 'configs' / 'quickstart.py'))
    c.model.update(STUDENT)
    c.batch_size, c.total_steps = 32, 4
    c.optimizer.warmup_steps = 0  # every step updates (the zero-initialised heads give ln(10) until they move)
    c.log_every, c.eval_every = 1, 4
    c.checkpoint_every = 2
    c.update(overrides)
    return c


@pytest.fixture(scope='module')
def teacher_workdir(tmp_path_factory) -> str:
    """A small BiT ResNet trained for 4 steps on the bundled digits: a workdir any distillation run can point to."""
    workdir = tmp_path_factory.mktemp('teacher')
    c = quick_config(model_name='resnet26')
    for field in c.model.keys():
        c.model[field] = None
    c.model.update(resnet_layers=(1, 1), resnet_width=0.5)
    train_and_evaluate(c, str(workdir))
    return str(workdir)


@pytest.fixture(scope='module')
def student_workdir(tmp_path_factory, teacher_workdir) -> pathlib.Path:
    """A distilled DeiT trained for 4 steps (hard distillation) from that teacher."""
    workdir = tmp_path_factory.mktemp('student')
    train_and_evaluate(distillation_config(teacher_workdir, type='hard'), str(workdir))
    return workdir


def distillation_config(teacher: str, **fields) -> ml_collections.ConfigDict:
    c = quick_config(model_name='deit_ti16_distilled', objective='distillation')
    c.distillation.teacher.path = teacher
    c.distillation.update(fields)
    return c


# The loss, by hand -----------------------------------------------------------------------------------------------
# Student logits [0, 0], teacher [ln 3, 0]: p_teacher = (3/4, 1/4), p_student = (1/2, 1/2).
STUDENT_LOGITS = jnp.array([[0.0, 0.0]])
TEACHER_LOGITS = jnp.array([[np.log(3.0), 0.0]])


@pytest.mark.parametrize('tau, normalisation, expected', [
    (1.0, 'batchmean', 0.130812), (1.0, 'numel', 0.065406), (3.0, 'batchmean', 0.148377), (3.0, 'numel', 0.074188)])
def test_soft_distillation_by_hand(tau, normalisation, expected):
    value = soft_distillation(STUDENT_LOGITS, TEACHER_LOGITS, tau, normalisation)
    np.testing.assert_allclose(float(value), expected, atol=1e-6)


def test_hard_distillation_by_hand():
    np.testing.assert_allclose(float(hard_distillation(STUDENT_LOGITS, TEACHER_LOGITS)), np.log(2.0), atol=1e-6)


def test_soft_distillation_equals_deit_code_in_torch():
    """deit/losses.py: F.kl_div(log_softmax(s / T), log_softmax(t / T), reduction='sum', log_target=True) T^2 / numel."""
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 6, 10)).astype(np.float32) * 3
    for tau in (1.0, 3.0):
        F = torch.nn.functional
        ref = F.kl_div(F.log_softmax(torch.tensor(s) / tau, 1), F.log_softmax(torch.tensor(t) / tau, 1),
                       reduction='sum', log_target=True) * tau * tau / s.size
        np.testing.assert_allclose(float(soft_distillation(jnp.asarray(s), jnp.asarray(t), tau)), float(ref),
                                   rtol=1e-5)


def test_loss_mixes_base_and_distillation_with_alpha():
    """(1 - alpha) CE(class head, labels) + alpha KD(distillation head, teacher), with stand-in heads."""
    model = models.create_model('deit_ti16_distilled', num_classes=3, image_size=8, **STUDENT)
    teacher = models.create_model('vit_ti16', num_classes=3, image_size=8, **STUDENT)
    spec = TeacherSpec('vit_ti16', STUDENT, '', 'auto', 8, 'inception')
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    labels = jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3) * 0.9 + 0.1 / 3
    params = meta.unbox(model.init(jax.random.key(1), images)['params'])
    params = jax.tree_util.tree_map_with_path(  # non-zero heads, so both terms matter
        lambda p, x: jax.random.normal(jax.random.key(len(str(p))), x.shape) if 'head' in str(p) else x, params)
    frozen = meta.unbox(teacher.init(jax.random.key(2), images)['params'])
    frozen['head']['kernel'] = jax.random.normal(jax.random.key(3), frozen['head']['kernel'].shape)
    cls, dist = model.apply({'params': params}, images, train=True, rngs={'dropout': jax.random.key(4)})
    t = teacher.apply({'params': frozen}, images)
    for kind, alpha, tau in [('soft', 0.5, 1.0), ('soft', 0.1, 3.0), ('hard', 0.5, 1.0)]:
        objective = Distillation(model=model, teacher=teacher, spec=spec, num_classes=3, type=kind, alpha=alpha,
                                 tau=tau, image_size=8, normalization='inception')
        loss, metrics = objective.loss(params, {}, frozen, {'images': images, 'labels': labels}, jax.random.key(4))
        base = optax.softmax_cross_entropy(cls, labels).mean()
        kd = soft_distillation(dist, t, tau) if kind == 'soft' else hard_distillation(dist, t)
        np.testing.assert_allclose(float(loss), float((1 - alpha) * base + alpha * kd), rtol=1e-6)
        np.testing.assert_allclose(float(metrics['train_distillation_loss']), float(kd), rtol=1e-6)


# The teacher's input ---------------------------------------------------------------------------------------------
def make_objective(teacher_size: int, teacher_norm: str, student_norm: str = 'inception') -> Distillation:
    model = models.create_model('vit_ti16', num_classes=3, image_size=16, **STUDENT)
    teacher = models.create_model('vit_ti16', num_classes=3, image_size=teacher_size, **STUDENT)
    spec = TeacherSpec('vit_ti16', STUDENT, '', 'auto', teacher_size, teacher_norm)
    return Distillation(model=model, teacher=teacher, spec=spec, num_classes=3, image_size=16,
                        normalization=student_norm)


def test_teacher_sees_the_students_mixed_batch():
    images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1)
    np.testing.assert_array_equal(make_objective(16, 'inception').teacher_input(images), images)


def test_teacher_at_another_normalisation_and_resolution():
    pixels = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), maxval=255.0)
    student = pixels / 127.5 - 1.0  # vit_jax.data 'inception'
    imagenet = (pixels / 255.0 - jnp.array([0.485, 0.456, 0.406])) / jnp.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(make_objective(16, 'imagenet').teacher_input(student), imagenet, atol=1e-5)
    resized = make_objective(32, 'inception').teacher_input(student)
    assert resized.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(resized, jax.image.resize(student, (2, 32, 32, 3), 'bicubic'), atol=1e-6)


# The frozen teacher in training -----------------------------------------------------------------------------------
def test_teacher_is_frozen_and_not_saved(student_workdir):
    tmp_path = student_workdir
    metrics = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [m['step'] for m in metrics if 'train_loss' in m] == [1, 2, 3, 4]
    assert len({m['train_loss'] for m in metrics if 'train_loss' in m}) == 4  # the student trains
    saved = ocp.StandardCheckpointer().metadata(str(tmp_path / 'checkpoints' / '4' / 'default')).item_metadata
    assert saved.get('frozen') is None
    n_saved = sum(np.prod(x.shape) for x in jax.tree.leaves(saved))
    n_student = sum(np.prod(x.shape) for x in jax.tree.leaves(saved['params']))
    assert n_student < n_saved <= 3 * n_student + 16  # the student, Adam's two moments and counts: no teacher


def test_teacher_parameters_bit_identical_after_five_steps(teacher_workdir):
    config = distillation_config(teacher_workdir, type='hard')
    model = models.create_model('deit_ti16_distilled', num_classes=10, image_size=16, **STUDENT)
    objective = create_objective(config, model, 10)
    frozen = objective.load_frozen()
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    tx, schedule = create_optimizer(config.optimizer, 5)
    state, shardings = init_state(model, tx, mesh, 16, 0, False, objective, frozen)
    step = make_train_step(objective, tx, shardings, mesh, schedule, 0, 0.0)
    rng = np.random.default_rng(0)
    params0 = jax.device_get(state.params)
    for _ in range(5):
        batch = {'images': rng.normal(size=(8, 16, 16, 3)).astype(np.float32),
                 'labels': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 8)]}
        state, _ = step(state, batch)
    after = jax.device_get(state.frozen)
    jax.tree.map(np.testing.assert_array_equal, after, frozen)
    assert not np.array_equal(jax.device_get(state.params)['head']['kernel'], params0['head']['kernel'])


def test_resumed_distillation_continues_exactly(tmp_path, teacher_workdir, student_workdir):
    config = distillation_config(teacher_workdir, type='hard')
    reference = student_workdir
    resumed = tmp_path / 'resumed'
    shutil.copytree(reference, resumed)
    # Interrupted after the step-2 checkpoint: later checkpoints and DONE never happened.
    shutil.rmtree(resumed / 'checkpoints' / '4')
    (resumed / 'DONE').unlink()
    train_and_evaluate(config, str(resumed))
    a = (reference / 'metrics.jsonl').read_text().splitlines()
    b = (resumed / 'metrics.jsonl').read_text().splitlines()
    assert len(a) == len(b) == 4 and 'eval_teacher_top1' in json.loads(b[-1])
    for x, y in zip(a, b):
        x, y = json.loads(x), json.loads(y)
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in sorted(x)], [y[k] for k in sorted(y)], rtol=1e-6)


def test_sharded_distillation_matches_one_device(teacher_workdir):
    config = distillation_config(teacher_workdir, type='soft', kl_normalisation='batchmean')
    model = models.create_model('deit_ti16_distilled', num_classes=10, image_size=16, dropout_rate=0.1,
                                drop_path_rate=0.1, **STUDENT)
    objective = create_objective(config, model, 10)
    frozen = objective.load_frozen()

    def losses(mesh):
        tx, schedule = create_optimizer(config.optimizer, 4)
        state, shardings = init_state(model, tx, mesh, 16, 0, False, objective, frozen)
        step = make_train_step(objective, tx, shardings, mesh, schedule, 0, 0.0)
        rng = np.random.default_rng(0)
        out = []
        for _ in range(3):
            batch = {'images': rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
                     'labels': np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]}
            batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
            state, metrics = step(state, batch)
            out.append(float(metrics['train_loss']))
        return np.array(out)

    single = losses(sharding.create_mesh(devices=jax.devices()[:1]))
    sharded = losses(sharding.create_mesh(data=4, tensor=2))
    assert len(set(single)) == 3
    np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_distillation_when_fine_tuning_at_a_new_resolution(tmp_path, teacher_workdir, student_workdir):
    """init_from a distilled student at 16 px, fine-tuned with distillation at 32 px; the teacher stays at 16."""
    student = student_workdir
    config = distillation_config(teacher_workdir, type='hard')
    config.image_size = 32
    config.init_from.update(path=str(student), posemb_resize='bicubic')
    config.optimizer.ema_decay = 0.9  # fine-tuning with EMA crashed on its first step (one buffer donated twice)
    metrics = train_and_evaluate(config, str(tmp_path / 'finetuned'))
    assert np.isfinite(metrics['eval_loss']) and 0 <= metrics['eval_agreement'] <= 1
    assert create_objective(config, models.create_model('deit_ti16_distilled', num_classes=10, image_size=32,
                                                        **STUDENT), 10).spec.image_size == 16


# Bad input: a ValueError naming the field, before anything compiles ----------------------------------------------
@pytest.mark.parametrize('fields, pattern', [
    (dict(alpha=1.5), r'distillation\.alpha=1\.5'),
    (dict(alpha=-0.1), r'distillation\.alpha'),
    (dict(tau=0.0), r'distillation\.tau=0\.0'),
    (dict(type='medium'), r'distillation\.type=.medium'),
    (dict(kl_normalisation='mean'), r'distillation\.kl_normalisation'),
    (dict(fusion='max'), r'distillation\.fusion'),
    (dict(preset='book'), r'distillation\.preset'),
])
def test_bad_distillation_fields(teacher_workdir, fields, pattern):
    config = distillation_config(teacher_workdir, **fields)
    with pytest.raises(ValueError, match=pattern):
        train_and_evaluate(config, '/nonexistent/never/written')


def test_bad_teachers(tmp_path, teacher_workdir):
    model = models.create_model('deit_ti16_distilled', num_classes=10, image_size=16, **STUDENT)
    config = distillation_config('')
    with pytest.raises(ValueError, match=r'teacher\.path'):
        create_objective(config, model, 10)
    config = distillation_config(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match='does not exist'):
        create_objective(config, model, 10)
    config = distillation_config(teacher_workdir)
    config.distillation.teacher.model_name = 'resnet_9000'
    with pytest.raises(ValueError, match=r"teacher: Unknown model 'resnet_9000'"):
        create_objective(config, model, 10)
    # A checkpoint that does not fit the named architecture: every mismatch listed.
    config = distillation_config(teacher_workdir)
    config.distillation.teacher.model.resnet_width = 1.0
    with pytest.raises(Exception, match='shape'):
        create_objective(config, model, 10).load_frozen()
    # A teacher trained on 10 classes for a 100-class student.
    big = models.create_model('deit_ti16_distilled', num_classes=100, image_size=16, **STUDENT)
    with pytest.raises(ValueError, match='has 10 classes but the dataset has 100'):
        create_objective(distillation_config(teacher_workdir), big, 100).load_frozen()


def test_paper_preset(teacher_workdir):
    config = distillation_config('', preset='paper')
    d = config.distillation
    assert (d.type, d.alpha, d.tau) == ('hard', 0.5, 1.0)  # the preset applies when the objective is built
    from vit_jax.objectives.distillation import PRESETS
    assert PRESETS['paper'] == dict(type='soft', tau=3.0, alpha=0.1, kl_normalisation='batchmean')
    objective = create_objective(distillation_config(teacher_workdir, preset='paper'), models.create_model(
        'deit_ti16_distilled', num_classes=10, image_size=16, **STUDENT), 10)
    assert (objective.type, objective.tau, objective.alpha, objective.kl_normalisation) == (
        'soft', 3.0, 0.1, 'batchmean')


@pytest.mark.parametrize('size, top1', [('ti', 74.5), ('s', 81.2), ('b', 83.4)])
def test_distilled_recipes(tmp_path, teacher_workdir, size, top1):
    """DeiT's recipe + its README's distillation flags; the tiny version trains two steps with a teacher."""
    path = ROOT / 'configs' / f'deit_{size}16_distilled.py'
    c = config_lib.load_config(str(path))
    assert c.model_name == f'deit_{size}16_distilled' and c.objective == 'distillation'
    assert (c.distillation.type, c.distillation.alpha, c.distillation.tau) == ('hard', 0.5, 1.0)
    assert (c.batch_size, c.optimizer.name, c.optimizer.weight_decay) == (1024, 'adamw', 0.05)
    assert c.optimizer.learning_rate == pytest.approx(5e-4 * 1024 / 512)
    assert c.total_steps == 300 * (1_281_167 // 1024)
    assert f'{top1}% top-1' in path.read_text() and 'not reproduced here' in path.read_text()
    if size != 'ti':
        return
    c.dataset, c.train_split, c.eval_split, c.data_dir = 'sklearn_digits', 'train', 'test', None
    c.image_size, c.batch_size, c.eval_batch_size, c.shuffle_buffer = 16, 32, 360, 64
    c.model.update(STUDENT)
    c.total_steps = c.log_every = c.eval_every = c.checkpoint_every = 2
    c.optimizer.warmup_steps = 0
    c.distillation.teacher.path = teacher_workdir
    metrics = train_and_evaluate(c, str(tmp_path))
    assert {'eval_top1', 'eval_class_head_top1', 'eval_distillation_head_top1', 'eval_teacher_top1',
            'eval_agreement'} <= set(metrics)
    assert np.isfinite(metrics['eval_loss'])
