"""RandAugment (Cubuk et al. 2020) in stateless TensorFlow, with the op set of either source.

'timm_increasing' is DeiT's: timm's ``rand-m9-mstd0.5-inc1``, described below. 'big_vision' is big_vision's
``randaug(2,10)`` (pp/autoaugment.py::distort_image_with_randaugment, TF's EfficientNet autoaugment.py): see
``_big_vision_ops``.

Each of ``num_layers`` layers picks one of 15 ops uniformly (with replacement) and applies it with probability 0.5,
at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]. The ops and their magnitude -> argument
maps are timm's "increasing" set (``_RAND_INCREASING_TRANSFORMS``): a larger magnitude is always a stronger
distortion, and signed ops (rotate, shear, translate, enhance) take a random sign. The PIL ops are re-implemented
on uint8 tensors following PIL's definitions; geometric ops interpolate bilinearly (PIL: the configured
resampling) and fill uncovered pixels with ``fill``, the dataset's mean colour, as timm's ``img_mean``.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

from vit_jax import console

tf = console.tensorflow()

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes run over [0, 10]
APPLY_PROBABILITY = 0.5  # timm's AugmentOp prob for RandAugment


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL's ImageEnhance: ``degenerate + factor * (image - degenerate)``, clipped; factor > 1 extrapolates."""
    degenerate = tf.cast(degenerate, tf.float32)
    blended = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
    return tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
    return tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))  # PIL's L: 0.299 R + 0.587 G + 0.114 B


def _transform(image: tf.Tensor, matrix: Sequence[tf.Tensor], fill: tf.Tensor,
               interpolation: str = 'BILINEAR') -> tf.Tensor:
    """PIL's ``Image.transform(AFFINE, matrix)``: output pixel (x, y) samples input (a x + b y + c, d x + e y + f).

    Uncovered pixels take the colour ``fill``: the op fills with 0, so it transforms ``image - fill`` and adds
    ``fill`` back (bilinear sampling is linear, so edge pixels blend with the fill colour as in PIL).
    """
    transforms = tf.cast(tf.stack(list(matrix) + [0.0, 0.0]), tf.float32)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=(tf.cast(image, tf.float32) - fill)[None], transforms=transforms, output_shape=tf.shape(image)[:2],
        fill_value=0.0, interpolation=interpolation, fill_mode='CONSTANT')[0]
    return tf.cast(tf.clip_by_value(tf.round(out + fill), 0.0, 255.0), tf.uint8)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
    """Per channel, stretches [min, max] to [0, 255] (PIL ImageOps.autocontrast, cutoff 0)."""
    low = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float32)
    high = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float32)
    # A flat channel stays as it is. (Per-channel parameters, not a select against a broadcast condition: faster.)
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1.0), 1.0)
    low = tf.where(high > low, low, 0.0)
    return tf.cast(tf.clip_by_value((tf.cast(image, tf.float32) - low) * scale, 0.0, 255.0), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """Per-channel histogram equalisation, PIL's ImageOps.equalize algorithm."""
    x = tf.cast(image, tf.int32)
    flat = tf.reshape(x + 256 * tf.range(3), [-1])  # channel c's values at [256 c, 256 c + 256)
    histogram = tf.reshape(tf.math.bincount(flat, minlength=768, maxlength=768), [3, 256])
    brightest = tf.gather(histogram, tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.int32), batch_dims=1)
    step = (tf.reduce_sum(histogram, axis=1) - brightest)[:, None] // 255
    lut = (tf.cumsum(histogram, axis=1, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.where(step > 0, tf.minimum(lut, 255), tf.range(256))  # PIL: step 0 leaves the channel as it is
    return tf.cast(tf.reshape(tf.gather(tf.reshape(lut, [-1]), flat), tf.shape(x)), tf.uint8)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """Blend with PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13), the border pixels left unfiltered."""
    x = tf.cast(image, tf.float32)
    kernel = tf.tile(tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])[:, :, None, None] / 13.0,
                     [1, 1, 3, 1])
    smooth = tf.round(tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'VALID')[0])
    inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0
    degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), x)
    return _blend(degenerate, image, factor)


def _ops(fill: tf.Tensor) -> list[Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]]:
    """timm's increasing ops as ``op(image, level in [0, 1], sign +-1)``, with timm's level -> argument maps."""

    def enhance_factor(level, sign):
        return 1.0 + 0.9 * level * sign  # _enhance_increasing_level_to_arg

    def rotate(image, level, sign):
        # PIL's rotate (counter-clockwise, about the centre), up to 30 degrees.
        angle = math.pi / 180 * 30.0 * level * sign
        height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
        cos, sin = tf.cos(angle), tf.sin(angle)
        x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2
        y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2
        return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset], fill)

    def posterize(image, level, sign):
        bits = 4 - tf.cast(tf.floor(4 * level), tf.int32)  # keeps 4 bits at level 0, none at 10
        mask = 256 - tf.bitwise.left_shift(1, 8 - bits)
        return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)

    def solarize(image, level, sign):
        threshold = 256 - tf.cast(tf.floor(256 * level), tf.int32)  # inverts nothing at level 0, all at 10
        x = tf.cast(image, tf.int32)
        return tf.cast(tf.where(x < threshold, x, 255 - x), tf.uint8)

    def solarize_add(image, level, sign):
        x = tf.cast(image, tf.int32)
        added = tf.minimum(x + tf.cast(tf.floor(110 * level), tf.int32), 255)
        return tf.cast(tf.where(x < 128, added, x), tf.uint8)

    def color(image, level, sign):
        return _blend(tf.tile(tf.round(_grayscale(image)), [1, 1, 3]), image, enhance_factor(level, sign))

    def contrast(image, level, sign):
        mean = tf.floor(tf.reduce_mean(_grayscale(image)) + 0.5)  # PIL: int(mean + 0.5) of the L image
        return _blend(tf.fill(tf.shape(image), mean), image, enhance_factor(level, sign))

    def brightness(image, level, sign):
        return _blend(tf.zeros_like(image), image, enhance_factor(level, sign))

    def shear_x(image, level, sign):
        return _transform(image, [1.0, 0.3 * level * sign, 0.0, 0.0, 1.0, 0.0], fill)

    def shear_y(image, level, sign):
        return _transform(image, [1.0, 0.0, 0.0, 0.3 * level * sign, 1.0, 0.0], fill)

    def translate_x(image, level, sign):  # TranslateXRel: up to 45 % of the width
        pixels = 0.45 * level * sign * tf.cast(tf.shape(image)[1], tf.float32)
        return _transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill)

    def translate_y(image, level, sign):
        pixels = 0.45 * level * sign * tf.cast(tf.shape(image)[0], tf.float32)
        return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill)

    return [
        lambda image, level, sign: auto_contrast(image),
        lambda image, level, sign: equalize(image),
        lambda image, level, sign: 255 - image,  # Invert
        rotate, posterize, solarize, solarize_add, color, contrast, brightness,
        lambda image, level, sign: sharpness(image, enhance_factor(level, sign)),
        shear_x, shear_y, translate_x, translate_y,
    ]


def _truncating_blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """autoaugment.py::blend: ``degenerate + factor * (image - degenerate)``, clipped, cast to uint8 (truncating)."""
    degenerate = tf.cast(degenerate, tf.float32)
    blended = degenerate + factor * (tf.cast(image, tf.float32) - degenerate)
    return tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)


def _tf_grayscale(image: tf.Tensor) -> tf.Tensor:
    """tf.image.rgb_to_grayscale of a uint8 image: weighted in [0, 1], back to uint8 by x * 255.5, truncated."""
    gray = tf.tensordot(tf.cast(image, tf.float32) / 255.0, tf.constant([0.2989, 0.5870, 0.1140]), [[2], [0]])
    return tf.cast(tf.clip_by_value(gray * 255.5, 0.0, 255.0), tf.uint8)[..., None]


def _big_vision_ops(fill: tf.Tensor) -> list[Callable[[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]]:
    """big_vision's 16 ops in its order, as ``op(image, level in [0, 1], sign +-1, key)``, with its level maps.

    Its quirks are kept: the enhance ops' factor is 0.1 + 1.8 level (no sign), Contrast blends with the pixel COUNT
    / 256 (its "mean"), Solarize's threshold int(256 level) is cast to uint8 (256 -> 0: at magnitude 10 it inverts
    every pixel), geometric ops sample the nearest pixel (tfa.image's default) and fill with 128, translations are
    up to 100 pixels whatever the size, Cutout pastes a 80 x 80 grey box.
    """
    def enhance(level):
        return 0.1 + 1.8 * level

    def rotate(image, level, sign, key):
        angle = math.pi / 180 * 30.0 * level * sign
        height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
        cos, sin = tf.cos(angle), tf.sin(angle)
        x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2
        y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2
        return _transform(image, [cos, -sin, x_offset, sin, cos, y_offset], fill, 'NEAREST')

    def posterize(image, level, sign, key):
        shift = 8 - tf.cast(tf.floor(4 * level), tf.int32)
        x = tf.cast(image, tf.int32)
        return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(x, shift), shift), tf.uint8)

    def solarize(image, level, sign, key):
        threshold = tf.bitwise.bitwise_and(tf.cast(tf.floor(256 * level), tf.int32), 255)  # TF's uint8 cast
        x = tf.cast(image, tf.int32)
        return tf.cast(tf.where(x < threshold, x, 255 - x), tf.uint8)

    def solarize_add(image, level, sign, key):
        x = tf.cast(image, tf.int32)
        added = tf.clip_by_value(x + tf.cast(tf.floor(110 * level), tf.int32), 0, 255)
        return tf.cast(tf.where(x < 128, added, x), tf.uint8)

    def color(image, level, sign, key):
        return _truncating_blend(tf.tile(_tf_grayscale(image), [1, 1, 3]), image, enhance(level))

    def contrast(image, level, sign, key):
        count = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
        mean = tf.floor(tf.clip_by_value(count / 256.0, 0.0, 255.0))  # sum(histogram) / 256, as the original
        return _truncating_blend(tf.fill(tf.shape(image), mean), image, enhance(level))

    def brightness(image, level, sign, key):
        return _truncating_blend(tf.zeros_like(image), image, enhance(level))

    def sharpness(image, level, sign, key):
        x = tf.cast(image, tf.float32)
        kernel = tf.tile(tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]])[:, :, None, None] / 13.0,
                         [1, 1, 3, 1])
        smooth = tf.floor(tf.clip_by_value(tf.nn.depthwise_conv2d(x[None], kernel, [1, 1, 1, 1], 'VALID')[0],
                                           0.0, 255.0))
        inner = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0
        degenerate = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), x)
        return _truncating_blend(degenerate, image, enhance(level))

    def shear_x(image, level, sign, key):
        return _transform(image, [1.0, 0.3 * level * sign, 0.0, 0.0, 1.0, 0.0], fill, 'NEAREST')

    def shear_y(image, level, sign, key):
        return _transform(image, [1.0, 0.0, 0.0, 0.3 * level * sign, 1.0, 0.0], fill, 'NEAREST')

    def translate_x(image, level, sign, key):
        return _transform(image, [1.0, 0.0, 100.0 * level * sign, 0.0, 1.0, 0.0], fill, 'NEAREST')

    def translate_y(image, level, sign, key):
        return _transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, 100.0 * level * sign], fill, 'NEAREST')

    def cutout(image, level, sign, key):
        pad = tf.cast(tf.floor(40 * level), tf.int32)
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        row_key, col_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        centre = (tf.random.stateless_uniform([], row_key, 0, height, dtype=tf.int32),
                  tf.random.stateless_uniform([], col_key, 0, width, dtype=tf.int32))
        rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
        inside = ((rows >= centre[0] - pad) & (rows < centre[0] + pad) & (cols >= centre[1] - pad)
                  & (cols < centre[1] + pad))
        return tf.where(inside[..., None], tf.cast(fill, tf.uint8), image)

    return [
        lambda image, level, sign, key: auto_contrast(image),
        lambda image, level, sign, key: equalize(image),
        lambda image, level, sign, key: 255 - image,
        rotate, posterize, solarize, color, contrast, brightness, sharpness, shear_x, shear_y, translate_x,
        translate_y, cutout, solarize_add,
    ]


def randaugment(image: tf.Tensor, key: tf.Tensor, *, num_layers: int, magnitude: float, magnitude_std: float,
                fill: Sequence[float], ops: str = 'timm_increasing') -> tf.Tensor:
    """uint8 (h, w, 3) -> uint8 (h, w, 3), every random choice drawn from ``key``.

    'big_vision': every layer applies its op (the original draws a probability per op but never uses it), at
    exactly ``magnitude`` (no noise), with the grey fill 128.
    """
    if ops == 'big_vision':
        bv_ops = _big_vision_ops(tf.constant([128.0, 128.0, 128.0]))
        level = tf.constant(min(max(float(magnitude), 0.0), MAX_LEVEL) / MAX_LEVEL)
        for layer_key in tf.unstack(tf.random.experimental.stateless_split(key, num_layers)):
            op_key, sign_key, op_random_key = tf.unstack(tf.random.experimental.stateless_split(layer_key, 3))
            op = tf.random.stateless_uniform([], op_key, 0, len(bv_ops), dtype=tf.int32)
            sign = tf.where(tf.random.stateless_uniform([], sign_key) < 0.5, -1.0, 1.0)
            image = tf.switch_case(op, [functools.partial(op_fn, image, level, sign, op_random_key)
                                        for op_fn in bv_ops])
        return image
    ops = _ops(tf.constant(fill, tf.float32))
    for layer_key in tf.unstack(tf.random.experimental.stateless_split(key, num_layers)):
        op_key, apply_key, magnitude_key, sign_key = tf.unstack(tf.random.experimental.stateless_split(layer_key, 4))
        op = tf.random.stateless_uniform([], op_key, 0, len(ops), dtype=tf.int32)
        level = magnitude + magnitude_std * tf.random.stateless_normal([], magnitude_key)
        level = tf.clip_by_value(level, 0.0, MAX_LEVEL) / MAX_LEVEL
        sign = tf.where(tf.random.stateless_uniform([], sign_key) < 0.5, -1.0, 1.0)
        branches = [functools.partial(op_fn, image, level, sign) for op_fn in ops]
        image = tf.cond(tf.random.stateless_uniform([], apply_key) < APPLY_PROBABILITY,
                        functools.partial(tf.switch_case, op, branches), functools.partial(tf.identity, image))
    return image
