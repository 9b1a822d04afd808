"""ViT-Ti/16 on ImageNet-1k from scratch with big_vision's plain-ViT recipe (as configs/vit_s16.py).

    python -m vit_jax.main --config configs/vit_ti16.py --workdir workdirs/vit_ti16

Dataset: ``imagenet2012`` prepared with TFDS (see configs/vit_s16.py).
Expected: no published number for Ti with this exact recipe; DeiT's recipe gives 72.2% (configs/deit_s16.py with
``--config.model_name=deit_ti16``). Roughly 1/3 of ViT-S/16's cost on the same TPUv3-8.
"""

from vit_jax.train.config import base_config, big_vision_i1k_recipe


def get_config():
    c = big_vision_i1k_recipe(base_config())
    c.model_name = 'vit_ti16'
    return c
