"""One run of a sweep: its command, its state on disk, running it (here or on a cluster node) and its compute.

A run's workdir holds what ``python -m vit_jax.main`` writes (``config.json``, ``metrics.jsonl``, ``checkpoints/``,
``DONE`` last) and what the sweep adds: ``sweep_run.json`` (its overrides, command and attempts), ``log.txt`` (every
attempt's output) and ``flops.json`` (its compute).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Any

DONE, FAILED, STARTED, NEW = 'done', 'failed', 'started', 'new'


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs to run one run (picklable: submitit sends it to a SLURM node)."""

    id: str
    name: str
    workdir: str  # absolute
    config: str  # FILE[:arg], as given (relative to cwd)
    flags: tuple[str, ...]
    overrides: tuple[tuple[str, Any], ...]
    cwd: str

    def command(self, python: str = sys.executable, workdir: str | None = None) -> list[str]:
        """``python -m vit_jax.main --config FILE --workdir DIR/<run> --config.FIELD=VALUE ...``."""
        return [python, '-m', 'vit_jax.main', '--config', self.config, '--workdir', workdir or self.workdir,
                *self.flags]

    def shell_line(self, python: str = 'python', workdir: str | None = None) -> str:
        return shlex.join(self.command(python, workdir))


def write_json(path: str, value: Any) -> None:
    """Atomically: a reader sees the old file or the new one."""
    tmp = f'{path}.tmp{os.getpid()}.{threading.get_ident()}'
    with open(tmp, 'w') as f:
        json.dump(value, f, indent=1, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def status(workdir: str) -> str:
    """done (``DONE`` written), failed (its last attempt failed), started (checkpoints or an attempt) or new."""
    if os.path.exists(os.path.join(workdir, 'DONE')):
        return DONE
    record = read_json(os.path.join(workdir, 'sweep_run.json')) or {}
    attempts = record.get('attempts', [])
    if attempts and attempts[-1].get('returncode') not in (None, 0):
        return FAILED
    if attempts or os.path.isdir(os.path.join(workdir, 'checkpoints')):
        return STARTED
    return NEW


def log_tail(workdir: str, lines: int = 15) -> str:
    try:
        with open(os.path.join(workdir, 'log.txt'), errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except FileNotFoundError:
        return ''


_PROCESSES: set[subprocess.Popen] = set()  # running children, so that Ctrl-C can stop them (they checkpoint on SIGTERM)


def stop_all() -> None:
    for process in list(_PROCESSES):
        process.terminate()
    for process in list(_PROCESSES):
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def run_one(spec: RunSpec, count_flops: bool = True) -> dict[str, Any]:
    """Runs (or resumes) one run to the end; never raises for a failed run: returns its status, return code, wall
    time and log tail. A finished run is not rerun. Then writes its compute (``flops.json``)."""
    if status(spec.workdir) == DONE:
        return dict(id=spec.id, status=DONE, returncode=0, wall_s=0.0, log_tail='')
    os.makedirs(spec.workdir, exist_ok=True)
    record_path = os.path.join(spec.workdir, 'sweep_run.json')
    record = read_json(record_path) or dict(id=spec.id, name=spec.name, overrides=dict(spec.overrides),
                                            command=spec.shell_line(), attempts=[])
    attempt = dict(start=time.time(), host=os.uname().nodename, returncode=None)
    record['attempts'].append(attempt)
    write_json(record_path, record)
    command = spec.command()
    start = time.perf_counter()
    with open(os.path.join(spec.workdir, 'log.txt'), 'a') as log:
        log.write(f'=== {time.strftime("%Y-%m-%d %H:%M:%S")} on {attempt["host"]}: {shlex.join(command)}\n')
        log.flush()
        process = subprocess.Popen(command, cwd=spec.cwd, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        _PROCESSES.add(process)
        try:
            returncode = process.wait()
        finally:
            _PROCESSES.discard(process)
    wall = time.perf_counter() - start
    done = os.path.exists(os.path.join(spec.workdir, 'DONE'))
    if returncode == 0 and not done:  # e.g. stopped on SIGTERM after a checkpoint: unfinished, not successful
        returncode = -1
    attempt.update(returncode=returncode, wall_s=wall)
    write_json(record_path, record)
    result = dict(id=spec.id, status=DONE if done else FAILED, returncode=returncode, wall_s=wall,
                  log_tail='' if done else log_tail(spec.workdir))
    if done and count_flops:
        try:
            write_flops(spec.workdir, spec.cwd)
        except Exception as e:  # noqa: BLE001 (the run succeeded; its compute is counted again by --report)
            result['flops_error'] = f'{type(e).__name__}: {e}'
    return result


def wall_seconds(workdir: str) -> float:
    """The run's wall time over all its attempts (a resumed run's time is the sum)."""
    record = read_json(os.path.join(workdir, 'sweep_run.json')) or {}
    return sum(a.get('wall_s') or 0.0 for a in record.get('attempts', []))


# Compute -----------------------------------------------------------------------------------------------------------
_FLOPS_LOCK = threading.Lock()
BENCH_MAX_BATCH = 32  # XLA's count is per image: a smaller batch gives the same figure for a fraction of the compile


def write_flops(workdir: str, cwd: str | None = None) -> dict[str, Any]:
    """``flops.json`` of a finished run: XLA's count of its train step per image (``vit_jax.bench --mode compile``)
    x batch x steps, the analytic count (``vit_jax.models.flops``, 3x forward) and the parameter count.

    The same model at the same size is counted once per sweep (a cache in the sweep's ``flops_cache/``).
    """
    path = os.path.join(workdir, 'flops.json')
    cached = read_json(path)
    if cached is not None:
        return cached
    config = read_json(os.path.join(workdir, 'config.json'))
    done = read_json(os.path.join(workdir, 'DONE'))
    if config is None or done is None:
        raise FileNotFoundError(f'{workdir} has no config.json or DONE: only a finished run has a compute count.')
    steps, batch = int(done['step']), int(config['batch_size'])
    model = model_figures(config)
    per_image = xla_train_flops_per_image(config, model['num_classes'], os.path.dirname(workdir), cwd)
    result = dict(steps=steps, batch_size=batch, images=steps * batch, **model,
                  xla_train_flops_per_image=per_image, train_flops=per_image * batch * steps,
                  analytic_train_flops=(3.0 * model['analytic_forward_flops_per_image'] * batch * steps
                                        if model['analytic_forward_flops_per_image'] else None))
    write_json(path, result)
    return result


def model_overrides(config: dict) -> dict[str, Any]:
    return {k: v for k, v in (config.get('model') or {}).items() if v is not None}


def model_figures(config: dict) -> dict[str, Any]:
    """Parameters, classes, family, a label and the analytic forward FLOPs of a run's model (from its config.json)."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from vit_jax import data, models
    info = data.dataset_info(ml_collections.ConfigDict(config))
    overrides = model_overrides(config)
    if isinstance(overrides.get('resnet_layers'), list):
        overrides['resnet_layers'] = tuple(overrides['resnet_layers'])
    size = int(config['image_size'])
    model = models.create_model(config['model_name'], num_classes=info.num_classes, image_size=size, **overrides)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
    try:
        analytic = models.flops(model)
    except ValueError:
        analytic = None
    return dict(params=int(params), num_classes=info.num_classes, train_examples=info.num_train_examples,
                family=models.model_info(config['model_name']).family, model=model_label(model, config['model_name']),
                analytic_forward_flops_per_image=analytic)


def model_label(model, name: str) -> str:
    """A model's name by its size, as the paper's tables: ``ViT D96 L4 /4`` or ``ResNet26 x0.5``."""
    from vit_jax import models
    if isinstance(model, models.ResNet):
        depth = 3 * sum(model.resnet_layers) + 2
        return f'ResNet{depth} x{model.resnet_width:g}'
    if model.stem == 'patch':
        return f'ViT D{model.hidden_size} L{model.num_layers} /{model.patch_size}'
    return name


def xla_train_flops_per_image(config: dict, num_classes: int, sweep_dir: str, cwd: str | None = None) -> float:
    """XLA's count of the train step, per image, from the bench harness (cached per model, size and classes)."""
    overrides = model_overrides(config)
    dtype = overrides.pop('dtype', None) or 'float32'
    for field in ('param_dtype',):
        overrides.pop(field, None)
    batch = math.gcd(int(config['batch_size']), BENCH_MAX_BATCH)
    key = dict(model=config['model_name'], overrides=overrides, image_size=config['image_size'],
               num_classes=num_classes, dtype=dtype, batch=batch)
    cache_dir = os.path.join(sweep_dir, 'flops_cache')
    os.makedirs(cache_dir, exist_ok=True)
    import hashlib
    cache = os.path.join(cache_dir, hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12] + '.json')
    with _FLOPS_LOCK:  # one count per model, however many runs finish at once
        cached = read_json(cache)
        if cached is not None:
            return float(cached['train_flops_per_image'])
        command = [sys.executable, '-m', 'vit_jax.bench', '--mode', 'compile', '--model', key['model'],
                   '--batch', str(batch), '--image-size', str(key['image_size']), '--num-classes', str(num_classes),
                   '--dtype', dtype]
        for field, value in overrides.items():
            value = ','.join(map(str, value)) if isinstance(value, (list, tuple)) else value
            command += ['--override', f'{field}={value}']
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            raise RuntimeError(f'{shlex.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}')
        result = json.loads(lines[-1])
        write_json(cache, dict(key=key, **{k: result[k] for k in ('train_flops_per_image', 'train_compile_s')}))
        return float(result['train_flops_per_image'])
