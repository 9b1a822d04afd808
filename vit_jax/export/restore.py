"""What the CLI exports: a training workdir (config.json + orbax checkpoints) or a checkpoint file for a named model."""

from __future__ import annotations

import ast
import json
import os
from typing import Any

import ml_collections

from vit_jax import hardware, models
from vit_jax.checkpoints import CheckpointMismatchError, load_params, restore_vit_jax
from vit_jax.checkpoints.common import fit_to_model


def parse_override(text: str) -> tuple[str, Any]:
    """'field=value' -> (field, value), the value read as a Python literal when it is one ('(3, 4, 9)', '1e-5')."""
    if '=' not in text:
        raise ValueError(f'--override {text!r}: expected field=value, e.g. hidden_size=384.')
    field, value = text.split('=', 1)
    lowered = {'true': True, 'false': False, 'none': None, 'null': None}
    if value.lower() in lowered:
        return field.strip(), lowered[value.lower()]
    try:
        return field.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field.strip(), value  # a string choice: classifier=gap


def load_workdir(workdir: str, step: int | None = None, ema: bool = True):
    """(model, params, config, source) of a training workdir: its ``config.json`` and orbax checkpoint ``step``
    (default the latest), exporting ``ema_params`` where the run kept them (what its eval reported), else ``params``."""
    config_path = os.path.join(workdir, 'config.json')
    if not os.path.exists(config_path):
        raise ValueError(f'{workdir} has no config.json: is it a vit_jax training workdir (python -m vit_jax.main)?')
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if not os.path.isdir(os.path.join(workdir, 'checkpoints')) or not any(
            d.isdigit() for d in os.listdir(os.path.join(workdir, 'checkpoints'))):
        raise ValueError(f'{workdir} has no checkpoints under checkpoints/: train it first.')
    flat, path, key = restore_vit_jax(workdir, step, ema)
    overrides = {k: v for k, v in config.model.to_dict().items() if v is not None}
    head = flat.get('head/bias')
    model = models.create_model(config.model_name, num_classes=0 if head is None else int(head.shape[0]),
                                image_size=config.image_size, platform=hardware.host_platform(), **overrides)
    params = fit_to_model(flat, model, f'{path} ({key})')  # every key and shape checked, scanned if the model is
    source = {'workdir': os.path.abspath(workdir), 'step': int(os.path.basename(path)), 'params': key}
    return model, params, config, source


def load_checkpoint(path: str, name: str, overrides: dict[str, Any], num_classes: int | None = None,
                    image_size: int | None = None, format: str = 'auto'):
    """(model, params, source) for a checkpoint file that ``load_params`` reads; ``num_classes`` defaults to the
    checkpoint's head. A checkpoint that does not fit the model raises CheckpointMismatchError, listing every key."""
    kwargs = dict(overrides)
    if image_size:
        kwargs['image_size'] = image_size
    if num_classes is None:
        try:  # the head's width is in the checkpoint: read it from the mismatch report of a 1-class model
            load_params(path, models.create_model(name, num_classes=1, **kwargs), format)
            num_classes = 1
        except CheckpointMismatchError as e:
            widths = [ckpt[0] for key, ckpt, _ in e.mismatched if key == 'head/bias']
            num_classes = widths[0] if widths else (0 if 'head/bias' in e.missing else 1)
    model = models.create_model(name, num_classes=num_classes, **{'platform': hardware.host_platform(), **kwargs})
    params = load_params(path, model, format)
    return model, params, {'checkpoint': os.path.abspath(path), 'model': name, 'overrides': overrides}


def eval_config(dataset: str, data_dir: str | None, split: str, image_size: int, batch_size: int,
                normalization: str, crop_pct: float) -> ml_collections.ConfigDict:
    """The fields ``vit_jax.data.eval_iterator`` reads, for a checkpoint exported with ``--dataset``."""
    from vit_jax.train.config import base_config
    config = base_config()
    config.dataset, config.data_dir, config.eval_split = dataset, data_dir, split
    config.image_size, config.eval_batch_size = image_size, batch_size
    config.augment.normalization, config.augment.crop_pct = normalization, crop_pct
    return config
