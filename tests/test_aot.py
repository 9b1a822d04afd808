"""The real TPU and GPU compilers, run on this CPU (deviceless AOT): every shipped recipe's train step compiles for an
H100 with cuDNN's fused attention, tiny models of each family compile for H100 / A100 / TPU v5e meshes, and
``python -m vit_jax.aot`` reports, remedies and saves what it compiled.

The compilers live in their own prefix (``vit_jax/aot/compilers.py``; ``make test`` installs them): each group of
cases runs in one child process with that prefix (``tests/aot_worker.py``), and this process never imports them.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.aot import compilers, hlo, saved, targets
from vit_jax.models import encoder

REPO = pathlib.Path(__file__).parents[1]
CONFIGS = sorted(p.name for p in (REPO / 'configs').glob('*.py'))
# What a compile needs of a recipe, and nothing of its size: a small batch, one warmup step, the blocks scanned (the
# same attention call, compiled once instead of once per layer).
SMALL = {'batch_size': 8, 'eval_batch_size': 8, 'optimizer.warmup_steps': 1, 'total_steps': 10,
         'model.scan_layers': True}
TEACHER = {'distillation.teacher.model_name': 'deit_ti16', 'distillation.teacher.path': '/teacher.npz'}
TINY = {'model.hidden_size': 64, 'model.num_heads': 2, 'model.mlp_dim': 128, 'model.num_layers': 2,
        'batch_size': 16, 'eval_batch_size': 16, 'optimizer.warmup_steps': 1, 'total_steps': 10}


def recipe_case(name: str, topology: str = 'h100x1', **overrides) -> dict:
    extra = dict(TEACHER) if 'distilled' in name else {}
    return {'name': f'{name}@{topology}', 'config': f'configs/{name}', 'topology': topology, 'eval': False,
            'overrides': {**SMALL, 'model.dtype': 'bfloat16', **extra, **overrides}}


def run_cases(kind: str, cases: list[dict], tmp: pathlib.Path) -> dict:
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


# --- GPU: cuDNN attention for every token count ------------------------------------------------------------------

def test_padded_attention_equals_unpadded_attention():
    """The padding cuDNN's backward needs (tokens to a multiple of 8, the padded keys masked, the padded queries
    dropped) changes nothing: values and gradients equal the unpadded attention's (run here through XLA's
    implementation with the same lengths), at every ViT/DeiT token count."""
    for n in (197, 198, 257, 577, 785):
        keys = jax.random.split(jax.random.key(n), 4)
        q, k, v, dout = (2.0 * jax.random.normal(key, (2, n, 3, 64), jnp.float32) for key in keys)

        def run(fn):
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp(dout))

        padded = jax.jit(lambda: run(lambda *a: encoder.padded_attention(*a, 0.125, 'xla')))()
        plain = jax.jit(lambda: run(lambda *a: jax.nn.dot_product_attention(*a, scale=0.125,
                                                                            implementation='xla')))()
        assert padded[0].shape == (2, n, 3, 64)
        for got, want, what in zip(padded, plain, ('out', 'dq', 'dk', 'dv')):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.abs(want).max()),
                                       err_msg=f'{what} at {n} tokens')


@pytest.fixture(scope='module')
def gpu(tmp_path_factory):
    cases = [recipe_case(name) for name in CONFIGS]
    cases.append(recipe_case('vit_b16.py', image_size=384))  # 577 tokens
    cases.append(recipe_case('deit_b16.py', topology='a100x1'))
    # Tiny models of each family, train and eval steps: bf16 (cuDNN) and fp32 (XLA's attention), 1 and 8 GPUs.
    tiny = {'vit': ('quickstart.py', {}),
            'deit_distilled': ('deit_ti16_distilled.py', {**TEACHER, 'distillation.teacher.model.hidden_size': 64,
                                                          'distillation.teacher.model.num_heads': 2,
                                                          'distillation.teacher.model.mlp_dim': 128,
                                                          'distillation.teacher.model.num_layers': 1,
                                                          'image_size': 32, 'distillation.teacher.image_size': 32}),
            't2t': ('t2t_vit_14.py', {'image_size': 64, 'model.token_dim': 16}),
            'hybrid': ('r50_vit_b16.py', {'image_size': 64, 'model.resnet_width': 0.25}),
            'mae': ('mae_vit_b16.py', {'image_size': 32, 'model.patch_size': 8, 'mae.decoder_width': 32,
                                       'mae.decoder_depth': 1, 'mae.decoder_heads': 2})}
    for family, (config, overrides) in tiny.items():
        for dtype in ('bfloat16', 'float32'):
            for topology, mesh in (('h100x1', {}), ('h100x8', {'mesh.data': 8}),
                                   ('h100x8', {'mesh.data': 1, 'mesh.fsdp': 8}), ('a100x1', {})):
                if (topology == 'h100x8' or topology == 'a100x1') and family not in ('vit', 'deit_distilled'):
                    continue
                name = f'{family} {dtype} {topology} {"fsdp" if mesh.get("mesh.fsdp") else "data"}'
                cases.append({'name': name, 'config': f'configs/{config}', 'topology': topology,
                              'overrides': {**TINY, **overrides, **mesh, 'model.dtype': dtype}})
    return run_cases('gpu', cases, tmp_path_factory.mktemp('gpu'))


@pytest.mark.parametrize('name', CONFIGS + ['vit_b16.py 384 px', 'deit_b16.py on an A100'])
def test_every_recipe_trains_with_cudnn_attention_on_a_gpu(gpu, name):
    """Each shipped recipe's train step (bf16, at its own resolution; 197, 198, 257 or 577 tokens, MAE's kept
    patches) compiles for a GPU with cuDNN's fused attention forward and backward, and nothing of the CPU's."""
    key = {'vit_b16.py 384 px': 'vit_b16.py@h100x1', 'deit_b16.py on an A100': 'deit_b16.py@a100x1'}.get(name)
    if key == 'vit_b16.py@h100x1':  # the 384 px case was appended after the 224 px one of the same name
        key = [k for k in gpu if k.startswith('vit_b16.py@h100x1')][-1]
    result = ok(gpu, key or f'{name}@h100x1')
    train = result['train']
    assert result['attention'] == 'cudnn' and result['platform'].startswith('cuda:')
    assert train['cudnn_attention_calls'] >= 2, 'forward and backward'
    assert train['cpu_kernel_calls'] == 0
    assert 0 < train['total_bytes'] < result['chip_memory_bytes']


@pytest.mark.parametrize('family', ['vit', 'deit_distilled', 't2t', 'hybrid', 'mae'])
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_tiny_models_compile_for_gpus(gpu, family, dtype):
    """Train and eval steps of each family compile for one H100; ViT and DeiT also for 8 H100s (data and fsdp
    meshes) and an A100. bf16 runs cuDNN's attention, fp32 XLA's (cuDNN takes no fp32)."""
    names = [k for k in gpu if k.startswith(f'{family} {dtype} ')]
    assert names
    for name in names:
        result = ok(gpu, name)
        calls = result['train']['cudnn_attention_calls'] + result['eval']['cudnn_attention_calls']
        if dtype == 'bfloat16':
            assert result['attention'] == 'cudnn' and calls >= 3, name  # train fwd + bwd, eval fwd
        else:
            assert result['attention'] == 'xla' and calls == 0, name
        assert result['train']['cpu_kernel_calls'] == result['eval']['cpu_kernel_calls'] == 0, name
        assert result['eval']['total_bytes'] > 0, name
        if ' h100x8 ' in name:
            sharded = result['train']['collectives']
            assert sharded['all-reduce']['count'] + sharded['reduce-scatter']['count'] > 0, name
            assert result['mesh'] == ({'data': 1, 'fsdp': 8, 'tensor': 1} if name.endswith('fsdp') else
                                      {'data': 8, 'fsdp': 1, 'tensor': 1})
        if ' a100x1 ' in name:
            assert result['platform'] == 'cuda:8.0'


# --- TPU ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tpu(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('tpu')
    b16 = {**SMALL, 'batch_size': 64, 'eval_batch_size': 64, 'model.dtype': 'bfloat16'}
    cases = [
        {'name': 'quickstart', 'config': 'configs/quickstart.py', 'topology': 'v5e-4', 'save': str(tmp / 'q.aot')},
        # Unrolled: XLA's cost analysis counts a scanned body once (the report then takes the model's FLOPs).
        {'name': 'vit_ti16', 'config': 'configs/vit_ti16.py', 'topology': 'v5e-4',
         'overrides': {**b16, 'model.scan_layers': False}, 'eval': False},
        {'name': 'vit_b16 fsdp=1', 'config': 'configs/vit_b16.py', 'topology': 'v5e-4', 'eval': False,
         'overrides': {**b16, 'mesh.data': 4, 'mesh.fsdp': 1}},
        {'name': 'vit_b16 fsdp=4', 'config': 'configs/vit_b16.py', 'topology': 'v5e-4', 'eval': False,
         'overrides': {**b16, 'mesh.data': 1, 'mesh.fsdp': 4}},
        {'name': 'two slices', 'config': 'configs/quickstart.py', 'topology': 'v5e-4', 'num_slices': 2,
         'eval': False},
        {'name': 'vit_l16 too big', 'config': 'configs/vit_b16.py', 'topology': 'v5e-1', 'eval': False,
         'remedies': True, 'overrides': {**SMALL, 'model.dtype': 'bfloat16', 'batch_size': 256,
                                         'model.hidden_size': 1024, 'model.num_heads': 16, 'model.mlp_dim': 4096,
                                         'model.num_layers': 24}},
    ]
    return run_cases('tpu', cases, tmp), tmp


@pytest.mark.parametrize('name', ['quickstart', 'vit_ti16'])
def test_compiles_for_tpu_v5e_with_memory_and_flops(tpu, name):
    """The steps compile for 4 TPU v5e chips (data parallel); memory and FLOPs are positive and the compiled FLOPs per
    image are 3x the analytic forward count within 10%."""
    result = ok(tpu[0], name)
    assert result['platform'] == 'tpu' and result['attention'] == 'xla' and result['devices'] == 4
    for step in ('train', 'eval') if name == 'quickstart' else ('train',):
        assert result[step]['argument_bytes'] > 0 and result[step]['temp_bytes'] > 0 and result[step]['flops'] > 0
    assert result['fits'] and result['headroom_bytes'] > 0
    ratio = result['compiled_flops_per_image'] / (3 * result['model_flops_per_image'])
    assert 0.9 < ratio < 1.1, ratio
    assert result['train']['collectives']['all-reduce']['count'] >= 1  # the gradients, over the data axis
    estimate = result['estimate']
    assert estimate['step_seconds'] > 0 and 0 < estimate['mfu'] <= 1 and estimate['flops_source'] == 'compiled'


def test_fsdp_shards_the_arguments(tpu):
    """fsdp=4 on 4 chips holds a quarter of the parameters and optimizer state per chip: <= 0.3x of fsdp=1."""
    replicated, sharded = ok(tpu[0], 'vit_b16 fsdp=1'), ok(tpu[0], 'vit_b16 fsdp=4')
    assert sharded['train']['argument_bytes'] <= 0.3 * replicated['train']['argument_bytes']
    assert sharded['train']['collectives']['all-gather']['count'] > 0  # the sharded parameters, gathered
    # Scanned: XLA's count holds one layer, so the estimate takes the model's FLOPs.
    assert sharded['flops_source'] == 'model' and sharded['compiled_flops_per_image'] is None


def test_multi_slice_crosses_slices_on_the_data_axis(tpu):
    result = ok(tpu[0], 'two slices')
    assert result['devices'] == 8 and result['mesh']['data'] == 8


def test_a_model_that_does_not_fit_gets_a_remedy_that_was_compiled_and_fits(tpu):
    """ViT-L/16 at batch 256 on one v5e chip (16 GiB) does not fit; the remedies are tried in order, and the one
    printed fits according to its own compile."""
    result = ok(tpu[0], 'vit_l16 too big')
    assert not result['fits']
    remedies = result['remedies']
    assert remedies and remedies[-1]['fits'] and all(not r['fits'] for r in remedies[:-1])
    assert remedies[0]['overrides'] == {'model.remat': True}  # one chip: no fsdp to add; remat comes first
    assert remedies[-1]['peak_bytes'] < targets.CHIPS['v5e'].memory_bytes


def test_a_saved_executable_refuses_another_config_and_other_devices(tpu):
    from vit_jax.train.config import load_config
    path = tpu[1] / 'q.aot'
    config = load_config(str(REPO / 'configs' / 'quickstart.py'))
    changed = load_config(str(REPO / 'configs' / 'quickstart.py'))
    changed.batch_size = 256
    with pytest.raises(ValueError, match=r'built for another config: config.batch_size=256 here, 128 in the file'):
        saved.load(str(path), changed)
    with pytest.raises(ValueError, match=r'built for v5e-4 \(4 x TPU v5 lite\); this host has 8 x cpu'):
        saved.load(str(path), config)


# --- The command -------------------------------------------------------------------------------------------------

def aot(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'vit_jax.aot', *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_the_command_prints_the_report_and_nothing_of_the_plugins(tmp_path):
    run = aot('--config', 'configs/quickstart.py', '--topology', 'v5e-4', '--json', str(tmp_path / 'r.json'))
    assert run.returncode == 0, run.stderr
    assert 'on v5e-4: 4 TPU v5e (4 devices)' in run.stdout and 'FITS' in run.stdout
    assert 'all-reduce 1 x' in run.stdout
    for noise in ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'InitGoogle', 'oneDNN'):
        assert noise not in run.stderr and noise not in run.stdout
    report = json.loads((tmp_path / 'r.json').read_text())
    assert report['topology'] == 'v5e-4' and report['train']['flops'] > 0


def test_unknown_topology_and_missing_compiler_are_one_line_each(tmp_path, monkeypatch):
    run = aot('--config', 'configs/quickstart.py', '--topology', 'v5x-4')
    assert run.returncode == 2 and run.stderr.count('\n') == 1
    assert "unknown topology 'v5x-4'; known: v4-8" in run.stderr and 'h100xN' in run.stderr
    monkeypatch.setenv('VIT_JAX_COMPILERS', str(tmp_path))
    run = subprocess.run([sys.executable, '-m', 'vit_jax.aot', '--config', 'configs/quickstart.py', '--topology',
                          'h100x1'], capture_output=True, text=True, cwd=REPO, timeout=60)
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
