"""The training and evaluation iterators: tf.data graphs over ``sources``, yielding numpy batches for one host.

Training is exactly resumable. The stream is cut into epochs of ``steps_per_epoch`` global batches (each epoch's
remainder is dropped), so global step s is batch s % steps of epoch s // steps. Each epoch shuffles this host's
records with a seed drawn from (seed, epoch) and, in the epoch a run starts in, skips the records of the steps
already taken, before any decoding. Each example is augmented with a key drawn from (seed, epoch, its position in
the epoch on this host), each batch is mixed with a key from (seed, step, host), and tf.data keeps the order
deterministic. Hence a run started at step s yields the very batches a run from step 0 yields from step s on.

The price: every epoch starts a new shuffle buffer, so it begins by reading ``shuffle_buffer`` records (bytes, not
decoded images) before its first batch. Files are read in a fixed order; TFDS shuffled the examples across them
when it prepared the dataset, and a buffer as large as the host's split is a full shuffle.
"""

from __future__ import annotations

import math
from typing import Iterator

import ml_collections
import numpy as np

from vit_jax import console
from vit_jax.data import config as config_lib
from vit_jax.data import mixing, preprocess, sources
from vit_jax.data.batches import _steps_per_epoch, batch_shapes, steps_per_epoch  # noqa: F401 - also here, as before

tf = console.tensorflow()

AUTOTUNE = tf.data.AUTOTUNE
# The mapped functions are graph code already (tf.cond, tf.switch_case; Python `if` only on config values): tf.data
# traces them as written, without AutoGraph's rewrite of their source (seconds of CPU at a process's first iterator),
# and a tensor used as a Python bool fails at the trace.
graph_function = tf.autograph.experimental.do_not_convert
# The first word of every key, so that example, batch and shuffle randomness never share a stream.
EXAMPLE, BATCH, SHUFFLE = 0, 1, 2


def _key(seed: int, *data) -> tf.Tensor:
    """A ``[2]`` int64 key for ``tf.random.stateless_*`` that depends on ``seed`` and every integer of ``data``."""
    key = tf.constant([seed, 0], tf.int64)
    for value in data:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return key


def _local_batch(global_batch: int, process_count: int, name: str) -> int:
    if global_batch % process_count:
        raise ValueError(f'config.{name}={global_batch} does not split over {process_count} processes.')
    return global_batch // process_count


def train_iterator(config: ml_collections.ConfigDict, *, seed: int, start_step: int = 0, process_index: int = 0,
                   process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Infinite; this host's part of every global batch from ``start_step`` on (see the module docstring).

    Yields ``{'images': float32 (B, S, S, 3), 'labels': float32 (B, num_classes)}``, B = batch_size / processes.
    """
    if start_step < 0:
        raise ValueError(f'start_step={start_step} < 0.')
    augment, size = config.augment, config.image_size
    config_lib.check_augment_config(augment)
    builder = sources.load_builder(config)
    num_classes = builder.info.features['label'].num_classes
    local_batch = _local_batch(config.batch_size, process_count, 'batch_size')
    steps = _steps_per_epoch(config, sources.num_examples(builder, config.train_split))
    epoch_length = steps * local_batch  # this host's examples per epoch; every host has at least that many
    start_epoch, start_batch = divmod(start_step, steps)
    records = sources.host_records(builder, config.train_split, process_index, process_count)
    repeats = int(augment.get('repeated_augmentation', 1))

    @graph_function
    def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
        shuffle_seed = tf.random.stateless_uniform([], _key(seed, SHUFFLE, epoch), minval=None, maxval=None,
                                                   dtype=tf.int64)
        ds = records.shuffle(config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        if repeats > 1:
            # DeiT's samplers.py::RASampler: an epoch is its first ~1/repeats shuffled examples, each `repeats` times
            # in a row (in one global batch), every copy augmented with its own key (its own position).
            ds = ds.take(-(-epoch_length // repeats)).flat_map(graph_function(
                lambda encoded, label: tf.data.Dataset.from_tensors((encoded, label)).repeat(repeats)))
        ds = ds.take(epoch_length).enumerate()
        ds = ds.skip(tf.where(epoch == start_epoch, tf.constant(start_batch * local_batch, tf.int64), 0))
        return ds.map(graph_function(lambda position, record: (epoch, position, *record)))

    @graph_function
    def example(epoch, position, encoded, label):
        key = _key(seed, EXAMPLE, epoch, process_index * epoch_length + position)
        return preprocess.train_image(encoded, key, augment, size), label

    @graph_function
    def batch(step, images_and_labels):
        images, labels = images_and_labels
        targets = mixing.smooth_one_hot(labels, num_classes, augment.label_smoothing)
        images, targets = mixing.mix(images, targets, _key(seed, BATCH, step, process_index), augment)
        return {'images': images, 'labels': targets}

    ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
    ds = ds.map(example, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)  # epochs hold whole batches, so none straddles two
    ds = ds.enumerate(start=start_step).map(batch, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE).with_options(sources.deterministic_options()).as_numpy_iterator()


def eval_iterator(config: ml_collections.ConfigDict, *, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over this host's part of ``config.eval_split``, in batches of eval_batch_size / processes.

    Yields ``{'images': float32 (B, S, S, 3), 'labels': int32 (B,), 'mask': float32 (B,)}``. The last batches are
    padded with mask-0 examples, and every host yields the same number of batches, so that a jitted step sees one
    shape and hosts stay in step; the real examples of all hosts are the split, each once.
    """
    augment, size = config.augment, config.image_size
    config_lib.check_augment_config(augment)
    builder = sources.load_builder(config)
    local_batch = _local_batch(config.eval_batch_size, process_count, 'eval_batch_size')
    largest_host = math.ceil(sources.num_examples(builder, config.eval_split) / process_count)
    num_batches = math.ceil(largest_host / local_batch)

    @graph_function
    def example(encoded, label):
        return {'images': preprocess.eval_image(encoded, augment, size), 'labels': tf.cast(label, tf.int32),
                'mask': tf.constant(1.0)}

    padding = {'images': tf.zeros([size, size, 3]), 'labels': tf.constant(0), 'mask': tf.constant(0.0)}
    ds = sources.host_records(builder, config.eval_split, process_index, process_count)
    ds = ds.map(example, num_parallel_calls=AUTOTUNE)
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat()).take(num_batches * local_batch)
    ds = ds.batch(local_batch).prefetch(AUTOTUNE).with_options(sources.deterministic_options())
    return ds.as_numpy_iterator()
