"""Fine-tune ViT-B/16 at 384 px, as google-research/vision_transformer does (``vit_jax/configs/common.py``,
``input_pipeline.py``, ``train.py``).

    python -m vit_jax.main --config configs/finetune_vit_b16.py --workdir workdirs/finetune_vit_b16 \
        --config.init_from.path=/path/to/imagenet21k/ViT-B_16.npz --config.data_dir=DATA_DIR

Dataset: ``imagenet2012`` prepared with TFDS (``--config.dataset=cifar10 --config.train_split='train[:98%]'
--config.eval_split=test --config.total_steps=10000`` for the small transfer tasks, as its DATASET_PRESETS).
Weights: the original ImageNet-21k ``ViT-B_16.npz`` (its pre-logits layer is dropped, the head is replaced by a
zero-initialised one, the 14x14 position grid is resized bilinearly to 24x24).
Expected (the source's published number, vision_transformer README, ViT-B/16 ImageNet-21k -> ImageNet at 384): ~84%
top-1; ~12 h on a TPUv3-8. Not reproduced here.
"""

from vit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model_name = 'vit_b16'
    c.model.update(dropout_rate=0.0, drop_path_rate=0.0)  # configs/models.py: dropout_rate 0.0 when fine-tuning
    c.init_from.update(path='', format='auto', posemb_resize='bilinear')  # checkpoint.py: scipy zoom(order=1)
    c.dataset = 'imagenet2012'
    c.train_split, c.eval_split = 'train[:99%]', 'validation'  # DATASET_PRESETS['imagenet2012']
    c.image_size = 384  # pp.crop
    c.batch_size = 512  # config.batch (accum_steps=8 only saves memory: --config.optimizer.microbatches=8)
    c.eval_batch_size = 512  # config.batch_eval
    c.shuffle_buffer = 50_000  # config.shuffle_buffer
    c.augment.update(
        crop='inception', crop_scale=(0.05, 1.0), crop_ratio=(0.75, 1.33), flip=True,  # input_pipeline.py (train)
        interpolation='bilinear', antialias=False, jpeg_dct_method='',  # tf.image.resize's defaults
        randaugment_magnitude=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0,
        repeated_augmentation=1, normalization='inception',  # (im - 127.5) / 127.5
        eval_resize='square', eval_interpolation='', crop_pct=1.0)  # eval: tf.image.resize(im, [crop, crop])
    c.optimizer.update(
        name='sgd', momentum=0.9, nesterov=False, mu_dtype='bfloat16',  # train.py; common.py optim_dtype
        learning_rate=0.03, weight_decay=0.0,  # config.base_lr; no weight decay
        warmup_steps=500, schedule='cosine', end_learning_rate=0.0, warmup_init_learning_rate=0.0,  # warmup_steps
        grad_clip_norm=1.0)  # config.grad_norm_clip
    c.total_steps = 20_000  # DATASET_PRESETS['imagenet2012']['total_steps']
    c.log_every = 50
    c.eval_every = 2_000
    c.checkpoint_every = 1_000
    return c
