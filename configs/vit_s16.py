"""ViT-S/16 on ImageNet-1k from scratch: big_vision's baseline (Beyer et al. 2022, "Better plain ViT baselines").

    python -m vit_jax.main --config configs/vit_s16.py --workdir workdirs/vit_s16

Dataset: ``imagenet2012`` prepared with TFDS (place the ILSVRC2012 tars in DATA_DIR/downloads/manual, then
``tfds build imagenet2012 --data_dir DATA_DIR``); pass ``--config.data_dir=DATA_DIR``.
Expected: 76.5% top-1 after 90 epochs in 6-7 h on a TPUv3-8 (80% with ``--config.total_steps`` for 300 epochs).
"""

from vit_jax.train.config import base_config, big_vision_i1k_recipe


def get_config():
    c = big_vision_i1k_recipe(base_config())
    c.model_name = 'vit_s16'
    return c
