"""Fine-tune ViT-B/16 at 384 px, as google-research/vision_transformer does (its ``configs/common.py``).

    python -m vit_jax.main --config configs/finetune_vit_b16.py --workdir workdirs/finetune_vit_b16 \
        --config.init_from.path=/path/to/imagenet21k/ViT-B_16.npz

Dataset: ``imagenet2012`` prepared with TFDS (``--config.dataset=cifar10`` etc. for the small transfer tasks, with
``--config.total_steps=10000``). Weights: the original ImageNet-21k ``ViT-B_16.npz`` (its pre-logits layer is dropped,
the head is replaced by a zero-initialised one, the 14x14 position grid is resized bilinearly to 24x24).
Recipe: SGD momentum 0.9, lr 0.03, batch 512, 500 warmup steps then cosine, global-norm clip 1.0, 20k steps, no
weight decay, inception crop (train) / resize (eval), [-1, 1] inputs.
Expected: ~84.0% ImageNet top-1 (vision_transformer README, ViT-B/16 i21k -> i1k at 384); ~12 h on a TPUv3-8.
"""

from vit_jax.train.config import base_config


def get_config():
    c = base_config()
    c.model_name = 'vit_b16'
    c.init_from.update(path='', format='auto', posemb_resize='bilinear')
    c.dataset = 'imagenet2012'
    c.train_split, c.eval_split = 'train[:99%]', 'validation'
    c.image_size = 384
    c.batch_size = 512
    c.eval_batch_size = 512
    c.augment.update(crop='inception', crop_scale=(0.05, 1.0), flip=True, crop_pct=1.0, normalization='inception')
    c.optimizer.update(name='sgd', learning_rate=0.03, momentum=0.9, weight_decay=0.0, warmup_steps=500,
                       schedule='cosine', grad_clip_norm=1.0)
    c.total_steps = 20_000
    c.log_every = 50
    c.eval_every = 2_000
    c.checkpoint_every = 1_000
    return c
