"""The input pipeline: TFDS datasets through tf.data, exactly resumable, sharded per host, in numpy batches.

    info = dataset_info(config)                                 # classes and split sizes; clear errors
    for batch in train_iterator(config, seed=0, start_step=s):  # {'images', 'labels' (soft targets)}, forever
    for batch in eval_iterator(config):                         # {'images', 'labels', 'mask'}, one padded pass

The config fields it reads:

    dataset          a TFDS name ('imagenet2012', 'cifar10', 'oxford_iiit_pet', ...), 'sklearn_digits' (bundled,
                     prepared in data_dir on first use), or 'folder:/root' (/root/<split>/<class>/<image>)
    data_dir         the TFDS data_dir (None: TFDS's default)
    train_split, eval_split          TFDS splits, slices allowed ('train[:98%]')
    image_size, batch_size, eval_batch_size (global), shuffle_buffer (records; per host)
    augment          ``default_augment_config()``:
        crop                 'inception' (random resized crop, area crop_scale, ratio 3/4..4/3) | 'resize' |
                             'random_crop_pad' (resize, pad size // 8, random crop: CIFAR's 4 px at 32 px)
        crop_scale           area range of the inception crop
        flip                 random horizontal flip
        randaugment_num_layers, randaugment_magnitude (0: off), randaugment_magnitude_std: timm's RandAugment
        random_erasing       probability of timm's RandomErasing (pixel mode)
        mixup_alpha, cutmix_alpha, mixup_switch_prob, mixup_prob: timm's batch Mixup (an alpha of 0: off)
        label_smoothing      timm's smoothing of the (mixed) one-hot targets
        crop_pct             eval: resize to floor(image_size / crop_pct), center crop image_size
        normalization        'inception' (x / 127.5 - 1) | 'imagenet' ((x / 255 - mean) / std)
        interpolation        (added) 'bilinear' | 'bicubic': the resize of train crops and eval images

Whichever of its modules imports TensorFlow first hides any GPU from it (``console.tensorflow``): it only feeds JAX.
"""

from typing import Any

from vit_jax.data.config import default_augment_config

__all__ = ['DatasetInfo', 'batch_shapes', 'dataset_info', 'default_augment_config', 'eval_iterator',
           'steps_per_epoch', 'train_iterator']

# TensorFlow (~5 s to import) loads only when data are read, so that configs and CLI errors come first.
# What a compile reads (the batch arithmetic, a dataset's classes and sizes) loads none of it.
_LAZY = {'batch_shapes': 'batches', 'steps_per_epoch': 'batches', 'DatasetInfo': 'sources', 'dataset_info': 'sources',
         'eval_iterator': 'pipeline', 'train_iterator': 'pipeline'}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f'vit_jax.data.{_LAZY[name]}'), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
