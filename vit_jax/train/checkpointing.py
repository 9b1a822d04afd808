"""Checkpoints that lose nothing: restore with fallback, saves that fail clearly, and resume guards on the config.

    changes = check_resume_config(config, workdir)        # before building: architecture/data changes are errors
    check_total_steps(config, total_steps, workdir)        # a run cannot be shortened below where it stands
    state, step = restore_newest(manager, abstract_state)  # skips (and moves aside) checkpoints that do not restore
    save(manager, step, state)                             # disk full: one error, partial save removed
    record_config(workdir, config, step, changes)          # config.json: the current config and its history

A checkpoint that fails to restore is moved to ``WORKDIR/corrupt_checkpoints/STEP`` (never deleted) once an older one
restores; if none does, all are left in place and one error names the folder. ``SIGTERM`` ends a run with
``Preempted`` after its save, which ``vit_jax.main`` turns into exit status 143 (128 + SIGTERM, as torchrun and
SLURM report a terminated job), so schedulers and ``make demo`` see that the run did not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import gc
import glob
import json
import logging
import os
import shutil
import sys
import warnings
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath

from vit_jax import workdir as workdir_lib

PREEMPTED_EXIT_STATUS = 143  # 128 + SIGTERM(15): what a shell, torchrun and SLURM report for a terminated job
CONFIG_FILE = 'config.json'
HISTORY_KEY = 'history'  # in config.json: the changes made at each resume with another config
CORRUPT_DIR = 'corrupt_checkpoints'
_ORBAX_TMP = '.orbax-checkpoint-tmp'
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# A checkpoint cannot continue with another value of these: they build another model, read other data or give the
# train state another structure. Everything else (learning rate, steps, cadences, augmentation, ...) may change.
INCOMPATIBLE_FIELDS = ('model_name', 'model.*', 'dataset', 'image_size', 'objective', 'optimizer.name',
                       'optimizer.accumulation_steps',
                       # The shapes of an objective's own parameters (MAE's decoder, MPP's head) are in the checkpoint.
                       'mae.decoder_width', 'mae.decoder_depth', 'mae.decoder_heads', 'mpp.target', 'mpp.bits')
# Model fields that change the computation but not the parameters: legal mid-run.
RUNTIME_MODEL_FIELDS = ('model.dropout_rate', 'model.attention_dropout_rate', 'model.drop_path_rate', 'model.dtype',
                        'model.remat', 'model.attention_impl')


class Preempted(Exception):
    """SIGTERM arrived: the state was saved at ``step`` in ``directory``; rerunning the command resumes."""

    exit_status = PREEMPTED_EXIT_STATUS

    def __init__(self, step: int, directory: str):
        self.step, self.directory = step, directory
        super().__init__(f'SIGTERM: saved step {step} to {directory}; rerun the same command to resume '
                         f'(exit status {PREEMPTED_EXIT_STATUS}).')


class CheckpointRestoreError(RuntimeError):
    """No checkpoint of the workdir restores; they are all left in place."""


class CheckpointSaveError(OSError):
    """A save failed (the disk is full); its partial files were removed and the complete checkpoints kept."""


class ConfigMismatchError(ValueError):
    """The config changes what the workdir's checkpoints cannot continue with (model, data, train state)."""


# Reading the workdir --------------------------------------------------------------------------------------------------

def checkpoint_dir(workdir: str) -> str:
    return os.fspath(workdir_lib.path(workdir) / 'checkpoints')  # gs://... as it is, a local path made absolute


def saved_steps(directory: str) -> list[int]:
    """The steps of the complete checkpoints in an orbax ``directory`` (temporary folders of unfinished saves are not)."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def workdir_step(workdir: str) -> int | None:
    """The newest checkpoint step of ``workdir``, read from the folder names (nothing is restored)."""
    steps = saved_steps(checkpoint_dir(workdir))
    return steps[-1] if steps else None


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json holds it (tuples as lists, placeholders as their values)."""
    return json.loads(config.to_json_best_effort())


def _incompatible(field: str) -> bool:
    if field in RUNTIME_MODEL_FIELDS:
        return False
    return any(field == f or (f.endswith('.*') and field.startswith(f[:-1])) for f in INCOMPATIBLE_FIELDS)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``field -> (old, new)`` for every field both configs have and that differs (history not compared)."""
    old, new = _flatten({k: v for k, v in old.items() if k != HISTORY_KEY}), _flatten(new)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys()) if old[k] != new[k]}


def _format_changes(changes: dict[str, tuple[Any, Any]], indent: str = '  ') -> str:
    return '\n'.join(f'{indent}{k}: {old!r} -> {new!r}' for k, (old, new) in changes.items())


def check_resume_config(config: ml_collections.ConfigDict, workdir: str,
                        log: Callable[[str], None] = logging.warning) -> dict[str, tuple[Any, Any]]:
    """Compares ``config`` with the config.json of a workdir that has checkpoints, before anything is built.

    Raises ConfigMismatchError listing every changed field that a checkpoint cannot continue with (the model, the
    dataset, the image size, the objective, the optimizer's state); logs one warning listing the legal changes
    (learning rate, total steps, cadences, ...) and returns them, for ``record_config``. A workdir without
    checkpoints (or without config.json, as written before these checks) returns {}.
    """
    path = workdir_lib.path(workdir) / CONFIG_FILE
    step = workdir_step(workdir)
    if step is None or not path.exists():
        return {}
    old = json.loads(path.read_text())
    changes = config_changes(old, _config_dict(config))
    # EMA on or off adds or drops the EMA parameters of the train state; another non-zero decay is fine.
    bad = {k: (a, b) for k, (a, b) in changes.items() if _incompatible(k) or (
        k == 'optimizer.ema_decay' and (a > 0) != (b > 0))}
    if bad:
        raise ConfigMismatchError(
            f'The config differs from the run in {workdir} (its {CONFIG_FILE}, checkpoint step {step}) in fields its '
            f'checkpoints cannot continue with:\n{_format_changes(bad)}\n'
            f'Use a new --workdir to train this config, or fine-tune from this run with '
            f'--config.init_from.path={workdir_lib.path(workdir)} in a new --workdir.')
    if config.total_steps:  # known without the data: say this before listing changes it would not get to
        check_total_steps(config, int(config.total_steps), workdir)
    if changes:
        log(f'Resuming {workdir} from step {step} with {len(changes)} changed setting(s) (recorded in '
            f'{CONFIG_FILE} under "{HISTORY_KEY}"):\n{_format_changes(changes)}')
    return changes


def check_total_steps(config: ml_collections.ConfigDict, total_steps: int, workdir: str) -> None:
    """A run cannot be shortened below the step its workdir stands at: a clear error instead of a silent exit."""
    step = workdir_step(workdir)
    if step is None or total_steps >= step:
        return
    field = (f'config.total_steps={config.total_steps}' if config.total_steps
             else f'config.num_epochs={config.num_epochs} ({total_steps} steps)')
    raise ValueError(f'{field} is below step {step}, where the checkpoint in {checkpoint_dir(workdir)} stands. Set '
                     f'total_steps to at least {step} to continue ({step} reports the finished run\'s eval), or use '
                     f'a new --workdir.')


def record_config(workdir: str, config: ml_collections.ConfigDict, step: int,
                  changes: dict[str, tuple[Any, Any]]) -> None:
    """Writes config.json (atomically): the config now in use, and under "history" the changes made at each resume."""
    if jax.process_index() != 0:
        return
    path = workdir_lib.path(workdir) / CONFIG_FILE
    history = []
    if path.exists() and step > 0:
        if not changes:
            return  # the same config: nothing new to record
        history = json.loads(path.read_text()).get(HISTORY_KEY, [])
    current = _config_dict(config)
    if changes:
        history.append({'step': step, 'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'), 'changed': {k: {'old': old, 'new': new} for k, (old, new) in changes.items()}})
    if history:
        current[HISTORY_KEY] = history
    workdir_lib.write_atomic(path, json.dumps(current, indent=2))


# Restoring ------------------------------------------------------------------------------------------------------------

_ORBAX_SOURCE = f'{os.sep}orbax{os.sep}'  # in the path of orbax's files: its log records and its coroutines


def _is_abandoned_orbax_read(unraisable) -> bool:
    """Whether an unraisable exception is the noise of a read orbax abandoned on a failure: its TensorStore callback
    finding the event loop closed, or the coroutine itself turning the GeneratorExit of its closing into an error
    (orbax's serialization._read_array_index_and_device_put catches BaseException)."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and 'Event loop is closed' in str(error):
        return True
    code = getattr(unraisable.object, 'cr_code', None)
    return (code is not None and _ORBAX_SOURCE in code.co_filename
            and isinstance(getattr(error, '__cause__', None), GeneratorExit))


def _without_abandoned_read_noise(hook: Callable) -> Callable:
    """``sys.unraisablehook`` that drops the noise of reads orbax abandoned on a failure and passes everything else
    on."""
    if getattr(hook, 'drops_abandoned_reads', False):
        return hook

    def filtered(unraisable):
        if not _is_abandoned_orbax_read(unraisable):
            hook(unraisable)

    filtered.drops_abandoned_reads = True
    return filtered


def abandoned_tasks() -> list[asyncio.Task] | None:
    """The tasks whose coroutine is open in an event loop that is closed, so can never resume: what a failed orbax
    call leaves behind. None where Python keeps no registry of every task (3.11-3.13 do)."""
    registry = getattr(asyncio.tasks, '_all_tasks', getattr(asyncio.tasks, '_scheduled_tasks', None))
    if registry is None:
        return None
    return [task for task in list(registry) if not task.done() and task.get_loop().is_closed()
            and getattr(task.get_coro(), 'cr_frame', None) is not None]


def _close_abandoned_tasks() -> None:
    """Closes the coroutines of abandoned tasks: if the garbage collector closed them (whenever it runs), each would
    complain. Without a registry of tasks, a full collection does it (seconds in a large process)."""
    tasks = abandoned_tasks()
    if tasks is None:
        gc.collect()
        return
    with warnings.catch_warnings():  # the coroutines they created and never awaited, freed with them
        warnings.simplefilter('ignore', RuntimeWarning)
        for task in tasks:
            task._log_destroy_pending = False  # no "Task was destroyed but it is pending!" when collected
            try:
                task.get_coro().close()
            except Exception:  # orbax's read turns the GeneratorExit into its own error
                pass


@contextlib.contextmanager
def quiet_orbax_failures() -> Iterator[None]:
    """A failed orbax read or write logs its traceback from every thread and abandons coroutines that complain when
    closed; the caller reports the failure once, so those are silenced."""
    class _Drop(logging.Filter):  # orbax's own errors and warnings ("Metadata file does not exist") meanwhile
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.levelno >= logging.WARNING and _ORBAX_SOURCE in record.pathname)

    drop, loggers = _Drop(), [logging.getLogger('absl'), logging.getLogger()]
    for lg in loggers:
        lg.addFilter(drop)
    asyncio_level = logging.getLogger('asyncio').level
    logging.getLogger('asyncio').setLevel(logging.CRITICAL)
    sys.unraisablehook = _without_abandoned_read_noise(sys.unraisablehook)  # for good: TensorStore calls back late
    try:
        yield
    except BaseException:
        _close_abandoned_tasks()
        raise
    finally:
        logging.getLogger('asyncio').setLevel(asyncio_level)
        for lg in loggers:
            lg.removeFilter(drop)


def failure_reason(e: BaseException) -> str:
    """One line for a failed restore: the innermost message that says something, without orbax's TensorStore spec."""
    messages = []
    while e is not None:
        messages.append(f'{type(e).__name__}: {str(e).strip()}')
        e = e.__cause__ or e.__context__
    text = messages[-1] if len(messages) > 1 and 'Event loop' not in messages[-1] else messages[0]
    text = text.split('See full TensorStore details')[0].strip().splitlines()[0] if text else text
    return text[:300]


def _shapes(tree: Any) -> list[tuple[int, ...]]:
    return sorted(tuple(getattr(x, 'shape', ())) for x in jax.tree.leaves(tree))


def _check_same_state(manager, step: int, abstract_state: Any) -> None:
    """Raises ConfigMismatchError when the checkpoint's metadata (readable) describe a train state of other shapes:
    that checkpoint is intact but belongs to another model or optimizer, so it must not be moved aside."""
    import orbax.checkpoint as ocp
    item = os.path.join(os.fspath(manager.directory), str(step), 'default')
    try:  # read from the files: a manager that has not saved yet does not know the item's handler
        with quiet_orbax_failures():
            metadata = ocp.StandardCheckpointer().metadata(item).item_metadata
        stored = _shapes(metadata.tree if hasattr(metadata, 'tree') else metadata)
    except Exception:  # unreadable metadata: the checkpoint is damaged; restore() will say how
        return
    expected = _shapes(abstract_state)
    if stored and stored != expected:
        only_stored = sorted(set(stored) - set(expected))[:5]
        only_expected = sorted(set(expected) - set(stored))[:5]
        raise ConfigMismatchError(
            f'The checkpoint at step {step} in {manager.directory} holds a train state of other shapes than this '
            f'config builds ({len(stored)} arrays vs {len(expected)}; only in the checkpoint: {only_stored}, only in '
            f'this config: {only_expected}): the model or the optimizer changed. Use a new --workdir, or fine-tune '
            f'from this run with --config.init_from.path.')


def _move_aside(directory: str, step: int) -> str:
    target_root = os.path.join(os.path.dirname(directory), CORRUPT_DIR)
    os.makedirs(target_root, exist_ok=True)
    target, n = os.path.join(target_root, str(step)), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(target_root, f'{step}-{n}')
    shutil.move(os.path.join(directory, str(step)), target)
    return target


def restore_newest(manager, abstract_state: Any, restore: Callable[[int], Any] | None = None,
                   log: Callable[[str], None] = logging.warning) -> tuple[Any, int | None]:
    """(state, step) of the newest checkpoint of ``manager`` that restores into ``abstract_state``; (None, None) when
    there is none. Newer checkpoints that fail to restore are moved to ``corrupt_checkpoints/`` beside the checkpoint
    folder, each with one warning naming its step and the reason. Raises CheckpointRestoreError, leaving every
    checkpoint in place, when none restores, and ConfigMismatchError when one holds another train state.
    """
    import orbax.checkpoint as ocp
    if restore is None:
        restore = lambda s: manager.restore(s, args=ocp.args.StandardRestore(abstract_state))  # noqa: E731
    directory = os.fspath(manager.directory)
    failed: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        _check_same_state(manager, step, abstract_state)
        try:
            with quiet_orbax_failures():
                state = restore(step)
        except Exception as e:  # orbax and TensorStore raise many types for damaged files
            failed.append((step, failure_reason(e)))
            continue
        if failed and jax.process_index() == 0:
            for bad, reason in failed:
                where = _move_aside(directory, bad)
                log(f'Checkpoint step {bad} in {directory} does not restore ({reason}); resumed from step {step} '
                    f'instead. Step {bad} was moved to {where} (not deleted).')
            manager.reload()
        return state, step
    if failed:
        reasons = '\n'.join(f'  step {s}: {r}' for s, r in failed)
        raise CheckpointRestoreError(
            f'No checkpoint in {directory} restores:\n{reasons}\nThey are left in place. Move the folder aside to '
            f'train from scratch, or use a new --workdir.')
    return None, None


# Saving ---------------------------------------------------------------------------------------------------------------

def _no_space(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        text = str(e)
        if 'No space left on device' in text or 'Disk quota exceeded' in text or "os_error_code='28'" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def checkpoint_bytes(directory: str, state: Any) -> int:
    """What a checkpoint takes: the newest complete one on disk, else the state's bytes (orbax compresses less)."""
    steps = saved_steps(directory)
    if steps:
        return directory_bytes(os.path.join(directory, str(steps[-1])))
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(state)
                   if hasattr(x, 'shape')))


def remove_partial(directory: str, step: int) -> list[str]:
    """Removes the temporary folders of an unfinished save of ``step``; returns them."""
    partial = sorted(glob.glob(os.path.join(glob.escape(directory), f'{step}{_ORBAX_TMP}*')))
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return partial


def save(manager, step: int, state: Any, save_fn: Callable[[], Any] | None = None) -> None:
    """Saves ``state`` at ``step`` and waits for it, so that a failure names its step.

    On a full disk (or quota): removes the partial save and raises CheckpointSaveError naming the folder and the bytes
    a checkpoint needs; the complete checkpoints are untouched. Other failures also remove the partial save.
    """
    import orbax.checkpoint as ocp
    directory = os.fspath(manager.directory)
    try:
        with quiet_orbax_failures():
            if save_fn is None:
                manager.save(step, args=ocp.args.StandardSave(state))
            else:
                save_fn()
            manager.wait_until_finished()
    except Exception as e:
        remove_partial(directory, step)
        if not _no_space(e):
            raise
        needed = checkpoint_bytes(directory, state)
        free = shutil.disk_usage(directory).free
        kept = saved_steps(directory)
        raise CheckpointSaveError(
            errno.ENOSPC,
            f'No space left on the device of {directory} to save step {step}: a checkpoint needs about '
            f'{needed:,} bytes ({needed / 2**20:.1f} MiB) and {free:,} bytes are free. The partial save was removed; '
            f'the complete checkpoints ({kept or "none"}) are intact. Free some space (or lower '
            f'keep_checkpoints, or move the workdir to a larger disk) and rerun the same command to resume.') from None
