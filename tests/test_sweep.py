"""Scaling sweeps: grid expansion, stable run ids, skipping and resuming, executors, the report and its power law."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import submitit  # noqa: F401 (imported here, not inside a test: its logging.config call closes pytest's captures)

from vit_jax import sweep as sw
from vit_jax.sweep import executors
from vit_jax.sweep.__main__ import main as sweep_main
from vit_jax.sweep.runner import DONE, FAILED, RunSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 2 x 2 grid of tiny runs (two ViT widths x two step budgets) on the bundled digits.
TINY_SWEEP = textwrap.dedent('''
    import os
    from vit_jax.train.config import load_config

    def get_config(arg=''):
        c = load_config(os.path.join({repo!r}, 'configs', 'quickstart.py'))
        c.model.update(num_layers=1, num_heads=2, mlp_dim=32, drop_path_rate=0.0)
        c.batch_size = 32
        c.optimizer.warmup_steps = 1
        c.log_every = 2
        c.eval_every = 100
        c.checkpoint_every = 100
        return c

    def get_hyper(hyper, arg=''):
        return hyper.product([hyper.sweep('model.hidden_size', [16, 24]),
                              hyper.sweep('total_steps', [2, 4])])
''')


@pytest.fixture
def tiny_sweep(tmp_path):
    path = tmp_path / 'tiny.py'
    path.write_text(TINY_SWEEP.format(repo=REPO))
    return str(path)


def write_sweep(tmp_path, hyper_body: str, name: str = 'grid.py') -> str:
    path = tmp_path / name
    path.write_text(TINY_SWEEP.format(repo=REPO).split('def get_hyper')[0]
                    + 'def get_hyper(hyper, arg=""):\n    return ' + hyper_body + '\n')
    return str(path)


# Grid expansion ------------------------------------------------------------------------------------------------------
def test_product_and_zip_give_the_runs():
    grid = sw.product([sw.zipit([sw.sweep('model_name', ['vit_ti16', 'resnet26']),
                                 sw.sweep('model.resnet_width', [None, 0.5])]),
                       sw.sweep('train_split', ['train[:10%]', 'train']),
                       sw.fixed('seed', 3)])
    assert grid == [
        {'model_name': 'vit_ti16', 'model.resnet_width': None, 'train_split': 'train[:10%]', 'seed': 3},
        {'model_name': 'vit_ti16', 'model.resnet_width': None, 'train_split': 'train', 'seed': 3},
        {'model_name': 'resnet26', 'model.resnet_width': 0.5, 'train_split': 'train[:10%]', 'seed': 3},
        {'model_name': 'resnet26', 'model.resnet_width': 0.5, 'train_split': 'train', 'seed': 3},
    ]
    runs = [sw.Run.of(r) for r in grid]
    assert runs[0].flags() == ['--config.model_name=vit_ti16', '--config.seed=3', '--config.train_split=train[:10%]']
    assert runs[3].name == 'resnet26-w0.5-train-seed3'


def test_zip_of_unequal_grids_and_a_field_set_twice_are_errors():
    with pytest.raises(sw.SweepError, match=r'lengths \[2, 3\].*same number of runs'):
        sw.zipit([sw.sweep('seed', [0, 1]), sw.sweep('total_steps', [1, 2, 3])])
    with pytest.raises(sw.SweepError, match="Field 'seed' is set twice"):
        sw.product([sw.sweep('seed', [0]), sw.sweep('seed', [1])])


def test_run_ids_are_stable_across_processes_and_insensitive_to_order():
    a = sw.Run.of({'model_name': 'vit_s16', 'optimizer.learning_rate': 1e-3, 'train_split': 'train[:10%]'})
    b = sw.Run.of({'config.train_split': 'train[:10%]', 'optimizer.learning_rate': 1e-3, 'model_name': 'vit_s16'})
    assert a.id == b.id == a.dirname.rsplit('.', 1)[1]
    other = subprocess.run(
        [sys.executable, '-c', 'from vit_jax.sweep import Run; print(Run.of({"train_split": "train[:10%]", '
         '"model_name": "vit_s16", "optimizer.learning_rate": 1e-3}).id)'],
        capture_output=True, text=True, check=True, env={**os.environ, 'PYTHONHASHSEED': '123'})
    assert other.stdout.strip() == a.id
    assert a.id == '6de20072'  # a hash of the sorted overrides: fixed forever, or old sweep workdirs are orphaned
    assert sw.Run.of({'seed': 1}).id != sw.Run.of({'seed': 2}).id


def test_load_sweep_expands_and_checks_the_grid(tiny_sweep):
    loaded = sw.load_sweep(tiny_sweep)
    assert [r.as_dict() for r in loaded.runs] == [{'model.hidden_size': 16, 'total_steps': 2},
                                                  {'model.hidden_size': 16, 'total_steps': 4},
                                                  {'model.hidden_size': 24, 'total_steps': 2},
                                                  {'model.hidden_size': 24, 'total_steps': 4}]
    config = loaded.run_config(loaded.runs[3])
    assert (config.model.hidden_size, config.total_steps, config.model.num_layers) == (24, 4, 1)


# Bad input -----------------------------------------------------------------------------------------------------------
def test_unknown_config_field_is_a_clear_error(tmp_path):
    path = write_sweep(tmp_path, "hyper.sweep('model.hidden_sz', [16, 24])")
    with pytest.raises(sw.SweepError, match=r"unknown config field 'model.hidden_sz'.*Did you mean "
                                            r"'model.hidden_size'\?.*Fix the field name in get_hyper"):
        sw.load_sweep(path)


def test_wrong_type_and_impossible_model_are_clear_errors(tmp_path):
    with pytest.raises(sw.SweepError, match=r"model.hidden_size='wide'.*cannot be casted"):
        sw.load_sweep(write_sweep(tmp_path, "hyper.sweep('model.hidden_size', ['wide'])", 'a.py'))
    # A ViT's patch_size on a ResNet: caught before the first run, not in run 7's log.
    with pytest.raises(sw.SweepError,
                       match=r"run 0 .*Unknown field\(s\) \['drop_path_rate', 'hidden_size'.*for model 'resnet26'"):
        sw.load_sweep(write_sweep(tmp_path, "hyper.sweep('model_name', ['resnet26'])", 'b.py'))


def test_empty_grid_is_a_clear_error(tmp_path):
    with pytest.raises(sw.SweepError, match='the grid is empty'):
        sw.load_sweep(write_sweep(tmp_path,
                                  "hyper.product([hyper.sweep('seed', [0]), hyper.sweep('total_steps', [])])"))


def test_missing_sweep_file_and_functions_are_clear_errors(tmp_path):
    with pytest.raises(sw.SweepError, match='No sweep file at'):
        sw.load_sweep(str(tmp_path / 'nope.py'))
    (tmp_path / 'config_only.py').write_text('def get_config():\n    return None\n')
    with pytest.raises(sw.SweepError,
                       match=r'has no get_hyper\(\): a sweep file is a config file \(get_config\(arg=""\)\)'):
        sw.load_sweep(str(tmp_path / 'config_only.py'))
    with pytest.raises(sw.SweepError, match="scaling.py:tiny: Unknown grid 'tiny'.*'' \\(digits\\) or 'paper'"):
        sw.load_sweep(os.path.join(REPO, 'experiments', 'scaling.py') + ':tiny')


def test_a_workdir_holding_a_different_sweep_is_refused(tmp_path, tiny_sweep, capsys):
    workdir = tmp_path / 'sweep'
    workdir.mkdir()
    (workdir / 'sweep.json').write_text(json.dumps({'sweep': 'experiments/other.py', 'runs': {'a.1234abcd': {}}}))
    for mode in ([], ['--emit-commands'], ['--report']):
        assert sweep_main([tiny_sweep, '--workdir', str(workdir), *mode]) == 2
        err = capsys.readouterr().err
        assert 'holds a different sweep: experiments/other.py with 1 runs' in err and 'new --workdir' in err
    train_dir = tmp_path / 'train'
    (train_dir / 'checkpoints').mkdir(parents=True)
    assert sweep_main([tiny_sweep, '--workdir', str(train_dir), '--report']) == 2
    assert 'is a training workdir (it holds checkpoints)' in capsys.readouterr().err


# Skipping, emitting, failing -----------------------------------------------------------------------------------------
def test_finished_run_is_skipped_and_not_emitted(tmp_path, tiny_sweep, capsys):
    workdir = tmp_path / 'sweep'
    loaded = sw.load_sweep(tiny_sweep)
    finished = workdir / loaded.runs[1].dirname
    finished.mkdir(parents=True)
    (finished / 'DONE').write_text('{"step": 4}')
    assert sweep_main([tiny_sweep, '--workdir', str(workdir), '--emit-commands']) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and not any(loaded.runs[1].dirname in line for line in lines)
    assert lines[0].startswith(f'python -m vit_jax.main --config {tiny_sweep} --workdir {workdir}/'
                               f'd16-steps2.{loaded.runs[0].id} --config.model.hidden_size=16 --config.total_steps=2')


def test_run_status_on_disk(tmp_path):
    from vit_jax.sweep import runner
    workdir = tmp_path / 'run'
    assert runner.status(str(workdir)) == runner.NEW
    (workdir / 'checkpoints').mkdir(parents=True)  # interrupted: rerunning the same command resumes from these
    assert runner.status(str(workdir)) == runner.STARTED
    runner.write_json(str(workdir / 'sweep_run.json'), {'attempts': [{'returncode': 0, 'wall_s': 5.0},
                                                                     {'returncode': 1, 'wall_s': 2.5}]})
    assert runner.status(str(workdir)) == runner.FAILED and runner.wall_seconds(str(workdir)) == 7.5
    (workdir / 'DONE').write_text('{"step": 4}')
    assert runner.status(str(workdir)) == runner.DONE


def test_a_failed_run_does_not_stop_the_others(tmp_path):
    specs = [RunSpec(str(i), f'run{i}', str(tmp_path / str(i)), 'c.py', (), (), str(tmp_path)) for i in range(3)]

    def fake_run(spec):
        if spec.id == '0':
            return dict(id=spec.id, status=FAILED, returncode=1, wall_s=1.0, log_tail='ValueError: boom\n')
        if spec.id == '1':
            raise RuntimeError('worker lost')
        return dict(id=spec.id, status=DONE, returncode=0, wall_s=2.0, log_tail='')

    import io
    out = io.StringIO()
    progress = executors.Progress(total=4, done=1, out=out)
    results = executors.run_local(specs, progress, run=fake_run)
    assert [r['status'] for r in results] == [FAILED, FAILED, DONE]
    assert (progress.done, progress.failed, progress.running, progress.left) == (2, 2, 0, 0)
    text = out.getvalue()
    assert 'FAILED run0 (0), exit code 1' in text and '| ValueError: boom' in text and 'the sweep goes on' in text
    assert 'RuntimeError: worker lost' in text
    assert '2/4 done, 0 running, 2 failed, 0 left' in text


def test_progress_eta_is_mean_time_times_runs_left_over_parallel():
    progress = executors.Progress(total=10, done=2, running=2, parallel=2, walls=[60.0, 120.0])
    assert progress.left == 6
    assert progress.eta_s() == pytest.approx(90.0 * 8 / 2)


# The power law -------------------------------------------------------------------------------------------------------
def test_power_law_fit_recovers_known_parameters():
    compute = np.geomspace(1e15, 1e20, 12)
    a, b, c, d = 30.0, 0.1, 0.05, 2e16  # E = 30 (C + 2e16)^-0.1 + 0.05
    error = sw.power_law(compute, a, b, c, d)
    fit = sw.fit_power_law(compute, error)
    assert fit['points'] == 12
    assert fit['a'] == pytest.approx(a, rel=1e-3)
    assert fit['b'] == pytest.approx(b, rel=1e-3)
    assert fit['c'] == pytest.approx(c, rel=1e-3)
    assert fit['d'] == pytest.approx(d, rel=1e-2)
    assert fit['rms_log_residual'] < 1e-6 and fit['constrained']


def test_power_law_fit_refuses_too_few_points():
    fit = sw.fit_power_law(np.array([1e12, 1e13, 1e14, 1e15]), np.array([0.5, 0.3, 0.2, 0.15]))
    assert fit['fit'] is None and fit['reason'] == 'too few points for a fit: 4 < 5 (four parameters)'


def test_pareto_frontier():
    compute = np.array([1.0, 2.0, 2.0, 3.0, 4.0])
    error = np.array([0.5, 0.6, 0.4, 0.45, 0.3])
    assert sw.pareto_frontier(compute, error).tolist() == [0, 2, 4]


# End to end ----------------------------------------------------------------------------------------------------------
def _check_report(workdir, loaded):
    import pandas as pd
    df = pd.read_csv(workdir / 'results.csv')
    assert len(df) == 4 and set(df['status']) == {DONE}
    assert sorted(df['model.hidden_size']) == [16, 16, 24, 24] and sorted(df['total_steps']) == [2, 2, 4, 4]
    assert df['final_eval_top1'].between(0, 1).all() and df['best_eval_top1'].ge(df['final_eval_top1']).all()
    assert df['final_train_loss'].gt(0).all() and df['wall_s'].gt(0).all()
    row = df[(df['model.hidden_size'] == 24) & (df['total_steps'] == 4)].iloc[0]
    # XLA's count per image x batch x steps; the analytic count (3x forward, matmuls only) is a little lower.
    assert row['train_flops'] == pytest.approx(row['xla_train_flops_per_image'] * 32 * 4)
    assert 0.5 < row['analytic_train_flops'] / row['train_flops'] < 1.0
    assert row['params'] > 0 and row['train_examples'] == 1437 and row['model'] == 'ViT D24 L1 /4'
    fits = json.loads((workdir / 'fits.json').read_text())
    assert fits['vit']['fit'] is None and 'too few points' in fits['vit']['reason']
    for png in ('data_scaling.png', 'compute_scaling.png', 'loss_curves.png'):
        assert (workdir / png).stat().st_size > 10_000
    for run in loaded.runs:
        assert json.loads((workdir / run.dirname / 'DONE').read_text())['step'] in (2, 4)
        assert json.loads((workdir / run.dirname / 'sweep_run.json').read_text())['overrides'] == run.as_dict()


def test_local_executor_runs_a_2x2_grid_end_to_end(tmp_path, tiny_sweep, capsys):
    workdir = tmp_path / 'sweep'
    # All four at once: each run is mostly process start-up and compilation, which overlap on two cores.
    assert sweep_main([tiny_sweep, '--workdir', str(workdir), '--parallel', '4']) == 0
    out = capsys.readouterr().out
    assert '4 runs in' in out and '4/4 done, 0 running, 0 failed, 0 left' in out
    loaded = sw.load_sweep(tiny_sweep)
    _check_report(workdir, loaded)
    # Rerunning skips every finished run.
    assert sweep_main([tiny_sweep, '--workdir', str(workdir), '--no-flops']) == 0
    assert '4 finished already (skipped), 0 to run' in capsys.readouterr().out


def test_slurm_path_through_submitits_debug_executor(tmp_path, tiny_sweep, capsys, monkeypatch):
    """The SLURM code path (one array job, polling, results, a failed run) with submitit's in-process debug cluster;
    each run is stood in for by a stub (the real runs: the slow test below). (A job that raises would drop the debug
    cluster into pdb.)"""
    def stub_run_one(spec):
        if spec.name == 'd24-steps2':  # as run_one reports a run that failed (it never raises)
            return dict(id=spec.id, status=FAILED, returncode=1, wall_s=1.0, log_tail='MemoryError: out of memory\n')
        os.makedirs(spec.workdir, exist_ok=True)
        with open(os.path.join(spec.workdir, 'DONE'), 'w') as f:
            f.write('{"step": 1}')
        return dict(id=spec.id, status=DONE, returncode=0, wall_s=1.0, log_tail='')

    monkeypatch.setattr(executors, 'run_one', stub_run_one)
    workdir = tmp_path / 'sweep'
    code = sweep_main([tiny_sweep, '--workdir', str(workdir), '--executor', 'slurm', '--cluster', 'debug',
                       '--partition', 'gpu', '--gpus-per-node', '1', '--no-flops'])
    captured = capsys.readouterr()
    assert code == 1  # one run failed: the sweep says so in its exit code, after running the others
    assert 'Submitted 4 runs as array job' in captured.out and '(debug)' in captured.out
    assert 'FAILED d24-steps2' in captured.out and '| MemoryError: out of memory' in captured.out
    assert '3/4 done, 0 running, 1 failed, 0 left' in captured.out
    assert '1 run(s) failed' in captured.err
    loaded = sw.load_sweep(tiny_sweep)
    assert [os.path.exists(workdir / r.dirname / 'DONE') for r in loaded.runs] == [True, True, False, True]
    # Rerunning submits only the run that is not finished.
    code = sweep_main([tiny_sweep, '--workdir', str(workdir), '--executor', 'slurm', '--cluster', 'debug',
                       '--no-flops'])
    assert code == 1 and 'Submitted 1 runs as array job' in capsys.readouterr().out


@pytest.mark.slow
def test_slurm_path_runs_the_grid_through_submitits_local_executor(tmp_path, tiny_sweep, capsys):
    workdir = tmp_path / 'sweep'
    assert sweep_main([tiny_sweep, '--workdir', str(workdir), '--executor', 'slurm', '--cluster', 'local',
                       '--timeout-min', '10', '--partition', 'ignored-here']) == 0
    out = capsys.readouterr().out
    assert 'Submitted 4 runs as array job' in out and '4/4 done' in out
    _check_report(workdir, sw.load_sweep(tiny_sweep))
    assert any(name.endswith('_log.out') for name in os.listdir(workdir / 'submitit'))
