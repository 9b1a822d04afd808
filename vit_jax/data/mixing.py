"""Batch-level soft targets: label smoothing, and mixup (Zhang et al. 2018) / cutmix (Yun et al. 2019).

A port of timm's ``Mixup(mode='batch', correct_lam=True)``, DeiT's setting: with probability ``mixup_prob`` the
batch is mixed with itself reversed, by cutmix with probability ``mixup_switch_prob`` (when both alphas are on),
else by mixup, with one lambda ~ Beta(alpha, alpha) per batch. The targets mix with the same lambda, which for
cutmix is corrected to the pasted box's actual area.
"""

from __future__ import annotations

import ml_collections

from vit_jax import console
from vit_jax.data import preprocess

tf = console.tensorflow()


def smooth_one_hot(labels: tf.Tensor, num_classes: int, smoothing: float) -> tf.Tensor:
    """timm's targets: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
    off = smoothing / num_classes
    return tf.one_hot(labels, num_classes, on_value=1.0 - smoothing + off, off_value=off)


def _beta(key: tf.Tensor, alpha: float) -> tf.Tensor:
    a, b = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    x, y = tf.random.stateless_gamma([], a, alpha), tf.random.stateless_gamma([], b, alpha)
    return x / tf.maximum(x + y, 1e-12)


def _cutmix_box(key: tf.Tensor, lam: tf.Tensor, height: int, width: int) -> tuple[tuple, tf.Tensor]:
    """timm's ``rand_bbox``: a box of side ratio sqrt(1 - lam) centred uniformly, clipped to the image.

    Returns the box (top, bottom, left, right) and the corrected lambda, 1 - its area fraction.
    """
    y_key, x_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    cut = tf.sqrt(1.0 - lam)
    cut_h, cut_w = tf.cast(height * cut, tf.int32), tf.cast(width * cut, tf.int32)
    center_y = tf.random.stateless_uniform([], y_key, 0, height, dtype=tf.int32)
    center_x = tf.random.stateless_uniform([], x_key, 0, width, dtype=tf.int32)
    top, bottom = tf.clip_by_value(center_y - cut_h // 2, 0, height), tf.clip_by_value(center_y + cut_h // 2, 0, height)
    left, right = tf.clip_by_value(center_x - cut_w // 2, 0, width), tf.clip_by_value(center_x + cut_w // 2, 0, width)
    area = tf.cast((bottom - top) * (right - left), tf.float32)
    return (top, bottom, left, right), 1.0 - area / (height * width)


def _cut_and_paste(images: tf.Tensor, box: tuple) -> tf.Tensor:
    top, bottom, left, right = box
    return preprocess.paste(images, tf.reverse(images[:, top:bottom, left:right], [0]), top, left)


def mix(images: tf.Tensor, targets: tf.Tensor, key: tf.Tensor,
        augment: ml_collections.ConfigDict) -> tuple[tf.Tensor, tf.Tensor]:
    """(B, H, W, C) images and (B, classes) targets -> the same, mixed with the batch reversed."""
    mixup_on, cutmix_on = augment.mixup_alpha > 0, augment.cutmix_alpha > 0
    if not (mixup_on or cutmix_on):
        return images, targets
    apply_key, switch_key, mixup_key, cutmix_key, box_key = tf.unstack(tf.random.experimental.stateless_split(key, 5))
    mixup_lam = _beta(mixup_key, augment.mixup_alpha) if mixup_on else tf.constant(1.0)
    box, cutmix_lam = (0, 0, 0, 0), tf.constant(1.0)
    if cutmix_on:
        box, cutmix_lam = _cutmix_box(box_key, _beta(cutmix_key, augment.cutmix_alpha), *images.shape[1:3])
    use_cutmix = tf.constant(cutmix_on)
    if mixup_on and cutmix_on:
        use_cutmix = tf.random.stateless_uniform([], switch_key) < augment.mixup_switch_prob
    apply = tf.random.stateless_uniform([], apply_key) < augment.mixup_prob
    # Branch 0 leaves the batch as it is, 1 mixes it up, 2 cuts and pastes; only the chosen one runs.
    branch = tf.where(apply, tf.where(use_cutmix, 2, 1), 0)
    images = tf.switch_case(branch, [
        lambda: images,
        lambda: mixup_lam * images + (1.0 - mixup_lam) * tf.reverse(images, [0]),
        lambda: _cut_and_paste(images, box),
    ])
    lam = tf.gather([1.0, mixup_lam, cutmix_lam], branch)
    return images, lam * targets + (1.0 - lam) * tf.reverse(targets, [0])
