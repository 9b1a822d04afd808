"""``python -m vit_jax.aot``: its errors, the compilers kept out of ordinary commands, topology names, the HLO reading,
the remedies' search order and a saved executable run by vit_jax.main (the command's report and plan, and the cases
compiled for TPU and GPU, are in test_aot_tpu.py and test_aot_gpu.py)."""

import json
import subprocess
import sys
import textwrap
import types

import pytest

from aot_cases import REPO, aot
from vit_jax.aot import hlo, targets


def test_unknown_topology_and_missing_compiler_are_one_line_each(tmp_path, monkeypatch):
    run = aot('--config', 'configs/quickstart.py', '--topology', 'v5x-4')
    assert run.returncode == 2 and run.stderr.count('\n') == 1
    assert "unknown topology 'v5x-4'; known: v4-8" in run.stderr and 'h100xN' in run.stderr
    monkeypatch.setenv('VIT_JAX_COMPILERS', str(tmp_path))
    run = aot('--config', 'configs/quickstart.py', '--topology', 'h100x1', timeout=60)
    assert run.returncode == 2
    assert 'the GPU compiler is not installed' in run.stderr and 'python -m vit_jax.aot --install gpu' in run.stderr


def test_an_ordinary_command_never_sees_the_compilers():
    """The default environment's JAX has the CPU only: the compilers' prefix is not on its path."""
    code = 'import jax, importlib.util; print(jax.devices()[0].platform, importlib.util.find_spec("jax_plugins"))'
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.stdout.split() == ['cpu', 'None'], run.stdout + run.stderr
    assert not run.stderr.strip()


@pytest.mark.parametrize('name, devices, shape', [('v5e-4', 4, (2, 2)), ('v5litepod-16', 16, (4, 4)),
                                                  ('v5p-64', 32, (2, 4, 4)), ('v4-8', 4, (2, 2, 1)),
                                                  ('v6e-256', 256, (16, 16)), ('v4-4096', 2048, (8, 16, 16))])
def test_topology_names(name, devices, shape):
    topology = targets.parse(name)
    assert topology.num_devices == devices and topology.shape == shape


def test_gpu_topologies_and_bad_names():
    assert targets.parse('h100x8', num_hosts=4).num_devices == 32
    assert targets.parse('a100-40gbx2').chip.memory_bytes == 40 * 10 ** 9
    for bad, message in (('h100x9', '1 to 8 GPUs per host'), ('v5p-6', 'two per chip'), ('v5e-3', 'slices of 1'),
                         ('tpu-8', 'unknown topology')):
        with pytest.raises(ValueError, match=message):
            targets.parse(bad)


def test_collectives_are_counted_per_step_through_loops():
    """An all-gather in a scanned body of 12 iterations is 12 per step; async starts count once, by their result."""
    text = '''HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[8,4]{1,0} all-gather(%x), dimensions={1}
  %rs = f32[2]{0} reduce-scatter(%y), dimensions={0}
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %ars = (f32[16]{0}, bf16[4]{0}) all-reduce-start(%a, %b), to_apply=%add
  %ard = (f32[16]{0}, bf16[4]{0}) all-reduce-done(%ars)
  %cps = (f32[3]{0}, f32[3]{0}, u32[], u32[]) collective-permute-start(%c), source_target_pairs={{0,1}}
}
'''
    got = hlo.collectives(text)
    assert got['all-gather'] == {'count': 12, 'bytes': 12 * 32 * 4}
    assert got['reduce-scatter'] == {'count': 12, 'bytes': 12 * 2 * 4}
    assert got['all-reduce'] == {'count': 1, 'bytes': 16 * 4 + 4 * 2}
    assert got['collective-permute'] == {'count': 1, 'bytes': 12}
    assert got['all-to-all'] == {'count': 0, 'bytes': 0.0}


# A CPU target, the one a test can run a compiled step on (the TPU and GPU ones are in test_aot_tpu/gpu.py).
THIS_CPU = targets.Topology('cpu-1', targets.Chip('this CPU', 'cpu', 24 * 2 ** 30, 1e12, 1e11), 1)


def test_a_compile_loads_no_tensorflow(tmp_path):
    """What a compile reads of a dataset (its classes and split sizes: of one that is not here, from its definition;
    of the digits, prepared here, from their metadata), the batch arithmetic and the compile itself need no
    TensorFlow: a compiler's process does not spend its import."""
    from vit_jax import data
    from vit_jax.train.config import load_config
    digits = load_config(str(REPO / 'configs' / 'quickstart.py'))
    digits.data_dir = str(tmp_path / 'prepared')
    data.dataset_info(digits)  # prepares them, here, with TensorFlow
    code = textwrap.dedent(f"""
        import sys
        import jax
        from vit_jax.aot import compile as aot_compile, report, targets
        from vit_jax.train import loop
        from vit_jax.train.config import load_config
        tiny = {{'model.hidden_size': 32, 'model.num_layers': 1, 'model.num_heads': 2, 'model.mlp_dim': 64,
                'batch_size': 8, 'eval_batch_size': 8, 'optimizer.warmup_steps': 1, 'total_steps': 10}}
        cpu = targets.Topology('cpu-1', targets.Chip('this CPU', 'cpu', 2 ** 30, 1e12, 1e11), 1)
        for name, data_dir in (('vit_b16', {str(tmp_path / 'absent')!r}), ('quickstart', {digits.data_dir!r})):
            config = report.with_overrides(load_config(f'configs/{{name}}.py'), {{**tiny, 'data_dir': data_dir}})
            compiled = aot_compile.compile_config(config, cpu, jax.devices()[:1], eval_step=False)
            info = loop.dataset_info_for_compile(config)
            print(name, info.num_classes, info.num_train_examples, compiled.train.flops > 0,
                  'tensorflow' in sys.modules)""")
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=300)
    # the absent ImageNet-21k: its class count and a nominal 1000 steps of examples; the digits: their train split
    assert run.stdout.split() == ['vit_b16', '21843', '8000', 'True', 'False', 'quickstart', '10', '1437', 'True',
                                  'False'], (
        run.stdout + run.stderr[-2000:])


def test_main_runs_a_saved_executable_and_refuses_another_config(tmp_path):
    """Compiled ahead of time (here for this CPU, the one target a test can run) and saved, the steps run in
    ``vit_jax.main --compiled`` with the same losses as a run that compiles them itself; another config is refused
    before anything runs, naming the field."""
    import jax
    from vit_jax.aot import compile as aot_compile, report, saved
    from vit_jax.train.config import load_config
    overrides = {'model.hidden_size': 32, 'model.num_layers': 1, 'model.num_heads': 2, 'model.mlp_dim': 64,
                 'total_steps': 6, 'optimizer.warmup_steps': 1, 'log_every': 2, 'eval_every': 6,
                 'checkpoint_every': 6}
    config = report.with_overrides(load_config(str(REPO / 'configs' / 'quickstart.py')), overrides)
    devices = jax.devices()[:1]  # what the subprocess sees
    compiled = aot_compile.compile_config(config, THIS_CPU, devices, keep_executables=True)
    path = tmp_path / 'steps.aot'
    saved.save(str(path), compiled)

    def main(workdir, *extra):
        return subprocess.run([sys.executable, '-m', 'vit_jax.main', '--config', 'configs/quickstart.py',
                               '--workdir', str(tmp_path / workdir), *(f'--config.{k}={v}' for k, v in
                                                                      overrides.items()), *extra],
                              capture_output=True, text=True, cwd=REPO, timeout=600)

    with_file, without = main('aot', f'--compiled={path}'), main('jit')
    assert with_file.returncode == 0, with_file.stderr[-2000:]
    assert without.returncode == 0, without.stderr[-2000:]
    metrics = [[json.loads(line) for line in (tmp_path / w / 'metrics.jsonl').read_text().splitlines()]
               for w in ('aot', 'jit')]
    assert [m['step'] for m in metrics[0]] == [2, 4, 6] and 'eval_top1' in metrics[0][-1]
    assert metrics[0] == metrics[1]  # the same program: every logged loss and the eval bit for bit
    refused = main('other', f'--compiled={path}', '--config.batch_size=64')
    assert refused.returncode == 1
    assert 'built for another config: config.batch_size=64 here, 128 in the file' in refused.stderr
    assert 'JAX devices:' in with_file.stderr and 'JAX devices:' not in refused.stderr  # refused before it starts


def test_a_saved_cpu_executable_is_compiled_afresh_when_the_compilation_cache_holds_it(tmp_path):
    """With JAX's persistent compilation cache on and already holding the steps, the executables kept for saving are
    compiled afresh: a CPU executable loaded from the cache serializes without its code (jax 0.10.2), and the saved
    step failed when it ran (``NOT_FOUND: Function ... not found``). The loaded eval step gives the kept one's sums."""
    import os
    import jax
    import numpy as np
    from jax.experimental.compilation_cache import compilation_cache
    from vit_jax.aot import compile as aot_compile, report, saved
    from vit_jax.train import loop
    from vit_jax.train.config import load_config
    config = report.with_overrides(load_config(str(REPO / 'configs' / 'quickstart.py')), {
        'model.hidden_size': 16, 'model.num_layers': 1, 'model.num_heads': 2, 'model.mlp_dim': 32, 'batch_size': 8,
        'eval_batch_size': 8, 'total_steps': 2, 'optimizer.warmup_steps': 1})
    devices = jax.devices()[:1]
    cache = tmp_path / 'xla'
    settings = {'jax_compilation_cache_dir': str(cache), 'jax_persistent_cache_min_compile_time_secs': 0.0,
                'jax_persistent_cache_min_entry_size_bytes': 0, 'jax_enable_compilation_cache': True}
    before = {name: getattr(jax.config, name) for name in settings}
    try:
        for name, value in settings.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
        aot_compile.compile_config(config, THIS_CPU, devices)  # puts both steps in the cache
        assert any(name.startswith('jit_eval_sums') for name in os.listdir(cache))
        compiled = aot_compile.compile_config(config, THIS_CPU, devices, keep_executables=True)
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
    saved.save(str(tmp_path / 'steps.aot'), compiled)
    _, eval_step = saved.load(str(tmp_path / 'steps.aot'), config, devices)

    steps = loop.build_steps(config, devices=devices, info=loop.dataset_info_for_compile(config))
    state, (_, batch) = steps.abstract_state(), steps.batch_shapes()
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype), s.sharding),
                          state.params)
    batch = {'images': rng.normal(size=batch['images'].shape).astype(np.float32),
             'labels': rng.integers(0, 10, batch['labels'].shape).astype(np.int32),
             'mask': np.ones(batch['mask'].shape, np.float32)}
    want = compiled.eval_executable(params, state.objective_params, None, batch)
    got = eval_step(params, state.objective_params, None, batch)
    assert float(want['loss']) > 0
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_remedies_are_tried_in_order_and_keep_what_did_not_suffice():
    """The search with a stand-in compiler (the real one is in test_aot_tpu.py): more fsdp, then remat on top, then
    micro-batches 2, 4, ... on top of both, stopping at the first layout that fits; a layout the compiler refuses is
    an attempt with its error, and the search goes on."""
    from vit_jax.aot import report
    from vit_jax.train.config import load_config
    config = load_config(str(REPO / 'configs' / 'quickstart.py'))  # batch 128: 32 per chip on 4 chips
    tried = []

    def compile_fn(cfg, topology, devices):
        tried.append((int(cfg.mesh.fsdp), bool(cfg.model.remat), int(cfg.optimizer.microbatches)))
        if int(cfg.optimizer.microbatches) == 2:
            raise ValueError('RESOURCE_EXHAUSTED: stand-in refusal\nsecond line')
        fits = bool(cfg.model.remat) and int(cfg.optimizer.microbatches) >= 4
        return types.SimpleNamespace(fits=fits, peak_bytes=1 if fits else 2)

    attempts = report.remedies(config, targets.parse('v5e-4'), None, compile_fn=compile_fn, log=lambda s: None)
    assert tried == [(-1, False, 1), (-1, True, 1), (-1, True, 2), (-1, True, 4)]
    assert [a.fits for a in attempts] == [False, False, False, True]
    assert attempts[2].error == 'RESOURCE_EXHAUSTED: stand-in refusal' and attempts[2].compiled is None
    assert attempts[-1].overrides == {'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.tensor': 1, 'model.remat': True,
                                      'optimizer.microbatches': 4}


def test_plan_reuses_the_configs_own_compile_for_its_layout():
    """--plan's first candidate is the config's own layout when its mesh resolves to data parallelism: the command's
    compile of the config serves for it, and only the other layouts are compiled."""
    from vit_jax.aot import report
    from vit_jax.train.config import load_config
    config = load_config(str(REPO / 'configs' / 'quickstart.py'))  # mesh.data=-1: 4 on 4 chips

    def stand_in(seconds):
        return types.SimpleNamespace(fits=True, peak_bytes=1, estimate=lambda: {'step_seconds': seconds})

    own = stand_in(2.0)
    own.mesh_shape = {'data': 4, 'fsdp': 1, 'tensor': 1}
    tried = []

    def compile_fn(cfg, topology, devices):
        tried.append((int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor)))
        return stand_in(1.0)

    fitting = report.plan(config, targets.parse('v5e-4'), None, heads=3, budget=3, compile_fn=compile_fn,
                          log=lambda s: None, compiled=own)
    assert tried == [(2, 2, 1), (1, 4, 1)]  # not (4, 1, 1): that one is the config's own compile
    assert fitting[-1].compiled is own and len(fitting) == 3  # the slowest estimate: last
    tried.clear()
    report.plan(config, targets.parse('v5e-4'), None, heads=3, budget=3, compile_fn=compile_fn, log=lambda s: None)
    assert tried == [(4, 1, 1), (2, 2, 1), (1, 4, 1)]
