"""R50+ViT-B/16 hybrid pretraining on ImageNet-21k (ViT paper, section 3.1 "Hybrid Architecture", table 3).

    python -m vit_jax.main --config configs/r50_vit_b16.py --workdir workdirs/r50_vit_b16

Dataset: ``imagenet21k`` prepared with TFDS (see configs/vit_b16.py; the same overrides run it on ImageNet-1k).
Recipe: as configs/vit_b16.py (Adam, lr 1e-3, wd 0.1, batch 4096, 10k warmup, linear decay, 90 epochs).
Expected (paper): hybrids beat plain ViT at small compute and the gap closes for larger models (figure 5);
fine-tuned at 384 px, ImageNet top-1 ~84-85%. Not reproduced here (no accelerator).
"""

from vit_jax.train.config import base_config, vit_pretrain_recipe


def get_config():
    c = vit_pretrain_recipe(base_config())
    c.model_name = 'r50_vit_b16'
    c.model.representation_size = 768
    return c
