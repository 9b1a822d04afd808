"""vit_jax.export: PyTorch mirrors that match JAX for every family, int8 qnnpack + lite artefacts, the timm-named
safetensors round trip, and the CLI end to end (report, files, errors that leave nothing behind)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

torch = pytest.importorskip('torch')

from vit_jax import models  # noqa: E402
from vit_jax.checkpoints import load_params  # noqa: E402
from vit_jax.export import ExportError, artefacts, build, checkpoint_arrays, export, model_config, to_torch  # noqa
from vit_jax.export.__main__ import main  # noqa: E402
from vit_jax.export.convert import flatten  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures'
TINY = dict(hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96)
FAMILIES = {  # name: (registered model, overrides); all at 32 px, 10 classes
    'vit_token_representation': ('vit_b16', dict(TINY, patch_size=4, representation_size=32)),
    'vit_gap': ('vit_b16', dict(TINY, patch_size=4, classifier='gap')),
    'vit_sincos2d_token_unpooled_scanned': ('vit_b16', dict(TINY, patch_size=8, classifier='token_unpooled',
                                                           posemb='sincos2d', scan_layers=True)),
    'deit_distilled': ('deit_s16_distilled', dict(TINY, patch_size=4)),
    't2t_performer': ('t2t_vit_7', dict(TINY, token_dim=16)),
    't2t_transformer': ('t2t_vit_t14', dict(TINY, token_dim=16)),
    'hybrid': ('r26_vit_s32', dict(TINY, resnet_layers=(1, 1), resnet_width=0.5)),
    'resnet': ('resnet26', dict(resnet_layers=(1, 2), resnet_width=0.5)),
}
# The fixture of google-research/vision_transformer, as a registered model (tests/fixtures/vitjax_fixtures.json).
FIXTURE_ARGS = ['--checkpoint', str(FIXTURES / 'vitjax_token_rep.npz'), '--model', 'vit_b16', '--image-size', '32',
                '--override', 'patch_size=4', '--override', 'hidden_size=48', '--override', 'num_layers=2',
                '--override', 'num_heads=3', '--override', 'mlp_dim=96', '--override', 'representation_size=32']
FAST = ['--repeats', '2', '--warmup', '1']


def create(family: str) -> models.VisionTransformer:
    name, overrides = FAMILIES[family]
    return models.create_model(name, num_classes=10, image_size=32, **overrides)


def random_params(model, seed: int = 0) -> dict:
    """Random values for every parameter (heads are zero-initialised and norms identity: parity must mean something).

    Kernels ~ N(0, 1 / fan_in), norm scales 1 + 0.1 N(0, 1), everything else 0.1 N(0, 1): logits of order 1.
    """
    size = model.image_size
    shapes = meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(shape.shape)
        if name.endswith("['kernel']"):
            fan_in = np.prod(shape.shape[:2] if "['out']" in name and len(shape.shape) == 3 else shape.shape[:-1])
            x = x / np.sqrt(fan_in)
        elif 'random_features' in name:
            x = 0.5 * x
        else:
            x = 1 + 0.1 * x if name.endswith("['scale']") else 0.1 * x
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes['params'])


def jax_logits(model, params, images: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images))


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def images(n: int, size: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(os.listdir(parent)) if parent.exists() else []


# Parity -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('family', FAMILIES)
def test_torchscript_fp32_matches_jax(family):
    model = create(family)
    params = random_params(model)
    x = images(4)
    expected = jax_logits(model, params, x)
    scripted = torch.jit.script(to_torch(model, params))
    with torch.no_grad():
        got = scripted(nchw(x)).numpy()
    assert got.shape == expected.shape
    assert expected.std() > 0.1  # not a near-constant output that any model would match
    assert np.abs(got - expected).max() <= 1e-4


def test_fixture_logits_of_the_original_vision_transformer():
    """Through load_params, then our torch mirror: the official JAX ViT's own logits."""
    io = np.load(FIXTURES / 'vitjax_token_rep.io.npz')
    model = create('vit_token_representation')
    module = to_torch(model, load_params(FIXTURES / 'vitjax_token_rep.npz', model))
    with torch.no_grad():
        assert np.abs(module(nchw(io['images'])).numpy() - io['logits']).max() <= 1e-4


# int8 qnnpack and the lite interpreter ------------------------------------------------------------------------------
def test_int8_lite_equals_scripted_int8_and_agrees_with_fp32(tmp_path):
    import torch.jit.mobile
    model = create('deit_distilled')
    module = to_torch(model, random_params(model))
    optimized = artefacts.write_models(module, str(tmp_path))['optimize_for_mobile'].startswith('applied')
    x = nchw(images(256))
    with artefacts.qnnpack(), artefacts.quiet(), torch.no_grad():
        int8 = torch.jit.load(str(tmp_path / artefacts.INT8))(x)
        lite = torch.jit.mobile._load_for_lite_interpreter(str(tmp_path / artefacts.LITE))(x)
        fp32 = torch.jit.load(str(tmp_path / artefacts.FP32))(x)
    if optimized:  # XNNPACK builds: the lite file went through optimize_for_mobile
        torch.testing.assert_close(lite, int8, atol=1e-3, rtol=0)
    else:
        assert torch.equal(lite, int8)
    assert (int8.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.85
    assert (int8 - fp32).abs().mean() <= 0.1 * fp32.std()
    assert any('quantized' in str(type(m)) for m in artefacts.quantize_int8(module).modules())  # Linears did change


def test_vit_s16_int8_file_is_at_most_035_of_fp32(tmp_path):
    config = model_config(models.create_model('vit_s16', num_classes=1000))  # 224 px, torch's random init
    artefacts.write_models(build(config), str(tmp_path))
    fp32, int8 = (os.path.getsize(tmp_path / f) for f in (artefacts.FP32, artefacts.INT8))
    assert fp32 > 22e6 * 4  # 22,050,664 float32 parameters
    assert int8 <= 0.35 * fp32
    assert os.path.getsize(tmp_path / artefacts.LITE) <= 0.35 * fp32


# The state dict -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('family', FAMILIES)
def test_safetensors_round_trip_is_exact(tmp_path, family):
    model = create(family)
    params = random_params(model, seed=2)
    layout, arrays = checkpoint_arrays(model_config(model), params)
    path = tmp_path / 'state_dict.safetensors'
    artefacts.write_state_dict(arrays, str(path), {'layout': layout})
    if family.startswith(('vit', 'deit')):
        assert layout == 'timm'
        for key in ['patch_embed.proj.weight', 'patch_embed.proj.bias', 'blocks.1.attn.qkv.weight',
                    'blocks.1.attn.proj.weight', 'blocks.1.mlp.fc2.bias', 'norm.weight', 'head.weight']:
            assert key in arrays
        assert arrays['patch_embed.proj.weight'].shape[:2] == (48, 3)  # OIHW
        assert arrays['blocks.0.attn.qkv.weight'].shape == (144, 48)  # (3D, D)
    extra = {'vit_token_representation': ['cls_token', 'pos_embed', 'pre_logits.fc.weight'],
             'deit_distilled': ['cls_token', 'dist_token', 'pos_embed', 'head_dist.weight', 'head_dist.bias'],
             't2t_performer': ['tokens_to_token.attention1.w', 'tokens_to_token.attention2.mlp.2.weight'],
             't2t_transformer': ['tokens_to_token.attention1.attn.qkv.weight', 'pos_embed'],
             'hybrid': ['conv_root/kernel', 'block2/unit1/gn_proj/scale', 'cls']}.get(family, [])
    assert set(extra) <= set(arrays)
    loaded = flatten(load_params(path, model))
    ours = flatten(params)
    assert loaded.keys() == ours.keys()
    for key in ours:
        np.testing.assert_array_equal(loaded[key], ours[key], err_msg=key)


# The Python API and the CLI -----------------------------------------------------------------------------------------
def test_cli_on_a_checkpoint_file(tmp_path):
    out = tmp_path / 'export'
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    result = subprocess.run([sys.executable, '-m', 'vit_jax.export', *FIXTURE_ARGS, *FAST, '--out', str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'TorchScript fp32' in result.stdout and 'int8 qnnpack (lite)' in result.stdout
    assert sorted(os.listdir(out)) == sorted(artefacts.FILES)
    assert leftovers(tmp_path) == ['export']  # no temporary directory left beside it
    report = json.loads((out / artefacts.REPORT).read_text())

    assert report['model']['family'] == 'vit' and report['model']['num_params'] == 45434
    for f in artefacts.FILES[:-1]:
        assert report['files'][f]['bytes'] == os.path.getsize(out / f) > 0
    variants = ['torch_eager', 'torchscript_fp32', 'int8_qnnpack', 'int8_lite']
    assert all(report['latency_ms_per_image'][k] > 0 for k in ['jax', *variants])
    assert report['latency_ms_per_image']['batch'] == 1
    diff, agree = report['max_abs_logit_diff'], report['top1_agreement']
    assert max(diff[k] for k in variants[:2]) <= 1e-4
    assert 0 < diff['int8_qnnpack'] < 0.1 and diff['int8_lite'] == pytest.approx(diff['int8_qnnpack'], abs=1e-3)
    assert agree['torchscript_fp32'] == 1.0
    # The lite file is the scripted int8 model: the same predictions; and int8 keeps most of fp32's top-1.
    assert agree['int8_lite'] == agree['int8_qnnpack'] >= 0.75
    assert report['comparison']['examples'] == 8 and 'random' in report['comparison']['inputs']
    assert report['state_dict'] == {'layout': 'timm', 'round_trip': 'exact'}
    assert report['threads']['torch'] == len(os.sched_getaffinity(0))
    import torch.backends.xnnpack
    assert report['optimize_for_mobile'].startswith('applied' if torch.backends.xnnpack.enabled else 'skipped')

    io = np.load(FIXTURES / 'vitjax_token_rep.io.npz')  # the deployed file reproduces the original's logits
    with torch.no_grad():
        logits = torch.jit.load(str(out / artefacts.FP32))(nchw(io['images'])).numpy()
    assert np.abs(logits - io['logits']).max() <= 1e-4


def test_cli_on_a_workdir_with_ema(tmp_path):
    """A workdir as vit_jax.main writes it (config.json + orbax TrainState); compared on the eval split."""
    import orbax.checkpoint as ocp
    from vit_jax.train.config import base_config
    config = base_config()
    config.model_name, config.dataset, config.data_dir = 'vit_ti16', 'sklearn_digits', str(tmp_path / 'tfds')
    config.model.update(patch_size=4, **TINY)
    config.train_split, config.eval_split, config.image_size, config.eval_batch_size = 'train', 'test', 16, 128
    workdir = tmp_path / 'workdir'
    workdir.mkdir()
    (workdir / 'config.json').write_text(config.to_json_best_effort())
    model = models.create_model('vit_ti16', num_classes=10, image_size=16, patch_size=4, **TINY)
    params = random_params(model, seed=3)
    ema = jax.tree.map(lambda x: 0.5 * x, params)
    with ocp.CheckpointManager(str(workdir / 'checkpoints')) as manager:
        manager.save(7, args=ocp.args.StandardSave({'step': np.int32(7), 'params': params, 'ema_params': ema,
                                                    'opt_state': {'count': np.int32(7)}}))
    assert main(['--workdir', str(workdir), '--out', str(tmp_path / 'out'), '--max-eval-examples', '200',
                 *FAST]) == 0
    report = json.loads((tmp_path / 'out' / artefacts.REPORT).read_text())
    assert report['source']['step'] == 7 and report['source']['params'] == 'ema_params'
    assert report['comparison'] == {'inputs': 'eval split sklearn_digits:test', 'examples': 200}
    assert set(report['top1_accuracy']) == {'jax', 'torch_eager', 'torchscript_fp32', 'int8_qnnpack', 'int8_lite'}
    assert report['max_abs_logit_diff']['torchscript_fp32'] <= 1e-4
    # The exported weights are the EMA ones.
    state = load_params(tmp_path / 'out' / artefacts.STATE_DICT, model)
    np.testing.assert_array_equal(state['head']['kernel'], ema['head']['kernel'])


def test_checkpoint_that_does_not_fit_the_model_leaves_nothing(tmp_path, capsys):
    out = tmp_path / 'parent' / 'export'
    args = [a if a != 'hidden_size=48' else 'hidden_size=60' for a in FIXTURE_ARGS]
    assert main([*args, '--out', str(out)]) == 1
    err = capsys.readouterr().err
    assert 'does not match the model' in err and 'encoder/block_0/attn/qkv/kernel' in err
    assert leftovers(tmp_path) == []


def test_torch_without_qnnpack_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(type(torch.backends.quantized), 'supported_engines',
                        property(lambda self: ['x86', 'fbgemm']))
    out = tmp_path / 'export'
    assert main([*FIXTURE_ARGS, '--out', str(out)]) == 1
    assert 'no qnnpack' in capsys.readouterr().err
    model = create('vit_gap')
    with pytest.raises(ExportError, match='qnnpack'):
        export(random_params(model), model, str(out))
    assert leftovers(tmp_path) == []


def test_a_failure_midway_leaves_nothing_and_keeps_the_earlier_export(tmp_path, monkeypatch):
    model = create('vit_gap')
    params = random_params(model)
    out = tmp_path / 'a' / 'export'
    first = export(params, model, str(out), repeats=1, warmup=0)
    assert first['max_abs_logit_diff']['int8_lite'] > 0 and first['state_dict']['round_trip'] == 'exact'

    def broken(*args, **kwargs):
        raise OSError('disk full')

    monkeypatch.setattr(artefacts, 'write_state_dict', broken)
    with pytest.raises(OSError, match='disk full'):
        export(params, model, str(out), repeats=1, warmup=0)
    assert leftovers(out.parent) == ['export'] and sorted(os.listdir(out)) == sorted(artefacts.FILES)
    assert json.loads((out / artefacts.REPORT).read_text()) == json.loads(json.dumps(first, default=str))
    with pytest.raises(OSError, match='disk full'):
        export(params, model, str(tmp_path / 'b' / 'c' / 'export'), repeats=1, warmup=0)
    assert leftovers(tmp_path) == ['a']  # the parents it made are gone too


def test_configurations_without_an_exporter_are_refused(tmp_path):
    import flax.linen as nn
    config = model_config(create('vit_gap'))
    with pytest.raises(ExportError, match='No PyTorch exporter for Dense'):
        model_config(nn.Dense(3))
    with pytest.raises(ExportError, match="classifier='map'"):
        to_torch({**config, 'classifier': 'map'}, {})
    with pytest.raises(ExportError, match='layer_scale'):
        to_torch({**config, 'layer_scale': 1e-5}, {})
    with pytest.raises(ExportError, match='do not fit'):
        to_torch(config, random_params(create('vit_token_representation')))
    (tmp_path / 'busy').mkdir()
    (tmp_path / 'busy' / 'notes.txt').write_text('not an export')
    model = create('vit_gap')
    with pytest.raises(ExportError, match='not an earlier export'):
        export(random_params(model), model, str(tmp_path / 'busy'))
    assert leftovers(tmp_path) == ['busy']


def test_torch_side_imports_without_jax():
    code = ('import sys, torch, vit_jax.export as e; '
            'm = e.build(dict(module="VisionTransformer", num_classes=3, image_size=32, patch_size=8, hidden_size=24, '
            'num_layers=1, num_heads=2, mlp_dim=48)); torch.jit.script(m)(torch.zeros(1, 3, 32, 32)); '
            'assert "jax" not in sys.modules and "flax" not in sys.modules, "jax imported"')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT, capture_output=True)
