"""What a step is compiled for: the platform of the mesh's devices, handed to the model as its ``platform`` field.

Every hardware choice follows the devices a program is compiled for, decided here and nowhere else: 'auto'
attention (cuDNN's fused attention on a GPU of compute capability >= 8.0 in bf16/fp16, the C++ kernel on a CPU where
it ran faster, XLA's attention otherwise), the MKL products, anything timed on the CPU. The models never ask the host
process what it runs on, so a step compiled from a CPU host for an H100 or a TPU slice (``vit_jax.aot``) builds,
times and calls nothing of the CPU's, and the same model compiled for the CPU on a GPU host takes the CPU's kernels.

Platform names (``models.encoder.PORTABLE`` and the model's validator): 'cpu', 'tpu', 'rocm',
'cuda:<major>.<minor>' (the compute capability: 'cuda:9.0' for an H100, 'cuda:8.0' for an A100), and 'portable' for
a model built without a mesh (XLA's own ops only, which run anywhere).
"""

from __future__ import annotations

from typing import Any, Iterable

import jax

from vit_jax.models.encoder import PORTABLE


def device_platform(device: Any) -> str:
    """One device's platform name: 'cpu', 'tpu', 'rocm' or 'cuda:<compute capability>' (a device of a deviceless
    topology included: it carries its target's compute capability)."""
    platform = str(device.platform).lower()
    if platform in ('gpu', 'cuda'):
        capability = str(getattr(device, 'compute_capability', '') or '')
        if not capability:
            raise ValueError(f'{device}: a CUDA device without a compute capability; give the GPU target its '
                             f'gpu_device_info.cuda_compute_capability.')
        major, _, minor = capability.partition('.')
        return f'cuda:{int(major)}.{int(minor or 0)}'
    if platform in ('cpu', 'tpu', 'rocm'):
        return platform
    return PORTABLE


def platform_of(mesh_or_devices: jax.sharding.Mesh | Iterable[Any]) -> str:
    """The platform a program over these devices (a mesh, or a list of devices) is compiled for. A mesh mixing
    platforms or GPU generations raises: its program would be one for two targets."""
    devices = mesh_or_devices.devices.flat if isinstance(mesh_or_devices, jax.sharding.Mesh) else mesh_or_devices
    platforms = {device_platform(d) for d in devices}
    if len(platforms) != 1:
        raise ValueError(f'the mesh mixes platforms {sorted(platforms)}: one program is compiled for one of them; '
                         f'build the mesh over devices of one kind.')
    return platforms.pop()


def host_platform() -> str:
    """The platform of this process's default devices: for the tools that compute where they run (predict, analyse,
    export's reference outputs, the bench), never for a step compiled for a mesh."""
    return platform_of(jax.local_devices()[:1])
