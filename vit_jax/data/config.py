"""The augmentation settings of the training configs, with the vision_transformer fine-tuning defaults.

DeiT's recipe (Touvron et al. 2021, timm's ``create_transform``) overrides them as::

    interpolation='bicubic', randaugment_magnitude=9, random_erasing=0.25, mixup_alpha=0.8, cutmix_alpha=1.0,
    label_smoothing=0.1, normalization='imagenet'
"""

from __future__ import annotations

import ml_collections

CROPS = ('inception', 'resize', 'random_crop_pad')
NORMALIZATIONS = ('inception', 'imagenet')
INTERPOLATIONS = ('bilinear', 'bicubic')


def default_augment_config() -> ml_collections.ConfigDict:
    """``config.augment`` with every field the pipeline reads (see ``vit_jax.data`` for their meaning)."""
    return ml_collections.ConfigDict(dict(
        crop='inception',
        crop_scale=(0.08, 1.0),
        flip=True,
        randaugment_num_layers=2,
        randaugment_magnitude=0,
        randaugment_magnitude_std=0.5,
        random_erasing=0.0,
        mixup_alpha=0.0,
        cutmix_alpha=0.0,
        mixup_switch_prob=0.5,
        mixup_prob=1.0,
        label_smoothing=0.0,
        crop_pct=0.875,
        normalization='inception',
        interpolation='bilinear',  # added: the resize kernel of crops; DeiT resizes bicubic
    ))


def check_augment_config(augment: ml_collections.ConfigDict) -> None:
    """Fails early, with the allowed values, on a misspelt choice (rather than deep inside a tf.data graph)."""
    for field, allowed in [('crop', CROPS), ('normalization', NORMALIZATIONS), ('interpolation', INTERPOLATIONS)]:
        value = augment.get(field, allowed[0])
        if value not in allowed:
            raise ValueError(f'config.augment.{field}={value!r}; expected one of {allowed}.')
