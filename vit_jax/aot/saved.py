"""Compiled steps saved by ``python -m vit_jax.aot --save FILE`` and loaded by ``vit_jax.main --compiled FILE``.

The file holds the serialized train and eval executables (``jax.experimental.serialize_executable``) with what
they were built for: the config (as JSON), the devices (kind and count) and the jax version. Loading checks all
three before anything runs and refuses a mismatch in one line naming it: an executable is a program for one config
on one kind of hardware, and running it with another would give wrong shapes or wrong numbers, not an error.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import jax

FORMAT = 'vit_jax.aot/1'


def _config_json(config) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _devices_of(devices) -> dict[str, Any]:
    devices = list(devices)
    return {'device_kind': devices[0].device_kind, 'num_devices': len(devices)}


def save(path: str, compiled) -> None:
    """Writes ``compiled`` (``compile.Compiled`` with its executables) to ``path``."""
    from jax.experimental import serialize_executable
    if compiled.train.out_of_memory or compiled.eval.out_of_memory:
        raise ValueError(f'{compiled.topology.name}: the compiler refused the steps (out of memory): nothing to save.')
    if compiled.train_executable is None or compiled.eval_executable is None:
        raise ValueError('the executables were not kept: compile with keep_executables=True and the eval step')
    payload = {'format': FORMAT, 'jax': jax.__version__, 'topology': compiled.topology.name,
               'devices': {'device_kind': compiled.device_kind, 'num_devices': compiled.topology.num_devices},
               'config': _config_json(compiled.config),
               'train': serialize_executable.serialize(compiled.train_executable),
               'eval': serialize_executable.serialize(compiled.eval_executable)}
    with open(path, 'wb') as f:
        pickle.dump(payload, f)


def _difference(saved: dict, current: dict, prefix: str = 'config') -> str | None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, '<absent>'), current.get(key, '<absent>')
        if isinstance(a, dict) and isinstance(b, dict):
            found = _difference(a, b, f'{prefix}.{key}')
            if found:
                return found
        elif a != b:
            return f'{prefix}.{key}={b!r} here, {a!r} in the file'
    return None


def check(path: str, config) -> dict[str, Any]:
    """The file's contents, if it is one of ``--save`` built with this jax for ``config``; ValueError naming the
    first difference otherwise. Needs no devices: ``vit_jax.main`` calls it before anything starts."""
    try:
        with open(path, 'rb') as f:
            payload = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f'--compiled={path}: cannot read it ({e}); write one with python -m vit_jax.aot --save') \
            from None
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise ValueError(f'--compiled={path} is not a file of python -m vit_jax.aot --save ({FORMAT}).')
    if payload['jax'] != jax.__version__:
        raise ValueError(f'--compiled={path} was built with jax {payload["jax"]}, this is jax {jax.__version__}: '
                         f'compile it again with this jax.')
    difference = _difference(payload['config'], _config_json(config))
    if difference:
        raise ValueError(f'--compiled={path} was built for another config: {difference}. Compile it again for this '
                         f'config, or run without --compiled.')
    return payload


def load(path: str, config, devices=None) -> tuple[Any, Any]:
    """(train step, eval step) from ``path``, for ``config`` on ``devices`` (default: this process's); ValueError
    naming the first difference in jax version, config or devices."""
    from jax.experimental import serialize_executable
    payload = check(path, config)
    devices = jax.devices() if devices is None else list(devices)
    here = _devices_of(devices)
    if here != payload['devices']:
        raise ValueError(f'--compiled={path} was built for {payload["topology"]} ({payload["devices"]["num_devices"]} '
                         f'x {payload["devices"]["device_kind"]}); this host has {here["num_devices"]} x '
                         f'{here["device_kind"]}.')
    if devices[0].platform == 'cpu':
        # A CPU program may call the kernels' FFI targets, which exist once their libraries are loaded.
        from vit_jax import kernels
        kernels.register_targets()
    return tuple(serialize_executable.deserialize_and_load(*payload[name], execution_devices=devices)
                 for name in ('train', 'eval'))
