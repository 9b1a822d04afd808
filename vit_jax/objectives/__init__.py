"""Objectives: what a train step optimises and what its eval measures. The step never branches on which one.

An objective is a frozen dataclass holding the model (and whatever else it needs) with five methods:

- ``init(rng, image_size)``: its own trained parameters, boxed with logical axes like a model's (MPP's mask token
  and head, MAE's decoder); ``{}`` for none. They live in ``TrainState.objective_params``, are sharded, optimised and
  saved like the model's, and are dropped when the encoder is fine-tuned or exported (only ``params`` are read).
- ``frozen_shapes()`` / ``load_frozen()``: frozen state (a distillation teacher): sharded in ``TrainState.frozen``,
  no gradient and no optimizer state, never saved; ``load_frozen`` reads it from its source at start and on resume.
- ``loss(params, objective_params, frozen, batch, rng) -> (loss, metrics)``: one batch's loss and scalars to log.
- ``eval_sums(params, objective_params, frozen, batch) -> sums`` and ``eval_metrics(totals)``: the objective's eval.

It reaches into the model through the model's stages (``embed`` -> ``encode(tokens, positions=...)`` ->
``classify``), never through a copy of it. Adding an objective touches this package and a config, nothing else:

    @dataclasses.dataclass(frozen=True)
    class ReconstructMeanPatch(Objective):          # an example: predict each patch's mean from its token
        def init(self, rng, image_size):
            d = self.model.hidden_size
            return {'head': nn.with_logical_partitioning(nn.initializers.zeros, ('embed', None))(rng, (d, 3))}

        def loss(self, params, objective_params, frozen, batch, rng):
            x = batch['images']
            tokens = self.model.apply({'params': params}, x, train=True, rngs={'dropout': rng},
                                      method=lambda m, x, train: m.encode(m.embed(x, train), train))
            p = self.model.patch_size
            target = einops.reduce(x, 'b (h p1) (w p2) c -> b (h w) c', 'mean', p1=p, p2=p)
            prediction = tokens[:, self.model.num_prefix_tokens:] @ objective_params['head']
            loss = jnp.mean((prediction - target) ** 2)
            return loss, {'train_loss': loss}

        def eval_sums(self, params, objective_params, frozen, batch):
            loss, _ = self.loss(params, objective_params, frozen, batch, jax.random.key(0))
            return {'loss': loss * batch['mask'].sum(), 'count': batch['mask'].sum()}

    # and in create_objective: if config.objective == 'mean_patch': return ReconstructMeanPatch(model)
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from vit_jax.objectives.distillation import Distillation, create_distillation
from vit_jax.objectives.masked import MAE, MaskedPatchPrediction, create_masked
from vit_jax.objectives.supervised import Objective, Supervised

OBJECTIVES = ('supervised', 'distillation', 'masked_patch_prediction', 'mae')


def create_objective(config: ml_collections.ConfigDict, model: nn.Module, num_classes: int) -> Objective:
    """The objective named by ``config.objective``, its fields checked (before anything compiles)."""
    if config.objective == 'supervised':
        return Supervised(model)
    if config.objective == 'distillation':
        return create_distillation(config, model, num_classes)
    if config.objective in ('masked_patch_prediction', 'mae'):
        return create_masked(config, model, config.objective)
    raise ValueError(f'config.objective={config.objective!r} is not one of {OBJECTIVES}.')


__all__ = ['MAE', 'OBJECTIVES', 'Distillation', 'MaskedPatchPrediction', 'Objective', 'Supervised',
           'create_objective']
