"""The train state and the jitted steps, with explicit shardings over the mesh.

    state = init_state(...)           # parameters created already sharded (init jitted with out_shardings)
    state, metrics = train_step(state, batch)   # donated state; forward, backward, optimizer update (+ EMA)
    sums = eval_step(params, batch)   # loss / top-1 / top-5 sums over the unmasked examples
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
    params: Any
    opt_state: Any
    ema_params: Any  # None unless config.optimizer.ema_decay > 0


def init_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, image_size: int, seed: int,
               use_ema: bool) -> tuple[TrainState, TrainState]:
    """Creates the train state directly in its shardings; returns it and the tree of those shardings."""
    shardings = state_shardings(model, tx, mesh, image_size, use_ema)
    init = functools.partial(_new_state, model, tx, image_size, use_ema)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return state, shardings


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, image_size: int,
                   use_ema: bool) -> TrainState:
    """The train state's shapes, dtypes and shardings, without creating it (to lower or compile a step)."""
    shapes = jax.eval_shape(functools.partial(_new_state, model, tx, image_size, use_ema), jax.random.key(0))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(model, tx, mesh, image_size, use_ema))


def _new_state(model, tx, image_size, use_ema, rng) -> TrainState:
    params = meta.unbox(model.init(rng, jnp.zeros((1, image_size, image_size, 3)))['params'])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if use_ema else None)


def state_shardings(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, image_size: int,
                    use_ema: bool) -> TrainState:
    """Shardings of the train state: parameters by their logical axes; optimizer moments follow their parameter."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))['params']
    params = sharding.tree_shardings(boxed, mesh)
    abstract_params = meta.unbox(boxed)
    by_path = {_dict_keys(path): (leaf.shape, s) for (path, leaf), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(params))}

    def opt_leaf(path, leaf):
        # An optimizer leaf whose path ends with a parameter's path and has its shape (Adam's mu and nu, momentum,
        # MultiSteps' accumulated gradients) is sharded like that parameter; anything else (counts) is replicated.
        keys = _dict_keys(path)
        for start in range(len(keys)):
            shape, s = by_path.get(keys[start:], (None, None))
            if s is not None and shape == leaf.shape:
                return s
        return sharding.replicated(mesh)

    opt = jax.tree_util.tree_map_with_path(opt_leaf, jax.eval_shape(tx.init, abstract_params))
    return TrainState(step=sharding.replicated(mesh), params=params, opt_state=opt,
                      ema_params=params if use_ema else None)


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
    """The jitted train step: ``(state, batch) -> (state, metrics)``; the state is donated."""
    base_rng = jax.random.key(seed + 1)
    grad_fn = microbatched_grad(objective.loss, microbatches, mesh)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(base_rng, state.step)  # a function of the step: resuming replays the same noise
        (loss, metrics), grads = grad_fn(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, ema_decay)
        update_step = state.step // accumulation_steps  # the schedule counts optimizer updates
        metrics = dict(metrics, learning_rate=schedule(update_step), grad_norm=optax.global_norm(grads))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model: nn.Module, mesh: Mesh, param_shardings: Any) -> Callable:
    """The jitted eval step: sums of loss, top-1 and top-5 hits and the example count over one padded batch."""

    def step(params, batch):
        logits = model.apply({'params': params}, batch['images'], train=False)
        labels, mask = batch['labels'], batch['mask']
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
        return {'loss': jnp.sum(loss * mask), 'top1': jnp.sum((top5[:, 0] == labels) * mask),
                'top5': jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask), 'count': jnp.sum(mask)}

    return jax.jit(step, in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
                   out_shardings=sharding.replicated(mesh))
