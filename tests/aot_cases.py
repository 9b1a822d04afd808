"""Shared by the AOT tests: cases compiled in the compiler's own process (tests/aot_worker.py), and their results."""

import json
import pathlib
import subprocess
import sys

import pytest

from vit_jax.aot import compilers

REPO = pathlib.Path(__file__).parents[1]
CONFIGS = sorted(p.name for p in (REPO / 'configs').glob('*.py'))
# What a compile needs of a recipe, and nothing of its size: a small batch, one warmup step, the blocks scanned (the
# same attention call, compiled once instead of once per layer).
SMALL = {'batch_size': 8, 'eval_batch_size': 8, 'optimizer.warmup_steps': 1, 'total_steps': 10,
         'model.scan_layers': True}
# A distillation teacher: its architecture is all a compile needs (its weights are loaded when training starts); the
# path must exist, so run_cases writes an empty file there.
TEACHER_PATH = '/tmp/vit_jax_aot_test_teacher.npz'
TEACHER = {'distillation.teacher.model_name': 'deit_ti16', 'distillation.teacher.path': TEACHER_PATH}
TINY = {'model.hidden_size': 64, 'model.num_heads': 2, 'model.mlp_dim': 128, 'model.num_layers': 2,
        'batch_size': 16, 'eval_batch_size': 16, 'optimizer.warmup_steps': 1, 'total_steps': 10}


def aot(*args, timeout=600, env=None) -> subprocess.CompletedProcess:
    """``python -m vit_jax.aot ARGS`` from the repository, as a user types it."""
    return subprocess.run([sys.executable, '-m', 'vit_jax.aot', *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def recipe_case(name: str, topology: str = 'h100x1', label: str = '', **overrides) -> dict:
    extra = dict(TEACHER) if 'distilled' in name else {}
    return {'name': f'{name}{label}@{topology}', 'config': f'configs/{name}', 'topology': topology, 'eval': False,
            'overrides': {**SMALL, 'model.dtype': 'bfloat16', **extra, **overrides}}


def selected_tiers(request) -> set[bool]:
    """Which tiers this run selected among the requesting module's tests: True for `slow` ones, False for the rest
    (`make test` compiles the fast tier's cases only, `make test-slow` the slow tier's)."""
    return {item.get_closest_marker('slow') is not None for item in request.session.items
            if getattr(item, 'module', None) is request.module}


def run_cases(kind: str, cases: list[dict], tmp: pathlib.Path, request) -> dict:
    """Compiles, in one process with the ``kind`` compiler, the ``cases`` of the tiers the run selected (a case dict's
    ``slow``); {name: report or {'error', 'traceback'}}."""
    tiers = selected_tiers(request)
    cases = [c for c in cases if c.get('slow', False) in tiers]
    pathlib.Path(TEACHER_PATH).touch()
    if not compilers.installed(kind):
        pytest.fail(f'the {kind} compiler is not installed: `make test` installs it (python -m vit_jax.aot '
                    f'--install {kind})')
    path_in, path_out = tmp / f'{kind}_cases.json', tmp / f'{kind}_results.json'
    path_in.write_text(json.dumps(cases))
    run = compilers.run(kind, [str(REPO / 'tests' / 'aot_worker.py'), str(path_in), str(path_out)], capture=True,
                        timeout=1500, cwd=str(REPO))
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(path_out.read_text())


def ok(results: dict, name: str) -> dict:
    result = results[name]
    assert 'error' not in result, f'{name}: {result.get("traceback", result.get("error"))}'
    return result
