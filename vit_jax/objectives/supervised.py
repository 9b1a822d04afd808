"""Supervised classification: cross-entropy against the pipeline's soft targets (label smoothing, mixup/cutmix)."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Supervised:
    model: nn.Module

    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]:
        logits = self.model.apply({'params': params}, batch['images'], train=True, rngs={'dropout': rng})
        if isinstance(logits, tuple):
            # A distilled DeiT trained without a teacher: both heads learn the labels (DeiT's no-distillation case).
            loss = sum(optax.softmax_cross_entropy(l, batch['labels']).mean() for l in logits) / len(logits)
            logits = logits[0]
        else:
            loss = optax.softmax_cross_entropy(logits, batch['labels']).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(batch['labels'], -1))
        return loss, {'train_loss': loss, 'train_accuracy': accuracy}
