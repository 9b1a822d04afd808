"""DeiT-B on ImageNet-1k, DeiT's recipe without distillation (Touvron et al. 2021, table 9).

    python -m vit_jax.main --config configs/deit_b16.py --workdir workdirs/deit_b16

Dataset: ``imagenet2012`` prepared with TFDS (see configs/vit_s16.py).
Recipe: 300 epochs, batch 1024, AdamW lr 1e-3 (5e-4 x 1024/512), wd 0.05, 5 warmup epochs, cosine to 1e-5, label
smoothing 0.1, RandAugment (2, 9, mstd 0.5), mixup 0.8 / cutmix 1.0, random erasing 0.25, stochastic depth 0.1.
Expected: 81.8% top-1 (paper), ~3 days on 8 V100 (DeiT paper: 53 h for DeiT-B on 8 V100).
"""

from vit_jax.train.config import base_config, deit_recipe


def get_config():
    c = deit_recipe(base_config())
    c.model_name = 'deit_b16'
    return c
