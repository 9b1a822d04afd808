"""Device mesh, logical axis rules and shardings: the same train step on one CPU, a GPU or a TPU pod.

The mesh has three axes: ``data`` (replicas, each a slice of the batch), ``fsdp`` (also a slice of the batch, and
parameters sharded along it, ZeRO-3 style) and ``tensor`` (Megatron-style: attention heads and MLP hidden units).
Models name their parameter axes (``embed``, ``heads``, ``mlp``, ...; see ``models/encoder.py``); ``AXIS_RULES`` maps
those names to mesh axes, so no module knows about the mesh.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import numpy as np
from flax.core import meta
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical parameter axis -> mesh axis. Unlisted names (kv, classes, layers, conv_in) are replicated.
AXIS_RULES = (
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('conv_out', 'tensor'),
)


@contextlib.contextmanager
def batch_split_tokens(mesh: Mesh):
    """Within it (while a step is traced), the blocks' tokens keep the batch split over data x fsdp
    (``models/encoder.token_sharding``). Without it XLA's propagation could split the tokens' width over fsdp like
    the parameters' and keep every example on every device: fsdp then planned many times data parallelism's memory."""
    from vit_jax.models import encoder
    with encoder.token_sharding(batch_sharding(mesh)):
        yield


def create_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (whatever the others leave)."""
    devices = jax.devices() if devices is None else devices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.')
    known = int(np.prod([s for s in sizes if s != -1]))
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices: the product of the '
                         f'axis sizes must divide the device count.')
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} uses {int(np.prod(sizes))} of {len(devices)} devices; '
                         'set one axis to -1 to use them all.')
    slices = sorted({getattr(d, 'slice_index', 0) or 0 for d in devices})
    if len(slices) > 1:
        # Multi-slice TPU: only the data axis crosses slices, over the data-centre network (DCN); fsdp and tensor,
        # which communicate every layer, stay within a slice's ICI (MaxText's dcn_data_parallelism).
        from jax.experimental import mesh_utils
        if sizes[0] % len(slices):
            raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} over {len(slices)} slices: the data axis crosses '
                             f'the slices, so it must be a multiple of {len(slices)}; use mesh.data=-1, or more '
                             f'data and less fsdp / tensor.')
        grid = mesh_utils.create_hybrid_device_mesh((sizes[0] // len(slices), *sizes[1:]), (len(slices), 1, 1),
                                                    devices)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape['data'] * mesh.shape['fsdp']


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _spec(names: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """Logical names -> PartitionSpec; a dimension that the mesh axis does not divide stays replicated."""
    rules = dict(AXIS_RULES)
    axes = []
    for name, size in zip(names, shape):
        axis = rules.get(name)
        if axis is not None and (mesh.shape[axis] == 1 or size % mesh.shape[axis] or axis in axes):
            axis = None
        axes.append(axis)
    return P(*axes)


def tree_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """Shardings for a tree of (possibly ``nn.Partitioned``-boxed) arrays or shapes; unboxed leaves are replicated."""

    def leaf(x):
        if isinstance(x, meta.Partitioned):
            return NamedSharding(mesh, _spec(x.names, x.value.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, boxed_tree, is_leaf=lambda x: isinstance(x, meta.Partitioned))
