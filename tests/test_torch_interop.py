"""Parity with PyTorch references: Hugging Face transformers ViT / DeiT built from random configs, converted through
``load_params`` (both generations of HF names, .bin and .safetensors), and the timm / DeiT release layout."""

import argparse

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from vit_jax import models  # noqa: E402
from vit_jax.checkpoints import load_params  # noqa: E402

SIZES = [  # (hidden, layers, heads, mlp, image, patch)
    (48, 2, 3, 96, 32, 4),
    (64, 3, 4, 256, 48, 8),
    (96, 1, 6, 192, 32, 16),
]


def hf_config(cls, hidden, layers, heads, mlp, image, patch, num_labels=7):
    return cls(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
               image_size=image, patch_size=patch, num_labels=num_labels, hidden_act='gelu')


def randomize(module: torch.nn.Module, seed: int) -> None:
    """HF initialises LayerNorms to identity and some tokens to zero: perturb everything, so parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def hf_logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).logits.numpy()


def to_hf4_names(state: dict) -> dict:
    """transformers 5.x names -> the 4.x names of the files on the Hub."""
    out = {}
    for key, value in state.items():
        for new, old in (('.layers.', '.encoder.layer.'), ('attention.q_proj', 'attention.attention.query'),
                         ('attention.k_proj', 'attention.attention.key'),
                         ('attention.v_proj', 'attention.attention.value'),
                         ('attention.o_proj', 'attention.output.dense'), ('mlp.fc1', 'intermediate.dense'),
                         ('mlp.fc2', 'output.dense')):
            key = key.replace(new, old)
        out[key] = value
    return out


def ours(name, hidden, layers, heads, mlp, image, patch, eps, num_classes=7):
    return models.create_model(name, num_classes=num_classes, image_size=image, patch_size=patch, hidden_size=hidden,
                               num_layers=layers, num_heads=heads, mlp_dim=mlp, layer_norm_eps=eps)


def jax_logits(model, params, images):
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, images))


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('names', ['hf5', 'hf4'])
def test_huggingface_vit(tmp_path, size, names):
    torch.manual_seed(0)
    config = hf_config(transformers.ViTConfig, *size)
    reference = transformers.ViTForImageClassification(config).eval()
    randomize(reference, 1)
    state = {k: v for k, v in reference.state_dict().items()}
    path = tmp_path / 'pytorch_model.bin'
    torch.save(to_hf4_names(state) if names == 'hf4' else state, path)
    model = ours('vit_b16', *size, eps=config.layer_norm_eps)  # vit_* defaults to tanh GELU: HF 'gelu' is exact
    model = model.clone(gelu_approximate=False)
    images = np.random.default_rng(0).normal(size=(3, size[4], size[4], 3)).astype(np.float32)
    params = load_params(path, model)
    assert np.abs(jax_logits(model, params, images) - hf_logits(reference, images)).max() <= 1e-4


@pytest.mark.parametrize('size', SIZES[:2])
def test_huggingface_deit_with_teacher_safetensors(tmp_path, size):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    config = hf_config(transformers.DeiTConfig, *size)
    reference = transformers.DeiTForImageClassificationWithTeacher(config).eval()
    randomize(reference, 2)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / 'model.safetensors')
    model = ours('deit_b16_distilled', *size, eps=config.layer_norm_eps)
    images = np.random.default_rng(1).normal(size=(2, size[4], size[4], 3)).astype(np.float32)
    params = load_params(tmp_path / 'model.safetensors', model)
    # At inference both return the average of the class and distillation heads.
    assert np.abs(jax_logits(model, params, images) - hf_logits(reference, images)).max() <= 1e-4


def test_deit_release_layout(tmp_path):
    """A DeiT release file: timm names with fused qkv, under 'model', beside the training args (a Namespace)."""
    hidden, layers, heads, mlp, image, patch = SIZES[1]
    config = hf_config(transformers.DeiTConfig, *SIZES[1], num_labels=5)
    reference = transformers.DeiTForImageClassificationWithTeacher(config).eval()
    randomize(reference, 3)
    hf = reference.state_dict()
    timm_state = {'cls_token': hf['deit.embeddings.cls_token'], 'dist_token': hf['deit.embeddings.distillation_token'],
                  'pos_embed': hf['deit.embeddings.position_embeddings'],
                  'patch_embed.proj.weight': hf['deit.embeddings.patch_embeddings.projection.weight'],
                  'patch_embed.proj.bias': hf['deit.embeddings.patch_embeddings.projection.bias'],
                  'norm.weight': hf['deit.layernorm.weight'], 'norm.bias': hf['deit.layernorm.bias'],
                  'head.weight': hf['cls_classifier.weight'], 'head.bias': hf['cls_classifier.bias'],
                  'head_dist.weight': hf['distillation_classifier.weight'],
                  'head_dist.bias': hf['distillation_classifier.bias']}
    for i in range(layers):
        b = f'deit.layers.{i}.'
        for part in ('weight', 'bias'):
            timm_state[f'blocks.{i}.attn.qkv.{part}'] = torch.cat(
                [hf[f'{b}attention.{n}_proj.{part}'] for n in 'qkv'])
            for theirs, timm_name in (('attention.o_proj', 'attn.proj'), ('layernorm_before', 'norm1'),
                                      ('layernorm_after', 'norm2'), ('mlp.fc1', 'mlp.fc1'), ('mlp.fc2', 'mlp.fc2')):
                timm_state[f'blocks.{i}.{timm_name}.{part}'] = hf[f'{b}{theirs}.{part}']
    torch.save({'model': timm_state, 'epoch': 299, 'args': argparse.Namespace(model='deit_tiny')},
               tmp_path / 'deit.pth')
    model = ours('deit_b16_distilled', *SIZES[1], eps=config.layer_norm_eps, num_classes=5)
    images = np.random.default_rng(2).normal(size=(2, image, image, 3)).astype(np.float32)
    params = load_params(tmp_path / 'deit.pth', model)
    assert np.abs(jax_logits(model, params, images) - hf_logits(reference, images)).max() <= 1e-4
