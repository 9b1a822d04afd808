"""What predict and analyze look at: a model with its parameters, its eval transform and its class names.

    loaded = from_workdir('workdirs/quickstart')                     # the run's config: its eval, its labels
    loaded = from_checkpoint('ViT-B_16-224.npz', 'vit_b16')          # the family's published eval transform
    image = load_image('cat.jpg', loaded.augment, loaded.image_size)  # exactly the eval preprocessing, (S, S, 3)

Eval transforms of the public checkpoints, by family: the ``config.augment`` of the recipe that trained them (see
``vit_jax.train.config``), so that they go through the same ``vit_jax.data.preprocess.eval_image`` as training runs:

- vit, hybrid (google-research/vision_transformer): resize to a square, inception normalisation to [-1, 1];
- deit (timm): resize the shorter side to 256 bicubic (antialiased, like PIL), center crop 224 (crop_pct 0.875),
  ImageNet mean / std;
- t2t (T2T-ViT): the same with crop_pct 0.9 (its models' default_cfg, as configs/t2t_vit_14.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any

import ml_collections
import numpy as np

from vit_jax import models

IMAGENET21K_CLASSES = 21843  # the fall11 release, as vision_transformer's and timm's "in21k" heads


class ImageError(ValueError):
    """An input file that cannot be read or decoded as an image; the message names the file."""


@dataclasses.dataclass
class Loaded:
    model: Any
    params: Any
    augment: ml_collections.ConfigDict  # the fields eval_image reads
    image_size: int
    class_names: list[str] | None
    names_source: str  # where the class names come from, or why there are none
    source: dict  # where the weights come from (for reports)
    config: ml_collections.ConfigDict | None = None  # a workdir's training config

    def class_name(self, index: int) -> str:
        return self.class_names[index] if self.class_names else str(index)


def public_eval_augment(family: str, **overrides) -> ml_collections.ConfigDict:
    """``config.augment`` with the published eval transform of ``family``; non-None ``overrides`` replace fields."""
    from vit_jax.train.config import base_config, deit_recipe, vit_pretrain_recipe
    if family in ('deit', 't2t'):
        augment = deit_recipe(base_config()).augment
        if family == 't2t':
            augment.update(eval_interpolation='bicubic', crop_pct=0.9)
    else:  # vit, hybrid, and the BiT ResNets of the same code base
        augment = vit_pretrain_recipe(base_config()).augment
    augment.update({k: v for k, v in overrides.items() if v is not None})
    return augment


def from_workdir(workdir: str, step: int | None = None, ema: bool = True, data_dir: str | None = None,
                 labels: str | None = None) -> Loaded:
    """A training workdir: its config's model, eval transform and dataset's label names; the EMA weights if kept."""
    from vit_jax.export.restore import load_workdir
    model, params, config, source = load_workdir(workdir, step, ema)
    if data_dir:
        config.data_dir = data_dir
    names, where = (read_labels(labels, model.num_classes) if labels else
                    dataset_class_names(config, model.num_classes))
    return Loaded(model, params, config.augment, config.image_size, names, where, source, config)


def from_checkpoint(path: str, name: str, overrides: dict[str, Any] | None = None, num_classes: int | None = None,
                    image_size: int | None = None, format: str = 'auto', labels: str | None = None,
                    **eval_overrides) -> Loaded:
    """A checkpoint file for registered model ``name``, with its family's published eval transform.

    ``eval_overrides`` (``config.augment`` fields: eval_resize, crop_pct, normalization, ...) replace the family's
    where not None.
    """
    from vit_jax.export.restore import load_checkpoint
    model, params, source = load_checkpoint(path, name, overrides or {}, num_classes, image_size, format)
    augment = public_eval_augment(models.model_info(name).family, **eval_overrides)
    names, where = (read_labels(labels, model.num_classes) if labels else
                    imagenet_class_names(model.num_classes))
    return Loaded(model, params, augment, model.image_size, names, where, source)


# Class names ---------------------------------------------------------------------------------------------------------
def read_labels(path: str, num_classes: int) -> tuple[list[str], str]:
    """One class name a line, in the order of the model's outputs."""
    with open(path) as f:
        names = [line.rstrip('\n') for line in f if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f'--labels {path} has {len(names)} names but the model has {num_classes} classes: give one '
                         'name a line, in the order of its outputs.')
    return names, path


def dataset_class_names(config: ml_collections.ConfigDict, num_classes: int) -> tuple[list[str] | None, str]:
    """The TFDS label names of the run's dataset (``ClassLabel.names``); ImageNet's words for imagenet2012."""
    from vit_jax.data import sources
    try:
        names = list(sources.load_builder(config).info.features['label'].names)
    except ValueError as e:  # the dataset is not prepared here: its names may still be known
        if config.dataset.startswith('imagenet2012') and num_classes == 1000:
            return imagenet_class_names(num_classes)
        return None, f'no class names: {e}'
    if config.dataset.startswith('imagenet2012') and num_classes == 1000:
        return imagenet_class_names(num_classes)  # TFDS's names are WordNet ids (n01440764): show the words
    if len(names) != num_classes:
        return None, f'no class names: dataset {config.dataset!r} has {len(names)} classes, the model {num_classes}'
    return names, f'TFDS {config.dataset} labels'


def imagenet_class_names(num_classes: int, timm_info_dir: str | None = None) -> tuple[list[str] | None, str]:
    """ImageNet-1k or -21k names from installed packages (never the network), in the checkpoints' class order.

    1k: TFDS's list of the 1,000 ILSVRC-2012 classes (``siscore.labels``, in the order of its ``imagenet2012``
    WordNet ids). 21k (21,843 classes): timm's synset list and lemmas, when timm is installed.
    """
    if num_classes == 1000:
        from tensorflow_datasets.datasets.siscore import labels
        return [n.split(',')[0] for n in labels.IMAGENET_LABELS_LIST], 'ImageNet-1k (TFDS)'
    if num_classes == IMAGENET21K_CLASSES:
        root = timm_info_dir or _timm_info_dir()
        if root is None:
            return None, ('no class names: ImageNet-21k names come from timm\'s data files; `pip install timm` '
                          '(or pass --labels FILE, one name a line)')
        with open(os.path.join(root, 'imagenet_synset_to_lemma.txt')) as f:
            lemma = dict(line.rstrip('\n').split('\t', 1) for line in f if '\t' in line)
        with open(os.path.join(root, 'imagenet21k_goog_synsets.txt')) as f:
            synsets = f.read().split()
        return [lemma.get(s, s).split(',')[0] for s in synsets], 'ImageNet-21k (timm)'
    return None, f'no class names for a {num_classes}-class head: pass --labels FILE (one name a line)'


def _timm_info_dir() -> str | None:
    # Located without importing timm (which imports torch and torchvision).
    spec = importlib.util.find_spec('timm')
    if spec is None or not spec.submodule_search_locations:
        return None
    root = os.path.join(list(spec.submodule_search_locations)[0], 'data', '_info')
    return root if os.path.exists(os.path.join(root, 'imagenet21k_goog_synsets.txt')) else None


# Images ---------------------------------------------------------------------------------------------------------------
def load_image(path: str, augment: ml_collections.ConfigDict, image_size: int) -> np.ndarray:
    """One image file -> (S, S, 3) float32 through the eval transform; ImageError naming the file if it cannot."""
    from vit_jax import console
    from vit_jax.data import preprocess
    tf = console.tensorflow()
    try:
        with open(path, 'rb') as f:
            encoded = f.read()
    except OSError as e:
        raise ImageError(f'{path}: cannot read it ({e.strerror}).') from e
    try:
        return preprocess.eval_image(tf.constant(encoded), augment, image_size).numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
        # TF's message carries its graph-node and op names around the reason: keep the reason.
        reason = re.sub(r'\{\{[^}]*\}\}|\[Op:.*', '', e.message or type(e).__name__).strip().splitlines()[0]
        raise ImageError(f'{path}: not a readable image ({reason}); give a JPEG, PNG, GIF, BMP or WebP file.') from e
