"""The augmentation settings of the training configs, with the vision_transformer fine-tuning defaults.

DeiT's recipe (Touvron et al. 2021, timm's ``create_transform``) overrides them as::

    interpolation='bicubic', randaugment_magnitude=9, random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0,
    label_smoothing=0.1, normalization='imagenet'
"""

from __future__ import annotations

import ml_collections

CROPS = ('inception', 'resize', 'random_crop_pad')
NORMALIZATIONS = ('inception', 'imagenet')
INTERPOLATIONS = ('bilinear', 'bicubic', 'area', 'random')  # 'random': timm's per-image bilinear or bicubic
EVAL_RESIZES = ('timm', 'big_vision', 'square')
DCT_METHODS = ('', 'INTEGER_ACCURATE', 'INTEGER_FAST')
RANDAUGMENT_OPS = ('timm_increasing', 'big_vision')


def default_augment_config() -> ml_collections.ConfigDict:
    """``config.augment`` with every field the pipeline reads (see ``vit_jax.data`` for their meaning)."""
    return ml_collections.ConfigDict(dict(
        crop='inception',
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),  # aspect ratios of the inception crop (big_vision: (0.75, 1.33))
        flip=True,
        randaugment_num_layers=2,  # RandAugment's ops per image
        randaugment_magnitude=0,   # RandAugment's magnitude (timm's m; 0: RandAugment off)
        randaugment_magnitude_std=0.5,  # timm's mstd: the magnitude's per-image noise
        random_erasing=0.0,
        mixup_alpha=0.0,           # timm's batch Mixup: Beta(alpha, alpha), 0 = off
        cutmix_alpha=0.0,          # timm's CutMix: Beta(alpha, alpha), 0 = off
        mixup_switch_prob=0.5,     # with both on: the chance of CutMix for a batch
        mixup_prob=1.0,            # the chance that a batch is mixed at all
        label_smoothing=0.0,
        crop_pct=0.875,
        normalization='inception',
        interpolation='bilinear',  # added: the resize kernel of crops; DeiT resizes bicubic
        eval_interpolation='',     # the eval resize's kernel; '' = interpolation (big_vision evaluates with 'area')
        antialias=False,           # widen the kernel when downsampling, as PIL does (timm, DeiT, T2T)
        jpeg_dct_method='',        # 'INTEGER_ACCURATE': libjpeg's ISLOW, PIL's decode; '': TF's default
        eval_resize='timm',        # 'timm' | 'big_vision' | 'square': see vit_jax.data.preprocess.eval_image
        repeated_augmentation=1,   # DeiT's RASampler: each example this many times per epoch (3), 1 = off
        randaugment_ops='timm_increasing',  # 'timm_increasing' (DeiT) | 'big_vision' (TF autoaugment.py's set)
    ))


def check_augment_config(augment: ml_collections.ConfigDict) -> None:
    """Fails early, with the allowed values, on a misspelt choice (rather than deep inside a tf.data graph)."""
    for field, allowed in [('crop', CROPS), ('normalization', NORMALIZATIONS), ('interpolation', INTERPOLATIONS),
                           ('eval_interpolation', ('',) + INTERPOLATIONS[:-1]),
                           ('eval_resize', EVAL_RESIZES), ('jpeg_dct_method', DCT_METHODS),
                           ('randaugment_ops', RANDAUGMENT_OPS)]:
        value = augment.get(field, allowed[0])
        if value not in allowed:
            raise ValueError(f'config.augment.{field}={value!r}; expected one of {allowed}.')
