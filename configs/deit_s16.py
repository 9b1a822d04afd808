"""DeiT-S on ImageNet-1k: facebookresearch/deit ``main.py``'s defaults (Touvron et al. 2021, table 9), without
distillation (vit_jax.train.config.deit_recipe cites each value).

    python -m vit_jax.main --config configs/deit_s16.py --workdir workdirs/deit_s16 --config.data_dir=DATA_DIR

Dataset: ``imagenet2012`` prepared with TFDS (see configs/vit_s16.py).
Expected (the source's published number, DeiT paper table 7 / README): 79.8% top-1; DeiT reports 2-3 days on 4
V100s. Not reproduced here. Differences from the source: ``python -m vit_jax.recipes``.
"""

from vit_jax.train.config import base_config, deit_recipe


def get_config():
    c = deit_recipe(base_config())
    c.model_name = 'deit_s16'
    return c
