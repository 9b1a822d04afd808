"""Parameter counts and the table of models, computed with ``jax.eval_shape`` (nothing is allocated)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from vit_jax.models.registry import create_model, list_models, model_info


def count_params(model: nn.Module) -> int:
    """Number of parameters (frozen ones included, as the papers count them)."""
    size = model.image_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))['params'])
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(meta.unbox(shapes)))


def model_table(markdown: bool = False, num_classes: int = 1000) -> str:
    """One row per registered model: family, parameters at 224 px / 1000 classes, the paper's ImageNet top-1."""
    rows = [('model', 'family', 'params', 'paper (ImageNet top-1)')]
    for name in list_models():
        info = model_info(name)
        model = create_model(name, num_classes=num_classes)
        if hasattr(model, 'scan_layers'):  # the same parameters, stacked; traced once instead of once per block
            model = model.clone(scan_layers=True)
        rows.append((name, info.family, f'{count_params(model):,}', info.paper or '-'))
    if markdown:
        lines = ['| ' + ' | '.join(rows[0]) + ' |', '|' + '---|' * len(rows[0])]
        return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
