"""``export(params, model, out_dir)``: write the deployment artefacts and measure them against JAX.

    report = export(params, model, 'out/vit', eval_batches=data.eval_iterator(config))

Writes into ``out_dir`` (everything goes to a temporary directory beside it first, so a failure leaves nothing behind
and an earlier export intact) the files of ``artefacts.FILES`` and returns the report it saved there: file sizes,
CPU latency per image at batch 1, max |logits - JAX logits| and top-1 agreement with JAX for every PyTorch variant,
and whether the safetensors state dict reads back through ``load_params`` to the very same parameters.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import statistics
import tempfile
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax.core import meta

from vit_jax import timing
from vit_jax.export import artefacts, convert
from vit_jax.export.report import write_report

log = logging.getLogger(__name__)

CHUNK = 64  # images per forward when comparing: bounds the memory of large eval batches


def num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def _torch_fn(module: Any) -> Callable[[np.ndarray], np.ndarray]:
    def run(images: np.ndarray) -> np.ndarray:  # NHWC numpy -> NCHW torch, as a deployment feeds it
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))).numpy()
    return run


def time_per_image(fns: Mapping[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median and min milliseconds of each function, timed round-robin (see ``vit_jax.timing``)."""
    times = timing.round_robin_seconds(fns, warmup, repeats)
    return {k: {'median': 1e3 * statistics.median(t), 'min': 1e3 * min(t)} for k, t in times.items()}


def compare(fns: Mapping[str, Callable[[np.ndarray], np.ndarray]], batches: Iterable[Mapping[str, np.ndarray]],
            max_examples: int | None = None) -> dict[str, Any]:
    """Runs every function on the real (mask 1) images of ``batches``; max |diff| and top-1 agreement vs ``jax``."""
    diff = {k: 0.0 for k in fns if k != 'jax'}
    agree = {k: 0.0 for k in fns if k != 'jax'}
    correct = {k: 0 for k in fns}
    count, labelled, first = 0, True, None
    for batch in batches:
        images = np.asarray(batch['images'], np.float32)
        mask = np.asarray(batch.get('mask', np.ones(len(images)))) > 0
        images = images[mask]
        labels = np.asarray(batch['labels'])[mask] if 'labels' in batch else None
        labelled &= labels is not None
        if max_examples is not None:
            images = images[:max_examples - count]
            labels = None if labels is None else labels[:len(images)]
        if not len(images):
            break
        first = images[:1] if first is None else first
        for start in range(0, len(images), CHUNK):
            x = images[start:start + CHUNK]
            outputs = {k: np.asarray(fn(x), np.float32) for k, fn in fns.items()}
            ref = outputs['jax']
            for k, out in outputs.items():
                if labels is not None and out.ndim == 2:  # (unpooled models have no one prediction per image)
                    correct[k] += int((out.argmax(-1) == labels[start:start + CHUNK]).sum())
                if k != 'jax':
                    diff[k] = max(diff[k], float(np.abs(out - ref).max()))
                    agree[k] += float((out.argmax(-1) == ref.argmax(-1)).mean()) * len(x)  # per image
        count += len(images)
        if max_examples is not None and count >= max_examples:
            break
    if first is None:
        raise ValueError('No input images to compare on (an empty eval split?).')
    result = {'examples': count, 'first': first, 'max_abs_logit_diff': diff,
              'top1_agreement': {k: v / count for k, v in agree.items()}}
    if labelled:
        result['top1_accuracy'] = {k: v / count for k, v in correct.items()}
    return result


def _round_trip(path: str, model: Any, params: Mapping[str, Any]) -> str:
    """'exact' when ``load_params(path, model)`` gives back exactly ``params``, else what differs."""
    from vit_jax.checkpoints import load_params
    try:
        loaded = convert.flatten(load_params(path, model))
    except Exception as e:  # a layout that load_params cannot map back (reported, not fatal)
        return f'failed: {type(e).__name__}: {str(e).splitlines()[0]}'
    ours = convert.flatten(params)
    different = sorted(k for k in ours if k not in loaded or not np.array_equal(loaded[k], ours[k]))
    return 'exact' if not different and loaded.keys() == ours.keys() else f'failed: differs at {different[:5]}'


def _foreign_files(out_dir: str) -> list[str]:
    """What ``out_dir`` holds besides the files an export writes (a user's notes, a deploy/ folder)."""
    return sorted(set(os.listdir(out_dir)) - set(artefacts.FILES)) if os.path.isdir(out_dir) else []


def _check_out_dir(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise convert.ExportError(f'{out_dir} exists and is a file, not an export folder: choose another --out.')
    foreign = _foreign_files(out_dir)
    if foreign:
        raise convert.ExportError(
            f'{out_dir} holds files that are not an earlier export\'s: {foreign}. An export writes and replaces only '
            f'{list(artefacts.FILES)}: move the others away, or choose another --out.')


def _prepare_out_dir(out_dir: str) -> list[str]:
    """Checks OUT_DIR is new, empty or an earlier export; creates its missing parents and returns them (removed
    again on failure)."""
    _check_out_dir(out_dir)
    created, parent = [], os.path.dirname(out_dir)
    while not os.path.exists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(created):
        os.mkdir(d)
    return created


def _install(tmp: str, out_dir: str) -> None:
    """Moves the finished export from ``tmp`` into ``out_dir``: a new folder is renamed into place; into an existing
    one, each file replaces its earlier version (the report last), and nothing else there is touched."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp (and safetensors) make private files; the artefacts are for sharing
    for f in os.listdir(tmp):
        os.chmod(os.path.join(tmp, f), 0o666 & ~umask)
    if not os.path.exists(out_dir):
        os.rename(tmp, out_dir)
        return
    _check_out_dir(out_dir)  # again: files may have appeared while the export ran
    for f in sorted(os.listdir(tmp), key=lambda f: f == artefacts.REPORT):
        os.replace(os.path.join(tmp, f), os.path.join(out_dir, f))
    os.rmdir(tmp)


def measure(model: Any, params: Mapping[str, Any], module: torch.nn.Module, directory: str,
            batches: Iterable[Mapping[str, np.ndarray]], max_examples: int | None, warmup: int,
            repeats: int) -> dict[str, Any]:
    """Compares JAX with torch eager and the artefacts in ``directory`` on ``batches``, then times them at batch 1."""
    apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
    device_params = jax.device_put(params)
    with artefacts.qnnpack(), artefacts.quiet():
        loaded = {'torch_eager': module, **artefacts.load_models(directory)}
        fns = {'jax': lambda x: np.asarray(apply(device_params, jnp.asarray(x))),
               **{k: _torch_fn(m) for k, m in loaded.items()}}
        compared = compare(fns, batches, max_examples)
        log.info('Timing at batch 1 (%d warm-up and %d timed runs per variant) ...', warmup, repeats)
        image = compared.pop('first')
        jax_image = jnp.asarray(image)
        torch_image = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
        timed = {'jax': lambda: apply(device_params, jax_image).block_until_ready(),
                 **{k: (lambda m=m: m(torch_image)) for k, m in loaded.items()}}
        load = [round(os.getloadavg()[0], 2)]
        with torch.no_grad():
            latency = time_per_image(timed, warmup, repeats)
        load.append(round(os.getloadavg()[0], 2))
    return {**compared, 'latency': latency, 'load_average': load}


def export(params: Mapping[str, Any], model: Any, out_dir: str, eval_batches: Iterable[Mapping] | None = None, *,
           name: str | None = None, inputs: str | None = None, source: Mapping[str, Any] | None = None,
           max_eval_examples: int | None = None, warmup: int = 3, repeats: int = 20, threads: int | None = None,
           seed: int = 0) -> dict[str, Any]:
    """Writes the artefacts of ``model`` with ``params`` into ``out_dir`` and returns (and saves) the report.

    ``eval_batches``: ``{'images' NHWC, 'labels', 'mask'}`` batches (``vit_jax.data.eval_iterator``) on which to
    compare with JAX, described by ``inputs`` in the report; without them, 8 random normal images.
    """
    artefacts.require_qnnpack()  # every check that can fail comes before the first file is written
    config = convert.model_config(model)
    convert.check_supported(config)
    out_dir = os.path.abspath(out_dir)
    threads = threads or num_cores()
    torch.set_num_threads(threads)
    params = jax.device_get(meta.unbox(params))
    module = convert.to_torch(config, params)
    if eval_batches is None:
        size = config['image_size']
        eval_batches = [{'images': np.random.default_rng(seed).normal(size=(8, size, size, 3)).astype(np.float32)}]
        inputs = inputs or '8 random normal images (no dataset given)'
    inputs = inputs or 'the given eval batches'

    created = _prepare_out_dir(out_dir)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=os.path.dirname(out_dir))
    try:
        log.info('Writing the TorchScript fp32, int8 qnnpack and lite models ...')
        notes = artefacts.write_models(module, tmp)
        layout, arrays = convert.checkpoint_arrays(config, params)
        state_path = os.path.join(tmp, artefacts.STATE_DICT)
        artefacts.write_state_dict(arrays, state_path, {'layout': layout, 'model': name or config['module']})
        round_trip = _round_trip(state_path, model, params)
        log.info('Comparing with JAX on %s ...', inputs)
        measured = measure(model, params, module, tmp, eval_batches, max_eval_examples, warmup, repeats)

        sizes = {f: os.path.getsize(os.path.join(tmp, f)) for f in artefacts.FILES if f != artefacts.REPORT}
        latency = measured['latency']
        report = {
            'model': {'name': name, 'family': convert.family(config), 'config': config,
                      'num_params': int(sum(v.size for v in convert.flatten(params).values()))},
            'source': dict(source or {}),
            'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'versions': {'torch': torch.__version__, 'jax': jax.__version__},
            'input': 'NCHW float32 (B, 3, S, S), normalised as in training; JAX takes the NHWC transpose',
            'output': 'logits (B, classes); distilled DeiT: the mean of its two heads',
            'quantization': 'dynamic int8 (torch.ao.quantization.quantize_dynamic, nn.Linear, qint8), engine qnnpack',
            'optimize_for_mobile': notes['optimize_for_mobile'],
            'threads': {'torch': threads, 'jax': f'XLA CPU default ({num_cores()} cores)'},
            'load_average': measured['load_average'],  # 1-minute, before / after timing: other jobs slow it
            'files': {f: {'bytes': b} for f, b in sizes.items()},
            'int8_vs_fp32_size': sizes[artefacts.INT8] / sizes[artefacts.FP32],
            'state_dict': {'layout': layout, 'round_trip': round_trip},
            'latency_ms_per_image': {'batch': 1, 'warmup': warmup, 'repeats': repeats, 'statistic': 'median',
                                     **{k: v['median'] for k, v in latency.items()}},
            'latency_ms_per_image_min': {k: v['min'] for k, v in latency.items()},
            'comparison': {'inputs': inputs, 'examples': measured['examples']},
            'max_abs_logit_diff': measured['max_abs_logit_diff'],
            'top1_agreement': measured['top1_agreement'],
        }
        if 'top1_accuracy' in measured:
            report['top1_accuracy'] = measured['top1_accuracy']
        if config.get('dtype', 'float32') != 'float32':
            report['note'] = f'JAX computes in {config["dtype"]}, PyTorch in float32: expect larger logit diffs.'
        write_report(report, os.path.join(tmp, artefacts.REPORT))
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:  # the parents this call made, outermost last
            shutil.rmtree(created[-1], ignore_errors=True)
        raise
    return report
