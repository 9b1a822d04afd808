"""T2T-ViT-14 on ImageNet-1k with the official recipe (Yuan et al. 2021; yitu-opensource/T2T-ViT).

    python -m vit_jax.main --config configs/t2t_vit_14.py --workdir workdirs/t2t_vit_14

Dataset: ``imagenet2012`` prepared with TFDS (see configs/vit_s16.py).
Recipe: DeiT's augmentation, 310 epochs, batch 512, AdamW lr 5e-4, wd 0.05, 10 warmup epochs, cosine, stochastic
depth 0.1, EMA of the weights (0.99996; the EMA weights are evaluated, as the paper's), eval crop 0.9.
Expected: 81.5% top-1 (paper), on 8 V100 GPUs.
"""

from vit_jax.train.config import base_config, deit_recipe


def get_config():
    c = deit_recipe(base_config(), epochs=310, batch_size=512, warmup_epochs=10)
    c.model_name = 't2t_vit_14'
    c.augment.crop_pct = 0.9
    c.optimizer.ema_decay = 0.99996
    return c
