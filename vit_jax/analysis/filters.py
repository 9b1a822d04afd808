"""The patch embedding's filters (ViT paper section 4.5, figure 7 left): their top principal components.

The kernel (p, p, C, D) holds D filters of p x p x C pixels. Centred over the D filters, its principal components are
pixel patterns, shown as RGB images; the paper's figure shows the first 28 of ViT-L/32. They resemble plausible basis
functions for a low-dimensional representation of each patch's fine structure.
"""

from __future__ import annotations

import numpy as np


def embedding_filters(kernel: np.ndarray, num_components: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (p, p, C, D) -> (components (n, p, p, C) with unit norm, explained variance ratio (n,))."""
    kernel = np.asarray(kernel, np.float64)
    if kernel.ndim != 4:
        raise ValueError(f'expected a patch-embedding kernel (p, p, C, D), got shape {kernel.shape}.')
    p, q, c, d = kernel.shape
    filters = kernel.reshape(p * q * c, d).T  # (D, pixels): one row per output feature
    filters = filters - filters.mean(axis=0)
    _, s, vt = np.linalg.svd(filters, full_matrices=False)
    variance = s ** 2
    ratio = variance / max(variance.sum(), 1e-30)
    n = min(num_components, len(s))
    return vt[:n].reshape(n, p, q, c), ratio[:n]


def to_rgb(component: np.ndarray) -> np.ndarray:
    """A component (p, p, C) scaled to [0, 1] for display (its own min..max); one channel is shown as grey."""
    x = component - component.min()
    x = x / max(x.max(), 1e-12)
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x[..., :3]
