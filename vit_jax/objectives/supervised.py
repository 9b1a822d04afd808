"""Supervised classification: cross-entropy against the pipeline's soft targets (label smoothing, mixup/cutmix)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array, prefix: str = '') -> dict:
    """Sums of the cross-entropy, top-1 and top-5 hits over the unmasked examples (integer labels)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {f'{prefix}loss': jnp.sum(loss * mask), f'{prefix}top1': jnp.sum((top5[:, 0] == labels) * mask),
            f'{prefix}top5': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask)}


@dataclasses.dataclass(frozen=True)
class Objective:
    """The defaults of every objective: no parameters of its own, no frozen state, a classifier's eval.

    Subclasses override ``loss`` and whatever else their method adds (see ``vit_jax.objectives``).
    """

    model: nn.Module
    self_supervised = False  # True: no labels used; the loop adds the linear few-shot eval (config.fewshot)

    def init(self, rng: jax.Array, image_size: int) -> Any:
        """The objective's own trained parameters (boxed with logical axes, like a model's ``init``)."""
        return {}

    def frozen_shapes(self) -> Any:
        """Shapes (boxed with logical axes) of the frozen state, or None."""
        return None

    def load_frozen(self) -> Any:
        """The frozen state as host arrays, read from its source (at start and on every resume), or None."""
        return None

    def loss(self, params: Any, objective_params: Any, frozen: Any, batch: dict[str, jax.Array],
             rng: jax.Array) -> tuple[jax.Array, dict]:
        raise NotImplementedError

    def eval_sums(self, params: Any, objective_params: Any, frozen: Any, batch: dict[str, jax.Array]) -> dict:
        """Sums over one padded eval batch (``batch['mask']`` marks the real examples); 'count' is required."""
        logits = self.model.apply({'params': params}, batch['images'], train=False)
        return {**classification_sums(logits, batch['labels'], batch['mask']), 'count': jnp.sum(batch['mask'])}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Totals of ``eval_sums`` over the eval split -> the logged metrics (means, prefixed ``eval_``)."""
        count = max(totals.get('count', 0.0), 1.0)
        return {f'eval_{k}': v / count for k, v in totals.items() if k != 'count'}


@dataclasses.dataclass(frozen=True)
class Supervised(Objective):

    def loss(self, params, objective_params, frozen, batch, rng):
        logits = self.model.apply({'params': params}, batch['images'], train=True, rngs={'dropout': rng})
        if isinstance(logits, tuple):
            # A distilled DeiT trained without a teacher: both heads learn the labels (DeiT's no-distillation case).
            loss = sum(optax.softmax_cross_entropy(l, batch['labels']).mean() for l in logits) / len(logits)
            logits = logits[0]
        else:
            loss = optax.softmax_cross_entropy(logits, batch['labels']).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch['labels'], -1))
        return loss, {'train_loss': loss, 'train_accuracy': accuracy}
