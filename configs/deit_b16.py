"""DeiT-B on ImageNet-1k: facebookresearch/deit ``main.py``'s defaults (Touvron et al. 2021, table 9), without
distillation (vit_jax.train.config.deit_recipe cites each value).

    python -m vit_jax.main --config configs/deit_b16.py --workdir workdirs/deit_b16 --config.data_dir=DATA_DIR

Dataset: ``imagenet2012`` prepared with TFDS (see configs/vit_s16.py).
Expected (the source's published number, DeiT paper table 7 / README): 81.8% top-1; the paper: 53 h on 8 V100s
(16 GPUs in the README's command). Not reproduced here. Differences from the source: ``python -m vit_jax.recipes``.
"""

from vit_jax.train.config import base_config, deit_recipe


def get_config():
    c = deit_recipe(base_config())
    c.model_name = 'deit_b16'
    return c
