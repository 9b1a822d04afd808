"""The train and eval steps of a config, compiled for a topology that is not here, and what the compiler planned.

Runs in the compiler's process (``compilers.run``): ``jax.experimental.topologies`` gives the target's devices, the
training system builds its mesh, model (whose ``platform`` is the target's: cuDNN attention on an H100, nothing of
the CPU's), objective, optimizer and shardings over them exactly as ``vit_jax.main`` would (``train.loop.build_steps``),
and the steps are lowered on abstract arrays and compiled. The report reads the compiled program: XLA's memory plan
per device, its FLOP and byte counts, and its collectives (``hlo.collectives``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from typing import Any

import jax
import ml_collections

from vit_jax.aot import compilers, hlo, targets

# The compiler's memory plan does not hold the runtime's own reservations (XLA's allocator, cuDNN workspaces,
# NCCL / ICI buffers): a plan within this fraction of the chip's memory is reported as fitting.
USABLE_MEMORY = 0.95


def topology_devices(topology: targets.Topology) -> list:
    """The devices of ``topology``, made without the hardware (``jax.experimental.topologies``)."""
    from jax.experimental import topologies
    if topology.platform == 'tpu':
        extra = {'chip_config_name': 'megacore'} if len(topology.shape) == 3 else {}
        desc = topologies.get_topology_desc(platform='tpu', topology_name=targets.tpu_topology_name(topology),
                                            chips_per_host_bounds=targets.tpu_host_bounds(topology),
                                            num_slices=topology.slices, **extra)
    else:
        chip = next(name for name, c in targets.CHIPS.items() if c is topology.chip)
        config = targets.gpu_target_config(chip, compilers.package_version('nvidia-cudnn-cu12'),
                                           compilers.package_version('nvidia-cuda-runtime-cu12'))
        desc = topologies.get_topology_desc(platform='cuda', target_config=config,
                                            topology=f'1x{topology.slices}x{topology.devices_per_slice}')
    devices = list(desc.devices)
    if len(devices) != topology.num_devices:
        raise RuntimeError(f'{topology.describe()}: the compiler made {len(devices)} devices')
    return devices


@dataclasses.dataclass
class StepReport:
    """What the compiler planned for one step on each device."""
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, dict[str, float]]
    compile_seconds: float
    loops: bool = False  # a loop in the program: XLA's FLOP and byte counts hold its body once
    out_of_memory: str = ''  # the compiler's refusal (the TPU compiler will not build a program over its HBM)

    @property
    def total_bytes(self) -> int:
        """Live at the step's peak: arguments, temporaries, outputs not aliased to a donated argument, code."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes + self.code_bytes


_REQUIRED = re.compile(r'total memory required for HLO temporaries \(([\d.]+)([KMGT]?)\)')
_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def _compile(lowered):
    """(executable, seconds, None), or (None, seconds, the refusal) where the compiler ran out of the chip's memory."""
    start = time.perf_counter()
    try:
        return lowered.compile(), time.perf_counter() - start, None
    except Exception as e:  # noqa: BLE001 - JaxRuntimeError; anything but running out of memory is raised
        if 'RESOURCE_EXHAUSTED' not in str(e):
            raise
        return None, time.perf_counter() - start, str(e)


@contextlib.contextmanager
def _fresh_compiles():
    """Compiles inside skip JAX's persistent compilation cache (``jax_compilation_cache_dir``). With jax 0.10.2, a CPU
    executable that the cache loaded serializes without its code: the saved step then fails in ``vit_jax.main
    --compiled`` with ``NOT_FOUND: Function ... not found``. TPU and GPU targets never meet the cache: their compiler
    process runs without it (``compilers.COMMON_ENVIRONMENT``)."""
    from jax.experimental.compilation_cache import compilation_cache
    enabled = jax.config.jax_enable_compilation_cache
    compilation_cache.reset_cache()  # JAX decides once per process whether to use the cache: decide again
    jax.config.update('jax_enable_compilation_cache', False)
    try:
        yield
    finally:
        jax.config.update('jax_enable_compilation_cache', enabled)
        compilation_cache.reset_cache()


def out_of_memory_report(message: str, seconds: float) -> StepReport:
    """What a refusal says of the step: the temporaries it needed (argument and output sizes are not in it)."""
    required = _REQUIRED.search(message)
    temp = int(float(required.group(1)) * _UNITS[required.group(2)]) if required else 0
    return StepReport(0, 0, 0, temp, 0, 0.0, 0.0, hlo.collectives(''), seconds,
                      out_of_memory=message.strip().splitlines()[0][:400])


def read_compiled(compiled, seconds: float) -> StepReport:
    if compiled is None:
        return StepReport(0, 0, 0, 0, 0, 0.0, 0.0, hlo.collectives(''), 0.0)
    memory = compiled.memory_analysis()
    text = compiled.as_text()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    return StepReport(argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
                      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
                      code_bytes=int(memory.generated_code_size_in_bytes), flops=float(cost.get('flops', 0.0)),
                      bytes_accessed=float(cost.get('bytes accessed', 0.0)),
                      collectives=hlo.collectives(text), compile_seconds=seconds, loops=hlo.has_loops(text))


@dataclasses.dataclass
class Compiled:
    """A config compiled for a topology: the executables and the report's numbers."""
    config: ml_collections.ConfigDict
    topology: targets.Topology
    mesh_shape: dict[str, int]
    platform: str
    attention: str
    train: StepReport
    eval: StepReport
    model_flops_per_image: float   # forward, analytic (vit_jax.models.flops)
    device_kind: str = ''
    train_executable: Any = None
    eval_executable: Any = None

    @property
    def chip(self) -> targets.Chip:
        return self.topology.chip

    @property
    def peak_bytes(self) -> int:
        return max(self.train.total_bytes, self.eval.total_bytes)

    @property
    def fits(self) -> bool:
        if self.train.out_of_memory or self.eval.out_of_memory:
            return False
        return self.peak_bytes <= USABLE_MEMORY * self.chip.memory_bytes

    @property
    def flops_source(self) -> str:
        """'compiled': XLA's cost analysis of the program (TPU, without loops); 'model': the analytic count, 3 x the
        forward pass (the GPU compiler reports no cost analysis, and XLA's counts a loop body once: scan_layers,
        micro-batches); 'none' where neither exists."""
        if self.train.flops > 0 and not self.train.loops:
            return 'compiled'
        return 'model' if math.isfinite(self.model_flops_per_image) else 'none'

    def model_flops_per_step(self) -> float:
        """Forward + backward FLOPs of the global batch: the analytic count, or the compiled program's."""
        batch = int(self.config.batch_size)
        if math.isfinite(self.model_flops_per_image):
            return 3 * self.model_flops_per_image * batch
        return self.train.flops * self.topology.num_devices  # no analytic count (T2T-ViT): the compiled program's

    def estimate(self) -> dict[str, float]:
        """A roofline estimate of the train step: the compiled program's FLOPs and bytes per device against the
        chip's peak bf16 FLOP/s and memory bandwidth. A lower bound on the step time (it assumes perfect overlap
        and ignores communication); the images/s and MFU it implies are upper bounds. Where the compiler gives no
        cost analysis (GPU), the model's FLOPs alone bound it (compute only)."""
        source = self.flops_source
        flops = self.train.flops if source == 'compiled' else self.model_flops_per_step() / self.topology.num_devices
        if source == 'none' or not flops:
            return {'step_seconds': math.nan, 'compute_seconds': math.nan, 'memory_seconds': math.nan,
                    'images_per_second': math.nan, 'mfu': math.nan, 'bound': 'unknown', 'flops_source': source}
        compute = flops / self.chip.bf16_flops
        memory = self.train.bytes_accessed / self.chip.memory_bandwidth if source == 'compiled' else 0.0
        seconds = max(compute, memory)
        batch = int(self.config.batch_size)
        return {'step_seconds': seconds, 'compute_seconds': compute,
                'memory_seconds': memory if source == 'compiled' else math.nan,
                'images_per_second': batch / seconds,
                # From the model's FLOPs alone the step runs at peak by construction: no MFU to speak of.
                'mfu': (self.model_flops_per_step() / (seconds * self.chip.bf16_flops * self.topology.num_devices)
                        if source == 'compiled' else math.nan),
                'bound': 'compute' if compute >= memory else 'memory', 'flops_source': source}

    def to_json(self) -> dict[str, Any]:
        return {'topology': self.topology.name, 'chip': self.chip.name, 'devices': self.topology.num_devices,
                'mesh': self.mesh_shape, 'platform': self.platform, 'attention': self.attention,
                'model': self.config.model_name, 'batch_size': int(self.config.batch_size),
                'train': {**dataclasses.asdict(self.train), 'total_bytes': self.train.total_bytes},
                'eval': {**dataclasses.asdict(self.eval), 'total_bytes': self.eval.total_bytes},
                'chip_memory_bytes': self.chip.memory_bytes, 'fits': self.fits,
                'headroom_bytes': self.chip.memory_bytes - self.peak_bytes,
                'model_flops_per_image': self.model_flops_per_image,
                'compiled_flops_per_image': (self.train.flops * self.topology.num_devices / int(self.config.batch_size)
                                             if self.train.flops and not self.train.loops else None),
                'flops_source': self.flops_source,
                'estimate': self.estimate(), 'jax': jax.__version__}


def compile_config(config: ml_collections.ConfigDict, topology: targets.Topology, devices=None,
                   keep_executables: bool = False, eval_step: bool = True) -> Compiled:
    """Compiles the train step and the eval step ``vit_jax.main`` would run with ``config`` for ``topology``
    (``eval_step=False``: the train step alone, its eval report zeros)."""
    from vit_jax import models
    from vit_jax.models import encoder
    from vit_jax.train import loop
    devices = topology_devices(topology) if devices is None else devices
    steps = loop.build_steps(config, devices=devices, info=loop.dataset_info_for_compile(config))
    state = steps.abstract_state()
    train_batch, eval_batch = steps.batch_shapes()
    with _fresh_compiles() if keep_executables and topology.platform == 'cpu' else contextlib.nullcontext():
        train, train_seconds, train_refused = _compile(steps.train_step.lower(state, train_batch))
        evaluate, eval_seconds, eval_refused = (
            _compile(steps.eval_step.lower(state.params, state.objective_params, state.frozen, eval_batch))
            if eval_step else (None, 0.0, None))
    model = steps.model
    tokens = model.grid_size ** 2 + model.num_prefix_tokens
    per_device = max(int(config.batch_size) // max(steps.batch_shards, 1), 1)
    attention = encoder.resolve_attention(model.attention_impl, model.dtype, model.hidden_size // model.num_heads,
                                          (per_device, tokens, model.num_heads), model.platform)
    try:
        flops = float(models.flops(model))
    except ValueError:
        flops = math.nan
    return Compiled(config=config, topology=topology, mesh_shape=dict(steps.mesh.shape), platform=model.platform,
                    attention=attention,
                    train=(out_of_memory_report(train_refused, train_seconds) if train_refused else
                           read_compiled(train, train_seconds)),
                    eval=(out_of_memory_report(eval_refused, eval_seconds) if eval_refused else
                          read_compiled(evaluate, eval_seconds)), model_flops_per_image=flops,
                    device_kind=devices[0].device_kind, train_executable=train if keep_executables else None,
                    eval_executable=evaluate if keep_executables else None)
