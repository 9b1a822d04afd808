"""Where the examples come from: a prepared TFDS dataset, the bundled ``sklearn_digits``, or a folder of images.

Every source ends as the same thing, a ``tf.data.Dataset`` of ``(encoded image bytes, label)`` for one host's part of
a split, in a fixed order. Images stay encoded here, so that skipping, sharding and shuffling move bytes, and the
pipeline decodes each example once, after all three. TensorFlow is imported (quietly) only where examples are read
or written: a dataset's classes and split sizes, all that a compile (``vit_jax.aot``) asks, need none of it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import TYPE_CHECKING

import ml_collections
import tensorflow_datasets as tfds

from vit_jax import console
from vit_jax.data import digits

if TYPE_CHECKING:
    import tensorflow as tf

FOLDER_PREFIX = 'folder:'
# Datasets TFDS has no builder for: how to prepare them (imagenet2012's instructions come from its builder).
PREPARE_HINTS = {
    'imagenet21k': ('ImageNet-21k (the fall11 or winter21 release from image-net.org) has no TFDS builder: write it as '
                    'a TFDS dataset with a builder of your own (`tfds new imagenet21k`, as big_vision does), so that '
                    'its files are in {where}/imagenet21k/<version>/, or use dataset="folder:/path" with '
                    '/path/<split>/<class>/<image>'),
}
# Class counts of datasets without a TFDS definition, for compiling without their data (vit_jax.aot): big_vision's
# ImageNet-21k (fall11 release) has 21,843 classes.
CLASS_COUNTS = {'imagenet21k': 21843}
_MAX_LISTED = 20  # bad files named in an error or warning
_CHECKED: dict[str, list[tuple[str, str]]] = {}  # folder root -> its bad files, found once per process
log = logging.getLogger(__name__)  # not absl's logger: entry points quiet that one for TFDS's chatter


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    num_train_examples: int  # in config.train_split, all hosts together
    num_eval_examples: int  # in config.eval_split


def load_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The dataset's TFDS builder, ready to read; ``sklearn_digits`` is prepared on first use."""
    name = config.dataset
    if name.startswith(FOLDER_PREFIX):
        return _folder_builder(name[len(FOLDER_PREFIX):], bool(config.get('skip_bad_images', False)),
                               _split_name(config.get('train_split', 'train')))
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except ValueError as e:  # tfds.core.DatasetNotFoundError, or a name TFDS cannot parse
        where = os.path.expanduser(config.data_dir or tfds.core.constants.DATA_DIR)
        source = 'config.data_dir' if config.data_dir else "TFDS's default data_dir"
        hint = PREPARE_HINTS.get(name, f'prepare it there with its TFDS builder (`tfds build <builder> --data_dir '
                                       f'{where}`), or point config.data_dir at the folder that holds {name}/')
        raise ValueError(
            f'Unknown dataset {name!r}: it is neither {digits.SklearnDigits.name!r}, nor "{FOLDER_PREFIX}/path", nor '
            f'a registered TFDS dataset, nor prepared in {where} ({source}; looked for {os.path.join(where, name)}). '
            f'To use it, {hint.format(where=where)}.') from e
    if not builder.is_prepared():
        if not isinstance(builder, digits.SklearnDigits):
            raise ValueError(_not_prepared_message(builder))
        console.tensorflow()  # TFDS writes the records with it; reading the prepared metadata needs none
        builder.download_and_prepare()  # a few seconds, once: the data ship with scikit-learn
    if not {'image', 'label'} <= set(builder.info.features):
        raise ValueError(f'Dataset {name!r} has features {sorted(builder.info.features)}; the pipeline reads '
                         f"image classification datasets, with features 'image' and 'label'.")
    return builder


def _not_prepared_message(builder: tfds.core.DatasetBuilder) -> str:
    root = builder.data_dir_root
    message = (f'TFDS dataset {builder.name!r} is not prepared in data_dir={root} (looked for {builder.data_dir}). '
               f'Prepare it with `tfds build {builder.name} --data_dir {root}`')
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        # E.g. imagenet2012: its tar files cannot be downloaded by TFDS.
        message += (f', after placing the files it needs in {root}/downloads/manual:\n'
                    f'{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}')
    return message + '.'


def _split_name(split: str) -> str:
    """'train[:90%]' -> 'train'."""
    return re.split(r'[\[+]', split, maxsplit=1)[0].strip()


def _folder_builder(root: str, skip_bad_images: bool = False, train_split: str = 'train') -> tfds.core.DatasetBuilder:
    """``tfds.ImageFolder`` with its files checked once per process: every image must decode (or, with
    ``skip_bad_images``, those that do not are dropped and listed), and no class folder may be empty."""
    tf = console.tensorflow()
    if not tf.io.gfile.isdir(root):
        raise ValueError(f'Folder dataset root {root!r} does not exist: expected {root}/<split>/<class>/<image>.')
    builder = tfds.ImageFolder(root)
    first_time = root not in _CHECKED
    if first_time:
        _check_class_folders(root, builder, train_split)
        _CHECKED[root] = _undecodable(builder)
    bad = _CHECKED[root]
    if bad:
        listed = '\n'.join(f'  {path}: {reason}' for path, reason in bad[:_MAX_LISTED])
        more = f'\n  ... and {len(bad) - _MAX_LISTED} more' if len(bad) > _MAX_LISTED else ''
        if not skip_bad_images:
            raise ValueError(f'{len(bad)} file(s) of the folder dataset {root} are not images that decode:\n{listed}'
                             f'{more}\nReplace or remove them, or set config.skip_bad_images=True to train without '
                             f'them (they are then counted and listed in the log).')
        if first_time:
            log.warning('Skipping %d file(s) of the folder dataset %s that do not decode '
                            '(config.skip_bad_images):\n%s%s', len(bad), root, listed, more)
        _drop_examples(builder, {path for path, _ in bad})
    return builder


def _undecodable(builder: tfds.ImageFolder) -> list[tuple[str, str]]:
    """(path, reason) of every file that does not decode as the pipeline decodes it: read once, at preparation,
    rather than crashing an epoch with "Invalid JPEG data" and no file name."""
    tf = console.tensorflow()
    bad = []
    # ImageFolder keeps its file list in _split_examples (tfds 4.9); there is no public accessor.
    for examples in builder._split_examples.values():
        for example in examples:
            try:
                tf.io.decode_image(tf.io.read_file(example.image_path), channels=3, expand_animations=False)
            except (tf.errors.OpError, ValueError) as e:
                reason = getattr(e, 'message', str(e)).strip().splitlines()
                bad.append((example.image_path, reason[0] if reason else type(e).__name__))
    return sorted(bad)


def _drop_examples(builder: tfds.ImageFolder, paths: set[str]) -> None:
    builder._split_examples = {split: [e for e in examples if e.image_path not in paths]
                               for split, examples in builder._split_examples.items()}
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[len(examples)], num_bytes=0)
        for split, examples in builder._split_examples.items()]))


def _check_class_folders(root: str, builder: tfds.ImageFolder, train_split: str) -> None:
    """An empty class folder would silently become a class without examples: an error in the training split (the
    model would learn a class it never sees), a warning elsewhere."""
    tf = console.tensorflow()
    for split in sorted(builder._split_examples):
        counts = {}
        for example in builder._split_examples[split]:
            counts[example.label] = counts.get(example.label, 0) + 1
        split_dir = os.path.join(root, split)
        empty = sorted(os.path.join(split_dir, d) for d in tf.io.gfile.listdir(split_dir)
                       if tf.io.gfile.isdir(os.path.join(split_dir, d)) and not counts.get(d.rstrip('/')))
        if not empty:
            continue
        what = (f'{len(empty)} class folder(s) of the folder dataset {root} hold no images (.jpg, .jpeg, .png): '
                f'{", ".join(empty)}')
        if split == train_split:
            raise ValueError(f'{what}. The model would have a class it never sees in training: add its images, or '
                             f'remove the folder from every split.')
        log.warning('%s. Their classes are not evaluated in split %r.', what, split)


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Examples in ``split``, which may be sliced (``'train[:98%]'``) or, for TFDS, a sum (``'train+validation'``)."""
    try:
        if isinstance(builder, tfds.ImageFolder):
            _, start, stop = _folder_range(builder, split)
            return stop - start
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError) as e:
        raise ValueError(f'Split {split!r} does not fit dataset {builder.name!r}, which has splits '
                         f'{sorted(builder.info.splits)}: {e}') from e


def dataset_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    builder = load_builder(config)
    return DatasetInfo(name=config.dataset, num_classes=builder.info.features['label'].num_classes,
                       num_train_examples=num_examples(builder, config.train_split),
                       num_eval_examples=num_examples(builder, config.eval_split))


def host_records(builder: tfds.core.DatasetBuilder, split: str, process_index: int,
                 process_count: int) -> tf.data.Dataset:
    """This host's ``(encoded image, int64 label)`` of ``split``, always in the same order."""
    if isinstance(builder, tfds.ImageFolder):
        return _folder_records(builder, split, process_index, process_count)
    host_split = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
    # Parse only the two features the pipeline uses (no segmentation masks, ...) and leave the image encoded.
    decoders = tfds.decode.PartialDecoding({'image': True, 'label': True},
                                           decoders={'image': tfds.decode.SkipDecoding()})
    ds = builder.as_dataset(split=host_split, shuffle_files=False, decoders=decoders,
                            read_config=tfds.ReadConfig(options=deterministic_options()))
    return ds.map(lambda ex: (ex['image'], ex['label']))


def _folder_records(builder: tfds.ImageFolder, split: str, process_index: int,
                    process_count: int) -> tf.data.Dataset:
    # tfds.ImageFolder has no sub-split API, so slices and host shards become skip / take over the full split
    # (ImageFolder already lists a split's files in a fixed shuffled order). Each host thus reads, but does not
    # decode, the files before its shard: fine for the small folders this is meant for.
    name, start, stop = _folder_range(builder, split)
    # The sharding of tfds.even_splits: the first (n % hosts) hosts take one example more.
    per_host, extra = divmod(stop - start, process_count)
    start += process_index * per_host + min(process_index, extra)
    ds = builder.as_dataset(split=name, decoders={'image': tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(options=deterministic_options()))
    ds = ds.skip(start).take(per_host + (process_index < extra))
    return ds.map(lambda ex: (ex['image'], ex['label']))


def _folder_range(builder: tfds.ImageFolder, split: str) -> tuple[str, int, int]:
    """``'train[10:-5]'`` -> ``('train', 10, n - 5)``."""
    instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(builder.info.splits)
    if len(instructions) != 1:
        raise ValueError(f'folder datasets take one split or slice, not {split!r}')
    name, start, stop = instructions[0].splitname, instructions[0].from_, instructions[0].to
    return name, start or 0, builder.info.splits[name].num_examples if stop is None else stop


def deterministic_options() -> tf.data.Options:
    """Parallel, but in a fixed order: exact resume depends on it."""
    tf = console.tensorflow()
    options = tf.data.Options()
    options.deterministic = True
    return options
