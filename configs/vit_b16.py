"""ViT-B/16 pretraining on ImageNet-21k, as in the ViT paper (Dosovitskiy et al. 2021, section 4.1, table 3,
appendix B.1; vit_jax.train.config.vit_pretrain_recipe cites each value).

    python -m vit_jax.main --config configs/vit_b16.py --workdir workdirs/vit_b16 --config.data_dir=DATA_DIR

Dataset: ``imagenet21k`` prepared with TFDS in ``--config.data_dir`` (TFDS has no public builder for it: bring your
own, e.g. big_vision's; ``--config.dataset=imagenet2012 --config.train_split=train --config.eval_split=validation``
runs the same recipe on ImageNet-1k).
Recipe: Adam (0.9, 0.999), lr 1e-3, weight decay 0.03 as flax.optim.Adam applies it (1e-3 x 0.03 = 3e-5 of each
kernel per step at the peak), batch 4096, 10k warmup steps then linear decay, 90 epochs, dropout 0.1, clip 1.0,
a 768-d pre-logits layer (dropped when fine-tuning), 224 px.
Expected (the source's published number, ViT paper table 5): ImageNet top-1 ~84% after fine-tuning at 384 px
(configs/finetune_vit_b16.py). Not reproduced here.
"""

from vit_jax.train.config import base_config, vit_pretrain_recipe


def get_config():
    c = vit_pretrain_recipe(base_config())
    c.model_name = 'vit_b16'
    c.model.representation_size = 768  # pretraining heads have a pre-logits layer (section 3.1)
    return c
