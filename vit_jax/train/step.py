"""The train state and the jitted steps, with explicit shardings over the mesh.

    state = init_state(...)           # parameters created already sharded (init jitted with out_shardings)
    state, metrics = train_step(state, batch)   # donated state; the objective's loss, backward, update (+ EMA)
    sums = eval_step(params, objective_params, frozen, batch)   # the objective's sums over the unmasked examples
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.core import meta
from jax.sharding import Mesh

from vit_jax import sharding
from vit_jax.train.optim import ema_update


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any            # the model's parameters
    objective_params: Any  # the objective's own trained parameters (MPP's head, MAE's decoder); {} for most
    opt_state: Any         # over trainable(): {'model': params, 'objective': objective_params}
    ema_params: Any        # None unless config.optimizer.ema_decay > 0
    frozen: Any = None     # the objective's frozen state (a distillation teacher): no gradient, never saved

    def trainable(self) -> dict[str, Any]:
        return {'model': self.params, 'objective': self.objective_params}

    def to_save(self) -> 'TrainState':
        """What a checkpoint holds: everything but the frozen state, which is reloaded from its source."""
        return self.replace(frozen=None)


def _objective(model: nn.Module, objective):
    if objective is None:
        from vit_jax.objectives import Supervised
        return Supervised(model)
    return objective


def init_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, image_size: int, seed: int,
               use_ema: bool, objective=None, frozen: Any = None) -> tuple[TrainState, TrainState]:
    """Creates the train state directly in its shardings; returns it and the tree of those shardings.

    ``frozen``: the objective's frozen state as host arrays (``objective.load_frozen()``), placed with its shardings.
    """
    objective = _objective(model, objective)
    shardings = state_shardings(model, tx, mesh, image_size, use_ema, objective)
    init = functools.partial(_new_state, model, objective, tx, image_size, use_ema)
    state = jax.jit(init, out_shardings=shardings.replace(frozen=None))(jax.random.key(seed))
    return state.replace(frozen=place_frozen(frozen, shardings)), shardings


def place_frozen(frozen: Any, shardings: TrainState) -> Any:
    """Host arrays of the frozen state -> global arrays in the state's shardings (never jit constants)."""
    if frozen is None:
        return None
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), frozen,
                        shardings.frozen)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, image_size: int,
                   use_ema: bool, objective=None) -> TrainState:
    """The train state's shapes, dtypes and shardings, without creating it (to restore into, lower or compile)."""
    objective = _objective(model, objective)
    shapes = jax.eval_shape(functools.partial(_new_state, model, objective, tx, image_size, use_ema),
                            jax.random.key(0))
    shardings = state_shardings(model, tx, mesh, image_size, use_ema, objective)
    frozen = objective.frozen_shapes()
    if frozen is not None:
        shapes = shapes.replace(frozen=meta.unbox(frozen))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _model_init(model, image_size, rng):
    return model.init(rng, jnp.zeros((1, image_size, image_size, 3)))['params']


def _new_state(model, objective, tx, image_size, use_ema, rng) -> TrainState:
    params = meta.unbox(_model_init(model, image_size, rng))
    objective_params = meta.unbox(objective.init(jax.random.fold_in(rng, 1), image_size))
    trainable = {'model': params, 'objective': objective_params}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, objective_params=objective_params,
                      opt_state=tx.init(trainable), ema_params=params if use_ema else None)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, image_size: int,
                    use_ema: bool, objective=None) -> TrainState:
    """Shardings of the train state: parameters by their logical axes; optimizer moments follow their parameter."""
    objective = _objective(model, objective)
    rng = jax.random.key(0)
    boxed = {'model': jax.eval_shape(functools.partial(_model_init, model, image_size), rng),
             'objective': jax.eval_shape(functools.partial(objective.init, image_size=image_size), rng)}
    trainable = sharding.tree_shardings(boxed, mesh)
    abstract = meta.unbox(boxed)
    by_path = {_dict_keys(path): (leaf.shape, s) for (path, leaf), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(trainable))}

    def opt_leaf(path, leaf):
        # An optimizer leaf whose path ends with a parameter's path and has its shape (Adam's mu and nu, momentum,
        # MultiSteps' accumulated gradients) is sharded like that parameter; anything else (counts) is replicated.
        keys = _dict_keys(path)
        for start in range(len(keys)):
            shape, s = by_path.get(keys[start:], (None, None))
            if s is not None and shape == leaf.shape:
                return s
        return sharding.replicated(mesh)

    opt = jax.tree_util.tree_map_with_path(opt_leaf, jax.eval_shape(tx.init, abstract))
    frozen = objective.frozen_shapes()
    return TrainState(step=sharding.replicated(mesh), params=trainable['model'],
                      objective_params=trainable['objective'], opt_state=opt,
                      ema_params=trainable['model'] if use_ema else None,
                      frozen=None if frozen is None else sharding.tree_shardings(frozen, mesh))


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(p.key) for p in path if isinstance(p, jax.tree_util.DictKey))


def microbatched_grad(loss_fn: Callable, microbatches: int, mesh: Mesh) -> Callable:
    """``jax.value_and_grad(loss_fn, has_aux=True)`` over ``microbatches`` equal slices of the batch, one at a time.

    The batch's mean loss is the mean of its slices' mean losses, so this is the batch's gradient (up to the order
    of float sums) and its metrics are the slices' means. Only one slice's activations are alive at once: the step
    needs about 1/microbatches of the memory, and on CPU its activations stay in cache (``vit_jax.bench
    --microbatches``). Slice ``i`` holds examples ``i, i + m, i + 2m, ...``, so that every device keeps its share of
    every slice and the batch sharding needs no data movement. Slice ``i`` draws its noise (dropout, stochastic
    depth) from ``fold_in(rng, i)``.
    """
    if microbatches < 1:
        raise ValueError(f'microbatches={microbatches}: give 1 (the whole batch at once) or more slices.')
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if microbatches == 1:
        return grad_fn
    slices = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))

    def split(x):
        shards = sharding.num_batch_shards(mesh)
        if x.shape[0] % (microbatches * shards):
            raise ValueError(f'A batch of {x.shape[0]} does not split into {microbatches} micro-batches over the '
                             f'{shards} batch shards of the mesh: make batch_size a multiple of optimizer.microbatches '
                             f'x {shards} = {microbatches * shards}.')
        x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), slices)

    def grads(params, batch, rng):
        batch = jax.tree.map(split, batch)

        def add_slice(total, inputs):
            i, micro = inputs
            return jax.tree.map(jnp.add, total, grad_fn(params, micro, jax.random.fold_in(rng, i))), None

        first = jax.tree.map(lambda x: x[0], batch)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first, rng))
        total, _ = jax.lax.scan(add_slice, zeros, (jnp.arange(microbatches), batch))
        return jax.tree.map(lambda t: t / microbatches, total)

    return grads


def make_train_step(objective, tx: optax.GradientTransformation, shardings: TrainState, mesh: Mesh,
                    schedule: optax.Schedule, seed: int, ema_decay: float, accumulation_steps: int = 1,
                    microbatches: int = 1) -> Callable:
    """The jitted train step: ``(state, batch) -> (state, metrics)``; the state is donated.

    Gradients are taken of the objective's loss with respect to ``state.trainable()`` (the model's and the
    objective's own parameters); the frozen state goes in as an argument and gets none.
    """
    base_rng = jax.random.key(seed + 1)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        with sharding.batch_split_tokens(mesh):
            return _step(state, batch)

    def _step(state: TrainState, batch: dict[str, jax.Array]):
        def loss_fn(trainable, batch, rng):
            return objective.loss(trainable['model'], trainable['objective'], state.frozen, batch, rng)

        grad_fn = microbatched_grad(loss_fn, microbatches, mesh)
        rng = jax.random.fold_in(base_rng, state.step)  # a function of the step: resuming replays the same noise
        (loss, metrics), grads = grad_fn(state.trainable(), batch, rng)
        trainable = state.trainable()
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        params = trainable['model']
        ema = state.ema_params
        if ema is not None:
            # Once per optimizer update: under accumulation the parameters only move every k-th step.
            updated = (state.step + 1) % accumulation_steps == 0
            ema = jax.tree.map(lambda new, old: jnp.where(updated, new, old), ema_update(ema, params, ema_decay), ema)
        update_step = state.step // accumulation_steps  # the schedule counts optimizer updates
        metrics = dict(metrics, learning_rate=schedule(update_step), grad_norm=optax.global_norm(grads))
        return state.replace(step=state.step + 1, params=params, objective_params=trainable['objective'],
                             opt_state=opt_state, ema_params=ema), metrics

    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(objective, mesh: Mesh, shardings: TrainState) -> Callable:
    """The jitted eval step ``(params, objective_params, frozen, batch) -> sums`` over one padded batch.

    What it sums (loss, top-1, top-5, per-head accuracies, ...) is the objective's (``objective.eval_sums``);
    ``objective.eval_metrics`` turns the totals into metrics.
    """
    def eval_sums(*args):
        with sharding.batch_split_tokens(mesh):
            return objective.eval_sums(*args)

    return jax.jit(eval_sums,
                   in_shardings=(shardings.params, shardings.objective_params, shardings.frozen,
                                 sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
