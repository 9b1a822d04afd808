"""R50+ViT-B/16 hybrid pretraining on ImageNet-21k (ViT paper, section 3.1 "Hybrid Architecture"), with ViT-B/16's
ImageNet-21k recipe (table 3 has no ImageNet-21k row for hybrids; vit_jax.train.config.vit_pretrain_recipe).

    python -m vit_jax.main --config configs/r50_vit_b16.py --workdir workdirs/r50_vit_b16 --config.data_dir=DATA_DIR

Dataset: ``imagenet21k`` prepared with TFDS (see configs/vit_b16.py; the same overrides run it on ImageNet-1k).
Expected (the source's published number): the paper reports hybrids pretrained on JFT-300M (figure 5, table 6), not
on ImageNet-21k; vision_transformer's released R50+ViT-B/16 (ImageNet-21k, fine-tuned at 384) is listed at ~84-85%
in its README. Not reproduced here.
"""

from vit_jax.train.config import base_config, vit_pretrain_recipe


def get_config():
    c = vit_pretrain_recipe(base_config())
    c.model_name = 'r50_vit_b16'
    c.model.representation_size = 768
    return c
