"""Fine-tune an MAE-pretrained ViT-B/16 (configs/mae_vit_b16.py) on ImageNet-1k (facebookresearch/mae FINETUNE.md).

    python -m vit_jax.main --config configs/finetune_from_mae.py --workdir workdirs/finetune_from_mae \
        --config.init_from.path=workdirs/mae_vit_b16

The encoder comes from the MAE workdir (its decoder is dropped, the log says so). Recipe (main_finetune.py for
ViT-B): 100 epochs, batch 1024, lr = blr 5e-4 x 1024 / 256, layer-wise lr decay 0.65 (util/lr_decay.py), AdamW
(0.9, 0.999), weight decay 0.05, 5 warmup epochs then cosine to 1e-6 per iteration, drop path 0.1, label smoothing
0.1, RandAugment m9 mstd0.5, random erasing 0.25, mixup 0.8 / cutmix 1.0; eval resize 256 bicubic + crop 224.
Differs from the source: its global pooling normalises after the mean (``fc_norm``) where our ``gap`` normalises
before it, and its head starts at trunc_normal(2e-5), ours at zero.
Expected: 83.6% ImageNet top-1 (MAE table 3, ViT-B, 800-epoch pretraining: FINETUNE.md); not reproduced here.
"""

from vit_jax.train.config import IMAGENET_TRAIN_EXAMPLES, base_config, deit_recipe


def get_config():
    epochs, batch, warmup_epochs = 100, 1024, 5  # --epochs 100 --batch_size 32 x 32 GPUs --warmup_epochs 5
    c = deit_recipe(base_config(), epochs=epochs, batch_size=batch, warmup_epochs=warmup_epochs)
    c.model_name = 'deit_b16'
    c.model.update(posemb='sincos2d', classifier='gap', drop_path_rate=0.1)  # --global_pool; --drop_path 0.1
    c.init_from.update(path='', format='vit_jax')
    c.augment.update(repeated_augmentation=1)  # main_finetune.py has no repeated augmentation
    c.optimizer.update(
        name='adamw', learning_rate=5e-4 * batch / 256, b1=0.9, b2=0.999,  # --blr 5e-4
        weight_decay=0.05, weight_decay_mode='lr', layer_decay=0.65,  # --weight_decay 0.05 --layer_decay 0.65
        schedule='cosine', warmup_steps=warmup_epochs * (IMAGENET_TRAIN_EXAMPLES // batch),
        warmup_init_learning_rate=0.0, end_learning_rate=1e-6, grad_clip_norm=0.0)  # --min_lr 1e-6; lr_sched.py
    return c
