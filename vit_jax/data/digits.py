"""``sklearn_digits``: scikit-learn's 1,797 real 8x8 handwritten digits as a TFDS dataset, prepared offline.

It exists so that the quickstart runs on any machine, with no download, through exactly the TFDS code path of
ImageNet: ``download_and_prepare`` writes TFRecords into the data_dir and the pipeline reads them like any dataset.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360  # 20 %; the remaining 1,437 examples are the train split
SPLIT_SEED = 0


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """The UCI optical digits (``sklearn.datasets.load_digits``): gray values 0..16 scaled to uint8 RGB."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Seeded stratified 1,437 / 360 train / test split.'}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description='8x8 handwritten digits bundled with scikit-learn, repeated on 3 channels.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(8, 8, 3)),
                'label': tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits',
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # the data ships with scikit-learn
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.round(digits.images * (255 / 16)).astype(np.uint8)
        images = np.repeat(images[..., None], 3, axis=-1)
        train, test = train_test_split(np.arange(len(images)), test_size=NUM_TEST, stratify=digits.target,
                                       random_state=SPLIT_SEED)
        return {'train': self._generate_examples(images, digits.target, train),
                'test': self._generate_examples(images, digits.target, test)}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> Iterator:
        for i in indices:
            yield int(i), {'image': images[i], 'label': int(labels[i])}
