"""Where the examples come from: a prepared TFDS dataset, the bundled ``sklearn_digits``, or a folder of images.

Every source ends as the same thing, a ``tf.data.Dataset`` of ``(encoded image bytes, label)`` for one host's part of
a split, in a fixed order. Images stay encoded here, so that skipping, sharding and shuffling move bytes, and the
pipeline decodes each example once, after all three.
"""

from __future__ import annotations

import dataclasses

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import digits

FOLDER_PREFIX = 'folder:'


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
        return _folder_builder(name[len(FOLDER_PREFIX):])
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except ValueError as e:  # tfds.core.DatasetNotFoundError, or a name TFDS cannot parse
        where = config.data_dir or "TFDS's default data_dir"
        raise ValueError(
            f'Unknown dataset {name!r}: it is neither {digits.SklearnDigits.name!r}, nor "{FOLDER_PREFIX}/path", nor '
            f'a TFDS dataset (registered, or prepared in {where}).') from e
    if isinstance(builder, digits.SklearnDigits):
        builder.download_and_prepare()  # a few seconds, once: the data ship with scikit-learn
    elif not builder.is_prepared():
        raise ValueError(_not_prepared_message(builder))
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


def _folder_builder(root: str) -> tfds.core.DatasetBuilder:
    if not tf.io.gfile.isdir(root):
        raise ValueError(f'Folder dataset root {root!r} does not exist: expected {root}/<split>/<class>/<image>.')
    return tfds.ImageFolder(root)


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
    options = tf.data.Options()
    options.deterministic = True
    return options
