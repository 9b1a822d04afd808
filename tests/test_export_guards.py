"""Export and load_params never lose a user's files or a model: re-exporting replaces only the export's own files,
and a workdir whose newest checkpoint is corrupt falls back to the newest that restores (or takes --step)."""

import glob
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytest.importorskip('torch')

from test_export import TINY, artefacts, create, random_params  # noqa: E402
from vit_jax import models  # noqa: E402
from vit_jax.checkpoints import CheckpointError, load_params  # noqa: E402
from vit_jax.export import ExportError, export  # noqa: E402
from vit_jax.export.__main__ import main  # noqa: E402

FAST = dict(repeats=1, warmup=0)


def test_reexport_refuses_a_folder_with_other_files_and_keeps_them(tmp_path):
    model = create('vit_gap')
    out = tmp_path / 'export'
    export(random_params(model, seed=0), model, str(out), **FAST)
    (out / 'notes.txt').write_text('my notes\n')
    (out / 'deploy').mkdir()
    (out / 'deploy' / 'app.py').write_text('print(1)\n')
    before = {f: (out / f).read_bytes() for f in artefacts.FILES}
    with pytest.raises(ExportError) as info:
        export(random_params(model, seed=1), model, str(out), **FAST)
    assert str(info.value) == (
        f"{out} holds files that are not an earlier export's: ['deploy', 'notes.txt']. An export writes and replaces "
        f"only {list(artefacts.FILES)}: move the others away, or choose another --out.")
    assert (out / 'notes.txt').read_text() == 'my notes\n' and (out / 'deploy' / 'app.py').exists()
    assert {f: (out / f).read_bytes() for f in artefacts.FILES} == before  # the earlier export untouched
    assert sorted(os.listdir(tmp_path)) == ['export']  # no temporary folder left beside it


def test_reexport_into_an_earlier_export_replaces_its_files(tmp_path):
    model = create('vit_gap')
    out = tmp_path / 'export'
    export(random_params(model, seed=0), model, str(out), **FAST)
    second = random_params(model, seed=1)
    export(second, model, str(out), **FAST)
    assert sorted(os.listdir(out)) == sorted(artefacts.FILES) and sorted(os.listdir(tmp_path)) == ['export']
    state = load_params(out / artefacts.STATE_DICT, model)
    np.testing.assert_array_equal(state['head']['kernel'], second['head']['kernel'])


# A workdir with a corrupt newest checkpoint ------------------------------------------------------------------------

MODEL_OVERRIDES = dict(patch_size=4, **TINY)


def workdir_with_steps(tmp_path, steps):
    """A workdir as vit_jax.main writes it, with a checkpoint per step whose parameters are ``random_params(seed=step)``."""
    from vit_jax.train.config import base_config
    config = base_config()
    config.model_name, config.image_size = 'vit_ti16', 16
    config.model.update(MODEL_OVERRIDES)
    workdir = tmp_path / 'workdir'
    workdir.mkdir()
    (workdir / 'config.json').write_text(config.to_json_best_effort())
    model = models.create_model('vit_ti16', num_classes=10, image_size=16, **MODEL_OVERRIDES)
    with ocp.CheckpointManager(str(workdir / 'checkpoints')) as manager:
        for s in steps:
            manager.save(s, args=ocp.args.StandardSave({'step': np.int32(s), 'params': random_params(model, seed=s),
                                                        'ema_params': None, 'opt_state': {'count': np.int32(s)}}))
    return workdir, model


def corrupt(step_dir) -> None:
    for f in glob.glob(str(step_dir / 'default' / 'ocdbt.process_0' / 'd' / '*')):
        with open(f, 'r+b') as fh:
            fh.truncate(10)


def test_load_params_falls_back_past_a_corrupt_checkpoint_and_takes_a_step(tmp_path, caplog):
    workdir, model = workdir_with_steps(tmp_path, [10, 20])
    corrupt(workdir / 'checkpoints' / '20')
    with caplog.at_level(logging.WARNING):
        params = load_params(workdir, model)
    expected = random_params(model, seed=10)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, expected))
    [warning] = [r.getMessage() for r in caplog.records if 'does not restore' in r.getMessage()]
    assert warning.startswith(f'Checkpoint step 20 in {workdir}/checkpoints does not restore (ValueError: OUT_OF_RANGE')
    assert warning.endswith('using step 10 instead. Step 20 is left in place.')
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']
    with pytest.raises(CheckpointError, match=r'Cannot restore the orbax checkpoint .*/checkpoints/20 \(ValueError: '
                                              r'OUT_OF_RANGE'):
        load_params(workdir, model, step=20)
    params = load_params(workdir, model, step=10)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, expected))
    corrupt(workdir / 'checkpoints' / '10')
    with pytest.raises(CheckpointError, match=rf'No checkpoint in {workdir}/checkpoints restores:\n  step 20: .*\n'
                                              r'  step 10: '):
        load_params(workdir, model)


def test_export_cli_falls_back_and_takes_step(tmp_path, caplog):
    workdir, model = workdir_with_steps(tmp_path, [10, 20, 30])
    corrupt(workdir / 'checkpoints' / '30')
    out = tmp_path / 'out'
    with caplog.at_level(logging.WARNING):
        assert main(['--workdir', str(workdir), '--out', str(out), '--no-eval', '--repeats', '1', '--warmup', '0']) == 0
    assert json.loads((out / artefacts.REPORT).read_text())['source']['step'] == 20
    assert any(r.getMessage().startswith('Checkpoint step 30 in') for r in caplog.records)
    assert main(['--workdir', str(workdir), '--out', str(out), '--no-eval', '--repeats', '1', '--warmup', '0',
                 '--step', '10']) == 0
    assert json.loads((out / artefacts.REPORT).read_text())['source']['step'] == 10
    state = load_params(out / artefacts.STATE_DICT, model)
    np.testing.assert_array_equal(state['head']['kernel'], random_params(model, seed=10)['head']['kernel'])
