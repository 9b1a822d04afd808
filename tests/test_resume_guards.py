"""The training loop end to end: a corrupt checkpoint falls back with the very metrics of a run that never had it,
a resume with another model or data is refused before anything is built, a full disk gives one error and no partial
folder, and bad values are rejected before compiling. (SIGTERM's exit status 143: tests/test_train.py.)"""

import errno
import glob
import json
import logging
import os
import pathlib
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_jax.train import checkpointing, loop
from vit_jax.train.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)


def tiny_config(data_dir: str, **changes):
    config = load_config(str(ROOT / 'configs' / 'quickstart.py'))
    config.model.update(TINY)
    config.data_dir = data_dir
    config.batch_size = 32
    config.total_steps = 40
    config.optimizer.warmup_steps = 5
    config.log_every, config.eval_every, config.checkpoint_every = 10, 20, 20
    for field, value in changes.items():
        section, _, key = field.rpartition('.')
        (config[section] if section else config)[key] = value
    return config


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished 40-step run (checkpoints 20 and 40), its final metrics and its data_dir; tests work on copies."""
    root = tmp_path_factory.mktemp('finished')
    data_dir = str(root / 'tfds')
    workdir = root / 'work'
    metrics = loop.train_and_evaluate(tiny_config(data_dir), str(workdir))
    return workdir, metrics, data_dir


@pytest.fixture
def workdir(tmp_path, finished):
    copy = tmp_path / 'work'
    shutil.copytree(finished[0], copy)
    return copy


def test_a_corrupt_latest_checkpoint_falls_back_to_the_same_result(workdir, finished, caplog):
    _, reference_metrics, data_dir = finished
    reference_log = read_metrics(workdir)
    for f in glob.glob(str(workdir / 'checkpoints' / '40' / 'default' / 'ocdbt.process_0' / 'd' / '*')):
        with open(f, 'r+b') as fh:  # a truncated data file
            fh.truncate(10)
    (workdir / 'DONE').unlink()
    with caplog.at_level(logging.WARNING):
        metrics = loop.train_and_evaluate(tiny_config(data_dir), str(workdir))
    [warning] = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
    assert warning.startswith(f'Checkpoint step 40 in {workdir}/checkpoints does not restore (ValueError: ')
    assert warning.endswith(f'resumed from step 20 instead. Step 40 was moved to {workdir}/corrupt_checkpoints/40 '
                            '(not deleted).')
    # Steps 21-40 again, from step 20: the numbers of the run that never had a bad checkpoint.
    assert metrics.keys() == reference_metrics.keys()
    np.testing.assert_allclose([metrics[k] for k in sorted(metrics)],
                               [reference_metrics[k] for k in sorted(metrics)], rtol=1e-6)
    resumed = read_metrics(workdir)
    assert [m['step'] for m in resumed] == [m['step'] for m in reference_log] == [10, 20, 30, 40]
    for a, b in zip(resumed, reference_log):
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-6)
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['20', '40']
    assert os.listdir(workdir / 'corrupt_checkpoints') == ['40']


def never_built(*_, **__):
    raise AssertionError('built: the config should have been refused before')


def test_another_architecture_is_refused_before_anything_is_built(workdir, finished, monkeypatch):
    config = tiny_config(finished[2], **{'model.hidden_size': 64, 'model.num_layers': 2})
    monkeypatch.setattr(loop, 'build', never_built)
    with pytest.raises(checkpointing.ConfigMismatchError) as info:
        loop.train_and_evaluate(config, str(workdir))
    assert str(info.value).splitlines()[1:3] == ['  model.hidden_size: 32 -> 64', '  model.num_layers: 1 -> 2']
    assert 'Use a new --workdir to train this config, or fine-tune from this run with' in str(info.value)


def test_legal_changes_resume_with_a_warning_and_are_recorded(workdir, finished, caplog):
    config = tiny_config(finished[2], total_steps=50, **{'optimizer.learning_rate': 1e-3, 'eval_every': 25})
    with caplog.at_level(logging.WARNING):
        loop.train_and_evaluate(config, str(workdir))
    assert any(r.getMessage().startswith(f'Resuming {workdir} from step 40 with 3 changed setting(s)')
               for r in caplog.records)
    written = json.loads((workdir / 'config.json').read_text())
    assert written['optimizer']['learning_rate'] == 1e-3 and written['total_steps'] == 50
    assert written['history'][0]['step'] == 40
    assert written['history'][0]['changed'] == {'eval_every': {'old': 20, 'new': 25},
                                                'optimizer.learning_rate': {'old': 0.002, 'new': 0.001},
                                                'total_steps': {'old': 40, 'new': 50}}
    assert [m['step'] for m in read_metrics(workdir)][-2:] == [40, 50]


def test_total_steps_below_the_workdir_step(workdir, finished):
    with pytest.raises(ValueError, match=r'config\.total_steps=30 is below step 40, where the checkpoint in .* '
                                         r'stands\. Set total_steps to at least 40'):
        loop.train_and_evaluate(tiny_config(finished[2], total_steps=30), str(workdir))
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['20', '40']


def test_disk_full_during_a_save_one_error_and_no_partial_folder(workdir, finished, monkeypatch):
    directory = workdir / 'checkpoints'

    def full_disk(self, step, *args, **kwargs):  # what orbax leaves and raises when the disk fills
        partial = directory / f'{step}.orbax-checkpoint-tmp' / 'default'
        partial.mkdir(parents=True)
        (partial / 'chunk').write_bytes(b'\0' * 1000)
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
    with pytest.raises(checkpointing.CheckpointSaveError) as info:
        loop.train_and_evaluate(tiny_config(finished[2], total_steps=60), str(workdir))
    needed = checkpointing.directory_bytes(str(directory / '40'))
    assert str(info.value).startswith(f'[Errno 28] No space left on the device of {directory} to save step 60: a '
                                      f'checkpoint needs about {needed:,} bytes')
    assert sorted(os.listdir(directory)) == ['20', '40']  # no partial folder, every complete checkpoint kept


@pytest.mark.parametrize('changes,field', [
    (dict(keep_checkpoints=0), 'keep_checkpoints'),
    (dict(checkpoint_every=0), 'checkpoint_every'),
    (dict(eval_every=0), 'eval_every'),
    (dict(log_every=0), 'log_every'),
    ({'optimizer.learning_rate': -0.1}, 'optimizer.learning_rate'),
    ({'optimizer.weight_decay': -0.1}, 'optimizer.weight_decay'),
    ({'optimizer.warmup_steps': 100}, 'optimizer.warmup_steps'),
    ({'augment.mixup_alpha': -1.0}, 'augment.mixup_alpha'),
    ({'augment.random_erasing': 1.5}, 'augment.random_erasing'),
    (dict(total_steps=-1), 'total_steps'),
])
def test_bad_values_are_rejected_before_anything_is_built(tmp_path, monkeypatch, changes, field):
    monkeypatch.setattr(loop, 'build', never_built)
    with pytest.raises(ValueError, match=rf'^config\.{field}='):
        loop.train_and_evaluate(tiny_config(str(tmp_path / 'tfds'), **changes), str(tmp_path / 'work'))
    assert not (tmp_path / 'work').exists()
