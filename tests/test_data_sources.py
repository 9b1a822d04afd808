"""Data sources fail at preparation, naming the file or folder: bad images in a folder dataset (or skipped and listed
with ``skip_bad_images``), empty class folders, and a dataset that is not prepared."""

from __future__ import annotations

import io
import logging

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vit_jax import data


def make_config(root, **fields) -> ml_collections.ConfigDict:
    augment = data.default_augment_config()
    augment.update(crop='resize', flip=False)
    return ml_collections.ConfigDict({**dict(dataset=f'folder:{root}', data_dir=None, train_split='train',
                                             eval_split='test', image_size=8, batch_size=7, eval_batch_size=4,
                                             shuffle_buffer=16, augment=augment), **fields})


def jpeg_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (24, 24), colour).save(buffer, format='JPEG')
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog}: 4 JPEGs each, one of the cats truncated; test/{cat,dog}: 2 each, one dog a text file."""
    for split, count in [('train', 4), ('test', 2)]:
        for name, colour in [('cat', (255, 0, 0)), ('dog', (0, 0, 255))]:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                (tmp_path / split / name / f'{i}.jpg').write_bytes(jpeg_bytes(colour))
    whole = (tmp_path / 'train' / 'cat' / '3.jpg').read_bytes()
    (tmp_path / 'train' / 'cat' / '3.jpg').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'test' / 'dog' / '1.jpg').write_text('not an image\n')
    return tmp_path


def test_bad_images_are_named_at_preparation(folder):
    with pytest.raises(ValueError) as info:
        data.dataset_info(make_config(folder))
    lines = str(info.value).splitlines()
    assert lines[0] == f'2 file(s) of the folder dataset {folder} are not images that decode:'
    assert lines[1].startswith(f'  {folder}/test/dog/1.jpg: ')
    assert lines[2].startswith(f'  {folder}/train/cat/3.jpg: ') and 'JPEG' in lines[2]
    assert lines[3] == ('Replace or remove them, or set config.skip_bad_images=True to train without them (they are '
                        'then counted and listed in the log).')


def test_skip_bad_images_drops_and_lists_them(folder, caplog):
    config = make_config(folder, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        info = data.dataset_info(config)
        data.dataset_info(config)  # listed once per process, not at every look-up
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (2, 7, 3)
    skipped = [r.getMessage() for r in caplog.records if 'Skipping' in r.getMessage()]
    assert len(skipped) == 1
    assert skipped[0].startswith(f'Skipping 2 file(s) of the folder dataset {folder} that do not decode '
                                 '(config.skip_bad_images):')
    assert f'{folder}/train/cat/3.jpg' in skipped[0] and f'{folder}/test/dog/1.jpg' in skipped[0]
    # Two whole epochs of training and the whole eval split read without meeting a bad file.
    train = data.train_iterator(config, seed=0)
    labels = [next(train)['labels'].argmax(1) for _ in range(2)]
    assert [sorted(x) for x in labels] == [[0, 0, 0, 1, 1, 1, 1]] * 2  # 3 cats and 4 dogs per epoch
    masks = [b['mask'] for b in data.eval_iterator(config)]
    assert float(np.concatenate(masks).sum()) == 3


def test_an_empty_class_folder_in_the_training_split_is_an_error(tmp_path):
    for split in ('train', 'test'):
        for name in ('cat', 'dog'):
            (tmp_path / split / name).mkdir(parents=True)
            (tmp_path / split / name / '0.jpg').write_bytes(jpeg_bytes((9, 9, 9)))
    (tmp_path / 'train' / 'emu').mkdir()
    (tmp_path / 'train' / 'emu' / 'notes.txt').write_text('photos to come\n')
    with pytest.raises(ValueError, match=rf'1 class folder\(s\) of the folder dataset {tmp_path} hold no images '
                                         rf'\(\.jpg, \.jpeg, \.png\): {tmp_path}/train/emu\. The model would have a '
                                         r'class it never sees in training'):
        data.dataset_info(make_config(tmp_path, batch_size=2))


def test_an_empty_class_folder_elsewhere_is_a_warning(tmp_path, caplog):
    for split in ('train', 'test'):
        for name in ('cat', 'dog'):
            (tmp_path / split / name).mkdir(parents=True)
            if not (split == 'test' and name == 'dog'):
                (tmp_path / split / name / '0.jpg').write_bytes(jpeg_bytes((9, 9, 9)))
    with caplog.at_level(logging.WARNING):
        info = data.dataset_info(make_config(tmp_path, batch_size=2))
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (2, 2, 1)
    assert [r.getMessage() for r in caplog.records if 'hold no images' in r.getMessage()] == [
        f'1 class folder(s) of the folder dataset {tmp_path} hold no images (.jpg, .jpeg, .png): {tmp_path}/test/dog. '
        "Their classes are not evaluated in split 'test'."]


def test_an_unprepared_dataset_without_a_builder_says_where_and_how(tmp_path):
    config = make_config(tmp_path)
    config.dataset, config.data_dir = 'imagenet21k', str(tmp_path)
    with pytest.raises(ValueError) as info:
        data.dataset_info(config)
    message = str(info.value)
    assert (f"nor prepared in {tmp_path} (config.data_dir; looked for {tmp_path}/imagenet21k). To use it, ImageNet-21k "
            f'(the fall11 or winter21 release from image-net.org) has no TFDS builder') in message
    assert f'its files are in {tmp_path}/imagenet21k/<version>/' in message and '`tfds new imagenet21k`' in message
    config.dataset = 'not_a_dataset'
    with pytest.raises(ValueError, match=rf'looked for {tmp_path}/not_a_dataset\)\. To use it, prepare it there with '
                                         rf'its TFDS builder \(`tfds build <builder> --data_dir {tmp_path}`\)'):
        data.dataset_info(config)
