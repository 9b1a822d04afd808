"""Config values that cannot work are rejected before anything is built, naming the field and the valid range; every
config field can be set from the command line, as ``python -m vit_jax.main`` parses it."""

import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from vit_jax import models
from vit_jax.train.config import base_config, load_config
from vit_jax.train.validate import validate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE_CONFIG_FILE = 'from vit_jax.train.config import base_config\n\n\ndef get_config():\n    return base_config()\n'


def parse(config_file: pathlib.Path, *overrides: str) -> ml_collections.ConfigDict:
    """The config as vit_jax.main's flags parse it (locked, through ml_collections' config_flags)."""
    argv = ['prog', f'--config={config_file}', *overrides]
    values = flags.FlagValues()
    # config_flags registers the override flags from the command line it is given (main: sys.argv).
    config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


def leaves(config: ml_collections.ConfigDict, prefix: str = ''):
    """(dotted name, its ConfigDict, key) of every field."""
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}', config, key


def another_value(field_type, value):
    """A command-line value of ``field_type`` that differs from ``value``, and what it parses to."""
    if field_type is bool:
        return str(not value), not value
    if field_type is int:
        return str((value or 0) + 3), (value or 0) + 3
    if field_type is float:
        return str((value or 0.0) + 0.25), (value or 0.0) + 0.25
    if field_type is str:
        return 'changed', 'changed'
    if field_type is tuple:
        return '(1, 2)', (1, 2)
    return None, None


def test_every_field_of_every_section_can_be_set_from_the_command_line(tmp_path):
    config_file = tmp_path / 'base.py'
    config_file.write_text(BASE_CONFIG_FILE)
    default = base_config()
    overrides, expected, untyped = [], {}, []
    for name, parent, key in leaves(default):
        text, parsed = another_value(parent.get_type(key), parent[key])
        if text is None:
            untyped.append(f'{name} ({parent.get_type(key).__name__})')
            continue
        overrides.append(f'--config.{name}={text}')
        expected[name] = parsed
    assert not untyped, f'fields the command line cannot set (give them a type: ml_collections placeholder): {untyped}'
    config = parse(config_file, *overrides)
    got = {name: parent[key] for name, parent, key in leaves(config)}
    assert {k: got[k] for k in expected} == expected
    model_fields = [k for k in expected if k.startswith('model.')]
    # all but name, parent, num_classes, image_size (config.image_size) and platform (the mesh's: vit_jax.hardware)
    assert len(model_fields) == len(models.VisionTransformer.__dataclass_fields__) - 5


def test_the_readme_memory_remedies_parse():
    config = parse(ROOT / 'configs' / 'quickstart.py', '--config.model.remat=True', '--config.model.scan_layers=True',
                   '--config.model.resnet_layers=(3, 4, 9)', '--config.model.representation_size=96')
    assert (config.model.remat, config.model.scan_layers) == (True, True)
    assert config.model.resnet_layers == (3, 4, 9) and config.model.representation_size == 96
    assert config.model.hidden_size == 96  # the recipe's own value stays
    assert config.model.dtype is None  # unset: the registry's value


def test_unset_model_fields_are_not_overrides():
    config = load_config(str(ROOT / 'configs' / 'quickstart.py'))
    overrides = {k: v for k, v in config.model.items() if v is not None}
    assert overrides == dict(patch_size=4, hidden_size=96, num_layers=4, num_heads=3, mlp_dim=192, drop_path_rate=0.1)


def quickstart(**changes) -> ml_collections.ConfigDict:
    config = load_config(str(ROOT / 'configs' / 'quickstart.py'))
    for dotted, value in changes.items():
        *path, key = dotted.split('__')
        node = config
        for part in path:
            node = node[part]
        node[key] = value
    return config


@pytest.mark.parametrize('changes,pattern', [
    (dict(optimizer__learning_rate=0.0), r'config\.optimizer\.learning_rate=0\.0 is out of range: it must be > 0'),
    (dict(optimizer__learning_rate=-1e-3), r'config\.optimizer\.learning_rate=-0\.001 .* must be > 0'),
    (dict(optimizer__weight_decay=-0.05), r'config\.optimizer\.weight_decay=-0\.05 .* must be >= 0'),
    (dict(optimizer__warmup_steps=2000), r'config\.optimizer\.warmup_steps=2000 is longer than the run: 1500 optimizer '
                                         r'updates .* Use at most 1500'),
    (dict(optimizer__warmup_steps=800, optimizer__accumulation_steps=2),
     r'warmup_steps=800 is longer than the run: 750 optimizer updates \(1500 steps / accumulation_steps=2\)'),
    (dict(optimizer__b2=1.0), r'config\.optimizer\.b2=1\.0 .* must be in \[0\.0, 1\.0\)'),
    (dict(optimizer__ema_decay=-0.1), r'config\.optimizer\.ema_decay=-0\.1 .* in \[0\.0, 1\.0\)'),
    (dict(optimizer__accumulation_steps=0), r'config\.optimizer\.accumulation_steps=0 .* >= 1'),
    (dict(augment__mixup_alpha=-0.2), r'config\.augment\.mixup_alpha=-0\.2 .* must be >= 0'),
    (dict(augment__cutmix_alpha=-1.0), r'config\.augment\.cutmix_alpha=-1\.0 .* must be >= 0'),
    (dict(augment__mixup_prob=1.5), r'config\.augment\.mixup_prob=1\.5 .* in \[0\.0, 1\.0\] \(a probability\)'),
    (dict(augment__mixup_switch_prob=-0.1), r'config\.augment\.mixup_switch_prob=-0\.1 .* in \[0\.0, 1\.0\]'),
    (dict(augment__random_erasing=2.0), r'config\.augment\.random_erasing=2\.0 .* in \[0\.0, 1\.0\]'),
    (dict(augment__label_smoothing=1.0), r'config\.augment\.label_smoothing=1\.0 .* in \[0\.0, 1\.0\)'),
    (dict(augment__crop_pct=0.0), r'config\.augment\.crop_pct=0\.0 .* in \(0, 1\]'),
    (dict(augment__crop_scale=(0.9, 0.1)), r'config\.augment\.crop_scale=\(0\.9, 0\.1\) .* 0 < low <= high <= 1'),
    (dict(augment__crop='center'), r"config\.augment\.crop='center'; expected one of"),
    (dict(keep_checkpoints=0), r'config\.keep_checkpoints=0 .* >= 1: 0 would delete every checkpoint'),
    (dict(checkpoint_every=0), r'config\.checkpoint_every=0 .* >= 1 \(to do it only at the end, use a value >= '
                               r'total_steps\)'),
    (dict(eval_every=0), r'config\.eval_every=0 .* >= 1'),
    (dict(log_every=0), r'config\.log_every=0 .* >= 1'),
    (dict(total_steps=-5), r'config\.total_steps=-5 .* >= 0'),
    (dict(total_steps=0, num_epochs=0.0), r'config\.num_epochs=0\.0 .* > 0 when total_steps is 0'),
    (dict(batch_size=0), r'config\.batch_size=0 .* >= 1'),
    (dict(mesh__data=0), r'config\.mesh\.data=0 .* -1 \(the remaining devices\) or >= 1'),
    (dict(init_from__posemb_resize='nearest'), r"config\.init_from\.posemb_resize='nearest' .* 'bilinear' or "
                                               r"'bicubic'"),
    (dict(model__resnet_layers=(3, 0)), r'config\.model\.resnet_layers=\(3, 0\) .* positive block counts'),
])
def test_each_bad_value_names_the_field_and_the_range(changes, pattern):
    config = quickstart(**changes)
    with pytest.raises(ValueError, match=pattern):
        validate_config(config)


def test_the_recipes_are_valid():
    for path in sorted((ROOT / 'configs').glob('*.py')):
        validate_config(load_config(str(path)))


def test_warmup_against_a_length_from_epochs():
    config = quickstart(total_steps=0, num_epochs=2.0)
    validate_config(config)  # the length is not known without the data
    with pytest.raises(ValueError, match=r'warmup_steps=100 is longer than the run: 22 optimizer updates'):
        validate_config(config, total_steps=22)


@pytest.mark.parametrize('width,ok', [(0.5, True), (1.0, True), (1.5, True), (0.75, False), (0.3, False)])
def test_resnet_width_must_suit_group_norm(width, ok):
    pattern = (rf"resnet_width={width} gives the ResNet {int(64 * width)} root channels \(64 x resnet_width\), which "
               r"GroupNorm's 32 groups do not divide: use a multiple of 0\.5")
    for name in ('r26_vit_s32', 'resnet26'):
        if ok:
            models.create_model(name, num_classes=10, resnet_width=width)
        else:
            with pytest.raises(ValueError, match=pattern):
                models.create_model(name, num_classes=10, resnet_width=width)


def run_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'vit_jax.main', '--config', str(ROOT / 'configs' / 'quickstart.py'),
                           '--workdir', '/nonexistent/never-created', *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'VIT_JAX_MALLOC': '0', **(env or {})})


def test_a_config_error_is_one_message_without_traceback():
    result = run_main('--config.optimizer.learning_rate=-0.001')
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        'python -m vit_jax.main: error: config.optimizer.learning_rate=-0.001 is out of range: it must be > 0 (a '
        'learning rate <= 0 trains by gradient ascent or not at all).',
        '(rerun with --verbose or VIT_JAX_VERBOSE=1 for the traceback: ValueError)']
    assert not os.path.exists('/nonexistent/never-created')
    verbose = run_main('--config.optimizer.learning_rate=-0.001', env={'VIT_JAX_VERBOSE': '1'})
    assert verbose.returncode == 1 and 'Traceback (most recent call last)' in verbose.stderr


def test_a_bad_flag_and_a_bad_model_name_are_one_line():
    result = run_main('--config.optimizer.learnig_rate=0.1')
    assert result.returncode == 1
    assert result.stderr.strip() == ('python -m vit_jax.main: error: \'learnig_rate\' Did you mean "learning_rate" '
                                     'instead of "learnig_rate"?')
    result = run_main('--config.model_name=vit_q16')
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 2
    assert result.stderr.startswith("python -m vit_jax.main: error: Unknown model 'vit_q16'. Registered models:")


def test_configs_and_validation_do_not_import_tensorflow():
    code = ('import sys\nfrom vit_jax.train.config import load_config\nfrom vit_jax.train.validate import '
            f'validate_config\nvalidate_config(load_config({str(ROOT / "configs" / "vit_b16.py")!r}))\n'
            'print(sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules))')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == '[]'
