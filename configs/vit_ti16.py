"""ViT-Ti/16 on ImageNet-1k from scratch with big_vision's ``configs/vit_s16_i1k.py`` recipe (as configs/vit_s16.py,
only the model's size differs).

    python -m vit_jax.main --config configs/vit_ti16.py --workdir workdirs/vit_ti16 --config.data_dir=DATA_DIR

Dataset: ``imagenet2012`` prepared with TFDS (see configs/vit_s16.py).
Expected: no published number for Ti with this recipe (big_vision has no Ti/16 ImageNet-1k config); DeiT's recipe
gives 72.2% (configs/deit_s16.py with ``--config.model_name=deit_ti16``). Not reproduced here.
"""

from vit_jax.train.config import base_config, big_vision_i1k_recipe


def get_config():
    c = big_vision_i1k_recipe(base_config())
    c.model_name = 'vit_ti16'
    c.model.representation_size = 192  # rep_size=True: the width
    return c
