"""Fine-tuning: position-embedding resizes against their references, head / representation adaptation, and a
fine-tune of the quickstart model from its own checkpoint at a larger image size."""

import json

import jax
import numpy as np
import pytest
import scipy.ndimage
import torch

from vit_jax import models
from vit_jax.checkpoints import load_params, load_pretrained, resize_posemb
from vit_jax.checkpoints.posemb import resize_grid
from vit_jax.train.loop import train_and_evaluate

RNG = np.random.default_rng(0)


@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
def test_same_grid_is_the_identity(method):
    posemb = RNG.normal(size=(1, 1 + 49, 16)).astype(np.float32)
    np.testing.assert_allclose(resize_posemb(posemb, 1, (7, 7), method), posemb, atol=1e-6)


@pytest.mark.parametrize('old,new', [((7, 7), (12, 12)), ((14, 14), (24, 24)), ((24, 24), (14, 14)),
                                     ((7, 7), (10, 12))])
def test_bilinear_matches_scipy_zoom(old, new):
    grid = RNG.normal(size=(*old, 8))
    zoom = (new[0] / old[0], new[1] / old[1], 1)
    reference = scipy.ndimage.zoom(grid, zoom, order=1)  # what vision_transformer calls
    assert reference.shape == (*new, 8)
    np.testing.assert_allclose(resize_grid(grid, new, 'bilinear'), reference, atol=1e-10)


@pytest.mark.parametrize('old,new', [((7, 7), (12, 12)), ((14, 14), (24, 24)), ((24, 24), (14, 14)),
                                     ((7, 7), (10, 12))])
def test_bicubic_matches_torch_interpolate(old, new):
    grid = RNG.normal(size=(*old, 8))
    reference = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=new,
                                                mode='bicubic', align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(resize_grid(grid, new, 'bicubic'), reference, atol=1e-10)


def test_prefix_rows_are_kept_and_distillation_token_handled():
    posemb = RNG.normal(size=(1, 2 + 16, 4))  # class + distillation token, then a 4x4 grid
    resized = resize_posemb(posemb, 2, (6, 6), 'bicubic')
    assert resized.shape == (1, 2 + 36, 4)
    np.testing.assert_array_equal(resized[:, :2], posemb[:, :2])


def fixture_model(fixtures_dir, **overrides):
    config = json.loads((fixtures_dir / 'vitjax_fixtures.json').read_text())['vitjax_token_rep']['config']
    kwargs = dict(image_size=32, patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96,
                  representation_size=config['representation_size'], num_classes=10)
    kwargs.update(overrides)
    return models.create_model('vit_b16', **kwargs)


def test_load_pretrained_adapts_head_representation_and_grid(fixtures_dir):
    model = fixture_model(fixtures_dir, num_classes=5, representation_size=None, image_size=48)
    init = jax.device_get(jax.jit(model.init)(jax.random.key(0), np.zeros((1, 48, 48, 3)))['params'])
    init = jax.tree.map(lambda x: getattr(x, 'value', x), init, is_leaf=lambda x: hasattr(x, 'value'))
    messages = []
    params = load_pretrained(fixtures_dir / 'vitjax_token_rep.npz', model, init, skip=r'^encoder/block_1/mlp/',
                             log=messages.append)
    original = np.load(fixtures_dir / 'vitjax_token_rep.npz')
    assert params['pos_embed'].shape == (1, 1 + 12 * 12, 48)
    np.testing.assert_array_equal(params['pos_embed'][:, 0], original['Transformer/posembed_input/pos_embedding'][:, 0])
    assert np.all(params['head']['kernel'] == 0) and params['head']['kernel'].shape == (48, 5)
    assert 'pre_logits' not in params
    np.testing.assert_array_equal(params['encoder']['block_1']['mlp']['fc1']['kernel'],
                                  init['encoder']['block_1']['mlp']['fc1']['kernel'])
    np.testing.assert_array_equal(params['encoder']['block_0']['mlp']['fc1']['kernel'],
                                  original['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'])
    text = '\n'.join(messages)
    assert 'head/kernel: new zero-initialised head, (32, 10) -> (48, 5)' in text
    assert 'pre_logits/kernel: dropped' in text
    assert 'pos_embed: resized bilinear to a 12x12 grid, (1, 145, 48)' in text
    assert 'encoder/block_1/mlp/fc1/kernel: left at init' in text


def quickstart_config(data_dir, **overrides):
    from test_train import load_config
    config = load_config('quickstart')
    config.model.update(hidden_size=48, num_layers=2, mlp_dim=96)
    config.data_dir = data_dir
    config.log_every = 20
    config.checkpoint_every = 1000
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.slow  # ~2 min of training; the resize and loading it relies on are tested above
def test_finetune_quickstart_at_a_larger_image_size(tmp_path):
    data_dir = str(tmp_path / 'tfds')
    pretrain = tmp_path / 'pretrain'
    base = train_and_evaluate(quickstart_config(data_dir, total_steps=300, eval_every=300), str(pretrain))
    assert base['eval_top1'] > 0.8
    # Our own workdir as a checkpoint format: exactly the trained parameters.
    model16 = models.create_model('vit_ti16', num_classes=10, image_size=16, patch_size=4, hidden_size=48,
                                  num_layers=2, num_heads=3, mlp_dim=96)
    assert load_params(pretrain, model16)['pos_embed'].shape == (1, 17, 48)

    short = dict(total_steps=40, eval_every=40, image_size=24)
    short_config = quickstart_config(data_dir, **short)
    # 40 steps of the recipe's 100-step warmup (a warmup longer than the run is refused): the same learning rates.
    short_config.optimizer.update(warmup_steps=40, learning_rate=short_config.optimizer.learning_rate * 40 / 100)
    scratch = train_and_evaluate(short_config, str(tmp_path / 'scratch'))
    finetune_config = short_config.copy_and_resolve_references()
    finetune_config.init_from.update(path=str(pretrain), posemb_resize='bicubic')
    finetuned = train_and_evaluate(finetune_config, str(tmp_path / 'finetune'))
    # 4x4 -> 6x6 patch grid; the pretrained start wins clearly over 40 steps from scratch.
    assert finetuned['eval_top1'] > scratch['eval_top1'] + 0.1
    assert finetuned['eval_top1'] > 0.8
