"""Mean attention distance (ViT paper section 4.5, figure 7 right; "attention distance" in appendix D.7).

For each head, the distance in image pixels between a query patch and the key patches, weighted by the attention
weights, averaged over queries and images. Patch tokens only: the prefix tokens' rows and columns are dropped and the
remaining weights are not renormalised, as the paper computes it (a head that attends to the class token counts less).
"""

from __future__ import annotations

import numpy as np


def patch_distances(grid: int, pixels_per_patch: float) -> np.ndarray:
    """(grid^2, grid^2) Euclidean distances in pixels between patch centres, row-major as the tokens."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    dr = rows[:, None] - rows[None, :]
    dc = cols[:, None] - cols[None, :]
    return pixels_per_patch * np.sqrt(dr ** 2 + dc ** 2)


def mean_attention_distance(attention: np.ndarray, grid: int, pixels_per_patch: float,
                            num_prefix_tokens: int = 1) -> np.ndarray:
    """Attention (..., B, H, N, N) -> mean distance per example and head (..., B, H) in pixels.

    ``sum_k A[q, k] d(q, k)`` over patch keys, averaged over patch queries; average the result over B yourself (so
    that batches can be accumulated).
    """
    a = np.asarray(attention)[..., num_prefix_tokens:, num_prefix_tokens:]  # float32 maps stay float32: 0.5 GB
    if a.shape[-1] != grid * grid:
        raise ValueError(f'attention over {a.shape[-1]} patch tokens does not fit a {grid}x{grid} grid.')
    dtype = np.promote_types(a.dtype, np.float32)
    per_query = np.einsum('...qk,qk->...q', a.astype(dtype, copy=False), patch_distances(grid, pixels_per_patch)
                          .astype(dtype))
    return per_query.mean(axis=-1)
