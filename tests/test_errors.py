"""Bad input gets a clear error that names the problem and the fix, before anything is compiled."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vit_jax import models
from vit_jax.checkpoints import CheckpointError, CheckpointMismatchError, load_params

SMALL = dict(image_size=32, patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_dim=96)


def test_unknown_model_lists_the_registered_names():
    with pytest.raises(ValueError, match=r"Unknown model 'vit_q16'.*vit_b16.*deit_s16_distilled.*resnet50"):
        models.create_model('vit_q16', num_classes=10)


def test_unknown_field_lists_the_valid_fields():
    with pytest.raises(ValueError, match=r"Unknown field\(s\) \['hiden_size'\].*Valid fields:.*'hidden_size'"):
        models.create_model('vit_b16', num_classes=10, hiden_size=12)
    with pytest.raises(ValueError, match=r"\['hidden_size'\] for model 'resnet50'"):
        models.create_model('resnet50', num_classes=10, hidden_size=12)


@pytest.mark.parametrize('name,overrides,pattern', [
    ('vit_b16', dict(image_size=225), r'image_size=225 is not divisible by patch_size=16.*multiple of 16 \(e\.g\. 224\)'),
    ('vit_b16', dict(patch_size=12), r'image_size=224 is not divisible by patch_size=12'),
    ('r50_vit_b16', dict(image_size=200), r'image_size=200 is not divisible by the ResNet stride 16'),
    ('t2t_vit_14', dict(image_size=230), r'image_size=230 is not divisible by 16'),
    ('t2t_vit_14', dict(patch_size=8), r'patch_size=8: T2T-ViT'),
    ('vit_b16', dict(num_heads=7), r'hidden_size=768 is not divisible by num_heads=7.*divisors \[1, 2, 3, 4, 6, 8'),
    ('vit_b16', dict(classifier='cls'), r"classifier='cls' is not one of \('token', 'gap', 'unpooled', "
                                        r"'token_unpooled'\)"),
    ('t2t_vit_7', dict(tokens_type='linformer'), r"tokens_type='linformer' is not one of \('performer', "
                                                  r"'transformer'\)"),
    ('vit_b16', dict(posemb='rope'), r"posemb='rope' is not one of"),
    ('vit_b16', dict(dtype='int8'), r"dtype='int8' is not one of \('float32', 'bfloat16', 'float16'\)"),
    ('deit_b16_distilled', dict(classifier='gap'), r'distilled model needs classifier="token"'),
    ('vit_b16', dict(drop_path_rate=1.5), r'drop_path_rate=1.5 must be in \[0, 1\)'),
])
def test_invalid_overrides(name, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        models.create_model(name, num_classes=10, **overrides)


def test_images_of_another_size():
    model = models.create_model('vit_ti16', num_classes=10, **SMALL)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match=r'Images are \(48, 48\).*image_size=32.*image_size=48'):
        model.apply(params, jnp.zeros((1, 48, 48, 3)))


def test_mismatch_lists_every_missing_unexpected_and_reshaped_key(fixtures_dir):
    # The fixture has a representation layer and 2 layers; this model has none and 3 layers, and 5 classes.
    model = models.create_model('vit_b16', num_classes=5, **dict(SMALL, num_layers=3))
    with pytest.raises(CheckpointMismatchError) as info:
        load_params(fixtures_dir / 'vitjax_token_rep.npz', model)
    err = info.value
    assert len(err.missing) == 12  # every parameter of block 2 (norm1/2 x2, qkv x2, out x2, fc1/2 x2)
    assert all(k.startswith('encoder/block_2/') for k in err.missing)
    assert err.unexpected == ['pre_logits/bias', 'pre_logits/kernel']
    assert err.mismatched == [('head/bias', (10,), (5,)), ('head/kernel', (32, 10), (48, 5))]
    message = str(err)
    for key in err.missing + err.unexpected + ['head/kernel: (32, 10) vs (48, 5)']:
        assert key in message


def test_position_embedding_mismatch_says_what_to_do(fixtures_dir):
    model = models.create_model('vit_b16', num_classes=10, **dict(SMALL, image_size=48), representation_size=32)
    with pytest.raises(CheckpointMismatchError, match=r'pos_embed: \(1, 65, 48\) vs \(1, 145, 48\)[\s\S]*another grid'):
        load_params(fixtures_dir / 'vitjax_token_rep.npz', model)


def test_unmapped_torch_keys_are_reported_by_their_own_name(tmp_path, fixtures_dir):
    state = torch.load(fixtures_dir / 't2t_performer.pth.tar', weights_only=True)['state_dict_ema']
    state['module.blocks.0.attn.rel_pos_bias'] = torch.zeros(3)
    torch.save({'state_dict': state}, tmp_path / 'extra.pth.tar')
    model = models.create_model('t2t_vit_7', num_classes=10, image_size=64, hidden_size=64, num_layers=2,
                                num_heads=2, mlp_dim=128, token_dim=16)
    with pytest.raises(CheckpointMismatchError, match=re.escape('blocks.0.attn.rel_pos_bias (checkpoint name)')):
        load_params(tmp_path / 'extra.pth.tar', model)


@pytest.mark.parametrize('suffix', ['.npz', '.pth', '.safetensors'])
def test_corrupt_files(tmp_path, fixtures_dir, suffix):
    source = {'.npz': 'vitjax_gap.npz', '.pth': 't2t_performer.pth.tar', '.safetensors': 'vitjax_gap.npz'}[suffix]
    data = (fixtures_dir / source).read_bytes()
    path = tmp_path / f'broken{suffix}'
    path.write_bytes(data[: len(data) // 2])
    model = models.create_model('vit_b16', num_classes=10, **SMALL)
    with pytest.raises(CheckpointError, match=r'truncated or corrupt'):
        load_params(path, model)


def test_missing_file_and_unknown_layout(tmp_path):
    model = models.create_model('vit_b16', num_classes=10, **SMALL)
    with pytest.raises(CheckpointError, match='No checkpoint at'):
        load_params(tmp_path / 'nope.npz', model)
    np.savez(tmp_path / 'other.npz', w=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"Unrecognised checkpoint layout \(first keys: \['w'\]\)"):
        load_params(tmp_path / 'other.npz', model)
    with pytest.raises(ValueError, match=r"format='onnx' is not one of"):
        load_params(tmp_path / 'other.npz', model, format='onnx')
