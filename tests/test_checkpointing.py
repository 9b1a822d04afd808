"""Checkpoints lose nothing: a corrupt one is skipped and moved aside, a full disk gives one error and no partial
folder, and a resume with another model or data is refused before anything is built."""

import asyncio
import errno
import gc
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_jax.train import checkpointing
from vit_jax.train.config import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def state(step: int) -> dict:
    return {'step': jnp.asarray(step), 'params': {'w': jnp.arange(600.0) + step, 'b': jnp.full((4, 4), step, float)}}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def manager_with(directory, steps) -> ocp.CheckpointManager:
    manager = ocp.CheckpointManager(str(directory), options=ocp.CheckpointManagerOptions(max_to_keep=5, create=True))
    for s in steps:
        checkpointing.save(manager, s, state(s))
    return manager


def truncate_data(step_dir: pathlib.Path) -> None:
    files = [f for f in glob.glob(str(step_dir / 'default' / 'ocdbt.process_0' / 'd' / '*'))]
    assert files
    for f in files:
        with open(f, 'r+b') as fh:
            fh.truncate(10)


def test_a_corrupt_latest_checkpoint_is_skipped_and_moved_aside(tmp_path):
    directory = tmp_path / 'checkpoints'
    manager = manager_with(directory, [10, 20, 30])
    truncate_data(directory / '30')  # a truncated data file
    shutil.rmtree(directory / '20' / 'default')  # a missing default/ folder
    warnings = []
    restored, step = checkpointing.restore_newest(manager, abstract(state(0)), log=warnings.append)
    assert step == 10
    np.testing.assert_array_equal(restored['params']['w'], np.arange(600.0) + 10)
    assert len(warnings) == 2
    assert warnings[0].startswith(f'Checkpoint step 30 in {directory} does not restore (ValueError: OUT_OF_RANGE: ')
    assert warnings[0].endswith(f'resumed from step 10 instead. Step 30 was moved to {tmp_path}/corrupt_checkpoints/30 '
                                '(not deleted).')
    assert 'Item "default" was not found' in warnings[1] and 'Step 20 was moved' in warnings[1]
    assert sorted(os.listdir(tmp_path / 'corrupt_checkpoints')) == ['20', '30']
    assert manager.all_steps() == [10] and os.listdir(directory) == ['10']
    checkpointing.save(manager, 20, state(20))  # the same step number saves again: the bad one is out of the way
    assert manager.all_steps() == [10, 20]


def test_a_failure_closes_the_coroutines_it_left_pending_and_nothing_complains_later(monkeypatch, caplog):
    loop = asyncio.new_event_loop()

    async def read():  # as orbax's serialization._read_array_index_and_device_put: GeneratorExit becomes an error
        try:
            await loop.create_future()
        except BaseException as e:
            raise Exception('read abandoned') from e

    reported = []
    monkeypatch.setattr(sys, 'unraisablehook', reported.append)
    with pytest.raises(ValueError, match='a failed read'):
        with checkpointing.quiet_orbax_failures():
            task = loop.create_task(read())
            loop.run_until_complete(asyncio.sleep(0))  # the read starts and waits
            loop.close()
            raise ValueError('a failed read')
    assert task.get_coro().cr_frame is None and not task.done()
    assert checkpointing.abandoned_tasks() == []
    del task
    gc.collect()
    assert reported == [] and [r.getMessage() for r in caplog.records if r.name == 'asyncio'] == []


def test_a_failed_restore_leaves_no_read_pending_to_complain_later(tmp_path, monkeypatch, recwarn):
    """orbax abandons its other reads when one fails; left pending, each would complain whenever the garbage collector
    closed it ("Exception ignored in <coroutine _read_array_index_and_device_put>", "was never awaited")."""
    rng = np.random.default_rng(0)  # incompressible: each array's data is in the truncated file, not inline
    tree = {f'w{i}': jnp.asarray(rng.random((128, 128), np.float32)) for i in range(64)}  # reads pending at the failure
    manager = ocp.CheckpointManager(str(tmp_path / 'checkpoints'))
    checkpointing.save(manager, 10, tree)
    truncate_data(tmp_path / 'checkpoints' / '10')
    reported = []
    monkeypatch.setattr(sys, 'unraisablehook', reported.append)
    with pytest.raises(Exception, match='OUT_OF_RANGE|Encountered error while reading'):
        with checkpointing.quiet_orbax_failures():
            manager.restore(10, args=ocp.args.StandardRestore(abstract(tree)))
    assert checkpointing.abandoned_tasks() == []  # closed now: the test above shows that nothing complains later
    assert reported == []
    assert [str(w.message) for w in recwarn if issubclass(w.category, RuntimeWarning)] == []


def test_no_checkpoint_restores_one_short_error_and_nothing_moved(tmp_path):
    directory = tmp_path / 'checkpoints'
    manager = manager_with(directory, [10, 20])
    truncate_data(directory / '10')
    truncate_data(directory / '20')
    with pytest.raises(checkpointing.CheckpointRestoreError) as info:
        checkpointing.restore_newest(manager, abstract(state(0)))
    lines = str(info.value).splitlines()
    assert lines[0] == f'No checkpoint in {directory} restores:'
    assert lines[1].startswith('  step 20: ValueError: OUT_OF_RANGE') and lines[2].startswith('  step 10: ')
    assert lines[3].startswith('They are left in place.') and len(lines) == 4
    assert sorted(os.listdir(directory)) == ['10', '20'] and not (tmp_path / 'corrupt_checkpoints').exists()


def test_an_empty_folder_restores_nothing(tmp_path):
    manager = manager_with(tmp_path / 'checkpoints', [])
    assert checkpointing.restore_newest(manager, abstract(state(0))) == (None, None)


def test_a_checkpoint_of_another_model_is_an_error_not_corruption(tmp_path):
    directory = tmp_path / 'checkpoints'
    manager = manager_with(directory, [10])
    other = {'step': jnp.asarray(0), 'params': {'w': jnp.zeros(800), 'b': jnp.zeros((4, 4))}}
    with pytest.raises(checkpointing.ConfigMismatchError, match=r'step 10 .* other shapes than this config builds '
                                                                r'\(3 arrays vs 3; only in the checkpoint: \[\(600,\)\], '
                                                                r'only in this config: \[\(800,\)\]\)'):
        checkpointing.restore_newest(manager, abstract(other))
    assert os.listdir(directory) == ['10']  # intact and in place


def test_disk_full_from_a_patched_writer(tmp_path):
    directory = tmp_path / 'checkpoints'
    manager = manager_with(directory, [10])

    def fail_half_way():  # what orbax leaves when the disk fills during a save
        partial = directory / f'20{checkpointing._ORBAX_TMP}' / 'default'
        partial.mkdir(parents=True)
        (partial / 'chunk').write_bytes(b'x' * 100)
        raise ValueError('RESOURCE_EXHAUSTED: Failed to write 1165664 bytes to file 4: No space left on device '
                         "[os_error_code='28']")

    with pytest.raises(checkpointing.CheckpointSaveError) as info:
        checkpointing.save(manager, 20, state(20), save_fn=fail_half_way)
    needed = checkpointing.directory_bytes(str(directory / '10'))
    assert needed > 1000 and info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert f'No space left on the device of {directory} to save step 20: a checkpoint needs about {needed:,} bytes' \
        in message
    assert 'The partial save was removed; the complete checkpoints ([10]) are intact.' in message
    assert os.listdir(directory) == ['10']
    restored, step = checkpointing.restore_newest(manager, abstract(state(0)))
    assert step == 10 and float(restored['params']['b'][0, 0]) == 10.0


def test_other_save_failures_also_leave_no_partial_folder(tmp_path):
    directory = tmp_path / 'checkpoints'
    manager = manager_with(directory, [])

    def fail():
        (directory / f'5{checkpointing._ORBAX_TMP}').mkdir()
        raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        checkpointing.save(manager, 5, state(5), save_fn=fail)
    assert os.listdir(directory) == []


DISK_FULL_SCRIPT = textwrap.dedent('''
    import os, sys
    import jax.numpy as jnp, orbax.checkpoint as ocp
    from vit_jax.train import checkpointing
    directory = sys.argv[1]
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=5, create=True))
    state = {'w': jnp.asarray(__import__('numpy').random.default_rng(0).normal(size=600_000), jnp.float32)}
    checkpointing.save(manager, 1, state)
    try:
        checkpointing.save(manager, 2, state)
    except checkpointing.CheckpointSaveError as e:
        print('ERROR', e)
    print('LEFT', sorted(os.listdir(directory)))
''')


def test_disk_full_on_a_small_tmpfs(tmp_path):
    """A real full disk: a 3 MiB tmpfs holds one 2.3 MB checkpoint, not two (needs root or a user namespace)."""
    mount = tmp_path / 'small'
    mount.mkdir()
    script = tmp_path / 'save.py'
    script.write_text(DISK_FULL_SCRIPT)
    command = (f'mount -t tmpfs -o size=3m tmpfs {mount} && {sys.executable} {script} {mount}/checkpoints')
    try:
        result = subprocess.run(['unshare', '-rm', 'sh', '-c', command], capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
    except FileNotFoundError:
        pytest.skip('no unshare on this machine')
    if 'LEFT' not in result.stdout and ('unshare' in result.stderr or 'mount' in result.stderr):
        pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()[-300:]}')
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f'ERROR [Errno 28] No space left on the device of {mount}/checkpoints to save step 2: '
                               'a checkpoint needs about'), result.stdout + result.stderr
    assert lines[1] == "LEFT ['1']"  # the complete checkpoint kept, the partial one removed
    assert 'Traceback' not in result.stderr and 'RESOURCE_EXHAUSTED' not in result.stderr


# The config of a resumed run ------------------------------------------------------------------------------------------

def quickstart():
    return load_config(str(ROOT / 'configs' / 'quickstart.py'))


def workdir_at(tmp_path, step: int, config) -> str:
    workdir = tmp_path / 'work'
    (workdir / 'checkpoints' / str(step)).mkdir(parents=True)
    checkpointing.record_config(str(workdir), config, 0, {})
    return str(workdir)


def test_another_architecture_or_dataset_is_refused_listing_each_field(tmp_path):
    workdir = workdir_at(tmp_path, 500, quickstart())
    config = quickstart()
    config.model.hidden_size = 192
    config.model.num_layers = 6
    config.dataset = 'cifar10'
    config.image_size = 32
    config.optimizer.learning_rate = 1e-3  # legal, and not listed among the errors
    with pytest.raises(checkpointing.ConfigMismatchError) as info:
        checkpointing.check_resume_config(config, workdir)
    assert str(info.value).splitlines() == [
        f'The config differs from the run in {workdir} (its config.json, checkpoint step 500) in fields its '
        'checkpoints cannot continue with:',
        "  dataset: 'sklearn_digits' -> 'cifar10'",
        '  image_size: 16 -> 32',
        '  model.hidden_size: 96 -> 192',
        '  model.num_layers: 4 -> 6',
        f'Use a new --workdir to train this config, or fine-tune from this run with '
        f'--config.init_from.path={os.path.abspath(workdir)} in a new --workdir.']


@pytest.mark.parametrize('field,value', [('model.classifier', 'gap'), ('model.scan_layers', True),
                                         ('optimizer.name', 'sgd'), ('optimizer.ema_decay', 0.999),
                                         ('objective', 'distillation'), ('model_name', 'deit_ti16')])
def test_changes_to_the_train_state_are_refused(tmp_path, field, value):
    workdir = workdir_at(tmp_path, 500, quickstart())
    config = quickstart()
    section, _, key = field.rpartition('.')
    (config[section] if section else config)[key] = value
    with pytest.raises(checkpointing.ConfigMismatchError, match=rf'\n  {field}: '):
        checkpointing.check_resume_config(config, workdir)


def test_legal_changes_resume_with_a_warning_and_config_json_keeps_the_history(tmp_path):
    workdir = workdir_at(tmp_path, 500, quickstart())
    config = quickstart()
    config.optimizer.learning_rate = 1e-3
    config.total_steps = 3000
    config.eval_every = 250
    config.model.drop_path_rate = 0.2  # regularisation, not architecture
    warnings = []
    changes = checkpointing.check_resume_config(config, workdir, log=warnings.append)
    assert changes == {'eval_every': (500, 250), 'model.drop_path_rate': (0.1, 0.2),
                       'optimizer.learning_rate': (0.002, 0.001), 'total_steps': (1500, 3000)}
    assert warnings == [f'Resuming {workdir} from step 500 with 4 changed setting(s) (recorded in config.json under '
                        '"history"):\n  eval_every: 500 -> 250\n  model.drop_path_rate: 0.1 -> 0.2\n'
                        '  optimizer.learning_rate: 0.002 -> 0.001\n  total_steps: 1500 -> 3000']
    checkpointing.record_config(workdir, config, 500, changes)
    written = json.loads(pathlib.Path(workdir, 'config.json').read_text())
    assert written['optimizer']['learning_rate'] == 1e-3 and written['total_steps'] == 3000  # the values in use
    [entry] = written['history']
    assert entry['step'] == 500
    assert entry['changed']['optimizer.learning_rate'] == {'old': 0.002, 'new': 0.001}
    # A second resume with the same config finds nothing new; a third change appends to the history.
    assert checkpointing.check_resume_config(config, workdir) == {}
    config.eval_every = 100
    changes = checkpointing.check_resume_config(config, workdir, log=lambda _: None)
    checkpointing.record_config(workdir, config, 900, changes)
    history = json.loads(pathlib.Path(workdir, 'config.json').read_text())['history']
    assert [h['step'] for h in history] == [500, 900] and history[1]['changed'] == {'eval_every': {'old': 250,
                                                                                                   'new': 100}}


def test_a_fresh_workdir_is_not_compared(tmp_path):
    config = quickstart()
    assert checkpointing.check_resume_config(config, str(tmp_path)) == {}
    (tmp_path / 'config.json').write_text(json.dumps({'model_name': 'vit_b16'}))  # no checkpoint: nothing to resume
    assert checkpointing.check_resume_config(config, str(tmp_path)) == {}


def test_total_steps_below_the_workdir_step(tmp_path):
    config = quickstart()
    workdir = workdir_at(tmp_path, 500, config)
    config.total_steps = 300
    with pytest.raises(ValueError, match=r'config\.total_steps=300 is below step 500, where the checkpoint in .* '
                                         r'stands\. Set total_steps to at least 500 to continue'):
        checkpointing.check_total_steps(config, 300, workdir)
    checkpointing.check_total_steps(config, 500, workdir)  # the finished run: reports its eval
    config.total_steps, config.num_epochs = 0, 2.0
    with pytest.raises(ValueError, match=r'config\.num_epochs=2\.0 \(22 steps\) is below step 500'):
        checkpointing.check_total_steps(config, 22, workdir)
