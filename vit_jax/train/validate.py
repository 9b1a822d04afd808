"""Every config value that cannot work, rejected before anything is built or compiled.

    validate_config(config)                     # the loop's first call; main prints its ValueError as one line
    validate_config(config, total_steps=1500)   # once the run's length is known (num_epochs needs the data)

Each error is a ValueError naming the field, its value and the valid range. Model fields (sizes, dropout rates,
``resnet_width``) are checked by ``create_model``; sections a config does not have are skipped.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from vit_jax.data.config import check_augment_config

_MISSING = object()


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
    node = config
    for part in field.split('.'):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(config: ml_collections.ConfigDict, field: str, ok, valid: str, hint: str = '') -> None:
    value = _get(config, field)
    if value is _MISSING:
        return
    if not ok(value):
        raise ValueError(f'config.{field}={value!r} is out of range: it must be {valid}{hint}.')


def _at_least(config, field: str, low: float, hint: str = '') -> None:
    _check(config, field, lambda v: _number(v) and math.isfinite(v) and v >= low, f'>= {low}', hint)


def _above(config, field: str, low: float, hint: str = '') -> None:
    _check(config, field, lambda v: _number(v) and math.isfinite(v) and v > low, f'> {low}', hint)


def _interval(config, field: str, low: float, high: float, closed_high: bool = True, hint: str = '') -> None:
    inside = (lambda v: low <= v <= high) if closed_high else (lambda v: low <= v < high)
    _check(config, field, lambda v: _number(v) and inside(v), f'in [{low}, {high}{"]" if closed_high else ")"}', hint)


def validate_config(config: ml_collections.ConfigDict, total_steps: int | None = None) -> None:
    """Raises ValueError naming the first field whose value cannot work, and its valid range."""
    for field in ('image_size', 'batch_size', 'eval_batch_size', 'shuffle_buffer'):
        _at_least(config, field, 1)
    _at_least(config, 'total_steps', 0, ' (0 = num_epochs decides)')
    if _get(config, 'total_steps') == 0:
        _above(config, 'num_epochs', 0, ' when total_steps is 0')
    for field in ('log_every', 'eval_every', 'checkpoint_every'):
        # 0 used to divide by zero after compiling; "only at the end" is any value >= total_steps.
        _at_least(config, field, 1, ' (to do it only at the end, use a value >= total_steps)')
    _at_least(config, 'keep_checkpoints', 1, ': 0 would delete every checkpoint, the final one included')

    opt = 'optimizer.'
    _above(config, opt + 'learning_rate', 0, ' (a learning rate <= 0 trains by gradient ascent or not at all)')
    for field in ('end_learning_rate', 'warmup_init_learning_rate', 'weight_decay', 'grad_clip_norm', 'eps'):
        _at_least(config, opt + field, 0)
    _at_least(config, opt + 'warmup_steps', 0)
    for field in ('b1', 'b2', 'momentum', 'ema_decay'):
        _interval(config, opt + field, 0.0, 1.0, closed_high=False)
    for field in ('accumulation_steps', 'microbatches'):
        _at_least(config, opt + field, 1)

    aug = 'augment.'
    for field in ('mixup_alpha', 'cutmix_alpha', 'randaugment_num_layers', 'randaugment_magnitude',
                  'randaugment_magnitude_std'):
        _at_least(config, aug + field, 0)
    for field in ('mixup_switch_prob', 'mixup_prob', 'random_erasing'):
        _interval(config, aug + field, 0.0, 1.0, hint=' (a probability)')
    _interval(config, aug + 'label_smoothing', 0.0, 1.0, closed_high=False)
    _check(config, aug + 'crop_pct', lambda v: _number(v) and 0 < v <= 1, 'in (0, 1]')
    _check(config, aug + 'crop_scale', lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1,
           '(low, high) with 0 < low <= high <= 1', ' (the area fraction of the inception crop)')
    if _get(config, 'augment') is not _MISSING:
        check_augment_config(config.augment)

    for field in ('data', 'fsdp', 'tensor'):
        _check(config, f'mesh.{field}', lambda v: isinstance(v, int) and (v == -1 or v >= 1),
               '-1 (the remaining devices) or >= 1')
    _check(config, 'model.resnet_layers', lambda v: v is None or (len(v) > 0 and all(
        isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)), 'positive block counts, e.g. (3, 4, 9)')
    _check(config, 'init_from.posemb_resize', lambda v: v in ('bilinear', 'bicubic'), "'bilinear' or 'bicubic'")
    _interval(config, 'distillation.alpha', 0.0, 1.0, hint=" (the distillation loss's weight)")
    _above(config, 'distillation.tau', 0, ' (the softmax temperature)')

    if total_steps is None:
        total_steps = _get(config, 'total_steps')
    accumulation = _get(config, opt + 'accumulation_steps')
    warmup = _get(config, opt + 'warmup_steps')
    if _number(total_steps) and total_steps > 0 and _number(warmup) and _number(accumulation):
        updates = int(total_steps) // max(int(accumulation), 1)
        if warmup > updates:
            raise ValueError(f'config.optimizer.warmup_steps={warmup} is longer than the run: {updates} optimizer '
                             f'updates ({total_steps} steps / accumulation_steps={accumulation}). Use at most '
                             f'{updates}, or train longer.')
