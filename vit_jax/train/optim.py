"""The optimizer of a recipe: optax chain from ``config.optimizer``.

    clip (global norm) -> Adam(W) / SGD-momentum with weight decay on weights only -> learning-rate schedule
    (linear warmup, then cosine / linear / constant), frozen parameters untouched, optional gradient accumulation.

No weight decay on biases, norms, position embeddings and tokens (DeiT, timm): decay applies to parameters with at
least two dimensions, except position embeddings and tokens, which have three but are embeddings, not weights.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from flax import traverse_util

from vit_jax.models import is_frozen

NO_DECAY = ('pos_embed', 'class_token', 'distillation_token')


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then the decay named by ``opt.schedule`` until ``total_steps``."""
    warmup = int(opt.warmup_steps)
    decay_steps = max(total_steps - warmup, 1)
    if opt.schedule == 'cosine':
        decay = optax.cosine_decay_schedule(opt.learning_rate, decay_steps, opt.end_learning_rate / opt.learning_rate
                                            if opt.learning_rate else 0.0)
    elif opt.schedule == 'linear':
        decay = optax.linear_schedule(opt.learning_rate, opt.end_learning_rate, decay_steps)
    elif opt.schedule == 'constant':
        decay = optax.constant_schedule(opt.learning_rate)
    else:
        raise ValueError(f'optimizer.schedule={opt.schedule!r} is not one of (cosine, linear, constant).')
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, opt.learning_rate, warmup), decay], [warmup])


def _labels(params: Any, rule) -> Any:
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: rule(k, v) for k, v in flat.items()})


def weight_decay_mask(params: Any) -> Any:
    """True where weight decay applies: kernels (ndim >= 2), not position embeddings or tokens.

    Frozen parameters reach here as optax ``MaskedNode``s (``multi_transform`` hides them): no ndim, no decay.
    """
    return _labels(params, lambda path, x: getattr(x, 'ndim', 0) >= 2 and path[-1] not in NO_DECAY)


def create_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation,
                                                                             optax.Schedule]:
    """The optax transformation and its schedule (for logging) from ``config.optimizer``."""
    schedule = learning_rate_schedule(opt, total_steps)
    chain = []
    if opt.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.name == 'adamw':
        chain.append(optax.adamw(schedule, opt.b1, opt.b2, opt.eps, weight_decay=opt.weight_decay,
                                 mask=weight_decay_mask))
    elif opt.name == 'adam':  # vision_transformer's pretraining: L2 decay added to the gradients
        if opt.weight_decay:
            chain.append(optax.add_decayed_weights(opt.weight_decay, mask=weight_decay_mask))
        chain.append(optax.adam(schedule, opt.b1, opt.b2, opt.eps))
    elif opt.name == 'sgd':
        chain.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
        if opt.weight_decay:
            chain.insert(-1, optax.add_decayed_weights(opt.weight_decay, mask=weight_decay_mask))
    else:
        raise ValueError(f'optimizer.name={opt.name!r} is not one of (adamw, adam, sgd).')
    tx = optax.chain(*chain)
    # Frozen tensors of the originals (T2T's sinusoid table, Performer features) are never updated.
    tx = optax.multi_transform({'train': tx, 'frozen': optax.set_to_zero()},
                               lambda params: _labels(params, lambda path, _: 'frozen' if is_frozen(path) else 'train'))
    if opt.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulation_steps)
    return tx, schedule


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """Exponential moving average of parameters (Polyak averaging; T2T evaluates and releases these weights)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
