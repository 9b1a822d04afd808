"""Resizing position embeddings to a new patch grid, for fine-tuning at another resolution (ViT paper, section 3.2).

The prefix rows (class token, DeiT's distillation token) are kept; the grid rows are reshaped to (g, g, D) and resized:

- ``'bilinear'``: google-research/vision_transformer, ``scipy.ndimage.zoom(order=1)`` (corners aligned);
- ``'bicubic'``: DeiT and T2T-ViT, ``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``
  (Keys' cubic with a = -0.75, edge pixels repeated), which preserves vector norms better.

Both are written here as separable (out x in) interpolation matrices in numpy, so neither scipy nor torch is needed
and the tests can compare against both.
"""

from __future__ import annotations

import math

import numpy as np

METHODS = ('bilinear', 'bicubic')


def _linear_align_corners(n_in: int, n_out: int) -> np.ndarray:
    """scipy.ndimage.zoom(order=1): output i samples input i * (n_in - 1) / (n_out - 1)."""
    m = np.zeros((n_out, n_in))
    if n_in == 1 or n_out == 1:
        m[:, 0] = 1.0
        return m
    pos = np.arange(n_out) * (n_in - 1) / (n_out - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    m[np.arange(n_out), lo] += 1 - frac
    m[np.arange(n_out), lo + 1] += frac
    return m


def _cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def _cubic_half_pixel(n_in: int, n_out: int) -> np.ndarray:
    """torch bicubic, align_corners=False: output i samples (i + 0.5) * n_in / n_out - 0.5, borders clamped."""
    m = np.zeros((n_out, n_in))
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(src).astype(int)
    t = src - base
    for k in range(-1, 3):
        idx = np.clip(base + k, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), _cubic(t - k))
    return m


def resize_grid(grid: np.ndarray, new_shape: tuple[int, int], method: str) -> np.ndarray:
    """(h, w, D) -> (new_h, new_w, D) with the method's interpolation along each axis."""
    if method not in METHODS:
        raise ValueError(f'posemb_resize={method!r} is not one of {METHODS}.')
    matrix = _linear_align_corners if method == 'bilinear' else _cubic_half_pixel
    rows = matrix(grid.shape[0], new_shape[0])
    cols = matrix(grid.shape[1], new_shape[1])
    out = np.einsum('ih,jw,hwd->ijd', rows, cols, grid.astype(np.float64))
    return out.astype(grid.dtype)


def resize_posemb(posemb: np.ndarray, num_prefix_tokens: int, new_grid: tuple[int, int], method: str,
                  old_grid: tuple[int, int] | None = None) -> np.ndarray:
    """(1, prefix + h*w, D) -> (1, prefix + new_h*new_w, D); the prefix rows are kept as they are.

    ``old_grid`` defaults to the square grid that the row count implies.
    """
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    if old_grid is None:
        side = math.isqrt(grid.shape[0])
        if side * side != grid.shape[0]:
            raise ValueError(f'A position embedding with {grid.shape[0]} grid rows is not a square grid: pass '
                             f'old_grid=(h, w).')
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != grid.shape[0]:
        raise ValueError(f'old_grid={old_grid} does not have the {grid.shape[0]} rows of the position embedding.')
    resized = resize_grid(grid.reshape(*old_grid, -1), new_grid, method)
    return np.concatenate([prefix, resized.reshape(1, new_grid[0] * new_grid[1], -1)], axis=1)
