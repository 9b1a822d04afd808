"""The TPU compiler on this CPU (deviceless AOT, libtpu in its own prefix): the command's report and plan, memory, FLOPs
and collectives of compiled steps for v5e slices, fsdp, multi-slice, remedies for a model that does not fit, and saved
executables."""

import json
import os

import pytest

from aot_cases import REPO, SMALL, aot, ok, run_cases
from vit_jax.aot import saved, targets


# Each case has a fast twin, or is fast itself: `make test` runs the command once on quickstart (its report, plan and
# saved file, the FLOPs), and compiles ViT-B/16 at 32 px (fsdp against data parallelism), two slices and ViT-L/16's
# refusal; `make test-slow` the same at the recipes' own sizes (ViT-Ti/16 unrolled, ViT-B/16 at 224 px) and the
# remedies compiled for ViT-L/16.
B16 = {**SMALL, 'batch_size': 64, 'eval_batch_size': 64, 'model.dtype': 'bfloat16'}
VIT_L16 = {**SMALL, 'model.dtype': 'bfloat16', 'batch_size': 256, 'model.hidden_size': 1024, 'model.num_heads': 16,
           'model.mlp_dim': 4096, 'model.num_layers': 24}


@pytest.fixture(scope='module')
def planned(tmp_path_factory):
    """One run of the command on quickstart for 4 v5e chips, with --plan (the config, then 2 candidate layouts
    compiled), --json and --save, and a persistent compilation cache in its environment: its output, its JSON report
    and the folder of the saved file (q.aot) and of the cache (xla/)."""
    tmp = tmp_path_factory.mktemp('plan')
    run = aot('--config', 'configs/quickstart.py', '--topology', 'v5e-4', '--plan', '--plan-budget', '2', '--json',
              str(tmp / 'plan.json'), '--save', str(tmp / 'q.aot'),
              env={**os.environ, 'JAX_COMPILATION_CACHE_DIR': str(tmp / 'xla')})
    assert run.returncode == 0, run.stderr
    return run, json.loads((tmp / 'plan.json').read_text()), tmp


def test_the_command_prints_the_report_and_nothing_of_the_plugins(planned):
    run, report, tmp = planned
    assert 'on v5e-4: 4 TPU v5e (4 devices)' in run.stdout and 'FITS' in run.stdout
    assert 'all-reduce 1 x' in run.stdout
    assert f'Saved the compiled steps to {tmp / "q.aot"}' in run.stdout
    for noise in ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'InitGoogle', 'oneDNN'):
        assert noise not in run.stderr and noise not in run.stdout
    assert report['topology'] == 'v5e-4' and report['train']['flops'] > 0
    # The TPU compiler cannot load what it would write to a persistent cache (a later run only warned): it writes none.
    assert not any(p.name.startswith('jit_step') for p in (tmp / 'xla').glob('*')), sorted((tmp / 'xla').glob('*'))


def test_plan_prints_layouts_that_were_compiled_and_fit(planned):
    """--plan compiles each candidate layout (here 2, the budget) and prints the fitting ones, fastest first, as
    ready --config overrides."""
    run, report, _ = planned
    assert 'Best layouts (estimated step time, fastest first):' in run.stdout
    assert '--config.mesh.data=4 --config.mesh.fsdp=1 --config.mesh.tensor=1' in run.stdout
    assert 'more layouts not compiled: raise --plan-budget' in run.stdout
    plan = report['plan']
    assert 1 <= len(plan) <= 2 and all(p['peak_bytes'] > 0 for p in plan)
    times = [p['estimate']['step_seconds'] for p in plan]
    assert times == sorted(times)


@pytest.fixture(scope='module')
def tpu(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp('tpu')
    cases = [
        # Unrolled: XLA's cost analysis counts a scanned body once (the report then takes the model's FLOPs).
        {'name': 'vit_ti16', 'config': 'configs/vit_ti16.py', 'topology': 'v5e-4', 'slow': True,
         'overrides': {**B16, 'model.scan_layers': False}, 'eval': False},
        {'name': 'two slices', 'config': 'configs/quickstart.py', 'topology': 'v5e-4', 'num_slices': 2,
         'eval': False},
        {'name': 'vit_l16 too big', 'config': 'configs/vit_b16.py', 'topology': 'v5e-1', 'eval': False,
         'overrides': VIT_L16},
        {'name': 'vit_l16 too big, remedies', 'config': 'configs/vit_b16.py', 'topology': 'v5e-1', 'eval': False,
         'remedies': True, 'slow': True, 'overrides': VIT_L16},
    ]
    for size, batch, slow in ((32, 16, False), (224, 64, True)):  # the fast twin: ViT-B's parameters, few activations
        for fsdp in (1, 4):
            cases.append({'name': f'vit_b16 {size} px fsdp={fsdp}', 'config': 'configs/vit_b16.py', 'slow': slow,
                          'topology': 'v5e-4', 'eval': False,
                          'overrides': {**B16, 'image_size': size, 'batch_size': batch, 'eval_batch_size': batch,
                                        'mesh.data': 4 // fsdp, 'mesh.fsdp': fsdp}})
    return run_cases('tpu', cases, tmp, request)


@pytest.mark.parametrize('name', ['quickstart', pytest.param('vit_ti16', marks=pytest.mark.slow)])
def test_compiles_for_tpu_v5e_with_memory_and_flops(request, name):
    """The steps compile for 4 TPU v5e chips (data parallel); memory and FLOPs are positive and the compiled FLOPs per
    image are 3x the analytic forward count within 10% (quickstart: the command's report; ViT-Ti/16 unrolled)."""
    if name == 'quickstart':
        result = request.getfixturevalue('planned')[1]
    else:
        result = ok(request.getfixturevalue('tpu'), name)
    assert result['platform'] == 'tpu' and result['attention'] == 'xla' and result['devices'] == 4
    for step in ('train', 'eval') if name == 'quickstart' else ('train',):
        assert result[step]['argument_bytes'] > 0 and result[step]['temp_bytes'] > 0 and result[step]['flops'] > 0
    assert result['fits'] and result['headroom_bytes'] > 0
    ratio = result['compiled_flops_per_image'] / (3 * result['model_flops_per_image'])
    assert 0.9 < ratio < 1.1, ratio
    assert result['train']['collectives']['all-reduce']['count'] >= 1  # the gradients, over the data axis
    estimate = result['estimate']
    assert estimate['step_seconds'] > 0 and 0 < estimate['mfu'] <= 1 and estimate['flops_source'] == 'compiled'


@pytest.mark.parametrize('size', [32, pytest.param(224, marks=pytest.mark.slow)])
def test_fsdp_shards_the_arguments(tpu, size):
    """fsdp=4 on 4 chips holds a quarter of the parameters and optimizer state per chip: <= 0.3x of fsdp=1."""
    replicated, sharded = ok(tpu, f'vit_b16 {size} px fsdp=1'), ok(tpu, f'vit_b16 {size} px fsdp=4')
    assert sharded['train']['argument_bytes'] <= 0.3 * replicated['train']['argument_bytes']
    # and the activations stay split over the batch (encoder.token_sharding): no more memory than data parallelism
    assert sharded['train']['total_bytes'] < replicated['train']['total_bytes'] and sharded['fits']
    assert sharded['train']['collectives']['all-gather']['count'] > 0  # the sharded parameters, gathered
    # Scanned: XLA's count holds one layer, so the estimate takes the model's FLOPs.
    assert sharded['flops_source'] == 'model' and sharded['compiled_flops_per_image'] is None


def test_multi_slice_crosses_slices_on_the_data_axis(tpu):
    result = ok(tpu, 'two slices')
    assert result['devices'] == 8 and result['mesh']['data'] == 8


def test_a_model_that_does_not_fit_is_reported_as_not_fitting(tpu):
    """ViT-L/16 at batch 256 on one v5e chip (16 GiB): the TPU compiler refuses it (RESOURCE_EXHAUSTED), and the
    report says it does not fit, with what it would need, instead of failing."""
    result = ok(tpu, 'vit_l16 too big')
    assert not result['fits'] and result['headroom_bytes'] < 0
    assert result['train']['total_bytes'] > targets.CHIPS['v5e'].memory_bytes


@pytest.mark.slow  # ViT-L/16 compiled per remedy; test_aot.py checks the search order with a stand-in compiler
def test_a_model_that_does_not_fit_gets_a_remedy_that_was_compiled_and_fits(tpu):
    """The remedies are tried in order, and the one printed fits according to its own compile."""
    result = ok(tpu, 'vit_l16 too big, remedies')
    assert not result['fits']
    remedies = result['remedies']
    assert remedies and remedies[-1]['fits'] and all(not r['fits'] for r in remedies[:-1])
    assert remedies[0]['overrides'] == {'model.remat': True}  # one chip: no fsdp to add; remat comes first
    assert remedies[-1]['peak_bytes'] < targets.CHIPS['v5e'].memory_bytes


def test_a_saved_executable_refuses_another_config_and_other_devices(planned):
    from vit_jax.train.config import load_config
    path = planned[2] / 'q.aot'
    config = load_config(str(REPO / 'configs' / 'quickstart.py'))
    changed = load_config(str(REPO / 'configs' / 'quickstart.py'))
    changed.batch_size = 256
    with pytest.raises(ValueError, match=r'built for another config: config.batch_size=256 here, 128 in the file'):
        saved.load(str(path), changed)
    with pytest.raises(ValueError, match=r'built for v5e-4 \(4 x TPU v5 lite\); this host has 8 x cpu'):
        saved.load(str(path), config)


