"""Objectives: the loss of one batch. The train step takes an objective and never branches on which one it is.

An objective is an object with ``loss(params, batch, rng) -> (loss, metrics)``: ``params`` the model's parameters,
``batch`` the input pipeline's dict, ``rng`` this step's dropout key; ``metrics`` a dict of scalars to log.
"""

from __future__ import annotations

from typing import Any, Protocol

import flax.linen as nn
import jax

from vit_jax.objectives.supervised import Supervised

OBJECTIVES = ('supervised',)


class Objective(Protocol):
    def loss(self, params: Any, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, dict]: ...


def create_objective(name: str, model: nn.Module) -> Objective:
    """The objective named by ``config.objective``."""
    if name == 'supervised':
        return Supervised(model)
    raise ValueError(f'objective={name!r} is not one of {OBJECTIVES}.')


__all__ = ['OBJECTIVES', 'Objective', 'Supervised', 'create_objective']
