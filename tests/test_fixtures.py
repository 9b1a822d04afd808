"""Parity with the official implementations: fixtures produced by google-research/vision_transformer and
yitu-opensource/T2T-ViT (see fixtures/README.md), loaded through ``load_params``: max |logits - reference| <= 1e-4."""

import json

import jax
import numpy as np
import pytest

from vit_jax import models
from vit_jax.checkpoints import load_params


def vision_transformer_model(config: dict, image_size: int):
    t = config['transformer']
    kwargs = dict(image_size=image_size, patch_size=config['patches']['size'][0], hidden_size=config['hidden_size'],
                  num_layers=t['num_layers'], num_heads=t['num_heads'], mlp_dim=t['mlp_dim'],
                  classifier=config['classifier'], representation_size=config['representation_size'])
    if 'resnet' in config:
        return models.create_model('r50_vit_b16', num_classes=10, resnet_layers=tuple(config['resnet']['num_layers']),
                                   resnet_width=config['resnet']['width_factor'], **kwargs)
    return models.create_model('vit_b16', num_classes=10, **kwargs)


def t2t_model(kwargs: dict):
    return models.create_model(
        't2t_vit_7', num_classes=kwargs['num_classes'], image_size=kwargs['img_size'],
        tokens_type=kwargs['tokens_type'], hidden_size=kwargs['embed_dim'], num_layers=kwargs['depth'],
        num_heads=kwargs['num_heads'], mlp_dim=int(kwargs['embed_dim'] * kwargs['mlp_ratio']),
        token_dim=kwargs['token_dim'])


def assert_parity(model, params, io, fixture_num_params):
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert num_params == fixture_num_params
    logits = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, io['images']))
    assert logits.shape == io['logits'].shape
    assert np.abs(logits - io['logits']).max() <= 1e-4


@pytest.mark.parametrize('name', ['vitjax_token_rep', 'vitjax_gap', 'vitjax_hybrid'])
def test_vision_transformer_npz(fixtures_dir, name):
    spec = json.loads((fixtures_dir / 'vitjax_fixtures.json').read_text())[name]
    model = vision_transformer_model(spec['config'], spec['image_size'])
    params = load_params(fixtures_dir / f'{name}.npz', model)
    assert_parity(model, params, np.load(fixtures_dir / f'{name}.io.npz'), spec['num_params'])


@pytest.mark.parametrize('name', ['t2t_performer', 't2t_transformer'])
def test_official_t2t(fixtures_dir, name):
    spec = json.loads((fixtures_dir / 't2t_fixtures.json').read_text())[name]
    model = t2t_model(spec['kwargs'])
    params = load_params(fixtures_dir / f'{name}.pth.tar', model)
    assert_parity(model, params, np.load(fixtures_dir / f'{name}.io.npz'), spec['num_params'])


def test_new_flax_block_numbering(tmp_path, fixtures_dir):
    """Current Flax names (LayerNorm_1, MultiHeadDotProductAttention_0, MlpBlock_0) load to the same logits."""
    renames = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0', 'LayerNorm_2': 'LayerNorm_1',
               'MlpBlock_3': 'MlpBlock_0'}
    arrays = dict(np.load(fixtures_dir / 'vitjax_token_rep.npz'))
    renamed = {}
    for key, value in arrays.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        renamed[key] = value
    spec = json.loads((fixtures_dir / 'vitjax_fixtures.json').read_text())['vitjax_token_rep']
    model = vision_transformer_model(spec['config'], spec['image_size'])
    np.savez(tmp_path / 'new_numbering.npz', **renamed)
    params = load_params(tmp_path / 'new_numbering.npz', model)
    assert_parity(model, params, np.load(fixtures_dir / 'vitjax_token_rep.io.npz'), spec['num_params'])


def test_big_vision_scanned_layout(tmp_path, fixtures_dir):
    """big_vision: stacked encoderblock/ (scan) and a pos_embedding that does not cover the class token."""
    arrays = dict(np.load(fixtures_dir / 'vitjax_gap.npz'))
    blocks = sorted({k.split('/')[1] for k in arrays if k.startswith('Transformer/encoderblock_')})
    stacked = {}
    for key in list(arrays):
        if key.startswith('Transformer/encoderblock_'):
            rest = key.split('/', 2)[2]
            stacked.setdefault(rest, []).append((key.split('/')[1], arrays.pop(key)))
    for rest, values in stacked.items():
        values = [v for _, v in sorted(values, key=lambda kv: int(kv[0].split('_')[1]))]
        assert len(values) == len(blocks)
        arrays[f'Transformer/encoderblock/{rest}'] = np.stack(values)
    arrays['pos_embedding'] = arrays.pop('Transformer/posembed_input/pos_embedding')
    np.savez(tmp_path / 'bv.npz', **arrays)
    spec = json.loads((fixtures_dir / 'vitjax_fixtures.json').read_text())['vitjax_gap']
    model = vision_transformer_model(spec['config'], spec['image_size'])
    params = load_params(tmp_path / 'bv.npz', model)
    assert_parity(model, params, np.load(fixtures_dir / 'vitjax_gap.io.npz'), spec['num_params'])


def test_fixture_into_scanned_model(fixtures_dir):
    """The same weights drive a model compiled with nn.scan over its layers (stacked parameters)."""
    spec = json.loads((fixtures_dir / 'vitjax_fixtures.json').read_text())['vitjax_token_rep']
    model = vision_transformer_model(spec['config'], spec['image_size']).clone(scan_layers=True, remat=True)
    params = load_params(fixtures_dir / 'vitjax_token_rep.npz', model)
    assert params['encoder']['blocks']['attn']['qkv']['kernel'].shape == (2, 48, 3, 3, 16)
    assert_parity(model, params, np.load(fixtures_dir / 'vitjax_token_rep.io.npz'), spec['num_params'])
