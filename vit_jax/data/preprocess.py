"""Per-example image transforms: decode, crop, resize, flip, normalise, and random erasing; all stateless.

Every random choice takes an explicit ``key`` (a ``[2]`` int64 seed for ``tf.random.stateless_*``), so an example's
augmentation depends only on its key: the property that makes resuming exact.
"""

from __future__ import annotations

import math

import ml_collections

from vit_jax import console
from vit_jax.data import randaugment

tf = console.tensorflow()

# torchvision's ImageNet statistics, used by DeiT / T2T-ViT (timm's IMAGENET_DEFAULT_MEAN / STD).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RATIO_RANGE = (3 / 4, 4 / 3)  # the aspect ratios of the inception crop (Szegedy et al. 2015; timm, big_vision)


def _decode(encoded: tf.Tensor, window_fn=None, dct_method: str = '') -> tf.Tensor:
    """uint8 (h, w, 3) of a JPEG / PNG / ..., cropped to ``window_fn(shape) -> (top, left, height, width)``.

    JPEGs are decoded inside the window only (``decode_and_crop_jpeg``, as big_vision does): an inception crop keeps
    8..100 % of the image, so this skips much of the decoding work on ImageNet. ``dct_method='INTEGER_ACCURATE'``
    decodes as libjpeg's default ISLOW, which PIL uses: the same pixels as DeiT's / timm's loader (big_vision's
    ``decode(precise=True)``); TF's default fast DCT differs from it by ~1/255 on average.
    """
    def jpeg() -> tf.Tensor:
        if window_fn is None:
            return tf.io.decode_jpeg(encoded, channels=3, dct_method=dct_method)
        window = window_fn(tf.io.extract_jpeg_shape(encoded))
        return tf.io.decode_and_crop_jpeg(encoded, tf.stack(window), channels=3, dct_method=dct_method)

    def other() -> tf.Tensor:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        if window_fn is None:
            return image
        top, left, height, width = window_fn(tf.shape(image))
        return tf.image.crop_to_bounding_box(image, top, left, height, width)

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def _resize(image: tf.Tensor, size, method: str, antialias: bool = False) -> tf.Tensor:
    """float32 in [0, 255]; bicubic overshoots, hence the clip. ``antialias``: PIL's resize (timm, DeiT, T2T)
    widens the kernel when it downsamples; TF's resize does that only when asked (big_vision's ``antialias``)."""
    return tf.clip_by_value(tf.image.resize(image, size, method=method, antialias=antialias), 0.0, 255.0)


def _inception_window(shape: tf.Tensor, key: tf.Tensor, scale: tuple, ratio: tuple = RATIO_RANGE) -> tuple:
    """timm's RandomResizedCrop window, drawn by TF's (stateless) sampler as big_vision's ``inception_crop`` does."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=key, min_object_covered=0.0, aspect_ratio_range=tuple(ratio),
        area_range=tuple(scale), use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], size[0], size[1]


def normalize(image: tf.Tensor, normalization: str) -> tf.Tensor:
    """[0, 255] -> 'inception': [-1, 1] (vision_transformer, big_vision) | 'imagenet': (x - mean) / std (DeiT)."""
    if normalization == 'inception':
        return image / 127.5 - 1.0
    return (image / 255.0 - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def train_image(encoded: tf.Tensor, key: tf.Tensor, augment: ml_collections.ConfigDict, size: int) -> tf.Tensor:
    """timm's training transform (DeiT): crop -> flip -> RandAugment -> normalise -> random erasing; float32."""
    crop_key, flip_key, randaugment_key, erasing_key = tf.unstack(tf.random.experimental.stateless_split(key, 4))
    method, antialias = augment.get('interpolation', 'bilinear'), augment.get('antialias', False)
    dct_method = augment.get('jpeg_dct_method', '')
    if method == 'random':  # timm's RandomResizedCropAndInterpolation('random'): bilinear or bicubic per image
        method_key = tf.random.experimental.stateless_fold_in(crop_key, 1)
        bicubic = tf.random.stateless_uniform([], method_key) < 0.5
        resize = lambda image, shape, _, aa: tf.cond(  # noqa: E731
            bicubic, lambda: _resize(image, shape, 'bicubic', aa), lambda: _resize(image, shape, 'bilinear', aa))
    else:
        resize = _resize
    if augment.crop == 'inception':
        ratio = augment.get('crop_ratio', RATIO_RANGE)
        image = _decode(encoded, lambda shape: _inception_window(shape, crop_key, augment.crop_scale, ratio),
                        dct_method)
        image = resize(image, (size, size), method, antialias)
    elif augment.crop == 'resize':
        image = resize(_decode(encoded, dct_method=dct_method), (size, size), method, antialias)
    else:  # 'random_crop_pad': torchvision's RandomCrop(padding=4) of the CIFAR ResNets, 4 px at 32 px
        pad = max(size // 8, 1)
        image = resize(_decode(encoded, dct_method=dct_method), (size, size), method, antialias)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_key)
    if augment.flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
    if augment.randaugment_magnitude > 0:
        # Like timm, on uint8 pixels, with the fill colour of the geometric ops the dataset mean.
        mean = IMAGENET_MEAN if augment.normalization == 'imagenet' else (0.5, 0.5, 0.5)
        image = randaugment.randaugment(
            tf.cast(tf.round(image), tf.uint8), randaugment_key, num_layers=augment.randaugment_num_layers,
            magnitude=augment.randaugment_magnitude, magnitude_std=augment.randaugment_magnitude_std,
            fill=[round(255 * m) for m in mean], ops=augment.get('randaugment_ops', 'timm_increasing'))
        image = tf.cast(image, tf.float32)
    image = normalize(image, augment.normalization)
    if augment.random_erasing > 0:
        image = random_erasing(image, erasing_key, augment.random_erasing)
    return image


def eval_image(encoded: tf.Tensor, augment: ml_collections.ConfigDict, size: int) -> tf.Tensor:
    """The evaluation image of ``augment.eval_resize``'s source, normalised; float32 (size, size, 3).

    'timm'        DeiT / T2T / timm: torchvision ``Resize(floor(size / crop_pct))`` on the PIL image (the shorter
                  side to that size, the longer to ``int(short * long / short_side)``), as uint8 like PIL, then
                  ``CenterCrop(size)`` at offsets ``int(round((h - size) / 2))``. With ``antialias`` and bicubic
                  interpolation this is PIL's resize within ~0.3/255 (tests/test_data.py).
    'big_vision'  ``decode|resize_small(floor(size / crop_pct))|central_crop(size)``: both sides scaled by the same
                  factor and rounded (pp/ops_image.py::_resize_factor), back to uint8 (a truncating cast), offsets
                  ``(h - size) // 2``.
    'square'      vision_transformer's evaluation (input_pipeline.py): ``tf.image.resize`` straight to (size, size).
    """
    mode = augment.get('eval_resize', 'timm')
    method = augment.get('eval_interpolation') or augment.get('interpolation', 'bilinear')
    method = 'bicubic' if method == 'random' else method  # timm evaluates 'random' models bicubic
    antialias = augment.get('antialias', False)
    image = _decode(encoded, dct_method=augment.get('jpeg_dct_method', ''))
    if mode == 'square':
        return normalize(_resize(image, (size, size), method, antialias), augment.normalization)
    scaled = math.floor(size / augment.crop_pct)
    shape = tf.cast(tf.shape(image)[:2], tf.int64)
    short = tf.reduce_min(shape)
    if mode == 'big_vision':
        factor = tf.cast(scaled, tf.float32) / tf.cast(short, tf.float32)
        new_shape = tf.cast(tf.round(tf.cast(shape, tf.float32) * factor), tf.int32)
        image = tf.cast(tf.cast(_resize(image, new_shape, method, antialias), tf.uint8), tf.float32)
        top, left = (new_shape[0] - size) // 2, (new_shape[1] - size) // 2
    else:
        # torchvision's _compute_resized_output_size: int(scaled * long / short), exact in integers.
        new_shape = tf.cast(tf.where(shape == short, tf.constant(scaled, tf.int64), shape * scaled // short), tf.int32)
        image = tf.round(_resize(image, new_shape, method, antialias))  # PIL returns uint8, rounded
        # int(round(x)) of Python rounds halves to even, as tf.round does.
        top = tf.cast(tf.round(tf.cast(new_shape[0] - size, tf.float32) / 2), tf.int32)
        left = tf.cast(tf.round(tf.cast(new_shape[1] - size, tf.float32) / 2), tf.int32)
    image = image[top:top + size, left:left + size]
    image.set_shape([size, size, 3])
    return normalize(image, augment.normalization)


def random_erasing(image: tf.Tensor, key: tf.Tensor, probability: float) -> tf.Tensor:
    """timm's RandomErasing(mode='pixel', max_count=1) of DeiT, on the normalised image.

    With ``probability``, a box of 2..33 % of the area and aspect ratio 0.3..3.3 is filled with N(0, 1) noise; like
    timm, 10 boxes are drawn and the first that fits inside the image is used (none fits: nothing is erased).
    """
    apply_key, area_key, ratio_key, top_key, left_key, noise_key = tf.unstack(
        tf.random.experimental.stateless_split(key, 6))
    height, width = image.shape[0], image.shape[1]
    area = tf.random.stateless_uniform([10], area_key, 0.02, 1 / 3) * (height * width)
    ratio = tf.exp(tf.random.stateless_uniform([10], ratio_key, math.log(0.3), math.log(1 / 0.3)))
    heights = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
    widths = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
    fits = (heights < height) & (widths < width)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    box_h, box_w = heights[first], widths[first]
    # timm's random.randint(0, height - box_h), both ends included.
    top = tf.cast(tf.random.stateless_uniform([], top_key) * tf.cast(height - box_h + 1, tf.float32), tf.int32)
    left = tf.cast(tf.random.stateless_uniform([], left_key) * tf.cast(width - box_w + 1, tf.float32), tf.int32)
    erase = fits[first] & (tf.random.stateless_uniform([], apply_key) < probability)

    def erased() -> tf.Tensor:
        noise = tf.random.stateless_normal([1, box_h, box_w, 3], noise_key)
        return paste(image[None], noise, top, left)[0]

    return tf.cond(erase, erased, lambda: image)


def paste(images: tf.Tensor, patches: tf.Tensor, top: tf.Tensor, left: tf.Tensor) -> tf.Tensor:
    """(B, H, W, C) ``images`` with the (B, h, w, C) ``patches`` at rows top.., columns left...

    Slices and concats, not a select against a broadcast (H, W) mask: the select touches every pixel of the batch.
    """
    bottom, right = top + tf.shape(patches)[1], left + tf.shape(patches)[2]
    middle = tf.concat([images[:, top:bottom, :left], patches, images[:, top:bottom, right:]], axis=2)
    pasted = tf.concat([images[:, :top], middle, images[:, bottom:]], axis=1)
    pasted.set_shape(images.shape)  # the slices lost it; jit and the batch-level ops want it
    return pasted
