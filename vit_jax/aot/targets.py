"""The hardware a step can be compiled for without it: chips, topology names as users know them, GPU targets.

TPU names follow Cloud TPU's accelerator types: ``v4-8`` ... ``v4-4096`` and ``v5p-8`` ... (the number counts
TensorCores, two per chip, one megacore device per chip), ``v5e-1`` ... ``v5e-256`` (``v5litepod-N``) and ``v6e-1``
... ``v6e-256`` (the number counts chips). GPU hosts are ``h100xN``, ``h200xN``, ``a100xN`` (80 GB) and
``a100-40gbxN`` with N GPUs per host, 1 to 8; ``num_hosts`` such hosts make one cluster. TPU slices, and their
``num_slices`` (multi-slice over the data-centre network), follow MaxText's ``accelerator_to_spec_map.py``: the
topology shape of each slice and 4 chips per host (8 for a one-host v5e/v6e-8).

The chip table holds published peak numbers (dense bf16 FLOP/s, HBM bytes and bandwidth), from the vendors' spec
sheets: Cloud TPU's system-architecture pages (v4, v5e, v5p, v6e), NVIDIA's A100, H100 SXM and H200 datasheets.
"""

from __future__ import annotations

import dataclasses
import math
import re

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                 # as users say it
    platform: str             # 'tpu' or 'gpu'
    memory_bytes: int         # HBM per device
    bf16_flops: float         # dense bf16 peak, FLOP/s per device
    memory_bandwidth: float   # HBM bytes/s per device
    device_kind: str = ''     # what jax calls it


CHIPS = {
    'v4': Chip('TPU v4', 'tpu', 32 * GiB, 275e12, 1228e9, 'TPU v4'),
    'v5e': Chip('TPU v5e', 'tpu', 16 * GiB, 197e12, 819e9, 'TPU v5 lite'),
    'v5p': Chip('TPU v5p', 'tpu', 95 * GiB, 459e12, 2765e9, 'TPU v5'),
    'v6e': Chip('TPU v6e', 'tpu', 32 * GiB, 918e12, 1640e9, 'TPU v6 lite'),
    'a100-40gb': Chip('A100 40 GB', 'gpu', 40 * 10 ** 9, 312e12, 1555e9, 'NVIDIA A100-SXM4-40GB'),
    'a100': Chip('A100 80 GB', 'gpu', 80 * 10 ** 9, 312e12, 2039e9, 'NVIDIA A100-SXM4-80GB'),
    'h100': Chip('H100 SXM 80 GB', 'gpu', 80 * 10 ** 9, 989e12, 3350e9, 'NVIDIA H100 80GB HBM3'),
    'h200': Chip('H200 141 GB', 'gpu', 141 * 10 ** 9, 989e12, 4800e9, 'NVIDIA H200'),
}
TPU_3D = ('v4', 'v5p')  # cores counted in the name, two per chip, a 3-D torus
TPU_CHIP_COUNTS = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e / v6e slices
TPU_3D_CHIP_COUNTS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str                    # as given, e.g. 'v5p-64', 'h100x8'
    chip: Chip
    devices_per_slice: int       # TPU chips per slice, or GPUs per host
    slices: int = 1              # TPU slices, or GPU hosts
    shape: tuple[int, ...] = ()  # the slice's torus (TPU)

    @property
    def num_devices(self) -> int:
        return self.devices_per_slice * self.slices

    @property
    def platform(self) -> str:
        return self.chip.platform

    def describe(self) -> str:
        what = (f'{self.slices} x ' if self.slices > 1 else '') + f'{self.devices_per_slice} {self.chip.name}'
        return f'{self.name}: {what} ({self.num_devices} devices)'


def _shape_3d(chips: int) -> tuple[int, int, int]:
    """The torus of a v4 / v5p slice of this many chips: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ..."""
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = min(range(3), key=lambda j: (shape[j], -j))  # grow the smallest axis, the last first
        shape[i] *= 2
    return tuple(shape)


def _shape_2d(chips: int) -> tuple[int, int]:
    side = 2 ** (int(math.log2(chips)) // 2)
    return (side, chips // side)


def known_names() -> list[str]:
    return (['v4-8 ... v4-8192', 'v5p-8 ... v5p-8192', 'v5e-1 ... v5e-256 (v5litepod-N)', 'v6e-1 ... v6e-256']
            + [f'{name}xN (N = 1..8 GPUs per host)' for name in CHIPS if CHIPS[name].platform == 'gpu'])


def parse(name: str, num_slices: int = 1, num_hosts: int = 1) -> Topology:
    """A topology by its user-facing name; ValueError listing the known names for anything else."""
    unknown = ValueError(f'unknown topology {name!r}; known: {", ".join(known_names())}')
    if num_slices < 1 or num_hosts < 1:
        raise ValueError(f'--num-slices={num_slices} and --num-hosts={num_hosts} must be >= 1.')
    gpu = re.fullmatch(r'([a-z0-9-]+)x(\d+)', name)
    if gpu and gpu.group(1) in CHIPS and CHIPS[gpu.group(1)].platform == 'gpu':
        n = int(gpu.group(2))
        if not 1 <= n <= 8:
            raise ValueError(f'{name}: 1 to 8 GPUs per host; for more, give --num-hosts.')
        if num_slices != 1:
            raise ValueError(f'{name}: --num-slices is for TPU slices; GPU clusters take --num-hosts.')
        return Topology(name, CHIPS[gpu.group(1)], n, num_hosts)
    tpu = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', name)
    if not tpu:
        raise unknown
    if num_hosts != 1:
        raise ValueError(f'{name}: a TPU slice has its hosts already; --num-hosts is for GPU clusters.')
    generation, count = tpu.group(1).replace('v5litepod', 'v5e'), int(tpu.group(2))
    if generation in TPU_3D:
        chips = count // 2
        if count % 2 or chips not in TPU_3D_CHIP_COUNTS:
            raise ValueError(f'{name}: {generation} slices count TensorCores, two per chip: one of '
                             f'{", ".join(f"{generation}-{2 * c}" for c in TPU_3D_CHIP_COUNTS)}.')
        shape = _shape_3d(chips)
    else:
        chips = count
        if chips not in TPU_CHIP_COUNTS:
            raise ValueError(f'{name}: {generation} slices of {", ".join(map(str, TPU_CHIP_COUNTS))} chips.')
        shape = _shape_2d(chips)
    return Topology(name, CHIPS[generation], chips, num_slices, shape)


def tpu_topology_name(topology: Topology) -> str:
    """get_topology_desc's name of one slice, e.g. 'v5p:4x4x4', 'v5e:2x2'."""
    generation = next(g for g, chip in CHIPS.items() if chip is topology.chip)
    return f'{generation}:{"x".join(map(str, topology.shape))}'


def tpu_host_bounds(topology: Topology) -> tuple[int, int, int]:
    """Chips per host: 2x2x1 (4), or the whole slice for a one-host v5e/v6e of up to 8 chips."""
    if topology.chip.name in ('TPU v5e', 'TPU v6e') and topology.devices_per_slice <= 8:
        return (*topology.shape, 1) if len(topology.shape) == 2 else topology.shape
    return (2, 2, 1) if topology.devices_per_slice >= 4 else (1, 1, 1)


# GpuTargetConfigProto (text) of each GPU: what XLA's GPU compiler needs to know of a device it cannot query. The
# device numbers are the ones the GPUs report (XLA's own test specs, xla/tools/hlo_opt/gpu_specs); the cuDNN and
# CUDA runtime versions are those of the installed compiler (filled in by ``gpu_target_config``).
GPU_DEVICE_INFO = {
    'h100': dict(core_count=132, fpus_per_core=128, shared_memory_per_core=233472,
                 shared_memory_per_block_optin=232448, memory_bandwidth=3352320000000, l2_cache_size=52428800,
                 clock_rate_ghz=1.98, device_memory_size=84929347584, capability=(9, 0),
                 description='NVIDIA H100 80GB HBM3'),
    'h200': dict(core_count=132, fpus_per_core=128, shared_memory_per_core=233472,
                 shared_memory_per_block_optin=232448, memory_bandwidth=4800000000000, l2_cache_size=52428800,
                 clock_rate_ghz=1.98, device_memory_size=150754820096, capability=(9, 0),
                 description='NVIDIA H200'),
    'a100': dict(core_count=108, fpus_per_core=64, shared_memory_per_core=167936,
                 shared_memory_per_block_optin=166912, memory_bandwidth=2039000000000, l2_cache_size=41943040,
                 clock_rate_ghz=1.41, device_memory_size=85031714816, capability=(8, 0),
                 description='NVIDIA A100-SXM4-80GB'),
    'a100-40gb': dict(core_count=108, fpus_per_core=64, shared_memory_per_core=167936,
                      shared_memory_per_block_optin=166912, memory_bandwidth=1555200000000, l2_cache_size=41943040,
                      clock_rate_ghz=1.41, device_memory_size=42298834944, capability=(8, 0),
                      description='NVIDIA A100-SXM4-40GB'),
}


def gpu_target_config(chip_name: str, cudnn: tuple[int, int, int], cuda_runtime: tuple[int, int, int]) -> str:
    """The GpuTargetConfigProto text of a GPU (``GPU_DEVICE_INFO``'s key) for this cuDNN and CUDA runtime."""
    info = GPU_DEVICE_INFO[chip_name]
    major, minor = info['capability']
    return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {info["shared_memory_per_core"]}
  threads_per_core_limit: 2048
  core_count: {info["core_count"]}
  fpus_per_core: {info["fpus_per_core"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {info["memory_bandwidth"]}
  l2_cache_size: {info["l2_cache_size"]}
  clock_rate_ghz: {info["clock_rate_ghz"]}
  device_memory_size: {info["device_memory_size"]}
  shared_memory_per_block_optin: {info["shared_memory_per_block_optin"]}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version {{
  major: {cuda_runtime[0]}
  minor: {cuda_runtime[1]}
  patch: {cuda_runtime[2]}
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {cudnn[0]}
  minor: {cudnn[1]}
  patch: {cudnn[2]}
}}
device_description_str: "{info["description"]}"
'''
