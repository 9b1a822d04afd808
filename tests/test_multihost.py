"""Two processes on this machine, 4 CPU devices each, as two hosts of a pod: the same losses as one process.

The processes start JAX's multi-controller runtime (``jax.distributed.initialize`` with a coordinator on localhost)
through ``python -m vit_jax.main --distributed``; their collectives go through gloo (JAX's CPU default). The
reference is one process with 8 devices reading both hosts' data: each host reads its own part of the dataset, so
the single-process run is given process 0's and then process 1's batches, the rows that the (data=4, fsdp=2) mesh
puts on process 0's devices and then on process 1's.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from vit_jax import data, distributed
from vit_jax.train import config as config_lib
from vit_jax.train.loop import train_and_evaluate

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / 'tests' / 'multihost_worker.py'
STEPS = 16
SIGTERM_AT = 5  # process 1 sends itself SIGTERM when its data reaches this step
OVERRIDES = {'model.hidden_size': 32, 'model.num_layers': 2, 'model.num_heads': 2, 'model.mlp_dim': 64,
             'batch_size': 64, 'total_steps': STEPS, 'log_every': 1, 'eval_every': STEPS, 'checkpoint_every': 100,
             'mesh.data': 4, 'mesh.fsdp': 2, 'optimizer.warmup_steps': 5}
TIMEOUT = 300  # seconds for one pair of processes: a hang (one process stopped, one waiting) fails, not blocks


def make_config(data_dir, **extra):
    config = config_lib.load_config(str(ROOT / 'configs' / 'quickstart.py'))
    config.data_dir = data_dir
    for key, value in {**OVERRIDES, **extra}.items():
        *parents, field = key.split('.')
        node = config
        for p in parents:
            node = node[p]
        node[field] = value
    return config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def run_two_processes(workdir, data_dir, sigterm_at: int | None = None, **extra) -> list[subprocess.CompletedProcess]:
    """``python -m vit_jax.main --distributed`` in two processes; returns both, finished."""
    port = free_port()
    flags = [f'--config={ROOT / "configs" / "quickstart.py"}', f'--workdir={workdir}', f'--config.data_dir={data_dir}',
             *(f'--config.{k}={v}' for k, v in {**OVERRIDES, **extra}.items()),
             '--distributed', f'--coordinator_address=localhost:{port}', '--num_processes=2']
    env = dict(os.environ, JAX_PLATFORMS='cpu', VIT_JAX_MALLOC='0')
    if sigterm_at is not None:
        env['VIT_JAX_TEST_SIGTERM_AT'] = str(sigterm_at)
    procs = [subprocess.Popen([sys.executable, str(WORKER), '4', *flags, f'--process_id={i}'], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def two_hosts(reader):
    """A single-process data reader that yields what two hosts read, process 0's rows first (see the docstring)."""
    def read(config, *, process_index=0, process_count=1, **kwargs):
        its = [reader(config, process_index=i, process_count=2, **kwargs) for i in range(2)]
        for parts in zip(*its):
            yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return read


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    """sklearn_digits prepared once, before any process reads it (two processes preparing it at once would race)."""
    root = str(tmp_path_factory.mktemp('tfds'))
    data.dataset_info(make_config(root))
    return root


@pytest.mark.parametrize('kwargs, env, message', [
    (dict(num_processes=0), {}, r'--num_processes=0: give the number of processes'),
    (dict(num_processes=2, process_id=2), {}, r'--process_id=2 is not in 0..1 \(--num_processes=2\)'),
    (dict(coordinator_address='host0'), {}, r"--coordinator_address='host0' has no port: give HOST:PORT .* host0:1234"),
    ({}, {'JAX_NUM_PROCESSES': 'two'}, r"\$JAX_NUM_PROCESSES='two' is not an integer"),
    (dict(num_processes=2), {'JAX_PROCESS_ID': '5'}, r'--process_id=5 is not in 0..1')])
def test_distributed_settings_are_checked_before_connecting(monkeypatch, kwargs, env, message):
    for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        distributed.initialize(**kwargs)


def test_one_process_preemption_watch_flags_sigterm_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with distributed.PreemptionWatch() as preempted:
        assert not preempted(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempted(2) and preempted(3)  # saved after the step in flight, whichever that is
    assert signal.getsignal(signal.SIGTERM) is previous


def assert_same_metrics(got: list[dict], expected: list[dict]) -> None:
    assert [m['step'] for m in got] == [m['step'] for m in expected]  # each step once: only process 0 writes
    for ours, ref in zip(got, expected):
        for key in ('train_loss', 'eval_loss', 'eval_top1'):
            if key in ref:
                np.testing.assert_allclose(ours[key], ref[key], rtol=1e-5, err_msg=f'{key} at step {ref["step"]}')


def one_process_reference(workdir, digits_dir, monkeypatch, **extra) -> list[dict]:
    """The same config in this process (8 devices, the conftest's), reading what the two hosts read."""
    with monkeypatch.context() as m:
        m.setattr(data, 'train_iterator', two_hosts(data.train_iterator))
        m.setattr(data, 'eval_iterator', two_hosts(data.eval_iterator))
        train_and_evaluate(make_config(digits_dir, **extra), str(workdir))
    expected = read_metrics(workdir)
    assert [m['step'] for m in expected] == list(range(1, STEPS + 1))
    return expected


@pytest.mark.multihost
@pytest.mark.slow  # ~2 min: `make test-multihost` runs it
def test_two_processes_fine_tune_as_one_process(tmp_path, digits_dir, monkeypatch):
    """Fine-tuning from a checkpoint into parameters sharded over both hosts' devices (some left at init): every
    logged loss and the eval equal the single-process 8-device run's, and metrics.jsonl holds each step once.

    The mesh is (data=1, fsdp=8), so that every parameter's embed axis spans both processes (on data=4 x fsdp=2 an
    fsdp pair is two devices of one process): no process holds a whole parameter, and ``jax.device_get`` of one fails.
    """
    pretrained = tmp_path / 'pretrained'
    train_and_evaluate(make_config(digits_dir, total_steps=2, log_every=2, eval_every=2,
                                   **{'optimizer.warmup_steps': 1}), str(pretrained))
    # Left at init: the zero head, and one Xavier-uniform kernel, drawn on the host and by the sharded init alike.
    fine_tune = {'init_from.path': str(pretrained), 'init_from.skip': '^(head|encoder/block_0/mlp/fc1)/',
                 'mesh.data': 1, 'mesh.fsdp': 8}
    expected = one_process_reference(tmp_path / 'one_process', digits_dir, monkeypatch, **fine_tune)

    workdir = tmp_path / 'two_processes'
    for i, r in enumerate(run_two_processes(workdir, digits_dir, **fine_tune)):
        assert r.returncode == 0, f'process {i}: exit {r.returncode}\n{r.stderr[-3000:]}'
    assert_same_metrics(read_metrics(workdir), expected)
    assert json.loads((workdir / 'DONE').read_text())['step'] == STEPS


@pytest.mark.multihost
@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_the_rerun_resumes_exactly(tmp_path, digits_dir,
                                                                                     monkeypatch):
    """SIGTERM to process 1 only: both save the same step and exit 143; rerunning both resumes, and the whole run's
    metrics equal an uninterrupted single-process run's."""
    expected = one_process_reference(tmp_path / 'one_process', digits_dir, monkeypatch)
    workdir = tmp_path / 'two_processes'
    stopped = run_two_processes(workdir, digits_dir, sigterm_at=SIGTERM_AT)
    for i, r in enumerate(stopped):
        assert r.returncode == 143, f'process {i}: exit {r.returncode}\n{r.stderr[-3000:]}'
    saved = [int(re.search(r'SIGTERM: saved step (\d+)', r.stderr).group(1)) for r in stopped]
    # One step, agreed by both, before the end (the data runs a few batches ahead of the steps: maybe before 5).
    assert saved[0] == saved[1] and 1 <= saved[0] < STEPS, saved
    assert sorted(int(d.name) for d in (workdir / 'checkpoints').iterdir() if d.name.isdigit()) == [saved[0]]
    assert [m['step'] for m in read_metrics(workdir)] == list(range(1, saved[0] + 1))

    for i, r in enumerate(run_two_processes(workdir, digits_dir)):
        assert r.returncode == 0, f'process {i}: exit {r.returncode}\n{r.stderr[-3000:]}'
    assert_same_metrics(read_metrics(workdir), expected)
