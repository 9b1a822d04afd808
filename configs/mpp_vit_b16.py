"""ViT-B/16 self-supervised pretraining by masked patch prediction (ViT paper, section 4.6 and appendix B.1.2).

    python -m vit_jax.main --config configs/mpp_vit_b16.py --workdir workdirs/mpp_vit_b16 --config.data_dir=DATA_DIR

Objective: corrupt 50% of each image's patch embeddings (80% [mask], 10% another patch, 10% kept) and predict each
corrupted patch's mean colour in 3 bits per channel (512 classes); ``--config.mpp.target=downsampled|pixels`` are
the paper's alternatives. Labels are not used; the log reports the masked loss on the eval split and linear
few-shot accuracies of the frozen encoder (``vit_jax.fewshot``).
Recipe (appendix B.1.2): Adam, lr 2e-4, 10k warmup steps then cosine decay, batch 4096, 1M steps; the paper's
data are JFT-300M, ImageNet-21k here (the vit_b16 pretraining set); inception crop + flip at 224. Weight decay,
dropout and clipping are not stated for MPP: table 3's ImageNet-21k pretraining values are kept.
Expected: 79.9% ImageNet top-1 after fine-tuning (configs/finetune_from_mpp.py): +2% over training from scratch,
4% behind supervised pretraining (the paper's number, JFT pretraining); not reproduced here.
"""

from vit_jax.train.config import base_config, vit_pretrain_recipe


def get_config():
    c = vit_pretrain_recipe(base_config())
    c.model_name = 'vit_b16'
    c.objective = 'masked_patch_prediction'
    c.mpp.update(target='mean_colour', corruption_rate=0.5, mask_prob=0.8, random_prob=0.1, bits=3)  # B.1.2
    c.optimizer.update(learning_rate=2e-4, warmup_steps=10_000, schedule='cosine', end_learning_rate=0.0)  # B.1.2
    c.batch_size = 4096  # B.1.2
    c.total_steps = 1_000_000  # B.1.2: 1M steps
    c.augment.update(crop='inception', flip=True)  # vision_transformer's pretraining crop + flip
    c.fewshot.enabled = 'auto'  # self-supervised: few-shot accuracy at every eval
    return c
