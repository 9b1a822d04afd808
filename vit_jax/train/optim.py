"""The optimizer of a recipe: optax chain from ``config.optimizer``.

    clip (global norm) -> Adam / SGD-momentum -> weight decay of kernels, applied as the recipe's source did ->
    learning-rate schedule; frozen parameters untouched; optional gradient accumulation (optax.MultiSteps).

Which parameters decay: exactly the weight matrices of dense and conv layers, found by name (the leaf ``kernel``, as
big_vision's ``wd_mults=[('.*/kernel$', 1.0)]``), so never biases, norm scales, position embeddings, tokens or
frozen tables, with or without ``scan_layers`` (which gives every parameter a layer axis). The same set as timm's
``add_weight_decay`` in DeiT / T2T (no decay for 1-D parameters and ``pos_embed``, ``cls_token``, ``dist_token``).
Names are read from the tree's keys, so the rule holds in any tree: the model's params, or ``(params, objective)``.

How they decay, ``weight_decay_mode`` (w = weight_decay, lr(t) = the schedule, peak = learning_rate):
    'lr'        p -= lr(t) * w * p, decoupled: torch.optim.AdamW (DeiT, T2T through timm), flax.optim.Adam's
                ``new_param -= learning_rate * weight_decay * param`` (the ViT paper), optax.adamw
    'schedule'  p -= lr(t) / peak * w * p, decoupled: big_vision/optax.py::make, whose chain is
                scale_by_adam -> scale(lr) -> add_decayed_weights(wd) -> scale_by_schedule (a multiplier in [0, 1])
    'l2'        g += w * p before the optimizer: torch.optim.SGD's weight_decay
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax.models import is_frozen

OPTIMIZERS = ('adam', 'adamw', 'sgd')  # 'adamw' is 'adam': how weight decay applies is weight_decay_mode's
WEIGHT_DECAY_MODES = ('lr', 'schedule', 'l2')
SCHEDULES = ('cosine', 'linear', 'constant', 'timm_cosine')


def param_names(path) -> tuple[str, ...]:
    """The keys along a ``jax.tree_util`` path: ``('encoder', 'block_0', 'attn', 'qkv', 'kernel')``."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(str(key.key))
    return tuple(names)


def decays(names: tuple[str, ...]) -> bool:
    """Weight decay applies to dense and conv weights: the leaf ``kernel`` (big_vision's ``.*/kernel$``)."""
    return bool(names) and names[-1] == 'kernel' and not is_frozen(names)


def weight_decay_mask(params: Any) -> Any:
    """A tree of bools like ``params``: True where weight decay applies (see ``decays``).

    Frozen parameters reach here as optax ``MaskedNode``s (``multi_transform`` hides them): empty nodes, kept.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(param_names(path)), params)


def decayed_names(params: Any) -> list[str]:
    """'/'-joined names of the parameters that decay, sorted (what ``python -m vit_jax.recipes`` and tests list)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(weight_decay_mask(params))
    return sorted('/'.join(param_names(path)) for path, on in flat if on)


def _frozen_labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'frozen' if is_frozen(param_names(path)) else 'train', params)


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate at each optimizer update (under accumulation: updates, not micro-steps).

    'cosine' / 'linear' / 'constant': linear warmup from ``warmup_init_learning_rate`` to the peak over
    ``warmup_steps`` updates, then the decay to ``end_learning_rate`` over the remaining updates (big_vision's
    ``utils.create_learning_rate_schedule``, vision_transformer's ``create_learning_rate_schedule``).
    'timm_cosine': timm's CosineLRScheduler as DeiT / T2T step it, once per epoch of ``schedule_epoch_steps``
    updates (``t_in_epochs=True``): epoch e runs at f(max(e - schedule_epoch_lag, 0)) with
    f(t) = init + t (peak - init) / warmup for t < warmup, else end + (peak - end) (1 + cos(pi t / cosine)) / 2
    (``warmup_prefix=False``: the cosine counts from epoch 0), held at ``end`` after ``cosine_epochs``.
    """
    # .get: a hand-made optimizer ConfigDict (tests, benchmarks) may predate the newer fields.
    peak, end = float(opt.learning_rate), float(opt.end_learning_rate)
    init = float(opt.get('warmup_init_learning_rate', 0.0))
    warmup = int(opt.warmup_steps)
    if opt.schedule == 'timm_cosine':
        epoch_steps = int(opt.get('schedule_epoch_steps', 0))
        if epoch_steps <= 0:
            raise ValueError('optimizer.schedule=timm_cosine steps once per epoch: set optimizer.schedule_epoch_steps '
                             '(updates per epoch).')
        warmup_epochs = warmup // epoch_steps
        cosine_epochs, lag = int(opt.get('cosine_epochs', 0)), int(opt.get('schedule_epoch_lag', 0))
        if cosine_epochs <= 0:
            raise ValueError('optimizer.schedule=timm_cosine needs optimizer.cosine_epochs (timm\'s t_initial).')

        def timm_cosine(step):
            t = jnp.maximum(jnp.asarray(step) // epoch_steps - lag, 0).astype(jnp.float32)
            cosine = end + 0.5 * (peak - end) * (1 + jnp.cos(math.pi * jnp.minimum(t / cosine_epochs, 1.0)))
            if not warmup_epochs:
                return cosine
            return jnp.where(t < warmup_epochs, init + t * (peak - init) / warmup_epochs, cosine)

        return timm_cosine
    decay_steps = max(total_steps - warmup, 1)
    if opt.schedule == 'cosine':
        decay = optax.cosine_decay_schedule(peak, decay_steps, end / peak if peak else 0.0)
    elif opt.schedule == 'linear':
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif opt.schedule == 'constant':
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f'optimizer.schedule={opt.schedule!r} is not one of {SCHEDULES}.')
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(init, peak, warmup), decay], [warmup])


def create_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                             optax.Schedule]:
    """The optax transformation and its schedule (for logging) from ``config.optimizer``.

    ``total_steps`` counts optimizer updates (the loop passes steps // accumulation_steps).
    """
    schedule = learning_rate_schedule(opt, total_steps)
    if opt.name not in OPTIMIZERS:
        raise ValueError(f'optimizer.name={opt.name!r} is not one of {OPTIMIZERS}.')
    mode = opt.get('weight_decay_mode', 'lr')
    if mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f'optimizer.weight_decay_mode={mode!r} is not one of {WEIGHT_DECAY_MODES}.')
    if opt.name in ('adam', 'adamw'):
        direction = optax.scale_by_adam(opt.b1, opt.b2, opt.eps, mu_dtype=opt.get('mu_dtype') or None)
    else:
        # vision_transformer's fine-tuning keeps the momentum in bfloat16 (configs/common.py optim_dtype).
        accumulator_dtype = opt.get('mu_dtype') or None
        direction = (optax.trace(decay=opt.momentum, nesterov=opt.nesterov, accumulator_dtype=accumulator_dtype)
                     if opt.momentum else optax.identity())
    decay = optax.add_decayed_weights(opt.weight_decay, mask=weight_decay_mask) if opt.weight_decay else None

    chain = []
    if opt.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if mode == 'l2' and decay:
        chain.append(decay)
    chain.append(direction)
    if mode == 'schedule':
        # big_vision/optax.py::make: -sched(t) * (lr * adam(g) + wd * p), sched(t) = lr(t) / peak in [0, 1].
        peak = float(opt.learning_rate) or 1.0  # a zero peak: the schedule is zero anyway
        chain.append(optax.scale(peak))
        if decay:
            chain.append(decay)
        chain.append(optax.scale_by_schedule(lambda t: -schedule(t) / peak))
    else:
        if mode == 'lr' and decay:
            chain.append(decay)  # optax.adamw's order: Adam's direction + w * p, both times -lr(t)
        chain.append(optax.scale_by_learning_rate(schedule))
    if opt.get('layer_decay', 0.0):
        chain.append(layerwise_lr_decay(opt.layer_decay))
    tx = optax.chain(*chain)
    # Frozen tensors of the originals (T2T's sinusoid table, Performer features) are never updated.
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()}, _frozen_labels)
    if opt.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulation_steps)
    return tx, schedule


def layer_id(names: tuple[str, ...], num_layers: int) -> int | None:
    """MAE util/lr_decay.py ``get_layer_id_for_vit``: embeddings 0, block i i + 1, the rest num_layers + 1.

    None for the stacked blocks of ``scan_layers`` (one id per slice of their leading axis).
    """
    if names and names[0] == 'model':  # the train step's {'model': ..., 'objective': ...}
        names = names[1:]
    elif names and names[0] == 'objective':  # an objective's own parameters (MAE's decoder): the top layer
        return num_layers + 1
    if not names:
        return num_layers + 1
    if names[0] in ('class_token', 'pos_embed', 'distillation_token', 'sinusoid_pos_embed', 'patch_embed',
                    'tokens_to_token', 'resnet'):
        return 0
    if len(names) > 1 and names[0] == 'encoder' and names[1].startswith('block_'):
        return int(names[1].split('_')[1]) + 1
    if len(names) > 1 and names[0] == 'encoder' and names[1] == 'blocks':
        return None
    return num_layers + 1


def layerwise_lr_decay(decay: float) -> optax.GradientTransformation:
    """Scales each update by decay^(L + 1 - layer_id) (MAE util/lr_decay.py ``param_groups_lrd``, BEiT, ELECTRA).

    Applied after the learning rate and the decoupled weight decay, so both scale, as torch AdamW's per-group lr
    does. L is the model's depth, read from the tree (its ``block_i`` names or the stacked blocks' leading axis).
    """

    def depth(tree) -> int:
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        depths = [0]
        for path, leaf in flat:
            names = param_names(path)
            for i, name in enumerate(names[:-1]):
                if name == 'encoder' and names[i + 1].startswith('block_'):
                    depths.append(int(names[i + 1].split('_')[1]) + 1)
                elif name == 'encoder' and names[i + 1] == 'blocks':
                    depths.append(leaf.shape[0])
        return max(depths)

    def update_fn(updates, state, params=None):
        num_layers = depth(updates)

        def scale(path, u):
            i = layer_id(param_names(path), num_layers)
            if i is None:  # scanned blocks: slice j is block j
                ids = jnp.arange(1, u.shape[0] + 1).reshape((-1,) + (1,) * (u.ndim - 1))
                return u * (decay ** (num_layers + 1 - ids)).astype(u.dtype)
            return u * jnp.asarray(decay ** (num_layers + 1 - i), u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """Exponential moving average of parameters (Polyak averaging; T2T evaluates and releases these weights)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
