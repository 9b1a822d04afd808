"""ViT-B/16 pretraining on ImageNet-21k, as in the ViT paper (Dosovitskiy et al. 2021, section 4.1, table 3).

    python -m vit_jax.main --config configs/vit_b16.py --workdir workdirs/vit_b16

Dataset: ``imagenet21k`` prepared with TFDS in ``--config.data_dir`` (TFDS has no public builder for it: bring your
own, e.g. big_vision's; ``--config.dataset=imagenet2012 --config.train_split=train --config.eval_split=validation``
runs the same recipe on ImageNet-1k).
Recipe: Adam (b1 0.9, b2 0.999), lr 1e-3, weight decay 0.1, batch 4096, 10k warmup steps then linear decay,
90 epochs, dropout 0.1, global-norm clip 1.0, a 768-d pre-logits layer (dropped when fine-tuning), 224 px.
Expected (paper): fine-tuned at 384 px, ImageNet top-1 ~84%; pretraining takes days on a TPUv3 pod slice.
Not reproduced here (no accelerator).
"""

from vit_jax.train.config import base_config, vit_pretrain_recipe


def get_config():
    c = vit_pretrain_recipe(base_config())
    c.model_name = 'vit_b16'
    c.model.representation_size = 768
    return c
