"""Position-embedding similarity (ViT paper section 4.5, figure 7 centre).

The cosine similarity of each patch's position embedding with every other patch's, shown as one small
(grid x grid) map per patch, laid out on the grid: a learned embedding that encodes 2D distance shows a bright blob
around each patch and row / column stripes.
"""

from __future__ import annotations

import numpy as np

from vit_jax.models.vit import sincos2d_posemb


def patch_position_embeddings(model, params) -> tuple[np.ndarray, str]:
    """The position embeddings of the patch tokens (grid^2, D), prefix tokens dropped, and what they are."""
    g, prefix = model.grid_size, model.num_prefix_tokens
    if model.posemb == 'learned':
        return np.asarray(params['pos_embed'], np.float64)[0, prefix:], 'learned pos_embed'
    if model.posemb == 'sinusoid':  # T2T: a fixed 1D table over the tokens, stored with the parameters
        return np.asarray(params['sinusoid_pos_embed'], np.float64)[0, prefix:], 'fixed 1D sinusoid table (T2T)'
    # big_vision's sincos2d is not a parameter and does not cover the prefix tokens: recompute the fixed table.
    return np.asarray(sincos2d_posemb(g, g, model.hidden_size), np.float64)[0], 'fixed 2D sin-cos table (sincos2d)'


def cosine_similarity(table: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, N) cosine similarity of every row with every other."""
    unit = table / np.maximum(np.linalg.norm(table, axis=-1, keepdims=True), 1e-12)
    return unit @ unit.T


def similarity_grid(similarity: np.ndarray, grid: int) -> np.ndarray:
    """(grid^2, grid^2) -> (grid, grid, grid, grid): [row, col] is the map of patch (row, col) against all others."""
    return similarity.reshape(grid, grid, grid, grid)
