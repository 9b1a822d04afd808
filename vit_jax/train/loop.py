"""The training loop: config -> data -> model -> objective -> sharded train step -> checkpoints and metrics.

``train_and_evaluate(config, workdir)`` trains (or resumes) and returns the final eval metrics. Rerunning the same
command resumes from the latest checkpoint in ``workdir`` and continues exactly as if never interrupted: the data
order is a function of (seed, step), the dropout noise a function of the step, and metrics logged after the
checkpoint are dropped from ``metrics.jsonl`` and logged again.

Writes to ``workdir``: ``checkpoints/`` (orbax, the last ``keep_checkpoints``; atomic), TensorBoard events,
``metrics.jsonl`` (one JSON object per logged step) and ``config.json``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax.core import meta

from vit_jax import checkpoints, data, distributed, fewshot, hardware, models, sharding, workdir as workdir_lib
from vit_jax.objectives import create_objective
from vit_jax.train import checkpointing
from vit_jax.train.optim import create_optimizer
from vit_jax.train.validate import validate_config
from vit_jax.train.step import (TrainState, _model_init, abstract_state, init_state, make_eval_step, make_train_step,
                                place_frozen, state_shardings)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the last good checkpoint is intact."""


def build(config: ml_collections.ConfigDict, devices=None, info: data.DatasetInfo | None = None):
    """Validates the config against the data and the devices and builds the model, mesh and step counts.

    ``devices``: what the mesh is built over, by default this process's ``jax.devices()``; the devices of a
    deviceless topology (``vit_jax.aot``) compile the same step for hardware that is not here.

    Everything that can be checked before compiling is checked here, with errors that name the field.
    """
    info = data.dataset_info(config) if info is None else info
    overrides = {k: v for k, v in config.model.items() if v is not None}
    if 'image_size' in overrides:
        raise ValueError('Set config.image_size, not config.model.image_size: the data and the model share it.')
    mesh = sharding.create_mesh(**config.mesh, devices=devices)
    # The one place a hardware choice is made: the model is compiled for the mesh's devices (vit_jax.hardware).
    model = models.create_model(config.model_name, num_classes=info.num_classes, image_size=config.image_size,
                                platform=hardware.platform_of(mesh), **overrides)
    shards = sharding.num_batch_shards(mesh)
    for field in ('batch_size', 'eval_batch_size'):
        value = config[field]
        if value % shards or value % jax.process_count():
            raise ValueError(f'config.{field}={value} is not divisible by the {shards} batch shards of the mesh '
                             f'{dict(mesh.shape)} (data x fsdp) and {jax.process_count()} processes: use a multiple '
                             f'of {math.lcm(shards, jax.process_count())}.')
    microbatches = config.optimizer.microbatches
    if microbatches < 1 or config.batch_size % (microbatches * shards):
        raise ValueError(f'config.batch_size={config.batch_size} does not split into '
                         f'config.optimizer.microbatches={microbatches} slices over the {shards} batch shards of the '
                         f'mesh: use a batch size that is a multiple of {max(microbatches, 1) * shards}, or fewer '
                         f'micro-batches.')
    per_epoch = data.steps_per_epoch(config, info.num_train_examples)
    if per_epoch < 1:
        raise ValueError(f'config.batch_size={config.batch_size} is larger than the {info.num_train_examples} '
                         f'examples of {config.dataset}:{config.train_split}.')
    total_steps = int(config.total_steps) or int(math.ceil(config.num_epochs * per_epoch))
    return info, model, mesh, total_steps


def dataset_info_for_compile(config: ml_collections.ConfigDict) -> data.DatasetInfo:
    """The dataset's classes and split sizes where it is prepared here, else what a compile needs without it: the
    class count from the dataset's TFDS definition and a nominal 1000 steps' worth of examples (split sizes only set
    the schedule's length, which changes no shape)."""
    try:
        return data.dataset_info(config)
    except Exception:  # noqa: BLE001 - not prepared here (imagenet2012 on a laptop): its definition is enough
        import tensorflow_datasets as tfds
        from vit_jax.data import sources
        if config.dataset.startswith('folder:') or config.dataset == 'sklearn_digits':
            raise
        classes = sources.CLASS_COUNTS.get(config.dataset)
        if classes is None:
            classes = tfds.builder(config.dataset, data_dir=config.data_dir).info.features['label'].num_classes
        return data.DatasetInfo(name=config.dataset, num_classes=classes,
                                num_train_examples=1000 * int(config.batch_size),
                                num_eval_examples=int(config.eval_batch_size))


@dataclasses.dataclass
class Steps:
    """The jitted train and eval steps of a config on a mesh, with what built them (``build_steps``)."""
    config: ml_collections.ConfigDict
    info: data.DatasetInfo
    model: Any
    mesh: Any
    objective: Any
    tx: Any
    schedule: Any
    shardings: TrainState
    train_step: Any
    eval_step: Any
    total_steps: int

    @property
    def use_ema(self) -> bool:
        return self.config.optimizer.ema_decay > 0

    @property
    def batch_shards(self) -> int:
        return sharding.num_batch_shards(self.mesh)

    def abstract_state(self) -> TrainState:
        """The train state (with the objective's frozen state) as shapes with shardings, to restore into or lower."""
        return abstract_state(self.model, self.tx, self.mesh, self.config.image_size, self.use_ema, self.objective)

    def batch_shapes(self) -> tuple[dict, dict]:
        """One global train batch and one eval batch as shapes with the batch sharding."""
        target = sharding.batch_sharding(self.mesh)
        return tuple({k: jax.ShapeDtypeStruct(shape, dtype, sharding=target) for k, (shape, dtype) in batch.items()}
                     for batch in data.batch_shapes(self.config, self.info.num_classes))


def build_steps(config: ml_collections.ConfigDict, devices=None, info: data.DatasetInfo | None = None) -> Steps:
    """Config -> model -> objective -> optimizer -> the sharded, jitted train and eval steps, on ``devices``
    (default: this process's). ``vit_jax.main`` trains with them; ``vit_jax.aot`` compiles them for a topology that
    is not here, so both run the very same step."""
    info, model, mesh, total_steps = build(config, devices, info)
    validate_config(config, total_steps)  # warmup against a length that num_epochs gave
    objective = create_objective(config, model, info.num_classes)
    opt = config.optimizer
    accumulation = max(int(opt.accumulation_steps), 1)
    tx, schedule = create_optimizer(opt, total_steps // accumulation)
    shardings = state_shardings(model, tx, mesh, config.image_size, opt.ema_decay > 0, objective)
    train_step = make_train_step(objective, tx, shardings, mesh, schedule, config.seed, opt.ema_decay, accumulation,
                                 microbatches=int(opt.microbatches))
    eval_step = make_eval_step(objective, mesh, shardings)
    return Steps(config, info, model, mesh, objective, tx, schedule, shardings, train_step, eval_step, total_steps)


def _device_batches(it: Iterator[dict], mesh, size: int = 2) -> Iterator[dict]:
    """Host batches -> global arrays sharded over the batch axes, ``size`` batches ahead (transfers overlap steps)."""
    target = sharding.batch_sharding(mesh)
    queue = collections.deque()

    def put(batch):
        return {k: jax.make_array_from_process_local_data(target, v) for k, v in batch.items()}

    for batch in it:
        queue.append(put(batch))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def evaluate(eval_step, objective, state: TrainState, config, mesh, use_ema: bool,
             fewshot_features=None, num_classes: int = 0) -> dict[str, float]:
    """The objective's eval metrics (loss, top-1, top-5, ...) over the whole eval split (padding masked out), and
    the linear few-shot accuracies when ``fewshot_features`` is given (``vit_jax.fewshot``).

    With EMA the averaged parameters are evaluated (they are what T2T reports and releases).
    """
    params = state.ema_params if use_ema else state.params
    it = data.eval_iterator(config, process_index=jax.process_index(), process_count=jax.process_count())
    sums = None
    for batch in _device_batches(it, mesh):  # sums stay on device: one transfer at the end, not one per batch
        step_sums = eval_step(params, state.objective_params, state.frozen, batch)
        sums = step_sums if sums is None else jax.tree.map(jnp.add, sums, step_sums)
    totals = {k: float(v) for k, v in jax.device_get(sums or {}).items()}
    metrics = objective.eval_metrics(totals)
    if fewshot_features is not None:
        metrics.update(fewshot.evaluate(fewshot_features, params, config, mesh, _device_batches, num_classes))
    return metrics


class MetricsLog:
    """``metrics.jsonl``: one object per logged step. On resume, lines after the restored step are dropped."""

    def __init__(self, path: str, resume_step: int):
        self.path = workdir_lib.path(path)
        self.writer = jax.process_index() == 0  # one file for the whole job: the other processes never touch it
        text = workdir_lib.read_text(self.path) if self.writer else None
        if text is not None:
            kept = [line + '\n' for line in text.splitlines()
                    if line.strip() and json.loads(line)['step'] <= resume_step]
            workdir_lib.write_atomic(self.path, ''.join(kept))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer:
            workdir_lib.append_line(self.path, json.dumps({'step': step, **metrics}))


def _check_finite(pending: list[tuple[int, dict]], manager: ocp.CheckpointManager) -> None:
    """Raises at the first non-finite loss since the last log, naming the step; the metrics stay pending."""
    fetched = jax.device_get(pending)
    for step, metrics in fetched:
        loss = float(metrics['train_loss'])
        if not np.isfinite(loss):
            good = manager.latest_step()
            raise NonFiniteLossError(
                f'Training loss is {loss} at step {step}. The last good checkpoint (step {good}) in '
                f'{manager.directory} is intact; lower the learning rate or enable grad_clip_norm, then rerun.')


def _summarise(pending: list[tuple[int, dict]], manager: ocp.CheckpointManager) -> dict[str, float]:
    """Checks and averages the metrics of the steps since the last log, and clears them."""
    _check_finite(pending, manager)
    fetched = jax.device_get(pending)
    # Means over the steps since the last log; the learning rate is the current one.
    means = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]} if fetched else {}
    if fetched:
        means['learning_rate'] = float(fetched[-1][1]['learning_rate'])
    pending.clear()
    return means


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, compiled: str | None = None
                       ) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the final eval metrics.

    ``compiled``: a file of ``python -m vit_jax.aot --save`` for this config and these devices, whose train and eval
    steps run instead of compiling them here (refused, naming the difference, when it was built for another).
    Raises ``checkpointing.Preempted`` after saving when SIGTERM arrives (``vit_jax.main`` exits 143).
    """
    validate_config(config)  # every value that cannot work, named with its range, before anything is built
    changes = checkpointing.check_resume_config(config, workdir)  # another model or data: refused, field by field
    if config.fewshot.enabled not in ('auto', 'on', 'off'):
        raise ValueError(f'config.fewshot.enabled={config.fewshot.enabled!r} is not one of (auto, on, off).')
    steps = build_steps(config)
    info, model, mesh, total_steps = steps.info, steps.model, steps.mesh, steps.total_steps
    objective, tx, shardings = steps.objective, steps.tx, steps.shardings
    train_step, eval_step = steps.train_step, steps.eval_step
    if compiled:
        from vit_jax.aot import saved
        train_step, eval_step = saved.load(compiled, config, mesh.devices.flat)
        logging.info('Running the steps compiled in %s.', compiled)
    checkpointing.check_total_steps(config, total_steps, workdir)
    workdir_lib.path(workdir).mkdir(parents=True, exist_ok=True)  # a local folder or a bucket (gs://) alike
    use_ema = steps.use_ema
    frozen = objective.load_frozen()  # read from its source at every start: a workdir never holds it

    manager = ocp.CheckpointManager(
        workdir_lib.path(workdir) / 'checkpoints',
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
    latest = manager.latest_step()
    if latest is not None:  # restored into the abstract state: no random state is built first
        abstract = steps.abstract_state().to_save()
        state, latest = checkpointing.restore_newest(manager, abstract)  # skips (moves aside) what does not restore
        state = state.replace(frozen=place_frozen(frozen, shardings))
        logging.info('Resumed from step %d of %s.', latest, manager.directory)
    else:
        state, _ = init_state(model, tx, mesh, config.image_size, config.seed, use_ema, objective, frozen)
        if config.init_from.path:
            state = _init_from_pretrained(state, shardings, model, config.init_from, config.image_size, config.seed)
    start_step = int(jax.device_get(state.step))

    log = MetricsLog(workdir_lib.path(workdir) / 'metrics.jsonl', start_step)
    from clu import metric_writers, periodic_actions  # they import TensorFlow: here, so that a compile loads none
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    if start_step == 0:
        writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})
    checkpointing.record_config(workdir, config, start_step, changes)  # the config in use, and what a resume changed
    logging.info('%s on %s: %d classes, %d train examples, %d steps of %d images, mesh %s.', config.model_name,
                 config.dataset, info.num_classes, info.num_train_examples, total_steps, config.batch_size,
                 dict(mesh.shape))

    fewshot_on = config.fewshot.enabled == 'on' or (config.fewshot.enabled == 'auto' and objective.self_supervised)
    features = fewshot.representation_fn(model, mesh, shardings.params) if fewshot_on else None
    evaluate_all = functools.partial(evaluate, eval_step, objective, fewshot_features=features,
                                     num_classes=info.num_classes)
    batches = _device_batches(data.train_iterator(config, seed=config.seed, start_step=start_step,
                                                  process_index=jax.process_index(),
                                                  process_count=jax.process_count()), mesh)

    report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_secs=30.0)
    hooks = [report]
    if config.profile and jax.process_index() == 0:
        hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))

    watch = distributed.PreemptionWatch().start()  # SIGTERM to any process: all of them save one step and stop
    preempted = False
    pending: list[tuple[int, dict]] = []
    eval_metrics: dict[str, float] = {}
    try:
        step = start_step
        while step < total_steps:
            with jax.profiler.StepTraceAnnotation('train', step_num=step):
                state, metrics = train_step(state, next(batches))
            step += 1
            pending.append((step, metrics))
            for hook in hooks:
                hook(step)
            last = step == total_steps
            logged: dict[str, float] = {}
            if step % config.log_every == 0 or last:
                logged.update(_summarise(pending, manager))
            if step % config.eval_every == 0 or last:
                eval_metrics = evaluate_all(state, config, mesh, use_ema)
                logged.update(eval_metrics)
            if logged:
                writer.write_scalars(step, logged)
                log.write(step, logged)
            preempted = watch(step)  # every step, in every process: the processes agree on the step to stop at
            if step % config.checkpoint_every == 0 or last or preempted:
                _check_finite(pending, manager)  # never save a state that came from a non-finite loss
                checkpointing.save(manager, step, state.to_save())  # waits: a failure names its step
            if preempted:  # saved above; main exits 143 so that schedulers and `make demo` see an unfinished run
                raise checkpointing.Preempted(step, os.fspath(manager.directory))
        if start_step == total_steps:  # a finished workdir: report its result instead of nothing
            eval_metrics = evaluate_all(state, config, mesh, use_ema)
        if step == total_steps and not preempted:
            manager.wait_until_finished()
            _write_done(workdir, step, eval_metrics)
    finally:
        watch.stop()
        manager.wait_until_finished()
        writer.flush()
    return eval_metrics


def _write_done(workdir: str, step: int, eval_metrics: dict[str, float]) -> None:
    """``DONE``, written last (atomically) by a finished run: sweeps skip its workdir."""
    if jax.process_index() == 0:
        workdir_lib.write_atomic(workdir_lib.path(workdir) / 'DONE', json.dumps({'step': step, **eval_metrics}))


def _pretraining_objective(path: str) -> str | None:
    """The objective a vit_jax workdir was trained with (its config.json, from the workdir, checkpoints/ or a step)."""
    for folder in (path, os.path.join(path, os.pardir), os.path.join(path, os.pardir, os.pardir)):
        candidate = os.path.join(folder, 'config.json')
        if os.path.isfile(candidate):
            try:
                with open(candidate) as f:
                    return json.load(f).get('objective', 'supervised')
            except (OSError, ValueError):
                return None
    return None


def _init_from_pretrained(state: TrainState, shardings: TrainState, model, init_from, image_size: int,
                          seed: int) -> TrainState:
    """Fine-tuning: the pretrained weights, adapted to this model, replace the initial parameters (and EMA).

    Loaded and adapted on the host, then each device takes its own slices: parameters sharded over hosts are never
    gathered (``jax.device_get`` of them fails where a process does not hold every shard).
    """
    params = checkpoints.load_pretrained(init_from.path, model, _host_init_params(model, image_size, seed),
                                         init_from.format, init_from.posemb_resize, init_from.skip, log=logging.info)
    params = jax.tree.map(lambda x, ref, s: jax.make_array_from_callback(
        ref.shape, s, lambda idx, x=np.asarray(x, ref.dtype): x[idx]), params, state.params, shardings.params)
    logging.info('Initialised from %s.', init_from.path)
    pretraining = _pretraining_objective(init_from.path)
    if pretraining not in (None, 'supervised'):
        logging.info('Dropped the %s objective\'s own parameters of %s (they are not the encoder\'s): only the '
                     'model\'s parameters are fine-tuned.', pretraining, init_from.path)
    # The EMA starts from its own copy: the donated step must not see one buffer twice.
    ema = jax.tree.map(jnp.copy, params) if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema)


def _host_init_params(model, image_size: int, seed: int) -> Any:
    """The initial parameters (the new head, ``skip``'s) as host arrays, computed on this process's first device.

    The same values as the sharded state's: init_state draws them from the same key, and JAX's partitionable
    threefry makes random numbers independent of the sharding.
    """
    with jax.default_device(jax.local_devices()[0]):
        params = jax.jit(functools.partial(_model_init, model, image_size))(jax.random.key(seed))
    return jax.device_get(meta.unbox(params))


def _flatten(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
