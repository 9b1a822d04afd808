"""T2T-ViT-14 on ImageNet-1k: yitu-opensource/T2T-ViT ``main.py`` (timm 0.3's train.py) defaults with its README's
command (``distributed_train.sh 8 ... --model t2t_vit_14 -b 64 --lr 5e-4 --weight-decay .05 --amp --img-size 224``).

    python -m vit_jax.main --config configs/t2t_vit_14.py --workdir workdirs/t2t_vit_14 --config.data_dir=DATA_DIR

Dataset: ``imagenet2012`` prepared with TFDS (see configs/vit_s16.py).
Expected (the source's published number, T2T-ViT README / paper table): 81.5% top-1, 8 GPUs. Not reproduced here.
Differences from the source: ``python -m vit_jax.recipes``.
"""

from vit_jax.train.config import IMAGENET_TRAIN_EXAMPLES, base_config, deit_recipe


def get_config():
    c = deit_recipe(base_config(), epochs=310, batch_size=512, warmup_epochs=10)  # DeiT's augmentation, then:
    c.model_name = 't2t_vit_14'
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // 512  # -b 64 on 8 GPUs
    c.augment.update(
        interpolation='random',  # --train-interpolation random: bilinear or bicubic per image
        repeated_augmentation=1,  # timm's train.py has no repeated-augmentation sampler
        eval_interpolation='bicubic', crop_pct=0.9)  # the models' default_cfg: crop_pct 0.9, bicubic
    c.optimizer.update(
        learning_rate=5e-4,  # --lr 5e-4, not scaled by the batch in timm's train.py
        weight_decay=0.05,  # --weight-decay .05 (timm add_weight_decay; the sinusoid table is frozen)
        warmup_init_learning_rate=1e-6, end_learning_rate=1e-5,  # --warmup-lr 1e-6 --min-lr 1e-5
        warmup_steps=10 * steps_per_epoch,  # --warmup-epochs 10
        cosine_epochs=300,  # --epochs 300: t_initial; the 10 --cooldown-epochs run at min-lr (310 in all)
        schedule_epoch_lag=0,  # train.py: lr_scheduler.step(epoch + 1) after epoch e sets epoch e + 1's rate
        ema_decay=0.99996)  # --model-ema (on by default) --model-ema-decay 0.99996
    c.total_steps = 310 * steps_per_epoch  # create_scheduler: num_epochs = epochs + cooldown_epochs
    return c
