"""ViT-S/16 on ImageNet-1k from scratch: big_vision's ``configs/vit_s16_i1k.py`` (Beyer et al. 2022, "Better plain
ViT baselines"), value by value (vit_jax.train.config.big_vision_i1k_recipe cites each).

    python -m vit_jax.main --config configs/vit_s16.py --workdir workdirs/vit_s16 --config.data_dir=DATA_DIR

Dataset: ``imagenet2012`` prepared with TFDS (place the ILSVRC2012 tars in DATA_DIR/downloads/manual, then
``tfds build imagenet2012 --data_dir DATA_DIR``).
Expected (the source's published number, big_vision vit_s16_i1k.py docstring): 76.5% top-1 after 90 epochs in
6-7 h on a TPUv3-8 (80% with 300 epochs: ``--config.total_steps=371587``). Not reproduced here.
Differences from the source: ``python -m vit_jax.recipes``.
"""

from vit_jax.train.config import base_config, big_vision_i1k_recipe


def get_config():
    c = big_vision_i1k_recipe(base_config())
    c.model_name = 'vit_s16'
    c.model.representation_size = 384  # config.model rep_size=True: a pre-logits layer of the width
    return c
