"""Fine-tune a masked-patch-prediction ViT-B/16 (configs/mpp_vit_b16.py) on ImageNet at 384 px.

    python -m vit_jax.main --config configs/finetune_from_mpp.py --workdir workdirs/finetune_from_mpp \
        --config.init_from.path=workdirs/mpp_vit_b16 --config.data_dir=DATA_DIR

The encoder comes from the MPP workdir; the objective's own parameters ([mask] embedding, prediction head) are
dropped (the log says so) and the classification head starts at zero. Recipe: vision_transformer's fine-tuning
(configs/finetune_vit_b16.py: SGD momentum 0.9, lr 0.03, 500 warmup steps, cosine, 20k steps, batch 512, clip 1).
Expected: 79.9% ImageNet top-1 (ViT paper section 4.6, after MPP on JFT-300M); not reproduced here.
"""

import os

from vit_jax.train.config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'finetune_vit_b16.py'))
    c.init_from.update(path='', format='vit_jax', posemb_resize='bilinear')  # the MPP workdir
    return c
