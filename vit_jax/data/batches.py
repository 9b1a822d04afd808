"""The batch arithmetic, without TensorFlow: the steps in an epoch and the shapes of the batches a step is compiled
for (``vit_jax.aot`` compiles a config's steps without its data, and so without TensorFlow)."""

from __future__ import annotations

import ml_collections
import numpy as np

from vit_jax.data import sources


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int | None = None) -> int:
    """Global steps per epoch: the train split's whole batches (the remainder of each epoch is dropped); the split's
    size is read from the dataset unless given."""
    if num_train_examples is None:
        num_train_examples = sources.dataset_info(config).num_train_examples
    return _steps_per_epoch(config, num_train_examples)


def _steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    if num_train_examples < config.batch_size:
        raise ValueError(f'config.batch_size={config.batch_size} exceeds the {num_train_examples} examples of '
                         f'{config.train_split!r}.')
    return num_train_examples // config.batch_size


def batch_shapes(config: ml_collections.ConfigDict, num_classes: int) -> tuple[dict, dict]:
    """{name: (shape, dtype)} of one global train batch and one global eval batch, as ``train_iterator`` and
    ``eval_iterator`` yield them (summed over the hosts): what a step is compiled for without the data."""
    s = config.image_size
    train = {'images': ((config.batch_size, s, s, 3), np.float32),
             'labels': ((config.batch_size, num_classes), np.float32)}
    evaluation = {'images': ((config.eval_batch_size, s, s, 3), np.float32),
                  'labels': ((config.eval_batch_size,), np.int32), 'mask': ((config.eval_batch_size,), np.float32)}
    return train, evaluation
