"""Every recipe in configs/ locked to its source's values, written here from the source (file named beside each):
a later edit of a config or of a recipe function cannot drift unnoticed."""

from __future__ import annotations

import pathlib

import pytest

from vit_jax import recipes
from vit_jax.train import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# facebookresearch/deit main.py defaults; datasets.py::build_transform; timm 0.3.2. 1,281,167 // 1024 = 1251 steps.
DEIT = {
    'batch_size': 1024, 'image_size': 224, 'total_steps': 300 * 1251,
    'model.dropout_rate': 0.0, 'model.drop_path_rate': 0.1,  # --drop, --drop-path
    'optimizer.name': 'adamw', 'optimizer.learning_rate': 1e-3,  # --lr 5e-4 x 1024 / 512
    'optimizer.eps': 1e-8, 'optimizer.weight_decay': 0.05, 'optimizer.weight_decay_mode': 'lr',  # torch AdamW
    'optimizer.schedule': 'timm_cosine', 'optimizer.warmup_steps': 5 * 1251, 'optimizer.cosine_epochs': 300,
    'optimizer.warmup_init_learning_rate': 1e-6, 'optimizer.end_learning_rate': 1e-5,  # --warmup-lr, --min-lr
    'optimizer.schedule_epoch_steps': 1251, 'optimizer.schedule_epoch_lag': 1,  # lr_scheduler.step(epoch)
    'optimizer.grad_clip_norm': 0.0, 'optimizer.ema_decay': 0.0,
    'augment.crop_scale': (0.08, 1.0), 'augment.interpolation': 'bicubic', 'augment.antialias': True,
    'augment.randaugment_ops': 'timm_increasing', 'augment.randaugment_num_layers': 2,
    'augment.randaugment_magnitude': 9, 'augment.randaugment_magnitude_std': 0.5,  # rand-m9-mstd0.5-inc1
    'augment.random_erasing': 0.25, 'augment.mixup_alpha': 0.8, 'augment.cutmix_alpha': 1.0,
    'augment.mixup_switch_prob': 0.5, 'augment.label_smoothing': 0.1, 'augment.repeated_augmentation': 3,
    'augment.normalization': 'imagenet', 'augment.eval_resize': 'timm', 'augment.crop_pct': 0.875,
    'augment.jpeg_dct_method': 'INTEGER_ACCURATE',
}
# big_vision configs/vit_s16_i1k.py. round(90 * 1,268,355 / 1024) = 111,477 steps.
BIG_VISION = {
    'batch_size': 1024, 'total_steps': 111_477, 'train_split': 'train[:99%]',
    'model.classifier': 'gap', 'model.posemb': 'sincos2d',
    'optimizer.name': 'adam', 'optimizer.mu_dtype': 'bfloat16', 'optimizer.learning_rate': 1e-3,
    'optimizer.weight_decay': 1e-4, 'optimizer.weight_decay_mode': 'schedule', 'optimizer.warmup_steps': 10_000,
    'optimizer.schedule': 'cosine', 'optimizer.end_learning_rate': 0.0, 'optimizer.grad_clip_norm': 1.0,
    'augment.crop_scale': (0.05, 1.0), 'augment.crop_ratio': (0.75, 1.33), 'augment.interpolation': 'bilinear',
    'augment.antialias': False, 'augment.randaugment_ops': 'big_vision', 'augment.randaugment_num_layers': 2,
    'augment.randaugment_magnitude': 10, 'augment.mixup_alpha': 0.2, 'augment.cutmix_alpha': 0.0,
    'augment.label_smoothing': 0.0, 'augment.random_erasing': 0.0, 'augment.repeated_augmentation': 1,
    'augment.normalization': 'inception', 'augment.eval_resize': 'big_vision',
    'augment.eval_interpolation': 'area', 'augment.crop_pct': 224 / 256,  # resize_small(256)|central_crop(224)
}
# ViT paper table 3 (ImageNet-21k), section 4.1, appendix B.1; flax.optim.Adam's decay.
VIT_PAPER = {
    'batch_size': 4096, 'num_epochs': 90, 'model.dropout_rate': 0.1, 'model.representation_size': 768,
    'optimizer.name': 'adam', 'optimizer.learning_rate': 1e-3, 'optimizer.weight_decay': 0.03,
    'optimizer.weight_decay_mode': 'lr', 'optimizer.warmup_steps': 10_000, 'optimizer.schedule': 'linear',
    'optimizer.grad_clip_norm': 1.0, 'augment.eval_resize': 'square',
}
EXPECTED = {
    # ViT paper appendix B.1.2: Adam lr 2e-4, 10k warmup, cosine, batch 4096, 1M steps; 50% corrupted, 80/10/10.
    'mpp_vit_b16': {'objective': 'masked_patch_prediction', 'batch_size': 4096, 'total_steps': 1_000_000,
                    'optimizer.learning_rate': 2e-4, 'optimizer.warmup_steps': 10_000, 'optimizer.schedule': 'cosine',
                    'mpp.corruption_rate': 0.5, 'mpp.mask_prob': 0.8, 'mpp.random_prob': 0.1,
                    'mpp.target': 'mean_colour'},
    'finetune_from_mpp': {'model_name': 'vit_b16', 'image_size': 384, 'optimizer.learning_rate': 0.03},
    # mae main_pretrain.py (PRETRAIN.md): 800 epochs, batch 4096, blr 1.5e-4, betas (0.9, 0.95), wd 0.05, 40 warmup.
    'mae_vit_b16': {'objective': 'mae', 'batch_size': 4096, 'total_steps': 800 * 312, 'optimizer.b2': 0.95,
                    'optimizer.learning_rate': 2.4e-3, 'optimizer.weight_decay': 0.05,
                    'optimizer.warmup_steps': 40 * 312, 'mae.mask_ratio': 0.75, 'mae.decoder_width': 512,
                    'mae.decoder_depth': 8, 'mae.decoder_heads': 16, 'mae.norm_pix_loss': True,
                    'augment.crop_scale': (0.2, 1.0)},
    # mae main_finetune.py (FINETUNE.md ViT-B): 100 epochs, batch 1024, blr 5e-4, layer decay 0.65, drop path 0.1.
    'finetune_from_mae': {'batch_size': 1024, 'total_steps': 100 * 1251, 'optimizer.learning_rate': 2e-3,
                          'optimizer.layer_decay': 0.65, 'model.drop_path_rate': 0.1, 'model.classifier': 'gap',
                          'optimizer.end_learning_rate': 1e-6, 'augment.mixup_alpha': 0.8},
    'deit_s16': dict(DEIT, model_name='deit_s16'),
    'deit_b16': dict(DEIT, model_name='deit_b16'),
    # DeiT README's distillation command: --distillation-type hard --distillation-alpha 0.5 --distillation-tau 1.0.
    **{f'deit_{size}16_distilled': dict(DEIT, model_name=f'deit_{size}16_distilled', objective='distillation', **{
        'distillation.type': 'hard', 'distillation.alpha': 0.5, 'distillation.tau': 1.0}) for size in ('ti', 's', 'b')},
    # T2T-ViT main.py + README: -b 64 x 8 GPUs, --lr 5e-4 unscaled, 300 + 10 cooldown epochs of 2502 steps.
    't2t_vit_14': dict(DEIT, **{
        'model_name': 't2t_vit_14', 'batch_size': 512, 'total_steps': 310 * 2502, 'optimizer.learning_rate': 5e-4,
        'optimizer.warmup_steps': 10 * 2502, 'optimizer.schedule_epoch_steps': 2502, 'optimizer.cosine_epochs': 300,
        'optimizer.schedule_epoch_lag': 0, 'optimizer.ema_decay': 0.99996, 'augment.interpolation': 'random',
        'augment.repeated_augmentation': 1, 'augment.crop_pct': 0.9, 'augment.eval_interpolation': 'bicubic'}),
    'finetune_deit_b16_384': dict(DEIT, **{
        'model_name': 'deit_b16', 'image_size': 384, 'batch_size': 512, 'total_steps': 30 * 2502,
        'optimizer.learning_rate': 5e-6, 'optimizer.weight_decay': 1e-8, 'optimizer.warmup_steps': 0,
        'optimizer.schedule_epoch_steps': 2502, 'optimizer.cosine_epochs': 30, 'optimizer.end_learning_rate': 1e-6,
        'augment.crop_pct': 1.0, 'init_from.posemb_resize': 'bicubic'}),
    'vit_s16': dict(BIG_VISION, model_name='vit_s16', **{'model.representation_size': 384}),  # rep_size=True
    'vit_ti16': dict(BIG_VISION, model_name='vit_ti16', **{'model.representation_size': 192}),
    'vit_b16': dict(VIT_PAPER, model_name='vit_b16'),
    'r50_vit_b16': dict(VIT_PAPER, model_name='r50_vit_b16'),
    # vision_transformer configs/common.py, input_pipeline.py, train.py.
    'finetune_vit_b16': {
        'model_name': 'vit_b16', 'image_size': 384, 'batch_size': 512, 'total_steps': 20_000,
        'optimizer.name': 'sgd', 'optimizer.momentum': 0.9, 'optimizer.mu_dtype': 'bfloat16',
        'optimizer.learning_rate': 0.03, 'optimizer.weight_decay': 0.0, 'optimizer.warmup_steps': 500,
        'optimizer.schedule': 'cosine', 'optimizer.grad_clip_norm': 1.0, 'augment.crop_scale': (0.05, 1.0),
        'augment.eval_resize': 'square', 'augment.normalization': 'inception', 'init_from.posemb_resize': 'bilinear',
    },
}


def test_every_config_has_a_locked_source():
    assert sorted(EXPECTED) == recipes.config_names() == sorted(recipes.SOURCES)


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_recipe_fields_equal_the_source(name):
    config = config_lib.load_config(str(ROOT / 'configs' / f'{name}.py'))
    for field, expected in EXPECTED[name].items():
        assert recipes._same(recipes._get(config, field), expected), (field, recipes._get(config, field), expected)
    assert recipes.field_differences(config, recipes.SOURCES[name]) == []


def test_recipes_report_lists_each_config_its_source_and_no_field_difference():
    text = recipes.report()
    for name in EXPECTED:
        assert f'\n{name}\n' in f'\n{text}'
    assert text.count('differing: none') == len(EXPECTED)
    markdown = recipes.report(markdown=True)
    assert markdown.count('### configs/') == len(EXPECTED)


def test_a_drifted_field_is_reported():
    config = config_lib.load_config(str(ROOT / 'configs' / 'vit_s16.py'))
    config.optimizer.weight_decay_mode = 'lr'
    assert recipes.field_differences(config, recipes.SOURCES['vit_s16']) == [
        "optimizer.weight_decay_mode: 'lr' vs the source's 'schedule'"]
