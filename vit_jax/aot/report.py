"""The printed report of a compiled config, the remedies for one that does not fit, and the plan search.

Every remedy and every planned layout is compiled before it is printed: a line that says "fits" is the compiler's
memory plan, never a guess.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Callable, Iterable

import ml_collections

from vit_jax.aot import compile as aot_compile, targets

GiB = 2 ** 30


def gib(n: float) -> str:
    return f'{n / GiB:.2f} GiB' if abs(n) >= GiB / 10 else f'{n / 2 ** 20:.1f} MiB'


def _bytes(n: float) -> str:
    for unit, size in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= size:
            return f'{n / size:.2f} {unit}'
    return f'{n:.0f} B'


def format_report(c: aot_compile.Compiled) -> str:
    chip, t = c.chip, c.train
    estimate = c.estimate()
    lines = [f'{c.config.model_name}, batch {c.config.batch_size}, on {c.topology.describe()}',
             f'  mesh {c.mesh_shape}, platform {c.platform}, attention {c.attention}, '
             f'jax {aot_compile.jax.__version__}',
             '  per device         train step    eval step',
             f'  arguments        {gib(t.argument_bytes):>12}  {gib(c.eval.argument_bytes):>11}'
             '   (parameters, optimizer state, batch)',
             f'  temporaries      {gib(t.temp_bytes):>12}  {gib(c.eval.temp_bytes):>11}',
             f'  outputs          {gib(t.output_bytes):>12}  {gib(c.eval.output_bytes):>11}'
             f'   ({gib(t.alias_bytes)} of the train step\'s in donated arguments)',
             f'  generated code   {gib(t.code_bytes):>12}  {gib(c.eval.code_bytes):>11}',
             f'  total            {gib(t.total_bytes):>12}  {gib(c.eval.total_bytes):>11}'
             f'   of {gib(chip.memory_bytes)} ({chip.name})']
    for name, step in (('train', t), ('eval', c.eval)):
        if step.out_of_memory:
            lines.append(f'  the {name} step was refused by the compiler: {step.out_of_memory}')
    headroom = aot_compile.USABLE_MEMORY * chip.memory_bytes - c.peak_bytes
    lines.append(f'  FITS, {gib(headroom)} of headroom (within {aot_compile.USABLE_MEMORY:.0%} of the chip\'s memory)'
                 if c.fits else f'  DOES NOT FIT by {gib(-headroom)} (within {aot_compile.USABLE_MEMORY:.0%} of '
                 f'the chip\'s memory)')
    batch = int(c.config.batch_size)
    if c.flops_source == 'compiled':
        lines.append(f'  FLOPs per step     {t.flops * c.topology.num_devices:.3e} ({t.flops:.3e} per device), '
                     f'{t.flops * c.topology.num_devices / batch:.3e} per image (model: '
                     f'{3 * c.model_flops_per_image:.3e} = 3 x forward)')
    else:
        why = ('XLA\'s cost analysis counts a loop body once' if t.loops else
               'this compiler reports no cost analysis')
        lines.append(f'  FLOPs per step     {c.model_flops_per_step():.3e} (the model\'s: 3 x forward; {why})'
                     if c.flops_source == 'model' else
                     '  FLOPs per step     unknown (no analytic count for this model, no cost analysis from this '
                     'compiler)')
    if estimate['bound'] == 'unknown':
        lines.append('  estimate: none (no FLOP count)')
    else:
        against = (f'{chip.bf16_flops / 1e12:.0f} TFLOP/s bf16 and {chip.memory_bandwidth / 1e9:.0f} GB/s'
                   if c.flops_source == 'compiled' else f'{chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, compute only')
        lines.append(f'  estimate (roofline, a lower bound on time): {estimate["step_seconds"] * 1e3:.1f} ms per step, '
                     f'{estimate["bound"]}-bound against {against}; at most {estimate["images_per_second"]:,.0f} '
                     + (f'images/s, MFU {estimate["mfu"]:.0%}' if c.flops_source == 'compiled' else
                        'images/s (at the peak FLOP/s)'))
    collectives = ', '.join(f'{kind} {v["count"]} x, {_bytes(v["bytes"])}' for kind, v in t.collectives.items()
                            if v['count'])
    lines += [f'  collectives per step (per device): {collectives or "none"}',
              f'  compiled here in {t.compile_seconds:.1f} s (train) + {c.eval.compile_seconds:.1f} s (eval)']
    return '\n'.join(lines)


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, object]) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``{'model.remat': True, 'mesh.fsdp': -1, ...}`` set."""
    config = copy.deepcopy(config)
    with config.unlocked():
        for path, value in overrides.items():
            *parents, leaf = path.split('.')
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def as_flags(overrides: dict[str, object]) -> str:
    return ' '.join(f'--config.{k}={v}' for k, v in overrides.items())


@dataclasses.dataclass
class Attempt:
    overrides: dict[str, object]
    compiled: aot_compile.Compiled | None
    error: str = ''

    @property
    def fits(self) -> bool:
        return self.compiled is not None and self.compiled.fits


def _attempt(config, topology, devices, overrides, compile_fn) -> Attempt:
    try:
        return Attempt(overrides, compile_fn(with_overrides(config, overrides), topology, devices))
    except (ValueError, RuntimeError) as e:  # an override the validator or the compiler refuses
        return Attempt(overrides, None, str(e).splitlines()[0][:200])


def _microbatch_options(config, devices: int) -> list[int]:
    per_device = int(config.batch_size) // devices
    current = int(config.optimizer.microbatches)
    return [m for m in (2, 4, 8, 16, 32, 64) if m > current and per_device % m == 0]


def remedies(config: ml_collections.ConfigDict, topology: targets.Topology, devices,
             compile_fn: Callable = aot_compile.compile_config, log: Callable[[str], None] = print) -> list[Attempt]:
    """For a config that does not fit: the remedies in order (more fsdp, remat, micro-batches, scan_layers, a
    smaller batch), each compiled. Each step keeps what the earlier ones applied when they did not suffice on their
    own; the search stops at the first layout that fits. Returns every attempt, the fitting one last."""
    n = topology.num_devices
    applied: dict[str, object] = {}
    attempts = []

    def stages(cfg) -> Iterable[list[dict[str, object]]]:
        if n > 1 and int(cfg.mesh.fsdp) not in (-1, n):
            yield [{'mesh.data': topology.slices, 'mesh.fsdp': -1, 'mesh.tensor': 1}]
        if not cfg.model.remat:
            yield [{'model.remat': True}]
        yield [{'optimizer.microbatches': m} for m in _microbatch_options(cfg, n)]
        if not cfg.model.scan_layers:
            yield [{'model.scan_layers': True}]
        batch = int(cfg.batch_size)
        yield [{'batch_size': batch // k} for k in (2, 4, 8) if (batch // k) % n == 0 and batch % k == 0]

    for options in stages(config):
        for option in options:
            attempt = _attempt(config, topology, devices, {**applied, **option}, compile_fn)
            attempts.append(attempt)
            peak = f'{gib(attempt.compiled.peak_bytes)}' if attempt.compiled else attempt.error
            log(f'  tried {as_flags(attempt.overrides)}: {"fits" if attempt.fits else "does not fit"} ({peak})')
            if attempt.fits:
                return attempts
        if options:
            applied.update(options[-1])
    return attempts


def mesh_options(devices: int, heads: int) -> list[dict[str, int]]:
    """(data, fsdp, tensor) over ``devices``: tensor a divisor of the heads up to 8, fsdp any power of two."""
    out = []
    for tensor in (1, 2, 4, 8):
        if devices % tensor or heads % tensor:
            continue
        rest = devices // tensor
        fsdp = 1
        while fsdp <= rest:
            if rest % fsdp == 0:
                out.append({'mesh.data': rest // fsdp, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor})
            fsdp *= 2
    return out


def plan(config: ml_collections.ConfigDict, topology: targets.Topology, devices, heads: int, budget: int = 24,
         compile_fn: Callable = aot_compile.compile_config, log: Callable[[str], None] = print,
         compiled: aot_compile.Compiled | None = None) -> list[Attempt]:
    """Searches mesh shapes x remat x micro-batches for the fastest estimated step that fits: every candidate is
    compiled (at most ``budget`` of them, the cheapest layouts first: less fsdp / tensor, no remat, fewer
    micro-batches). Returns the fitting attempts, fastest first.

    ``compiled``: the config's own compile, which the candidate with the config's layout reuses."""
    # The config's own layout as a candidate spells it: the mesh resolved, remat None (the model's default) as off.
    own = None if compiled is None else {**{f'mesh.{k}': v for k, v in compiled.mesh_shape.items()},
                                         'model.remat': bool(config.model.remat),
                                         'optimizer.microbatches': int(config.optimizer.microbatches)}
    n = topology.num_devices
    meshes = mesh_options(n, heads)
    meshes.sort(key=lambda m: (m['mesh.tensor'], m['mesh.fsdp']))
    if topology.slices > 1:
        meshes = [m for m in meshes if m['mesh.data'] % topology.slices == 0]
    micro = [1] + _microbatch_options(with_overrides(config, {'optimizer.microbatches': 1}), n)[:2]
    candidates = [{**m, 'model.remat': remat, 'optimizer.microbatches': k}
                  for remat, k, m in itertools.product((False, True), micro, meshes)]
    fitting = []
    for overrides in candidates[:budget]:
        attempt = (Attempt(overrides, compiled) if overrides == own else
                   _attempt(config, topology, devices, overrides, compile_fn))
        if attempt.compiled is None:
            log(f'  {as_flags(overrides)}: {attempt.error}')
            continue
        estimate = attempt.compiled.estimate()
        log(f'  {as_flags(overrides)}: {"fits" if attempt.fits else "does not fit"}, peak '
            f'{gib(attempt.compiled.peak_bytes)}, est. {estimate["step_seconds"] * 1e3:.1f} ms')
        if attempt.fits:
            fitting.append(attempt)
    if len(candidates) > budget:
        log(f'  ({len(candidates) - budget} more layouts not compiled: raise --plan-budget to search them)')
    fitting.sort(key=lambda a: a.compiled.estimate()['step_seconds'])
    return fitting

