"""The input pipeline: the bundled digits, exact resume, host shards, eval padding, targets, mocked TFDS datasets,
folders, errors, and the RandAugment ops against PIL. Nothing here downloads."""

from __future__ import annotations

import pathlib

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image, ImageEnhance, ImageOps

from conftest import mock_metadata
from vit_jax import data
from vit_jax.data import mixing, preprocess, randaugment, sources

DEIT_AUGMENT = dict(interpolation='bicubic', randaugment_magnitude=9, random_erasing=0.25, mixup_alpha=0.8,
                    cutmix_alpha=1.0, label_smoothing=0.1, normalization='imagenet')


def make_config(dataset: str, data_dir: str | None, image_size: int = 16, batch_size: int = 64,
                eval_batch_size: int = 100, train_split: str = 'train', eval_split: str = 'test',
                **augment) -> ml_collections.ConfigDict:
    augment_config = data.default_augment_config()
    augment_config.update(augment)
    return ml_collections.ConfigDict(dict(
        dataset=dataset, data_dir=data_dir, train_split=train_split, eval_split=eval_split, image_size=image_size,
        batch_size=batch_size, eval_batch_size=eval_batch_size, shuffle_buffer=2_000, augment=augment_config))


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory) -> str:
    """A data_dir where sklearn_digits is prepared once for the whole module (~5 s)."""
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    data.dataset_info(make_config('sklearn_digits', data_dir))
    return data_dir


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
    return [next(iterator) for _ in range(n)]


# The bundled digits.

def test_digits_builds_with_its_splits(digits_dir):
    info = data.dataset_info(make_config('sklearn_digits', digits_dir))
    assert info == data.DatasetInfo('sklearn_digits', num_classes=10, num_train_examples=1437, num_eval_examples=360)
    assert (pathlib.Path(digits_dir) / 'sklearn_digits' / '1.0.0' / 'dataset_info.json').exists()
    test = list(tfds.builder('sklearn_digits', data_dir=digits_dir).as_dataset('test').as_numpy_iterator())
    images = np.stack([ex['image'] for ex in test])
    assert images.shape == (360, 8, 8, 3) and images.dtype == np.uint8 and images.max() == 255
    assert (images == images[..., :1]).all()  # gray, repeated on 3 channels
    assert set(np.bincount([ex['label'] for ex in test])) <= {35, 36, 37}  # stratified: ~36 of each digit


@pytest.mark.parametrize('normalization, low, high', [
    ('inception', -1.0, 1.0),
    ('imagenet', min((0 - m) / s for m, s in zip(preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)),
     max((1 - m) / s for m, s in zip(preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)))])
def test_train_and_eval_batches(digits_dir, normalization, low, high):
    config = make_config('sklearn_digits', digits_dir, image_size=32, batch_size=128, normalization=normalization)
    batch = next(data.train_iterator(config, seed=0))
    assert batch['images'].shape == (128, 32, 32, 3) and batch['images'].dtype == np.float32
    assert batch['labels'].shape == (128, 10) and batch['labels'].dtype == np.float32
    assert low - 1e-5 <= batch['images'].min() < low + 0.1 and high - 0.1 < batch['images'].max() <= high + 1e-5
    np.testing.assert_array_equal(batch['labels'].sum(1), 1.0)
    assert set(np.unique(batch['labels'])) == {0.0, 1.0}
    eval_batch = next(data.eval_iterator(config))
    assert eval_batch['images'].shape == (100, 32, 32, 3) and eval_batch['labels'].dtype == np.int32
    assert low - 1e-5 <= eval_batch['images'].min() and eval_batch['images'].max() <= high + 1e-5
    assert data.steps_per_epoch(config) == 1437 // 128


# Exact resume, seeds, host shards.

def test_resume_is_exact_across_an_epoch_boundary(digits_dir):
    config = make_config('sklearn_digits', digits_dir, randaugment_magnitude=9, random_erasing=0.25,
                         mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    steps = data.steps_per_epoch(config)
    assert steps == 1437 // 64 == 22
    k = steps - 2  # steps k, k + 1 end epoch 0; step k + 2 starts epoch 1
    from_zero = take(data.train_iterator(config, seed=3), k + 3)
    resumed = take(data.train_iterator(config, seed=3, start_step=k), 3)
    for expected, actual in zip(from_zero[k:], resumed):
        np.testing.assert_array_equal(expected['images'], actual['images'])
        np.testing.assert_array_equal(expected['labels'], actual['labels'])
    assert not np.array_equal(from_zero[0]['images'], from_zero[steps]['images'])  # epochs differ
    assert not np.allclose(from_zero[k]['labels'].max(1), 0.9 + 0.1 / 10)  # mixup is on


def test_seeds_give_different_batches(digits_dir):
    config = make_config('sklearn_digits', digits_dir)
    first = next(data.train_iterator(config, seed=0))
    second = next(data.train_iterator(config, seed=1))
    assert not np.array_equal(first['images'], second['images'])
    assert not np.array_equal(first['labels'], second['labels'])


def test_host_shards_are_disjoint_halves(digits_dir):
    config = make_config('sklearn_digits', digits_dir, crop='resize', flip=False)  # images identify examples
    steps = data.steps_per_epoch(config)
    epoch = [take(data.train_iterator(config, seed=0, process_index=i, process_count=2), steps) for i in range(2)]
    assert all(batch['images'].shape[0] == 32 for host in epoch for batch in host)
    hosts = [{image.tobytes() for batch in host for image in batch['images']} for host in epoch]
    assert len(hosts[0]) == len(hosts[1]) == steps * 32  # no example twice in an epoch
    assert not hosts[0] & hosts[1]
    records = [list(sources.host_records(tfds.builder('sklearn_digits', data_dir=digits_dir), 'train', i, 2)
                    .as_numpy_iterator()) for i in range(2)]
    assert [len(r) for r in records] == [719, 718]  # tfds.even_splits of 1,437


def test_eval_covers_every_example_once(digits_dir):
    config = make_config('sklearn_digits', digits_dir, eval_batch_size=100)
    batches = list(data.eval_iterator(config))
    assert len(batches) == 4 and all(b['images'].shape == (100, 16, 16, 3) for b in batches)
    masks = np.concatenate([b['mask'] for b in batches])
    np.testing.assert_array_equal(masks, np.r_[np.ones(360), np.zeros(40)])
    labels = np.concatenate([b['labels'] for b in batches])[:360]
    test = tfds.builder('sklearn_digits', data_dir=digits_dir).as_dataset('test').as_numpy_iterator()
    np.testing.assert_array_equal(labels, [ex['label'] for ex in test])  # in order
    # Two hosts: 180 examples each, in the same number of batches.
    hosts = [list(data.eval_iterator(config, process_index=i, process_count=2)) for i in range(2)]
    assert [len(h) for h in hosts] == [4, 4] and hosts[0][0]['images'].shape == (50, 16, 16, 3)
    assert sum(b['mask'].sum() for h in hosts for b in h) == 360


# Targets.

def test_label_smoothing_without_mixup(digits_dir):
    config = make_config('sklearn_digits', digits_dir, label_smoothing=0.1)
    labels = next(data.train_iterator(config, seed=0))['labels']
    np.testing.assert_allclose(labels.max(1), 0.9 + 0.1 / 10, rtol=1e-6)
    np.testing.assert_allclose(labels.min(1), 0.1 / 10, rtol=1e-6)
    np.testing.assert_allclose(labels.sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('mixup_alpha, cutmix_alpha', [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_targets(digits_dir, mixup_alpha, cutmix_alpha):
    config = make_config('sklearn_digits', digits_dir, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
    for batch in take(data.train_iterator(config, seed=0), 4):
        labels = batch['labels']
        np.testing.assert_allclose(labels.sum(1), 1.0, rtol=1e-5)
        assert ((labels > 0).sum(1) <= 2).all()
        # Row i is mixed with row B-1-i by the same lambda, so the two rows add up to their two one-hots.
        paired = labels + labels[::-1]
        np.testing.assert_allclose(paired.sum(1), 2.0, rtol=1e-5)
        np.testing.assert_allclose(paired, np.round(paired), atol=1e-5)
    mixed_rows = (labels.max(1) < 1.0).mean()
    assert mixed_rows > 0.9  # lam < 1 for every pair whose labels differ (mixup_prob = 1)


def test_cutmix_pastes_a_box_of_the_partner():
    images = tf.stack([tf.zeros([16, 16, 3]), tf.ones([16, 16, 3])])
    targets = tf.one_hot([0, 1], 2)
    augment = data.default_augment_config()
    augment.cutmix_alpha = 1.0
    for seed in range(5):
        mixed, mixed_targets = mixing.mix(images, targets, tf.constant([seed, 0], tf.int64), augment)
        pasted = mixed[0, :, :, 0].numpy().mean()  # image 0 is zeros: the pasted box is ones
        np.testing.assert_allclose(mixed_targets[0].numpy(), [1 - pasted, pasted], atol=1e-6)


def test_random_erasing_box_area():
    erased_fractions = []
    for seed in range(20):
        erased = preprocess.random_erasing(tf.zeros([32, 32, 3]), tf.constant([seed, 0], tf.int64), 1.0)
        erased_fractions.append((erased.numpy() != 0).any(-1).mean())
    erased_fractions = np.array(erased_fractions)
    assert ((erased_fractions == 0) | ((erased_fractions >= 0.015) & (erased_fractions <= 0.36))).all()
    assert (erased_fractions > 0).mean() > 0.7  # the first of 10 boxes that fits is used


# Mocked TFDS datasets: the ImageNet and CIFAR code paths.

def test_imagenet_with_deit_augmentation(tmp_path):
    # The mock yields num_examples for every split, so the metadata give every split that size.
    metadata = mock_metadata(tmp_path, 'imagenet2012', {'train': 40, 'validation': 40})
    config = make_config('imagenet2012', metadata, image_size=64, batch_size=16, eval_batch_size=16,
                         eval_split='validation', **DEIT_AUGMENT)
    with tfds.testing.mock_data(num_examples=40, data_dir=metadata):
        info = data.dataset_info(config)
        assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 40, 40)
        batches = take(data.train_iterator(config, seed=0), 5)  # crosses two 2-step epochs
        eval_batches = list(data.eval_iterator(config))
    for batch in batches:
        assert batch['images'].shape == (16, 64, 64, 3) and batch['labels'].shape == (16, 1000)
        assert np.isfinite(batch['images']).all() and np.abs(batch['images']).max() < 10
        np.testing.assert_allclose(batch['labels'].sum(1), 1.0, rtol=1e-5)
        assert batch['labels'].min() >= 0.1 / 1000 - 1e-7  # smoothing
    assert len(eval_batches) == 3 and sum(b['mask'].sum() for b in eval_batches) == 40
    assert all(b['images'].shape == (16, 64, 64, 3) and np.isfinite(b['images']).all() for b in eval_batches)


def test_cifar10_with_random_crop_pad(tmp_path):
    metadata = mock_metadata(tmp_path, 'cifar10', {'train': 40, 'test': 40})
    config = make_config('cifar10', metadata, image_size=32, batch_size=8, eval_batch_size=16,
                         crop='random_crop_pad', crop_pct=1.0)
    with tfds.testing.mock_data(num_examples=40, data_dir=metadata):
        batches = take(data.train_iterator(config, seed=0), 6)
        eval_batches = list(data.eval_iterator(config))
    for batch in batches:
        assert batch['images'].shape == (8, 32, 32, 3) and batch['labels'].shape == (8, 10)
        assert np.isfinite(batch['images']).all() and -1 <= batch['images'].min() and batch['images'].max() <= 1
    # Zero padding: some crops reach into it (pixel 0 -> -1 after normalisation) on their borders.
    assert any((b['images'][:, 0] == -1).all(-1).any() or (b['images'][:, :, 0] == -1).all(-1).any()
               for b in batches)
    assert len(eval_batches) == 3 and sum(b['mask'].sum() for b in eval_batches) == 40


# Folder datasets.

def test_folder_dataset(tmp_path):
    colours = {'blue': (0, 0, 255), 'red': (255, 0, 0)}  # ImageFolder sorts the classes: blue = 0, red = 1
    for split, count in [('train', 6), ('test', 3)]:
        for name, colour in colours.items():
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new('RGB', (20 + i, 12), colour).save(folder / f'{i}.png')
    config = make_config(f'folder:{tmp_path}', None, batch_size=4, eval_batch_size=4, crop='resize',
                         normalization='inception')
    info = data.dataset_info(config)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (2, 12, 6)
    batch = next(data.train_iterator(config, seed=0))
    assert batch['images'].shape == (4, 16, 16, 3)
    red = batch['images'][..., 0].mean((1, 2)) > 0  # the red channel is +1 for red images, -1 for blue
    np.testing.assert_array_equal(batch['labels'].argmax(1), red.astype(int))
    eval_batches = list(data.eval_iterator(config))
    labels = np.concatenate([b['labels'] for b in eval_batches])
    red = np.concatenate([b['images'][..., 0].mean((1, 2)) > 0 for b in eval_batches])
    assert len(eval_batches) == 2 and sorted(labels[:6]) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(labels[:6], red[:6].astype(int))
    halves = [data.dataset_info(make_config(f'folder:{tmp_path}', None, train_split=s)).num_train_examples
              for s in ['train[:50%]', 'train[50%:]']]
    assert halves == [6, 6]


# Errors.

def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'no_such_dataset'"):
        data.dataset_info(make_config('no_such_dataset', str(tmp_path)))
    with pytest.raises(ValueError, match='does not exist'):
        data.dataset_info(make_config(f'folder:{tmp_path}/missing', None))


def test_dataset_not_prepared(tmp_path):
    with pytest.raises(ValueError, match=f'not prepared in data_dir={tmp_path}') as error:
        data.dataset_info(make_config('cifar10', str(tmp_path)))
    assert f'tfds build cifar10 --data_dir {tmp_path}' in str(error.value)
    with pytest.raises(ValueError, match=f'{tmp_path}/downloads/manual') as error:
        data.train_iterator(make_config('imagenet2012', str(tmp_path)), seed=0)
    assert 'ILSVRC2012_img_train.tar' in str(error.value)


def test_bad_choices_and_splits(digits_dir):
    with pytest.raises(ValueError, match="config.augment.crop='center'"):
        data.train_iterator(make_config('sklearn_digits', digits_dir, crop='center'), seed=0)
    with pytest.raises(ValueError, match="Split 'validation' does not fit"):
        data.dataset_info(make_config('sklearn_digits', digits_dir, eval_split='validation'))
    with pytest.raises(ValueError, match='does not split over 3 processes'):
        data.train_iterator(make_config('sklearn_digits', digits_dir), seed=0, process_count=3)


# RandAugment's ops against PIL, whose definitions timm's RandAugment uses.

@pytest.fixture(scope='module')
def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(40, 200, (6, 6, 3)), np.ones((6, 6, 1)))  # blocks, so histograms are uneven
    return np.clip(smooth + rng.integers(-30, 30, smooth.shape), 0, 255).astype(np.uint8)


def run_op(index: int, image: np.ndarray, level: float, sign: float = 1.0) -> np.ndarray:
    op = randaugment._ops(tf.constant([128.0, 128.0, 128.0]))[index]
    return op(tf.constant(image), tf.constant(level), tf.constant(sign)).numpy()


@pytest.mark.parametrize('index, level, pil_op', [
    (0, 0.0, ImageOps.autocontrast),
    (1, 0.0, ImageOps.equalize),
    (2, 0.0, ImageOps.invert),
    (4, 0.6, lambda im: ImageOps.posterize(im, 4 - int(0.6 * 4))),
    (5, 0.3, lambda im: ImageOps.solarize(im, 256 - int(0.3 * 256))),
])
def test_randaugment_ops_equal_pil(photo, index, level, pil_op):
    flat_blue = photo.copy()
    flat_blue[..., 2] = 77  # PIL leaves a one-valued channel alone in autocontrast and equalize
    for image in [photo, flat_blue]:
        np.testing.assert_array_equal(run_op(index, image, level), np.asarray(pil_op(Image.fromarray(image))))


@pytest.mark.parametrize('index, enhance', [(7, ImageEnhance.Color), (8, ImageEnhance.Contrast),
                                            (9, ImageEnhance.Brightness), (10, ImageEnhance.Sharpness)])
@pytest.mark.parametrize('sign', [1.0, -1.0])
def test_randaugment_enhance_ops_match_pil(photo, index, enhance, sign):
    factor = 1.0 + 0.9 * 0.7 * sign
    expected = np.asarray(enhance(Image.fromarray(photo)).enhance(factor)).astype(int)
    assert np.abs(run_op(index, photo, 0.7, sign).astype(int) - expected).max() <= 2


@pytest.mark.parametrize('index, level, sign, matrix', [
    (11, 0.5, 1.0, (1, 0.15, 0, 0, 1, 0)),  # ShearX 0.3 * 0.5
    (12, 0.5, -1.0, (1, 0, 0, -0.15, 1, 0)),  # ShearY
    (13, 10 / 45, 1.0, (1, 0, 3.6, 0, 1, 0)),  # TranslateXRel: 10 % of 36 px
    (14, 10 / 45, -1.0, (1, 0, 0, 0, 1, -3.6)),  # TranslateYRel
    (3, 1 / 3, 1.0, None),  # Rotate 10 degrees counter-clockwise
])
def test_randaugment_geometric_ops_match_pil(photo, index, level, sign, matrix):
    image, fill = Image.fromarray(photo), dict(resample=Image.BILINEAR, fillcolor=(128, 128, 128))
    expected = image.rotate(10, **fill) if matrix is None else image.transform(image.size, Image.AFFINE, matrix, **fill)
    difference = np.abs(run_op(index, photo, level, sign).astype(int) - np.asarray(expected).astype(int))
    assert difference.mean() < 3  # bilinear sampling at slightly different pixel centres; the edges differ most
    assert (run_op(index, photo, 0.0, sign) == photo).all()  # level 0: identity


def test_randaugment_is_stateless(photo):
    key = tf.constant([7, 0], tf.int64)
    kwargs = dict(num_layers=2, magnitude=9, magnitude_std=0.5, fill=[124, 116, 104])
    first = randaugment.randaugment(tf.constant(photo), key, **kwargs).numpy()
    np.testing.assert_array_equal(first, randaugment.randaugment(tf.constant(photo), key, **kwargs).numpy())
    outputs = {randaugment.randaugment(tf.constant(photo), tf.constant([s, 0], tf.int64), **kwargs).numpy().tobytes()
               for s in range(8)}
    assert len(outputs) >= 6  # each layer applies its op with probability 0.5


# Evaluation preprocessing against the originals'.

@pytest.fixture(scope='module')
def photos() -> list[bytes]:
    """Real photos (scikit-learn's two bundled samples) as JPEGs of varied sizes and aspect ratios."""
    import io

    from sklearn.datasets import load_sample_images
    out = []
    for image, sizes in zip(load_sample_images().images, [[(640, 427), (500, 333), (301, 457)],
                                                          [(375, 500), (300, 300), (1024, 683)]]):
        for width, height in sizes:
            buffer = io.BytesIO()
            Image.fromarray(image).resize((width, height), Image.BICUBIC).save(buffer, 'JPEG', quality=90)
            out.append(buffer.getvalue())
    return out


def torchvision_eval(encoded: bytes, size: int = 224, resize: int = 256) -> np.ndarray:
    """DeiT's datasets.build_transform (eval): Resize(256, BICUBIC) then CenterCrop(224) on the PIL image, written
    out as torchvision's functional.resize / center_crop do it for PIL images."""
    import io
    image = Image.open(io.BytesIO(encoded)).convert('RGB')
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = resize, int(resize * long / short)  # _compute_resized_output_size
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    image = image.resize((new_width, new_height), Image.BICUBIC)
    top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), np.float32)


TIMM_EVAL = dict(interpolation='bicubic', antialias=True, jpeg_dct_method='INTEGER_ACCURATE', eval_resize='timm',
                 crop_pct=0.875, normalization='inception')


def our_eval(encoded: bytes, **augment) -> np.ndarray:
    config = data.default_augment_config()
    config.update(augment)
    return (preprocess.eval_image(tf.constant(encoded), config, 224).numpy() + 1.0) * 127.5


def test_eval_image_matches_deits_pil_bicubic_resize_and_center_crop(photos):
    """Released DeiT / T2T / timm numbers were measured through PIL: our eval image must be that image."""
    for encoded in photos:
        expected = torchvision_eval(encoded)
        assert np.abs(our_eval(encoded, **TIMM_EVAL) - expected).mean() <= 1.0  # 1/255 of the range
        # Measured 0.12..0.16 / 255. The preprocessing this replaced (no antialiasing, TF's fast DCT): 1.1..5.7.
        old = our_eval(encoded, **dict(TIMM_EVAL, antialias=False, jpeg_dct_method=''))
        assert np.abs(old - expected).mean() > 1.0


def test_eval_image_square_and_big_vision_geometry(photos):
    encoded = photos[0]  # 640 x 427
    square = our_eval(encoded, eval_resize='square')
    full = tf.image.resize(tf.io.decode_jpeg(encoded), (224, 224)).numpy()
    np.testing.assert_allclose(square, np.clip(full, 0, 255), atol=1e-3)  # vision_transformer: the whole image
    # big_vision: resize_small(256) of 427 x 640 -> 256 x round(383.6) = 384, central_crop offsets (32 // 2, 160 // 2).
    big_vision = our_eval(encoded, eval_resize='big_vision', interpolation='area')
    small = tf.cast(tf.clip_by_value(tf.image.resize(tf.io.decode_jpeg(encoded), (256, 384), method='area'), 0, 255),
                    tf.uint8).numpy().astype(np.float32)
    np.testing.assert_allclose(big_vision, small[16:240, 80:304], atol=1e-3)


def test_repeated_augmentation_repeats_each_example_three_times_in_a_batch(digits_dir):
    """DeiT's RASampler (on by default in its main.py): 3 augmented copies of each example, in the same batch."""
    plain = make_config('sklearn_digits', digits_dir, crop='resize', flip=False, batch_size=48, repeated_augmentation=3)
    batch = next(data.train_iterator(plain, seed=0))['images']
    np.testing.assert_array_equal(batch[0::3], batch[1::3])  # without random augmentation: identical copies
    np.testing.assert_array_equal(batch[0::3], batch[2::3])
    assert len({image.tobytes() for image in batch}) == 16
    augmented = make_config('sklearn_digits', digits_dir, crop_scale=(0.3, 1.0), batch_size=48,
                            repeated_augmentation=3)
    steps = data.steps_per_epoch(augmented)
    batches = take(data.train_iterator(augmented, seed=0), steps + 1)
    assert not np.array_equal(batches[0]['images'][0], batches[0]['images'][1])  # each copy its own crop
    np.testing.assert_array_equal(batches[0]['labels'][0::3], batches[0]['labels'][1::3])
    resumed = next(data.train_iterator(augmented, seed=0, start_step=steps))  # exact resume, next epoch
    np.testing.assert_array_equal(resumed['images'], batches[steps]['images'])


def test_the_mapped_functions_are_traced_as_written(digits_dir, monkeypatch):
    """tf.data traces the pipeline's functions without AutoGraph's rewrite (pipeline.graph_function): a tensor used
    as a Python bool fails at the trace, where AutoGraph would have made it a tf.cond."""
    def branching_on_a_tensor(encoded, key, augment, size):
        image = tf.image.resize(tf.cast(tf.io.decode_png(encoded, 3), tf.float32), [size, size])
        if tf.reduce_mean(image) > 0:
            image = image / 255
        return image

    monkeypatch.setattr(preprocess, 'train_image', branching_on_a_tensor)
    with pytest.raises(TypeError, match='tf.Tensor. as a Python `bool`'):
        data.train_iterator(make_config('sklearn_digits', digits_dir, repeated_augmentation=3), seed=0)


def run_big_vision_op(index: int, image: np.ndarray, level: float = 1.0, sign: float = 1.0) -> np.ndarray:
    op = randaugment._big_vision_ops(tf.constant([128.0, 128.0, 128.0]))[index]
    return op(tf.constant(image), tf.constant(level), tf.constant(sign), tf.constant([3, 4], tf.int64)).numpy()


def test_big_vision_randaugment_ops_at_magnitude_10(photo):
    """big_vision pp/autoaugment.py's ops at randaug(2,10), quirks included (their formulas written out here)."""
    x = photo.astype(int)
    np.testing.assert_array_equal(run_big_vision_op(4, photo), x >> 4 << 4)  # Posterize: int(10 / 10 * 4) = 4 bits
    np.testing.assert_array_equal(run_big_vision_op(5, photo), 255 - x)  # Solarize: threshold uint8(256) = 0
    np.testing.assert_array_equal(run_big_vision_op(8, photo), np.minimum(1.9 * x, 255).astype(int))  # Brightness
    # Contrast blends with its "mean", the pixel count / 256: int(36 * 36 / 256) = 5.
    np.testing.assert_array_equal(run_big_vision_op(7, photo), np.clip(5 + 1.9 * (x - 5), 0, 255).astype(int))
    np.testing.assert_array_equal(run_big_vision_op(15, photo), np.where(x < 128, np.minimum(x + 110, 255), x))
    grey = np.zeros((224, 224, 3), np.uint8)
    assert (run_big_vision_op(14, grey) == 128).all(-1).sum() <= 80 * 80  # Cutout: a box of side 2 x 40
    assert (run_big_vision_op(14, grey) == 128).all(-1).sum() >= 40 * 40
    shifted = run_big_vision_op(12, grey)  # TranslateX: 100 pixels at any image size, grey fill
    assert (shifted == 128).all(-1).all(0).sum() == 100


def test_big_vision_randaugment_always_applies_an_op(photo):
    kwargs = dict(num_layers=1, magnitude=10, magnitude_std=0.0, fill=[128] * 3, ops='big_vision')
    changed = [not np.array_equal(randaugment.randaugment(tf.constant(photo), tf.constant([s, 0], tf.int64),
                                                          **kwargs).numpy(), photo) for s in range(12)]
    assert sum(changed) >= 11  # timm's applies each op with probability 0.5; big_vision's always


def test_random_interpolation_picks_bilinear_or_bicubic_per_image(photos):
    """T2T's --train-interpolation random: timm's RandomResizedCropAndInterpolation picks one of the two per image."""
    def train(method, seed):
        augment = data.default_augment_config()
        augment.update(interpolation=method, flip=False)
        return preprocess.train_image(tf.constant(photos[0]), tf.constant([seed, 0], tf.int64), augment, 32).numpy()

    picked = []
    for seed in range(8):
        chosen = train('random', seed)
        is_bilinear, is_bicubic = (np.array_equal(chosen, train(m, seed)) for m in ('bilinear', 'bicubic'))
        assert is_bilinear != is_bicubic
        picked.append(is_bicubic)
    assert 0 < sum(picked) < 8
