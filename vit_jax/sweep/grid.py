"""A sweep's grid: big_vision's ``get_hyper(hyper)`` with ``hyper.product``, ``hyper.sweep`` and ``hyper.zipit``.

A sweep file is a config file (``get_config(arg)``, what every run starts from) with a grid beside it::

    def get_config(arg=''):
        return quickstart_like_config()

    def get_hyper(hyper, arg=''):
        return hyper.product([
            hyper.sweep('model_name', ['vit_ti16', 'vit_s16']),
            hyper.sweep('train_split', ['train[:10%]', 'train']),
        ])

A grid is a list of runs, each a dict of config fields (dotted, as on the command line: ``optimizer.learning_rate``)
to values; a value of None leaves the field at the config's value. Each run is exactly
``python -m vit_jax.main --config FILE[:arg] --workdir DIR/<run> --config.FIELD=VALUE ...``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
from typing import Any, Iterable

import ml_collections

Overrides = dict[str, Any]
SCALARS = (str, int, float, bool)


class SweepError(ValueError):
    """A grid or a sweep workdir that cannot work; the message names the problem and the fix."""


# The grid builders, as big_vision's ``hyper`` module ------------------------------------------------------------------
def sweep(field: str, values: Iterable[Any]) -> list[Overrides]:
    """One run per value of ``field``."""
    return [{field: v} for v in values]


def fixed(field: str, value: Any) -> list[Overrides]:
    """One run setting ``field``: with ``product``, every run sets it."""
    return [{field: value}]


def product(grids: list[list[Overrides]]) -> list[Overrides]:
    """Every combination of one run from each grid (their fields merged)."""
    runs = []
    for combination in itertools.product(*grids):
        runs.append(_merge(combination))
    return runs


def zipit(grids: list[list[Overrides]]) -> list[Overrides]:
    """The i-th runs of every grid merged into one run; the grids must be equally long."""
    lengths = sorted({len(g) for g in grids})
    if len(lengths) > 1:
        raise SweepError(f'hyper.zipit of grids of lengths {[len(g) for g in grids]}: zipped grids must have the same '
                         f'number of runs (use hyper.product to combine grids of different lengths).')
    return [_merge(runs) for runs in zip(*grids)]


def _merge(runs: Iterable[Overrides]) -> Overrides:
    merged: Overrides = {}
    for run in runs:
        for field, value in run.items():
            if field in merged and merged[field] != value:
                raise SweepError(f'Field {field!r} is set twice in one run ({merged[field]!r} and {value!r}): a field '
                                 f'may appear in only one of the grids that hyper.product / hyper.zipit combine.')
            merged[field] = value
    return merged


class hyper:  # noqa: N801 (big_vision's spelling: get_hyper(hyper) uses it like a module)
    """What ``get_hyper(hyper)`` receives."""
    sweep = staticmethod(sweep)
    fixed = staticmethod(fixed)
    product = staticmethod(product)
    zipit = staticmethod(zipit)


# Runs ---------------------------------------------------------------------------------------------------------------
# Short names of common fields in a run's readable name: ``vit_ti16-p4-d32-l2-train_10pct-steps100``.
SHORT = {'patch_size': 'p', 'hidden_size': 'd', 'num_layers': 'l', 'num_heads': 'h', 'mlp_dim': 'mlp',
         'total_steps': 'steps', 'num_epochs': 'ep', 'learning_rate': 'lr', 'resnet_width': 'w', 'batch_size': 'b'}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a grid: its overrides, a stable id (a hash of them) and a readable name."""

    overrides: tuple[tuple[str, Any], ...]  # sorted by field: what the id hashes
    order: tuple[str, ...] = dataclasses.field(default=(), compare=False)  # the grid's order: what the name reads

    @classmethod
    def of(cls, overrides: Overrides) -> 'Run':
        fields = {_field(k): v for k, v in overrides.items() if v is not None}
        return cls(tuple(sorted(fields.items())), tuple(fields))

    @property
    def id(self) -> str:
        """8 hex digits of the SHA-1 of the sorted overrides: the same in every process and for any field order."""
        text = json.dumps([[k, v] for k, v in self.overrides], sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    @property
    def name(self) -> str:
        """The overrides, for people, in the grid's order: ``vit_ti16-p4-d32-train_10pct-steps100``."""
        values = dict(self.overrides)
        parts = []
        for field in self.order or values:
            value = values[field]
            leaf = field.rpartition('.')[2]
            text = str(value) if isinstance(value, str) else f'{SHORT.get(leaf, leaf)}{_flag_value(value)}'
            parts.append(re.sub(r'[^A-Za-z0-9.]+', '_', text.replace('%', 'pct')).strip('_'))
        return '-'.join(p for p in parts if p)[:100] or 'base'

    @property
    def dirname(self) -> str:
        """The run's workdir under the sweep's: ``<name>.<id>``."""
        return f'{self.name}.{self.id}'

    def as_dict(self) -> Overrides:
        return dict(self.overrides)

    def flags(self) -> list[str]:
        """The command-line flags of the overrides: ``--config.train_split=train[:10%]``."""
        return [f'--config.{k}={_flag_value(v)}' for k, v in self.overrides]


def _field(key: str) -> str:
    return key[len('config.'):] if key.startswith('config.') else key


def _flag_value(value: Any) -> str:
    if isinstance(value, tuple):
        return '(' + ','.join(str(v) for v in value) + (',)' if len(value) == 1 else ')')
    return str(value)


# Sweep files --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sweep:
    """A sweep file's grid, each run checked against its config."""

    config: str  # FILE[:arg], what --config of every run is
    runs: tuple[Run, ...]
    base: ml_collections.ConfigDict

    def run_config(self, run: Run) -> ml_collections.ConfigDict:
        """The config of ``run``: the sweep file's ``get_config(arg)`` with the run's overrides."""
        return apply_overrides(self.base, run, self.config)


def load_sweep(spec: str) -> Sweep:
    """Reads ``FILE[:arg]``: ``get_config(arg)`` and ``get_hyper(hyper, arg)``, every run's fields checked."""
    path, _, arg = spec.partition(':')
    if not os.path.exists(path):
        raise SweepError(f'No sweep file at {path!r}: give a file with get_config() and get_hyper(hyper), e.g. '
                         f'experiments/scaling.py.')
    module_name = 'vit_jax_sweep_' + re.sub(r'\W', '_', os.path.splitext(os.path.basename(path))[0])
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    for function in ('get_config', 'get_hyper'):
        if not hasattr(module, function):
            raise SweepError(f'{path} has no {function}(): a sweep file is a config file (get_config(arg="")) with a '
                             f'grid (get_hyper(hyper, arg="")) beside it; see experiments/scaling.py.')
    try:
        base = _call(module.get_config, arg)
        grid = _call(module.get_hyper, hyper, arg)
    except SweepError:
        raise
    except ValueError as e:  # e.g. an unknown FILE:arg
        raise SweepError(f'{spec}: {e}') from None
    if not isinstance(grid, list) or not all(isinstance(r, dict) for r in grid):
        raise SweepError(f'{path}: get_hyper() returned {type(grid).__name__}, not a list of {{field: value}} dicts '
                         f'(build it with hyper.product / hyper.sweep / hyper.zipit).')
    if not grid:
        raise SweepError(f'{spec}: the grid is empty (get_hyper returned no runs): a hyper.sweep over no values, or a '
                         f'hyper.product with an empty grid in it.')
    if not isinstance(base, ml_collections.ConfigDict):
        raise SweepError(f'{path}: get_config() returned {type(base).__name__}, not an ml_collections.ConfigDict.')
    base.lock()
    runs = [Run.of(r) for r in grid]
    seen: dict[str, int] = {}
    for i, run in enumerate(runs):
        if run.id in seen:
            raise SweepError(f'{spec}: runs {seen[run.id]} and {i} of the grid are the same run {run.as_dict()}: '
                             f'drop the duplicate (or sweep a field that tells them apart, e.g. seed).')
        seen[run.id] = i
        check_config(apply_overrides(base, run, spec, index=i), f'{spec}, run {i} {run.as_dict()}')
    return Sweep(spec, tuple(runs), base)


def check_config(config: ml_collections.ConfigDict, where: str) -> None:
    """What main would reject, rejected before the first run starts: a value out of range, a model that cannot be
    built (a field the model does not have: a ViT's patch_size on a ResNet)."""
    from vit_jax import models
    from vit_jax.train.validate import validate_config
    try:
        validate_config(config)
        overrides = {k: v for k, v in config.model.items() if v is not None}
        models.create_model(config.model_name, num_classes=1, image_size=config.image_size, **overrides)
    except ValueError as e:
        raise SweepError(f'{where}: {e}') from None


def _call(function, *args):
    """Calls ``get_config(arg)`` / ``get_hyper(hyper, arg)``, or without ``arg`` where the file's takes none."""
    params = inspect.signature(function).parameters
    return function(*args[:len(params)]) if len(params) < len(args) else function(*args)


def apply_overrides(base: ml_collections.ConfigDict, run: Run, spec: str = '', index: int | None = None,
                    ) -> ml_collections.ConfigDict:
    """``base`` (locked) with ``run``'s overrides; a field it lacks, or a value of the wrong type, is a SweepError."""
    config = copy.deepcopy(base)  # keeps the lock and each field's type (typed None placeholders too)
    where = f'{spec}, run {index if index is not None else run.dirname} {run.as_dict()}'
    for field, value in run.overrides:
        if not isinstance(value, SCALARS + (tuple,)):
            raise SweepError(f'{where}: {field}={value!r} is a {type(value).__name__}; a run sets a field to a '
                             f'str, int, float, bool or tuple (what the command line can pass).')
        parent, _, leaf = field.rpartition('.')
        node = config
        try:
            for part in parent.split('.') if parent else []:
                node = node[part]
            if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
                raise KeyError(leaf)
            node[leaf] = value
        except KeyError:
            raise SweepError(f'{where}: unknown config field {field!r}: the config has no such field. '
                             f'{_suggest(config, field)}Fix the field name in get_hyper().') from None
        except TypeError as e:
            raise SweepError(f'{where}: {field}={value!r}: {e}') from None
    return config


def _suggest(config: ml_collections.ConfigDict, field: str) -> str:
    import difflib
    fields = list(_flatten(config.to_dict()))
    close = difflib.get_close_matches(field, fields, n=1)
    return f'Did you mean {" or ".join(repr(c) for c in close)}? ' if close else ''


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out
